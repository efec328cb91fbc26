"""diffusers models: attachment through `diffusers.hooks`, and handlers for diffusers' own layers.

Imported only when a model containing diffusers modules is sparsified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import Timesteps

from .. import ops
from ..nn.base import SparseHandler, register_dense_safe, register_handler
from ..nn.state import LayerRecord
from ..regions import Geometry


HOOK_NAME = "sparsedit_spatial"
_POINT = Geometry()

register_dense_safe(Timesteps)


class SparseHook(ModelHook):
    """Routes a module's forward through its sparse handler."""

    def __init__(self, handler: SparseHandler):
        super().__init__()
        self.handler = handler

    def new_forward(self, module, *args, **kwargs):
        return self.handler.forward(*args, **kwargs)


class HookAttach:
    @staticmethod
    def attach(handler: SparseHandler) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(handler.module)
        if registry.get_hook(HOOK_NAME) is not None:
            raise RuntimeError(
                f"{handler.name} already carries a {HOOK_NAME} hook; call `sparsedit.unsparsify_(model)` first."
            )
        hook = SparseHook(handler)
        registry.register_hook(hook, HOOK_NAME)
        handler.original = hook.fn_ref.original_forward
        handler.module._sparsedit_handler = handler

    @staticmethod
    def detach(handler: SparseHandler) -> None:
        handler.module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        handler.module.__dict__.pop("_sparsedit_handler", None)


# -- spatial self-attention (UNet2DModel attention blocks, the VAE mid block) -------------------------------------------


@register_handler(Attention)
class SpatialAttentionHandler(SparseHandler):
    """Self-attention over a feature map's pixels (SIGE's attention extension).

    Sparse: only the active pixels are queries; keys and values come from every pixel of the current map (cached
    from the capture, with the active pixels' rows recomputed in place); GroupNorm uses the capture's statistics.
    The output changes at the active pixels only, an approximation (attention is global). In exact mode the layer
    runs densely and marks its whole output changed. Text-conditioned (cross-)attention, masks and spatial norms run
    densely until their adapter lands.
    """

    kind = "attention"

    def _plain(self, x, args, kwargs) -> bool:
        a = self.module
        return (
            x.dim() == 4
            and not args
            and all(v is None for k, v in kwargs.items() if k in ("encoder_hidden_states", "attention_mask"))
            and isinstance(a.processor, (AttnProcessor2_0, AttnProcessor))
            and a.spatial_norm is None
            and a.norm_q is None
            and a.norm_k is None
        )

    def macs_per_position(self, out):
        a = self.module
        c, inner = a.to_q.in_features, a.to_q.out_features
        hw = out.shape[-2] * out.shape[-1]
        return 4 * c * inner + 2 * hw * inner  # q, k, v, out projections + QK^T and AV

    def _tokens(self, x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    def _normalize(self, tokens, mean, rstd):
        """The group norm of pixels given as tokens `[B, n, C]`, with given per-(sample, group) statistics."""
        gn = self.module.group_norm
        if gn is None:
            return tokens
        b, n, c = tokens.shape
        g = gn.num_groups
        t = tokens.reshape(b, n, g, c // g).float()
        t = (t - mean[:, None, :, None]) * rstd[:, None, :, None]
        return (t.reshape(b, n, c) * gn.weight + gn.bias).to(tokens.dtype)

    def capture(self, key, out, x=None, *args, **kwargs):
        if x is None or not self._plain(x, args, kwargs):
            return super().capture(key, out)
        a = self.module
        extra = {}
        tokens = self._tokens(x)
        if a.group_norm is not None:
            g = a.group_norm.num_groups
            var, mean = torch.var_mean(x.reshape(x.shape[0], g, -1).float(), dim=-1, unbiased=False)
            extra = {"mean": mean, "rstd": torch.rsqrt(var + a.group_norm.eps)}
            h = self._normalize(tokens, mean, extra["rstd"])
        else:
            h = tokens
        self.state.cache.put(key, out=out, k=a.to_k(h), v=a.to_v(h), **extra)

    def sparse(self, x, *args, **kwargs):
        st = self.state
        key = st.key(self.name)
        if not self._plain(x, args, kwargs):
            return self.original(x, *args, **kwargs)  # untracked output: counts as changed everywhere
        entry = st.cache.get(key)
        buf = entry["out"]
        b, c, h, w = x.shape
        macs = self.macs_dense(buf)
        region_in = st.region_of(x)
        if st.config.exact and bool(region_in.any()):
            full = torch.ones_like(region_in)
            self.write_dense(buf, self.original(x), full)
            st.record(LayerRecord(self.name, self.kind, (h, w), macs, macs, 1.0, "exact attention"))
            st.set_region(buf, full)
            return buf
        region = self.output_region(region_in, _POINT, (h, w))
        active = region.any(dim=0).reshape(-1).nonzero()[:, 0]  # the union over the batch: shared query rows
        n = int(active.numel())
        if n:
            a = self.module
            tokens = self._tokens(x)[:, active]
            hn = self._normalize(tokens, entry["mean"], entry["rstd"]) if a.group_norm is not None else tokens
            k_all, v_all = entry["k"], entry["v"]
            old_k, old_v = k_all[:, active].clone(), v_all[:, active].clone()
            st.remember(lambda: (k_all.index_copy_(1, active, old_k), v_all.index_copy_(1, active, old_v)))
            k_all.index_copy_(1, active, a.to_k(hn))
            v_all.index_copy_(1, active, a.to_v(hn))
            heads = a.heads
            d = k_all.shape[-1] // heads
            q = a.to_q(hn).view(b, n, heads, d).transpose(1, 2)
            k = k_all.view(b, -1, heads, d).transpose(1, 2)
            v = v_all.view(b, -1, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * d).to(q.dtype)
            o = a.to_out[1](a.to_out[0](o))
            if a.residual_connection:
                o = o + tokens
            o = o / a.rescale_output_factor
            flat = buf.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: the cache is channels-last
            index = (torch.arange(b, device=x.device)[:, None] * (h * w) + active).reshape(-1)
            old = ops.gather_tokens(flat, index)
            st.remember(lambda: ops.scatter_tokens(flat, old, index))
            ops.scatter_tokens(flat, o.reshape(-1, c), index)
        hw = h * w
        a = self.module
        inner = a.to_q.out_features
        sparse_macs = b * n * (4 * c * inner + 2 * hw * inner)  # k, v rows recomputed for the active pixels only
        st.record(LayerRecord(self.name, self.kind, (h, w), macs, sparse_macs, n / hw))
        active_region = torch.zeros(hw, dtype=torch.bool, device=x.device)
        active_region[active] = True
        out_region = active_region.reshape(1, h, w).expand(b, h, w)
        st.set_region(buf, out_region)
        return buf
