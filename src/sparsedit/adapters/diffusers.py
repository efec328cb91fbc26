"""diffusers models: attachment through `diffusers.hooks`, and handlers for diffusers' own layers.

Imported only when a model containing diffusers modules is sparsified.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..config import AttentionMode, NormStats
from ..nn.base import IDENTITY, Prologue, SparseHandler, handler_of, register_dense_safe, register_handler
from ..nn.blocks import _no_store
from ..nn.layers import group_stats
from ..nn.state import LayerRecord, Mode
from ..nn.tokens import ActiveTokens, attend, group_norm_tokens, pixel_tokens
from ..nn.tracking import untracked


HOOK_NAME = "sparsedit_spatial"

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

    @staticmethod
    def prepare(model: torch.nn.Module) -> None:
        pair_token_consumers(model)


def pair_token_consumers(model: torch.nn.Module) -> None:
    """Mark each ResNet whose output diffusers' own cross-attention blocks pass to a transformer and to nothing else.

    In `CrossAttnDownBlock2D`, `CrossAttnUpBlock2D` and `UNetMidBlock2DCrossAttn` (their library `forward`, not a
    subclass's or an instance's), `hidden_states = attn(resnet(hidden_states, temb), ...)`: the transformer is the
    ResNet output's only reader, and its sparse runs read it at the active pixels only (GroupNorm with the
    capture's statistics, proj_in, the residual add: all per pixel; other pixels' keys and values come from the
    transformer's own cache). So the capture does not store that output (SD 1.5 at 512 px: 5 MiB per 320-channel
    map per step, about 0.6 GiB of a 20-step img2img capture), and sparse runs write conv2's tiles into scratch.
    The capture checks the hand-over by identity (`SparseState.claim_store`); a ResNet whose output reaches its
    transformer some other way is stored as before."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn

    blocks = (CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn)
    for block in model.modules():
        cls = type(block)
        if cls not in blocks or "forward" in block.__dict__ or block._forward_hooks or block._forward_pre_hooks:
            continue
        for resnet, attn in zip(block.resnets, block.attentions):
            r, a = handler_of(resnet), handler_of(attn)
            # (a fused ResNet is approximate mode: in exact mode the transformer runs its plain forward)
            if isinstance(r, ResnetBlock2DHandler) and r.fused and isinstance(a, Transformer2DHandler) and a.fusable:
                r.feeds_tokens = a.reads_resnet = True


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
    sets_own_region = True  # the scatter tags the buffer; a plain run's output counts as changed everywhere

    @property
    def covers_map(self) -> bool:
        return self.state.config.exact  # exact mode runs attention over the whole map

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

    def capture(self, key, out, x=None, *args, **kwargs):
        if x is None or not self._plain(x, args, kwargs):
            return super().capture(key, out)
        a = self.module
        extra = {}
        h = pixel_tokens(x)
        if a.group_norm is not None:
            mean, rstd = group_stats(x, a.group_norm.num_groups, a.group_norm.eps)
            extra = {"mean": mean, "rstd": rstd}
            h = group_norm_tokens(h, a.group_norm, mean, rstd)
        self.state.cache.put(key, out=out, k=a.to_k(h), v=a.to_v(h), **extra)

    def sparse(self, x, *args, **kwargs):
        st = self.state
        key = st.key(self.name)
        if not self._plain(x, args, kwargs):
            return self.original(x, *args, **kwargs)  # untracked output: counts as changed everywhere
        st.start_laps()
        entry = st.cache.get(key)
        buf = entry["out"]
        b, c, h, w = x.shape
        macs = self.macs_dense(buf)
        region_in = st.region_of(x)
        if (st.config.exact or st.config.attention is AttentionMode.DENSE) and st.any(region_in):
            full = st.full(region_in.shape, region_in.device)
            out = self.write_dense(buf, self.original(x), full)
            st.lap("dense")
            note = "exact attention" if st.config.exact else "dense attention (policy)"
            st.record(LayerRecord(self.name, self.kind, (h, w), macs, macs, 1.0, note))
            st.set_region(out, full)
            return out
        active = ActiveTokens.of(st, self, x)
        n = active.count
        a = self.module
        tokens = None
        if n:
            tokens = active.gather(x)
            hn = (
                group_norm_tokens(tokens, a.group_norm, entry["mean"], entry["rstd"])
                if a.group_norm is not None
                else tokens
            )
            active.refresh_kv(st, a, entry["k"], entry["v"], hn)
            o = attend(a, hn, entry["k"], entry["v"])
            if a.residual_connection:
                o = o + tokens
            tokens = o / a.rescale_output_factor
        st.lap("compute")
        active.scatter(st, buf, tokens)
        st.lap("scatter")
        hw = h * w
        inner = a.to_q.out_features
        sparse_macs = b * n * (4 * c * inner + 2 * hw * inner)  # k, v rows recomputed for the active pixels only
        st.record(LayerRecord(self.name, self.kind, (h, w), macs, sparse_macs, n / hw))
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
    feeds_tokens = False  # its output goes only to a fused transformer (set by `pair_token_consumers`)
    # conv1's output is computed where conv2 reads it instead of cached on maps of at least this many pixels. On
    # smaller maps the ring around a region is a large share of it while the map costs little to keep: SD 1.5 at
    # 512 px, 1.2% stroke, the ring costs 13% of conv1's sparse MACs at 64 px and 34% at 32 px, but 60-69% at 16 and
    # 8 px, where conv1's outputs hold 8 MiB per step (of 46).
    recompute_conv1_from = 32 * 32

    def check_supported(self):
        m = self.module
        cfg = self.state.config
        self.fused = (
            not cfg.exact
            and cfg.norm_stats is NormStats.FROZEN
            and m.upsample is None
            and m.downsample is None
            and m.output_scale_factor == 1.0
            # diffusers' forward treats any other value (the VAE's "group") as a plain norm2 with no time embedding
            and (m.time_embedding_norm in ("default", "scale_shift") or m.time_emb_proj is None)
            and isinstance(m.norm1, torch.nn.GroupNorm)
            and isinstance(m.norm2, torch.nn.GroupNorm)
        )

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
        if self._recompute_conv1(x):
            with _no_store(st):  # sparse runs compute it where conv2 reads it (`_conv1`)
                h = m.conv1(h)
        else:
            h = m.conv1(h)  # stored: conv2's gather reads its halo
        t = self._temb(temb)
        with _no_store(st):
            if m.time_embedding_norm == "default":
                if t is not None:
                    h = h + t[:, :, None, None]
                h = m.norm2(h)
            elif m.time_embedding_norm == "scale_shift":
                scale, shift = torch.chunk(t[:, :, None, None], 2, dim=1)
                h = m.norm2(h) * (1 + scale) + shift
            else:
                h = m.norm2(h)
            h = m.conv2(m.dropout(m.nonlinearity(h)))
        if m.conv_shortcut is not None:
            with _no_store(st):  # sparse runs read the shortcut only where they recompute it (conv2's tiles)
                shortcut = m.conv_shortcut(x)
        else:
            shortcut = x
        out = (shortcut + h) / m.output_scale_factor
        if self.feeds_tokens and st.mode is Mode.CAPTURE and not (m._forward_hooks or m._forward_pre_hooks):
            st.defer_store(key, out)  # the transformer it feeds may claim it (`pair_token_consumers`)
        else:
            st.cache.put(key, out=out)
        return out

    def sparse(self, x, temb=None):
        with untracked():  # per-channel glue only; every map's region is set by the conv handlers
            return self._sparse(x, temb)

    def _sparse(self, x, temb=None):
        m, st = self.module, self.state
        key = st.key(self.name)
        if self.feeds_tokens and key not in st.cache:
            # The capture stored no output: the transformer this block feeds reads it only at the active pixels,
            # which conv2 computes below. Those are the same for every batch row unless the rows' regions differ;
            # then the transformer (which batches the union) would read rows where conv2 wrote nothing, so the
            # block runs on the whole map instead.
            b, _, h, w = x.shape
            out = st.scratch_map((b, m.conv2.out_channels, h, w), m.conv2.weight.dtype, m.conv2.weight.device)
            if b > 1 and not self._uniform(st.pyramid((h, w))):
                before = st.region_of(x)
                st.set_region(x, st.full((b, h, w), x.device))
                try:
                    return self._blocks(x, temb, out)
                finally:
                    st.set_region(x, before)
        else:
            out = self.buffer(key)
        return self._blocks(x, temb, out)

    def _conv1(self, x, p1):
        """conv1 into run scratch, on its tiles, and on demand at the pixels around them that conv2's windows read
        (`SparseState.partial`): nothing of it is cached (on maps of `recompute_conv1_from` pixels or more). The ring
        is one GEMM over its pixels; caching conv1 held about a sixth of SD 1.5's UNet cache and a third of the VAE's."""
        m, st = self.module, self.state
        conv1 = handler_of(m.conv1)
        if not self._recompute_conv1(x):
            return conv1.sparse(x, p1)
        b, _, hh, ww = x.shape
        scratch = st.scratch_map((b, m.conv1.out_channels, hh, ww), m.conv1.weight.dtype, m.conv1.weight.device)
        h = conv1.sparse(x, p1, into=scratch)
        if h is scratch:  # tiles only (a dense fallback returns the whole fresh map)
            region = st.region_of(h)
            if st.any(region):
                bi = conv1.tiles(region, conv1.geometry, scratch)
                valid = st.memo(("covered", id(bi)), (bi,), bi.covered)
            else:
                valid = region
            st.partial(h, valid, lambda out, missing: conv1.fill(x, p1, out, missing))
        return h

    def _recompute_conv1(self, x) -> bool:
        return x.shape[-2] * x.shape[-1] >= self.recompute_conv1_from

    def _uniform(self, region: torch.Tensor) -> bool:
        return self.state.memo(("uniform rows", id(region)), (region,), lambda: bool((region == region[:1]).all()))

    def _blocks(self, x, temb, out):
        m, st = self.module, self.state
        act = handler_of(m.nonlinearity)
        norm1 = handler_of(m.norm1)
        p1 = act.fold(x, st.key(act.name), norm1.fold(x, st.key(norm1.name), IDENTITY))
        h = self._conv1(x, p1)
        t = self._temb(temb)
        norm2_handler = handler_of(m.norm2)
        norm2 = norm2_handler.prologue(h, st.key(norm2_handler.name))
        scale, shift = norm2.scale, norm2.shift
        if m.time_embedding_norm == "default":
            if t is not None:
                shift = shift + scale * t.to(scale.dtype)
        elif m.time_embedding_norm == "scale_shift":
            ts, tt = torch.chunk(t.to(scale.dtype), 2, dim=1)
            scale, shift = scale * (1 + ts), shift * (1 + ts) + tt
        p2 = act.fold(h, st.key(act.name), Prologue(scale, shift))
        if m.dropout.training and m.dropout.p > 0:
            raise RuntimeError(f"{self.name}: Dropout in training mode is random; call model.eval() before editing.")
        skip = x
        if m.conv_shortcut is not None:
            # The 1x1 shortcut's output tiles are exactly conv2's (the same region at the same resolution and tile
            # size), and conv2's scatter reads the residual only there, so it is computed into scratch and not cached;
            # a dense fallback blends the scratch's unwritten pixels away (or computed them all).
            skip = handler_of(m.conv_shortcut).sparse(x, into=st.scratch(out))
        return handler_of(m.conv2).sparse(h, p2, residual=skip, into=out)


# -- text-conditioned transformers (Stable Diffusion's Transformer2DModel) --------------------------------------------


def _pointwise_proj(module, h):
    """A 1x1 conv or a Linear, applied to tokens `[B, n, C]`."""
    if isinstance(module, torch.nn.Conv2d):
        return F.linear(h, module.weight.flatten(1), module.bias)
    return module(h)


def _plain_processor(processor) -> bool:
    """diffusers' default attention processors, or a wrapper of one that computes sparse runs itself (prompt edits'
    attention control: `wrapped` plus `sparse_attend`)."""
    if hasattr(processor, "sparse_attend"):
        processor = processor.wrapped
    return isinstance(processor, (AttnProcessor2_0, AttnProcessor))


@register_handler(Transformer2DModel)
class Transformer2DHandler(SparseHandler):
    """Stable Diffusion's spatial transformer, sparse over tokens (SIGE's attention extension, FISEdit's linear layers on
    active tokens): GroupNorm, proj_in, every block's LayerNorms, cross-attention, feed-forward and proj_out run on the
    active pixels only; each block's self-attention takes its queries from the active pixels and its keys/values from
    all pixels (cached from the capture, active rows refreshed in place). Approximate, like attention itself: inactive
    pixels keep their cached outputs. Exact mode and configurations beyond SD's (ada norms, chunked feed-forward,
    GLIGEN, masks, patch or vector inputs) run the plain forward.
    """

    kind = "transformer"
    reads_resnet = False  # fed by a resnet whose output it takes over at capture (`pair_token_consumers`)

    def check_supported(self):
        m = self.module
        blocks = list(m.transformer_blocks)
        self.fusable = (
            m.is_input_continuous
            and isinstance(m.norm, torch.nn.GroupNorm)
            and all(
                b.norm_type == "layer_norm"
                and not b.only_cross_attention
                and b.pos_embed is None
                and getattr(b, "_chunk_size", None) is None
                and not hasattr(b, "fuser")
                and _plain_processor(b.attn1.processor)
                and (b.attn2 is None or _plain_processor(b.attn2.processor))
                for b in blocks
            )
        )

    def _plain_call(self, x, kwargs) -> bool:
        allowed = {"encoder_hidden_states", "return_dict", "timestep", "added_cond_kwargs", "class_labels"}
        masks = (
            kwargs.get("attention_mask"),
            kwargs.get("encoder_attention_mask"),
            kwargs.get("cross_attention_kwargs"),
        )
        return (
            self.fusable
            and not self.state.config.exact
            and x.dim() == 4
            and all(v is None for v in masks)
            and set(kwargs) <= allowed | {"attention_mask", "encoder_attention_mask", "cross_attention_kwargs"}
        )

    def forward(self, hidden_states, *args, **kwargs):
        st = self.state
        if st.mode is None or args or not self._plain_call(hidden_states, kwargs):
            if st.mode is Mode.SPARSE and st.is_scratch(hidden_states):
                raise RuntimeError(
                    f"{self.name} is called differently than during the capture (extra arguments or masks), so it "
                    "would read its input where the sparse run did not compute it. Capture again with the same "
                    "call (the same keyword arguments as the edit)."
                )
            return self.original(hidden_states, *args, **kwargs)
        key = st.key(self.name)
        if st.mode is Mode.SPARSE:
            return self.sparse(key, hidden_states, kwargs)
        return self._capture(key, hidden_states, kwargs)

    def _capture(self, key, x, kwargs):
        st = self.state
        if self.reads_resnet and st.mode is Mode.CAPTURE:
            st.claim_store(x)  # its sparse runs read `x` at the active pixels only: the resnet need not store it
        stored, hooks = {}, []
        for i, block in enumerate(self.module.transformer_blocks):
            for name in ("to_k", "to_v"):
                hooks.append(getattr(block.attn1, name).register_forward_hook(
                    lambda mod, inp, out, tag=f"{name[-1]}{i}": stored.__setitem__(tag, out.detach())
                ))  # fmt: skip
        try:
            # Sparse runs read the GroupNorm's statistics, the block's output and the self-attention keys/values;
            # the children's own outputs (GroupNorm, proj_in/proj_out) are recomputed on the active tokens.
            with _no_store(st) if st.mode is Mode.CAPTURE else contextlib.nullcontext():
                result = self.original(x, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        out = result[0] if not kwargs.get("return_dict", True) else result.sample
        if st.mode is Mode.CAPTURE:
            st.cache.put(key, out=out, **stored)
        macs = self._macs(x.shape[0], x.shape[-2] * x.shape[-1], x.shape[-2] * x.shape[-1], kwargs)
        st.record(LayerRecord(self.name, self.kind, tuple(x.shape[-2:]), macs, macs, 1.0))
        return result

    def _macs(self, b, n, hw, kwargs) -> int:
        m = self.module
        c = m.in_channels
        inner = m.transformer_blocks[0].attn1.to_q.out_features if len(m.transformer_blocks) else c
        ctx = kwargs.get("encoder_hidden_states")
        total = 2 * n * c * inner + n * c  # proj_in, proj_out, GroupNorm affine
        for blk in m.transformer_blocks:
            total += 4 * n * inner * inner + 2 * n * hw * inner  # self-attention projections, QK^T and AV
            if blk.attn2 is not None and ctx is not None:
                length, dim = ctx.shape[-2], ctx.shape[-1]
                total += 2 * n * inner * inner + 2 * n * length * inner + 2 * length * dim * inner
            ff_inner = sum(p.numel() for p in blk.ff.parameters() if p.dim() == 2) // inner
            total += n * inner * ff_inner + 3 * n * inner  # feed-forward, three LayerNorms
        return b * total

    def sparse(self, key, x, kwargs):
        st, m = self.state, self.module
        st.start_laps()
        entry = st.cache.get(key)
        buf = entry["out"]
        b, c, h, w = x.shape
        hw = h * w
        gn_entry = st.cache.get(st.key(handler_of(m.norm).name))
        active = ActiveTokens.of(st, self, x)
        n = active.count
        dense = self._macs(b, hw, hw, kwargs)
        with untracked():  # token arithmetic: the buffer's region is set by the scatter
            out_tokens = self._sparse_tokens(x, entry, gn_entry, active, kwargs) if n else None
            st.lap("compute")
            active.scatter(st, buf, out_tokens)
            st.lap("scatter")
        st.record(LayerRecord(self.name, self.kind, (h, w), dense, self._macs(b, n, hw, kwargs) if n else 0, n / hw))
        if kwargs.get("return_dict", True):
            return Transformer2DModelOutput(sample=buf)
        return (buf,)

    def _sparse_tokens(self, x, entry, gn_entry, active, kwargs):
        st, m = self.state, self.module
        ctx = kwargs.get("encoder_hidden_states")
        residual = active.gather(x)
        hs = _pointwise_proj(m.proj_in, group_norm_tokens(residual, m.norm, gn_entry["mean"], gn_entry["rstd"]))
        for i, blk in enumerate(m.transformer_blocks):
            nh = blk.norm1(hs)
            active.refresh_kv(st, blk.attn1, entry[f"k{i}"], entry[f"v{i}"], nh)
            hs = attend(blk.attn1, nh, entry[f"k{i}"], entry[f"v{i}"]) + hs
            if blk.attn2 is not None:
                nh = blk.norm2(hs)
                kv = ctx if ctx is not None else nh
                attn2 = blk.attn2
                plain = lambda a=attn2, q=nh, c=kv: attend(a, q, a.to_k(c), a.to_v(c))  # noqa: E731
                controlled = getattr(attn2.processor, "sparse_attend", None)
                hs = (controlled(attn2, nh, kv, active.index, plain) if controlled else plain()) + hs
            hs = blk.ff(blk.norm3(hs)) + hs
        return _pointwise_proj(m.proj_out, hs) + residual


from . import dit, flux, flux2  # noqa: E402, F401  (register the diffusion transformers' handlers)
