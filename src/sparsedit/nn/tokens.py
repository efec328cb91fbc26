"""Token-sparse computation: the active set of a layer that acts per token (a feature map's pixels as rows, or a
transformer's sequence), the token counterpart of a convolution's active tiles (`regions.BlockIndex`).

Both are an *active set* with one contract: built once per edit from the layer's output region (memoised by the
plan), they gather the active rows of an input, scatter computed rows into the layer's cached output in place
(undo-logged, so an uncommitted edit rolls back), and tag that output with its changed region for the layers
downstream; the handler records what it computed (`LayerRecord`). Attention adds one operation: refreshing the cached
keys and values of the active rows, so active queries attend to every key with the edit's own rows up to date.
A transformer adapter (UNet `Transformer2DModel`, and the DiT families of the transformer-engine issue) builds on these
instead of growing private helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..regions import Geometry


__all__ = ["ActiveTokens", "attend", "group_norm_tokens", "pixel_tokens"]

_POINT = Geometry()  # a per-token layer: each output row reads its own input row


def pixel_tokens(x: torch.Tensor) -> torch.Tensor:
    """`[B, H*W, C]` rows of a `[B, C, H, W]` map (a view for a channels-last map)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def group_norm_tokens(tokens: torch.Tensor, gn, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """GroupNorm of pixels given as tokens `[B, n, C]`, with given per-(sample, group) statistics."""
    b, n, c = tokens.shape
    g = gn.num_groups
    t = tokens.reshape(b, n, g, c // g).float()
    t = (t - mean[:, None, :, None]) * rstd[:, None, :, None]
    t = t.reshape(b, n, c)
    if gn.affine:
        t = t * gn.weight + gn.bias
    return t.to(tokens.dtype)


def attend(attn, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attn`'s heads, scaled dot-product attention and output projection, for queries `q_in` and given keys/values
    (diffusers' `Attention` modules: `heads`, `to_q`, `to_out`)."""
    heads = attn.heads
    b, n, _ = q_in.shape
    q = attn.to_q(q_in)
    d = q.shape[-1] // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * d).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](o))


class ActiveTokens:
    """The tokens a layer recomputes in one sparse run: flat indices into its `H*W` positions, shared by the batch (the
    union of the samples' regions, so the active rows of every sample form one dense batch).

    Attributes:
        index: `[n]` int64 positions, ascending.
        size: `(H, W)` of the map the positions index.
    """

    def __init__(self, index: torch.Tensor, size: tuple[int, int]):
        self.index = index
        self.size = size

    @classmethod
    def of(cls, state, handler, x: torch.Tensor) -> ActiveTokens:
        """The active set of `handler`'s output on input `x`: its output region at this resolution (in approximate
        mode, the plan's region), built once per edit and looked up by the following runs."""
        h, w = x.shape[-2:]
        region = handler.output_region(state.region_of(x), _POINT, (h, w))
        index = state.memo(("tokens", id(region)), (region,), lambda: region.any(dim=0).reshape(-1).nonzero()[:, 0])
        return cls(index, (h, w))

    @property
    def count(self) -> int:
        return int(self.index.numel())

    @property
    def fraction(self) -> float:
        """The active fraction of the positions (a layer record's `active_fraction`)."""
        return self.count / (self.size[0] * self.size[1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The active rows `[B, n, C]` of a `[B, C, H, W]` map."""
        return pixel_tokens(x)[:, self.index]

    def scatter(self, state, buf: torch.Tensor, tokens: torch.Tensor | None) -> None:
        """Write `[B, n, C]` rows at the active positions of the cached map `buf` in place (undo-logged), and tag
        `buf` with the active positions as its changed region. `tokens=None` with no active rows writes nothing."""
        b, c, h, w = buf.shape
        active = self.index
        if active.numel():
            flat = pixel_tokens(buf)
            index = (torch.arange(b, device=buf.device)[:, None] * (h * w) + active).reshape(-1)
            if state.needs_undo(buf):
                old = ops.gather_tokens(flat, index)
                state.remember(lambda: ops.scatter_tokens(flat, old, index))
            ops.scatter_tokens(flat, tokens.reshape(-1, c).to(buf.dtype), index)

        def build():
            mask = torch.zeros(h * w, dtype=torch.bool, device=buf.device)
            mask[active] = True
            return mask.reshape(1, h, w).expand(b, h, w)

        state.set_region(buf, state.memo(("token region", id(active), b, h, w), (active,), build))

    def refresh_kv(self, state, attn, k_all: torch.Tensor, v_all: torch.Tensor, h: torch.Tensor) -> None:
        """Recompute the cached self-attention keys and values of the active rows from their normalised inputs `h`,
        in place (undo-logged)."""
        active = self.index
        if state.needs_undo(k_all) or state.needs_undo(v_all):
            old_k, old_v = k_all[:, active].clone(), v_all[:, active].clone()
            state.remember(lambda: (k_all.index_copy_(1, active, old_k), v_all.index_copy_(1, active, old_v)))
        k_all.index_copy_(1, active, attn.to_k(h))
        v_all.index_copy_(1, active, attn.to_v(h))
