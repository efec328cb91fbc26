"""FLUX.2's transformer (`Flux2Transformer2DModel`: FLUX.2 [dev] and [klein]), token-sparse: the third DiT family on
the contract of `dit.py`, a small registration on top of FLUX.1's (`flux.py`).

What differs from FLUX.1: the conditioning is a timestep (and guidance) embedding whose adaLN modulations are computed
once per call for all double-stream blocks (image and text) and all single-stream blocks; positions have four axes
`(t, h, w, l)` and reference images ride in the same sequence as the generated image, on their own `t` (Klein's
image editing), so dilation on the grid `img_ids` describes keeps each image to itself; single-stream blocks take
the joint sequence already concatenated and compute attention and their MLP from one fused projection
(`to_qkv_mlp_proj`), so their processor splits it as diffusers' does and only the attention's keys and values are
cached.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)

from ..nn.base import UnsupportedLayerError, register_handler
from ..nn.tokens import ActiveTokens
from .dit import _numel, _refuse_mask
from .flux import FluxTransformerHandler, _CaptureFlux, _heads, _SparseFlux, attend_cached


__all__ = ["Flux2TransformerHandler"]


def _parallel(attn) -> bool:
    return hasattr(attn, "to_qkv_mlp_proj")


def _parallel_qkv(attn, hidden_states, image_rotary_emb):
    """`Flux2ParallelSelfAttnProcessor`'s queries, keys and values `[B, S, heads, d]` (after qk-norm and the rotary
    embedding) and its MLP input, from the fused projection, op for op."""
    proj = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp = torch.split(proj, [local, proj.shape[-1] - local], dim=-1)
    query, key, value = qkv.chunk(3, dim=-1)
    query = attn.norm_q(_heads(attn, query))
    key = attn.norm_k(_heads(attn, key))
    value = _heads(attn, value)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value, mlp


def _parallel_out(attn, out, mlp):
    out = out.flatten(2, 3).to(mlp.dtype)
    return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class _CaptureFlux2:
    """The capture's processor of a FLUX.2 attention: FLUX.1's joint arithmetic for the double-stream blocks
    (`Flux2AttnProcessor` computes the same ops), the fused parallel one for the single-stream blocks; both keep the
    joint keys and values `[B, S, heads * d]` in `store`."""

    def __init__(self, store: dict, tag: str):
        self.store, self.tag = store, tag

    def __call__(self, attn, hidden_states, *args):
        if not _parallel(attn):
            return _CaptureFlux(self.store, self.tag)(attn, hidden_states, *args)
        attention_mask, image_rotary_emb = (list(args) + [None, None])[:2]
        _refuse_mask(attention_mask)
        query, key, value, mlp = _parallel_qkv(attn, hidden_states, image_rotary_emb)
        self.store[f"k{self.tag}"] = key.flatten(2, 3).detach()
        self.store[f"v{self.tag}"] = value.flatten(2, 3).detach()
        out = dispatch_attention_fn(query, key, value, attn_mask=None)
        return _parallel_out(attn, out.to(query.dtype), mlp)


class _SparseFlux2:
    """A FLUX.2 attention in a sparse run: the active rows' keys and values written at `at` in the layer's cached
    joint keys and values, their queries attending over all of them (`_SparseFlux` for the double-stream blocks)."""

    def __init__(self, state, at: ActiveTokens, k: torch.Tensor, v: torch.Tensor):
        self.state, self.at, self.k, self.v = state, at, k, v

    def __call__(self, attn, hidden_states, *args):
        if not _parallel(attn):
            return _SparseFlux(self.state, self.at, self.k, self.v)(attn, hidden_states, *args)
        attention_mask, image_rotary_emb = (list(args) + [None, None])[:2]
        _refuse_mask(attention_mask)
        query, key, value, mlp = _parallel_qkv(attn, hidden_states, image_rotary_emb)
        out = attend_cached(self.state, self.at, self.k, self.v, attn, query, key, value)
        return _parallel_out(attn, out, mlp)


@register_handler(Flux2Transformer2DModel)
class Flux2TransformerHandler(FluxTransformerHandler):
    """`Flux2Transformer2DModel` (FLUX.2 [dev], [klein]): double- and single-stream blocks on the active token rows
    through their own `forward`, with the model's modulations computed once per call as the model does; the active
    rows' rotary embeddings gathered from the four-axis `img_ids`. Reference images in the sequence (Klein's editing)
    are tokens like the others: a region over them (`[B, 1, N]` over the whole sequence) recomputes them. The
    reference-image K/V cache of `Flux2KleinKVPipeline` (`kv_cache_mode`) is refused: sparsedit's own cache does it."""

    plain_processors = (
        Flux2AttnProcessor,
        Flux2ParallelSelfAttnProcessor,
        Flux2KVAttnProcessor,  # the same arithmetic as the plain ones when no K/V cache is passed (refused below)
        Flux2KVParallelSelfAttnProcessor,
    )
    capture_processor = _CaptureFlux2

    def check_call(self, call):
        for name in ("kv_cache", "kv_cache_mode"):
            if call.get(name) is not None:
                raise UnsupportedLayerError(
                    f"{self.name}: `{name}` (Flux2KleinKVPipeline's reference K/V cache) is not supported by the "
                    "token-sparse engine, which caches every token's keys and values itself; call the transformer "
                    "without it (Flux2KleinPipeline)."
                )
        for i, block in enumerate(self.module.transformer_blocks):
            if getattr(block.attn, "fused_projections", False):
                raise UnsupportedLayerError(
                    f"{self.name}.transformer_blocks[{i}] has fused QKV projections, which the token-sparse engine "
                    "does not reproduce; call `unfuse_qkv_projections()` first, or edit densely."
                )
        super().check_call(call)

    sparse_processor = _SparseFlux2

    def run_rows(self, call, entry, active: ActiveTokens, recompute: bool, img_ids=None) -> torch.Tensor:
        model = self.module
        x = call["hidden_states"]
        timestep = call["timestep"].to(x.dtype) * 1000
        guidance = call.get("guidance")
        temb = model.time_guidance_embed(timestep, None if guidance is None else guidance.to(x.dtype) * 1000)
        mod_img = model.double_stream_modulation_img(temb)
        mod_txt = model.double_stream_modulation_txt(temb)
        mod_single = model.single_stream_modulation(temb)
        rows = model.x_embedder(x[:, active.index])
        ctx, rope, at = self.joint_rows(call, rows, active, recompute, img_ids)
        with self.sparse_processors(entry, at):
            for block in model.transformer_blocks:
                ctx, rows = block(hidden_states=rows, encoder_hidden_states=ctx, temb_mod_img=mod_img,
                                  temb_mod_txt=mod_txt, image_rotary_emb=rope)  # fmt: skip
            joint = torch.cat([ctx, rows], dim=1)
            for block in model.single_transformer_blocks:
                joint = block(hidden_states=joint, encoder_hidden_states=None, temb_mod=mod_single,
                              image_rotary_emb=rope)  # fmt: skip
        rows = joint[:, ctx.shape[1] :]
        return model.proj_out(model.norm_out(rows, temb))

    def macs(self, b: int, nq: int, n: int, mq: int, m: int) -> dict:
        model = self.module
        blocks = []
        for blk in model.transformer_blocks:
            attn, inner = blk.attn, blk.attn.inner_dim
            image = _numel(attn.to_q, attn.to_k, attn.to_v, attn.to_out, blk.ff)
            context = _numel(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, blk.ff_context)
            blocks.append(b * (nq * image + mq * context + 2 * (nq + mq) * (n + m) * inner))
        for blk in model.single_transformer_blocks:
            total = (nq + mq) * _numel(blk.attn) + 2 * (nq + mq) * (n + m) * blk.attn.inner_dim
            blocks.append(b * total)
        per_call = _numel(model.time_guidance_embed, model.double_stream_modulation_img,
                          model.double_stream_modulation_txt, model.single_stream_modulation, model.norm_out)  # fmt: skip
        embed = nq * _numel(model.x_embedder) + mq * _numel(model.context_embedder)
        return {"blocks": blocks, "ends": b * (embed + nq * _numel(model.proj_out) + per_call)}
