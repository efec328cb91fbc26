"""FLUX.1's transformer (`FluxTransformer2DModel`), token-sparse: the second DiT family on the contract of `dit.py`.

What differs from SD3: the input is already a token sequence (the pipeline packs 2x2 latent patches), so the model's
region is one row of tokens `[B, 1, N]` (the spatial hooks see the sequence as a one-row map); positions come from
`img_ids`, so dilation happens on the token grid they describe; rotary embeddings are gathered at the active
positions; the joint sequence is context first, then image; after the double-stream blocks come single-stream blocks
whose attention runs over the same joint sequence. Both kinds run their own `forward` on the active rows with an empty
context (its keys and values cached, `SparseConfig.dit_context="cache"`) or the recomputed one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformer2DModel

from ..nn.base import UnsupportedLayerError, register_handler
from ..nn.tokens import ActiveTokens
from ..regions import dilate
from .dit import DiTHandler, _numel, _refuse_mask


__all__ = ["FluxTransformerHandler", "grid_dilate"]


def grid_dilate(active: torch.Tensor, ids: torch.Tensor, radius: int) -> torch.Tensor:
    """`active` `[N]` bool over tokens at positions `ids` `[N, 3]` (FLUX's `(group, row, column)`), dilated by `radius`
    on each group's grid: a token is active when an active token of its group lies within `radius` rows and columns."""
    if radius == 0 or not bool(active.any()):
        return active
    out = active.clone()
    rows, cols = ids[:, 1].long(), ids[:, 2].long()
    for group in torch.unique(ids[:, 0]):
        member = ids[:, 0] == group
        r, c = rows[member] - rows[member].min(), cols[member] - cols[member].min()
        grid = torch.zeros(int(r.max()) + 1, int(c.max()) + 1, dtype=torch.bool, device=active.device)
        grid[r, c] = active[member]
        out[member] = dilate(grid, radius)[r, c]
    return out


def _heads(attn, t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (-1, attn.head_dim))


def _qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """`FluxAttnProcessor`'s queries, keys (after qk-norm and the rotary embedding) and values `[B, S, heads, d]`,
    the context's first (double-stream blocks), op for op."""
    query = attn.norm_q(_heads(attn, attn.to_q(hidden_states)))
    key = attn.norm_k(_heads(attn, attn.to_k(hidden_states)))
    value = _heads(attn, attn.to_v(hidden_states))
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq = attn.norm_added_q(_heads(attn, attn.add_q_proj(encoder_hidden_states)))
        ek = attn.norm_added_k(_heads(attn, attn.add_k_proj(encoder_hidden_states)))
        ev = _heads(attn, attn.add_v_proj(encoder_hidden_states))
        query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def _outputs(attn, out, encoder_hidden_states):
    """The attention output `[B, S, heads, d]` split into the image's and the context's, projected as the processor
    does (a single-stream block's is returned whole)."""
    out = out.flatten(2, 3)
    if encoder_hidden_states is None:
        return out
    m = encoder_hidden_states.shape[1]
    context, out = out.split_with_sizes([m, out.shape[1] - m], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(context.contiguous())


class _CaptureFlux:
    """`FluxAttnProcessor`'s arithmetic, op for op, keeping the joint keys (after qk-norm and rotary embedding) and
    values `[B, S, heads * d]` in `store`."""

    def __init__(self, store: dict, tag: str):
        self.store, self.tag = store, tag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        _refuse_mask(attention_mask)
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        self.store[f"k{self.tag}"] = key.flatten(2, 3).detach()
        self.store[f"v{self.tag}"] = value.flatten(2, 3).detach()
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        return _outputs(attn, out.to(query.dtype), encoder_hidden_states)


def attend_cached(state, at: ActiveTokens, k_cache, v_cache, attn, query, key, value) -> torch.Tensor:
    """The rows' keys and values `[B, n, heads, d]` written at `at` in a layer's cached joint keys and values, and
    their queries attending over all of them: the attention output `[B, n, heads, d]` in the queries' dtype."""
    at.write_rows(state, k_cache, key.flatten(2, 3))
    at.write_rows(state, v_cache, value.flatten(2, 3))
    k, v = _heads(attn, k_cache).transpose(1, 2), _heads(attn, v_cache).transpose(1, 2)
    return F.scaled_dot_product_attention(query.transpose(1, 2), k, v).transpose(1, 2).to(query.dtype)


class _SparseFlux:
    """A FLUX attention in a sparse run. Its input rows are the context's (recomputed, or none) then the active image
    tokens'; their keys and values are written at `at` in the layer's cached joint keys and values, and their queries
    attend over all of them."""

    def __init__(self, state, at: ActiveTokens, k: torch.Tensor, v: torch.Tensor):
        self.state, self.at, self.k, self.v = state, at, k, v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        _refuse_mask(attention_mask)
        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = attend_cached(self.state, self.at, self.k, self.v, attn, query, key, value)
        return _outputs(attn, out, encoder_hidden_states)


@register_handler(FluxTransformer2DModel)
class FluxTransformerHandler(DiTHandler):
    """`FluxTransformer2DModel` (FLUX.1 dev/schnell/Fill/Kontext shapes): double- and single-stream blocks on the
    active token rows through their own `forward`; `x_embedder`, `norm_out` and `proj_out` per token; rotary
    embeddings gathered at the active positions. Regions are over the packed token sequence, `[B, 1, N]` (or
    `[1, N]`). ControlNet residuals are refused so far."""

    plain_processors = (FluxAttnProcessor,)
    capture_processor = _CaptureFlux
    patch = 1

    def blocks(self):
        m = self.module
        return list(m.transformer_blocks) + list(m.single_transformer_blocks)

    def attentions(self, block):
        return {"": block.attn}

    def check_call(self, call):
        super().check_call(call)
        for name in ("joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples"):
            if call.get(name):
                raise UnsupportedLayerError(f"{self.name}: `{name}` is not supported by the token-sparse engine yet.")
        x = call["hidden_states"]
        if x.dim() != 3:
            raise ValueError(f"{self.name}: expected packed latents [B, N, C], got shape {tuple(x.shape)}.")

    def context_length(self, call) -> int:
        return call["encoder_hidden_states"].shape[1]

    def grid(self, x):
        return (1, x.shape[1])

    def tokens(self, x) -> int:
        return x.shape[1]

    def patchify(self, out):
        return out

    def active_tokens(self, x, img_ids) -> ActiveTokens:
        """The region's tokens (`[B, 1, N]`, the union over the batch), dilated by `input_dilation + dilation` on the
        token grid `img_ids` describes. Memoised by the plan (every step and branch of an edit shares it; `img_ids`
        are checked against the capture's like every input)."""
        st = self.state
        region = st.input_region

        def build():
            reach = region.any(dim=0).reshape(-1)
            return grid_dilate(reach, img_ids, st.config.input_dilation + st.config.dilation).nonzero()[:, 0]

        return ActiveTokens(st.memo(("flux tokens", id(region)), (region,), build), (1, x.shape[1]))

    def sparse(self, key, call):
        x = call["hidden_states"]
        img_ids = call["img_ids"] if call["img_ids"].ndim == 2 else call["img_ids"][0]
        entry = self.compute_active(key, call, self.active_tokens(x, img_ids), img_ids=img_ids)
        out = entry["out"]  # the post hook hands the caller a copy
        return Transformer2DModelOutput(sample=out) if call.get("return_dict", True) else (out,)

    sparse_processor = _SparseFlux  # what `sparse_processors` installs on every attention for a sparse run

    def joint_rows(self, call, rows: torch.Tensor, active: ActiveTokens, recompute: bool, img_ids):
        """For the active image `rows`: the context rows that run with them (the prompt's tokens embedded again, or
        none when their keys and values are the capture's), the rotary embeddings of all the rows that run (context
        first, then image) and their places in the joint sequence."""
        model, x = self.module, call["hidden_states"]
        txt_ids = call["txt_ids"] if call["txt_ids"].ndim == 2 else call["txt_ids"][0]
        m = txt_ids.shape[0]
        cos, sin = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        image_at = active.index + m
        if recompute:
            ctx = model.context_embedder(call["encoder_hidden_states"])
            where = torch.cat([torch.arange(m, device=x.device), image_at])
        else:
            ctx, where = rows.new_empty(rows.shape[0], 0, rows.shape[-1]), image_at
        return ctx, (cos[where], sin[where]), ActiveTokens(where, (1, m + x.shape[1]))

    def sparse_processors(self, entry, at: ActiveTokens):
        """Every attention's sparse processor over its cached joint keys and values, for one run."""
        st = self.state
        return self.processors(lambda i, tag: self.sparse_processor(st, at, entry[f"k{i}{tag}"], entry[f"v{i}{tag}"]))

    def run_rows(self, call, entry, active: ActiveTokens, recompute: bool, img_ids=None) -> torch.Tensor:
        model = self.module
        x = call["hidden_states"]
        rows = model.x_embedder(x[:, active.index])
        timestep = call["timestep"].to(rows.dtype) * 1000
        guidance = call.get("guidance")
        if guidance is not None:
            temb = model.time_text_embed(timestep, guidance.to(rows.dtype) * 1000, call["pooled_projections"])
        else:
            temb = model.time_text_embed(timestep, call["pooled_projections"])
        ctx, rope, at = self.joint_rows(call, rows, active, recompute, img_ids)
        with self.sparse_processors(entry, at):
            for block in self.blocks():
                ctx, rows = block(hidden_states=rows, encoder_hidden_states=ctx, temb=temb, image_rotary_emb=rope)
        return model.proj_out(model.norm_out(rows, temb))

    def macs(self, b: int, nq: int, n: int, mq: int, m: int) -> dict:
        model = self.module
        blocks = []
        for blk in model.transformer_blocks:
            attn, inner = blk.attn, blk.attn.inner_dim
            image = _numel(attn.to_q, attn.to_k, attn.to_v, attn.to_out, blk.ff)
            context = _numel(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, blk.ff_context)
            total = nq * image + mq * context + _numel(blk.norm1, blk.norm1_context)
            blocks.append(b * (total + 2 * (nq + mq) * (n + m) * inner))
        for blk in model.single_transformer_blocks:
            per_row = _numel(blk.attn, blk.proj_mlp, blk.proj_out)
            total = (nq + mq) * per_row + _numel(blk.norm) + 2 * (nq + mq) * (n + m) * blk.attn.inner_dim
            blocks.append(b * total)
        embed = nq * _numel(model.x_embedder) + mq * _numel(model.context_embedder) + _numel(model.time_text_embed)
        head = nq * _numel(model.proj_out) + _numel(model.norm_out)
        return {"blocks": blocks, "ends": b * (embed + head)}
