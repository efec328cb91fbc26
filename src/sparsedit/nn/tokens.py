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


__all__ = ["ActiveTokens", "attend", "group_norm_tokens", "joint_kv", "pixel_tokens", "sparse_joint_attention"]

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
        self.write_rows(state, k_all, attn.to_k(h))
        self.write_rows(state, v_all, attn.to_v(h))

    def write_rows(self, state, buf: torch.Tensor, rows: torch.Tensor) -> None:
        """Write `rows` `[B, n, ...]` at the active positions of a cached token tensor `buf` `[B, H*W, ...]` in place
        (undo-logged): the keys or values of a layer, for instance."""
        active = self.index
        if state.needs_undo(buf):
            old = buf[:, active].clone()
            state.remember(lambda: buf.index_copy_(1, active, old))
        buf.index_copy_(1, active, rows.to(buf.dtype))


def _heads(attn, t: torch.Tensor, norm=None) -> torch.Tensor:
    """`[B, n, heads * d]` projections as `[B, heads, n, d]`, with a per-head norm (SD3's RMS qk-norm) if given."""
    b, n, inner = t.shape
    t = t.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)
    return t if norm is None else norm(t)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """`[B, heads, n, d]` as `[B, n, heads * d]`."""
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


def joint_kv(attn, hidden: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of a joint (MMDiT) attention over the image tokens `hidden` and then the `context` tokens
    (the order of diffusers' `JointAttnProcessor2_0`), keys after their qk-norm, laid out `[B, N + m, heads * d]`:
    what a capture keeps per layer and step, and what `sparse_joint_attention` reads."""
    k, v = _flat(_heads(attn, attn.to_k(hidden), attn.norm_k)), attn.to_v(hidden)
    if context is None:
        return k, v
    kc = _flat(_heads(attn, attn.add_k_proj(context), attn.norm_added_k))
    return torch.cat([k, kc], dim=1), torch.cat([v, attn.add_v_proj(context)], dim=1)


def sparse_joint_attention(state, attn, active: ActiveTokens, rows: torch.Tensor, k_all: torch.Tensor,
                           v_all: torch.Tensor, context: torch.Tensor | None = None,
                           context_at: ActiveTokens | None = None):  # fmt: skip
    """Joint (MMDiT, SD3's `JointAttnProcessor2_0`) attention for the active image rows of one layer over every key.

    The rows' keys and values are written into the layer's cached ones (undo-logged) and their queries attend over all
    of them. With `context` (the context's normalised tokens, recomputed), the context's keys and values are written
    at `context_at` too, and its queries attend as well; without, the cached context keys and values stand (the
    context stream is the capture's). Exact for one layer (the cached keys of inactive rows are what the layer would
    compute); approximate across layers (inactive rows keep the capture's hidden states).

    Args:
        rows: the active image rows' normalised hidden states `[B, n, C]`.
        k_all, v_all: the capture's keys and values of this layer and step, `[B, N (+ m), heads * d]` (`joint_kv`).
        context: `[B, m, C']`, or `None`; `context_at`: the context's positions in `k_all` (after the image's).

    Returns:
        The rows' attention output `[B, n, C]`, and the context's (`None` without `context`, or for a
        `context_pre_only` layer its raw attention output, as the processor returns it).
    """
    b = rows.shape[0]
    q = _heads(attn, attn.to_q(rows), attn.norm_q)
    k_rows, v_rows = joint_kv(attn, rows)
    active.write_rows(state, k_all, k_rows)
    active.write_rows(state, v_all, v_rows)
    if context is not None:
        kc = _flat(_heads(attn, attn.add_k_proj(context), attn.norm_added_k))
        vc = attn.add_v_proj(context)
        context_at.write_rows(state, k_all, kc)
        context_at.write_rows(state, v_all, vc)
        q = torch.cat([q, _heads(attn, attn.add_q_proj(context), attn.norm_added_q)], dim=2)
    k, v = _heads(attn, k_all), _heads(attn, v_all)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, q.shape[2], v_all.shape[-1]).to(q.dtype)
    n = rows.shape[1]
    out_rows, out_context = o[:, :n], (o[:, n:] if context is not None else None)
    if out_context is not None and not attn.context_pre_only:
        out_context = attn.to_add_out(out_context)
    return attn.to_out[1](attn.to_out[0](out_rows)), out_context
