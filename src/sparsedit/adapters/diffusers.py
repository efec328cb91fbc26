"""diffusers models: attachment through `diffusers.hooks`, and handlers for diffusers' own layers.

Imported only when a model containing diffusers modules is sparsified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import Timesteps
from diffusers.models.resnet import ResnetBlock2D

from .. import ops
from ..nn.base import IDENTITY, Prologue, SparseHandler, register_dense_safe, register_handler
from ..nn.blocks import _no_store
from ..nn.state import LayerRecord, Mode
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


# -- ResNet blocks ------------------------------------------------------------------------------------------------------


@register_handler(ResnetBlock2D)
class ResnetBlock2DHandler(SparseHandler):
    """diffusers' ResNet block, fused: GroupNorm+SiLU inside each conv's gather, the time embedding folded into the
    second GroupNorm's shift, the shortcut add inside conv2's scatter (written straight into the block's output).

    Exact mode, recomputed GroupNorm statistics, `output_scale_factor != 1` and up/down-sampling resnets keep the plain
    forward (each child runs sparse on its own, and region tracking joins them).
    """

    kind = "resnet"

    def check_supported(self):
        m = self.module
        cfg = self.state.config
        self.fused = (
            not cfg.exact
            and cfg.norm_stats == "frozen"
            and m.upsample is None
            and m.downsample is None
            and m.output_scale_factor == 1.0
            and m.time_embedding_norm in ("default", "scale_shift")
            and isinstance(m.norm1, torch.nn.GroupNorm)
            and isinstance(m.norm2, torch.nn.GroupNorm)
        )

    def _handler(self, module):
        return module.__dict__["_sparsedit_handler"]

    def _temb(self, temb):
        m = self.module
        if m.time_emb_proj is None or temb is None:
            return None
        if not m.skip_time_act:
            temb = m.nonlinearity(temb)
        return m.time_emb_proj(temb)

    def forward(self, x, temb=None, *args, **kwargs):
        st = self.state
        if not self.fused or st.mode not in (Mode.CAPTURE, Mode.SPARSE) or args or kwargs or x.dim() != 4:
            return self.original(x, temb, *args, **kwargs)
        return self._capture(x, temb) if st.mode is Mode.CAPTURE else self.sparse(x, temb)

    def _capture(self, x, temb):
        """The diffusers forward, op for op (so the capture is bit-identical), storing only what sparse runs read."""
        m, st = self.module, self.state
        key = st.key(self.name)
        with _no_store(st):
            h = m.nonlinearity(m.norm1(x))
        h = m.conv1(h)  # stored: conv2's gather reads it
        t = self._temb(temb)
        with _no_store(st):
            if m.time_embedding_norm == "default":
                if t is not None:
                    h = h + t[:, :, None, None]
                h = m.norm2(h)
            else:
                scale, shift = torch.chunk(t[:, :, None, None], 2, dim=1)
                h = m.norm2(h) * (1 + scale) + shift
            h = m.conv2(m.dropout(m.nonlinearity(h)))
        shortcut = m.conv_shortcut(x) if m.conv_shortcut is not None else x
        out = (shortcut + h) / m.output_scale_factor
        st.cache.put(key, out=out)
        return out

    def sparse(self, x, temb=None):
        m, st = self.module, self.state
        out = self.buffer(st.key(self.name))
        act = self._handler(m.nonlinearity)
        norm1 = self._handler(m.norm1)
        p1 = act.fold(x, st.key(act.name), norm1.fold(x, st.key(norm1.name), IDENTITY))
        h = self._handler(m.conv1).sparse(x, p1)
        t = self._temb(temb)
        norm2_handler = self._handler(m.norm2)
        norm2 = norm2_handler.prologue(h, st.key(norm2_handler.name))
        scale, shift = norm2.scale, norm2.shift
        if m.time_embedding_norm == "default":
            if t is not None:
                shift = shift + scale * t.to(scale.dtype)
        else:
            ts, tt = torch.chunk(t.to(scale.dtype), 2, dim=1)
            scale, shift = scale * (1 + ts), shift * (1 + ts) + tt
        p2 = act.fold(h, st.key(act.name), Prologue(scale, shift))
        if m.dropout.training and m.dropout.p > 0:
            raise RuntimeError(f"{self.name}: Dropout in training mode is random; call model.eval() before editing.")
        skip = self._handler(m.conv_shortcut).sparse(x) if m.conv_shortcut is not None else x
        return self._handler(m.conv2).sparse(h, p2, residual=skip, into=out)
