"""Diffusion transformers, token-sparse (SD3/SD3.5's MMDiT first; the contract every DiT family registers into).

An edit that changes a fraction p of the image tokens recomputes, in every block at every step, only those tokens'
rows: the adaLN modulation, the norms, the projections, the feed-forward and the gates act per token, so they run on
the gathered active rows through the block's **own `forward`**; only attention mixes tokens, and it goes through a
processor this module installs on the block's attention for the run (`_SparseJoint`). That processor computes the
active rows' queries, keys and values, writes the keys and values into the capture's keys and values of this step
and layer (undo-logged, committed like every cache entry), and attends the active queries over all of them.
Inactive rows keep the capture's hidden states, so their outputs (and the latents they make) are the capture's bit
for bit; the active rows are approximate across layers, as in SIGE's sparse attention.

The context (text) stream of joint blocks is the capture's by default (`SparseConfig.dit_context="cache"`): its keys
and values are cached with the image's, and the block runs with an empty context, so an edit of p of the image pays
about p of a step. `"recompute"` runs the context tokens in every block again (they then see the edited image),
which costs their share of the step at every edit: with SD3's 333 prompt tokens and 4096 image tokens at 1024 px,
that caps a 2% edit near 9x fewer MACs instead of 30x.

A family registers a handler class for its model type (`register_handler`), naming its blocks and its ends (patch
embedding, conditioning, output head); the blocks' own code and diffusers' processors do the rest. A call the
handler cannot honour (attention masks, IP-Adapter kwargs, a processor it does not know) is refused by name.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..nn.base import SparseHandler, UnsupportedLayerError, register_handler
from ..nn.state import LayerRecord, Mode
from ..nn.tokens import ActiveTokens, joint_kv, sparse_joint_attention
from ..nn.tracking import untracked
from ..regions import dilate, repeat_region


__all__ = ["DiTHandler", "SD3TransformerHandler", "token_region"]


def token_region(region: torch.Tensor, patch: int, dilation: int) -> torch.Tensor:
    """The tokens an edit reaches: a `[B, H, W]` latent region max-pooled to the `patch`-sized token grid (any changed
    latent pixel makes its token active, so the latents outside the active tokens are the capture's), then dilated by
    `dilation` tokens."""
    b, h, w = region.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} latent does not split into {patch}x{patch} patches.")
    tokens = F.max_pool2d(region[:, None].float(), patch)[:, 0] > 0
    return dilate(tokens, dilation)


def _numel(*modules) -> int:
    """Multiply-accumulates per row (token) of the linear layers among `modules` and their children (a patch
    embedding's stride-p convolution counts per token too)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return sum(mod.weight.numel() for m in modules if m is not None for mod in m.modules() if isinstance(mod, kinds))


class _CaptureJoint:
    """`JointAttnProcessor2_0`'s arithmetic, op for op (so the capture's output is the plain model's bit for bit),
    keeping the joint keys (after their qk-norm) and values in `store` under `k<tag>`, `v<tag>`; with `hidden`
    (`SparseConfig.dit_cache="hidden"`), the attention's inputs instead: the image tokens under `h<tag>` and the
    context tokens (if any) under `c<tag>`."""

    def __init__(self, store: dict, tag: str, hidden: bool = False):
        self.store, self.tag, self.hidden = store, tag, hidden

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        _refuse_mask(attention_mask)
        b = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        inner = key.shape[-1]
        d = inner // attn.heads
        query = query.view(b, -1, attn.heads, d).transpose(1, 2)
        key = key.view(b, -1, attn.heads, d).transpose(1, 2)
        value = value.view(b, -1, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq = attn.add_q_proj(encoder_hidden_states).view(b, -1, attn.heads, d).transpose(1, 2)
            ck = attn.add_k_proj(encoder_hidden_states).view(b, -1, attn.heads, d).transpose(1, 2)
            cv = attn.add_v_proj(encoder_hidden_states).view(b, -1, attn.heads, d).transpose(1, 2)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2), torch.cat([value, cv], 2)
        if self.hidden:
            self.store[f"h{self.tag}"] = hidden_states.detach()
            if encoder_hidden_states is not None:
                self.store[f"c{self.tag}"] = encoder_hidden_states.detach()
        else:
            self.store[f"k{self.tag}"] = key.transpose(1, 2).reshape(b, -1, inner).detach()
            self.store[f"v{self.tag}"] = value.transpose(1, 2).reshape(b, -1, inner).detach()
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(query.dtype)
        context = None
        if encoder_hidden_states is not None:
            n = hidden_states.shape[1]
            out, context = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, context)


class _SparseJoint:
    """The processor of one joint (or plain self-) attention in a sparse run: active image rows in, their output out,
    with the layer's cached keys and values `k`, `v` (`[B, N (+ m), heads * d]`) refreshed at the active rows (and at
    `context_at` when the context is recomputed). A block called with an empty context gets an empty one back.

    With `hidden` (`{"h": [B, N, C], "c": [B, m, C'] or None}`, `SparseConfig.dit_cache="hidden"`), the cached
    attention inputs stand in for `k`, `v`: the active rows' inputs (and a recomputed context's) are written into them
    (undo-logged, so a commit keeps them), and every token's keys and values are projected from them for this run."""

    def __init__(self, state, active: ActiveTokens, k: torch.Tensor | None, v: torch.Tensor | None, context_at=None,
                 hidden: dict | None = None):  # fmt: skip
        self.state, self.active, self.k, self.v, self.context_at = state, active, k, v, context_at
        self.hidden = hidden

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        _refuse_mask(attention_mask)
        ctx = encoder_hidden_states
        recompute = ctx is not None and ctx.shape[1] > 0
        k, v = self.k, self.v
        if self.hidden is not None:
            st, h, c = self.state, self.hidden["h"], self.hidden["c"]
            self.active.write_rows(st, h, hidden_states)
            if recompute:
                ActiveTokens(torch.arange(c.shape[1], device=c.device), (1, c.shape[1])).write_rows(st, c, ctx)
            k, v = (st.temporary(t) for t in joint_kv(attn, h, c))
        rows, out_ctx = sparse_joint_attention(
            self.state, attn, self.active, hidden_states, k, v, ctx if recompute else None, self.context_at
        )
        if ctx is None:
            return rows
        return rows, (out_ctx if recompute else ctx)


def _refuse_mask(mask) -> None:
    if mask is not None:
        raise UnsupportedLayerError(
            "a diffusion transformer called with an attention mask cannot run token-sparse (the cached keys hold no "
            "mask); edit densely, or call it without `attention_mask`."
        )


class DiTHandler(SparseHandler):
    """A diffusion transformer model, token-sparse as a whole: it owns its subtree (no handler is attached below it).

    Subclasses name the family's parts: `blocks()`, the attention modules of a block with their plain processor
    types (`attentions`), the patch embedding of active tokens (`embed_rows`), the conditioning, the output head
    (`head_rows`) and the patch layout (`patchify`/`unpatchify`). The capture stores per call: the output tokens
    (`out`, before unpatchifying) and every attention's keys and values.
    """

    kind = "dit block"
    owns_subtree = True
    # The conditioning a prompt edit changes; a change makes the context stream run again (`compute_active`).
    context_inputs = frozenset({"encoder_hidden_states", "pooled_projections", "txt_ids"})
    plain_processors: tuple[type, ...] = ()
    capture_processor = None  # the family's plain processor, op for op, keeping keys and values (`_CaptureJoint`)
    caches_hidden = False  # whether the family can keep attention inputs instead (`SparseConfig.dit_cache="hidden"`)

    @property
    def keeps_inputs(self) -> bool:
        """Whether the capture keeps the attentions' inputs instead of keys and values (`dit_cache="hidden"`)."""
        return str(self.state.config.dit_cache) == "hidden"

    def check_supported(self):
        cfg = self.state.config
        if self.keeps_inputs and not self.caches_hidden:
            raise UnsupportedLayerError(
                f"{self.name}: SparseConfig(dit_cache='hidden') is built for SD3's joint blocks, not "
                f"{type(self.module).__name__}; use dit_cache='kv' (with dit_kv_share to save memory)."
            )
        if cfg.exact:
            raise UnsupportedLayerError(
                f"{self.name}: {type(self.module).__name__} mixes every token through attention in every block, so an "
                "exact edit is a dense one; use SparseConfig(exact=False) (the background stays the capture's bit for "
                "bit; the region is approximate), or edit densely."
            )
        if str(cfg.attention) != "sparse":
            raise UnsupportedLayerError(
                f"{self.name}: SparseConfig(attention='dense') makes every token a query again, a dense step; "
                "diffusion transformers run attention='sparse' only."
            )

    def prepare(self):
        self.signature = inspect.signature(type(self.module).forward)

    # -- the family's parts --------------------------------------------------------------------------------------------
    def blocks(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def attentions(self, block) -> dict[str, torch.nn.Module]:
        """The block's attention modules by cache tag suffix (`""`: the joint attention)."""
        raise NotImplementedError

    # -- modes -----------------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        st = self.state
        if st.mode is None:
            return self.original(*args, **kwargs)
        call = self.signature.bind(self.module, *args, **kwargs).arguments
        call.pop("self", None)
        self.check_call(call)
        if st.mode is Mode.SPARSE:
            return self.sparse(st.key(self.name), call)
        return self.capture_call(st.key(self.name), call)

    def check_call(self, call: dict) -> None:
        for i, block in enumerate(self.blocks()):
            for attn in self.attentions(block).values():
                if type(attn.processor) not in self.plain_processors:
                    raise UnsupportedLayerError(
                        f"{self.name}.blocks[{i}] runs attention through {type(attn.processor).__name__}, which the "
                        "token-sparse engine does not know (it reproduces "
                        f"{', '.join(t.__name__ for t in self.plain_processors)}); restore the default processors "
                        "(`set_default_attn_processor()` or `unfuse_qkv_projections()`), or edit densely."
                    )

    @contextlib.contextmanager
    def processors(self, make):
        """Install `make(i, tag)` as the processor of every attention for one run, restoring the originals after."""
        saved = []
        try:
            for i, block in enumerate(self.blocks()):
                for tag, attn in self.attentions(block).items():
                    saved.append((attn, attn.processor))
                    attn.processor = make(i, tag)
            yield
        finally:
            for attn, proc in saved:
                attn.processor = proc

    def capture_call(self, key, call):
        st = self.state
        store: dict[str, torch.Tensor] = {}
        keep = st.mode is Mode.CAPTURE and not st.no_store
        extra = {"hidden": True} if self.keeps_inputs else {}
        make = (lambda i, tag: self.capture_processor(store, f"{i}{tag}", **extra)) if keep else None
        with self.processors(make) if keep else contextlib.nullcontext():
            result = self.original(**call)
        out = result[0] if isinstance(result, tuple) else result.sample
        if keep:
            # The output tokens at full precision (a few channels per token: 0.1% of SD3's keys and values), so the
            # inactive tokens' latents are the capture's bit for bit whatever `cache_dtype` the keys and values take.
            st.cache.put_exact(key, out=self.patchify(out))
            if self.kv_key(key) == key:  # else the keys and values of its group's first step serve (`dit_kv_share`)
                st.cache.put(key, **store)
        x = call["hidden_states"]
        b, n, m = x.shape[0], self.tokens(x), self.context_length(call)
        dense = self.macs(b, n, n, m, m)
        for i, macs in enumerate(dense["blocks"]):
            st.record(LayerRecord(f"{self.name}.blocks.{i}", self.kind, self.grid(x), macs, macs, 1.0))
        st.record(LayerRecord(f"{self.name}.ends", "dit ends", self.grid(x), dense["ends"], dense["ends"], 1.0))
        return result

    def sparse(self, key, call):
        x = call["hidden_states"]
        active = self.active_tokens(x)
        entry = self.compute_active(key, call, active)
        with untracked():
            out = self.unpatchify(entry["out"], x)
        self.state.set_region(out, self.pixel_region(active, x))
        if call.get("return_dict", True):
            return Transformer2DModelOutput(sample=out)
        return (out,)

    def compute_active(self, key, call, active: ActiveTokens, **family) -> dict:
        """Run the active rows through the model (`run_rows`, with the family's extra arguments) into the cached
        output tokens of `key`, and record every block's MACs. Returns the cache entry."""
        st = self.state
        x = call["hidden_states"]
        entry = st.cache.get(key)
        kv = self.kv_key(key)
        if kv != key:  # the keys and values live under the group's first step; the output tokens are this step's
            entry = {**st.cache.get(kv), "out": entry["out"]}
        b, n_all, m = x.shape[0], self.tokens(x), self.context_length(call)
        # A changed context (a prompt edit) is recomputed whatever `dit_context` says: its cached keys and values are
        # the old prompt's.
        recompute = str(st.config.dit_context) == "recompute" or bool(st.changed_inputs & self.context_inputs)
        n = active.count
        dense = self.macs(b, n_all, n_all, m, m)
        sparse = self.macs(b, n, n_all, m if recompute else 0, m)
        if self.keeps_inputs:  # every token's keys and values, projected from the cached inputs
            sparse["blocks"] = [s + k for s, k in zip(sparse["blocks"], self.kv_macs(b, n_all, m), strict=True)]
        if n:
            with untracked():
                st.start_laps()
                rows = self.run_rows(call, entry, active, recompute, **family)
                active.write_rows(st, entry["out"], rows)
                st.lap("compute")
        grid = self.grid(x)
        for i, (d, s) in enumerate(zip(dense["blocks"], sparse["blocks"])):
            st.record(LayerRecord(f"{self.name}.blocks.{i}", self.kind, grid, d, s if n else 0, active.fraction))
        st.record(LayerRecord(f"{self.name}.ends", "dit ends", grid, dense["ends"], sparse["ends"] if n else 0,
                              active.fraction))  # fmt: skip
        return entry

    def kv_key(self, key: tuple) -> tuple:
        """The cache key holding the keys and values of call `key` (`(name, call index, *scope)`): its own, or under
        `SparseConfig.dit_kv_share = s > 1` that of the first step of its group of `s` neighbouring steps, the step
        being the scope's leading int (`SparseEditor` scopes each step by its index). A call scoped by anything else
        keeps its own."""
        s = self.state.config.dit_kv_share
        if s == 1 or len(key) < 3 or type(key[2]) is not int:
            return key
        return (*key[:2], key[2] - key[2] % s, *key[3:])

    # -- the active set --------------------------------------------------------------------------------------------------
    def active_tokens(self, x: torch.Tensor) -> ActiveTokens:
        st, p = self.state, self.patch
        region = st.region_of(x)
        gh, gw = x.shape[-2] // p, x.shape[-1] // p

        def build():
            reach = dilate(region, st.config.input_dilation)
            return token_region(reach, p, st.config.dilation).any(dim=0).reshape(-1).nonzero()[:, 0]

        return ActiveTokens(st.memo(("dit tokens", id(region), p), (region,), build), (gh, gw))

    def pixel_region(self, active: ActiveTokens, x: torch.Tensor) -> torch.Tensor:
        st, p = self.state, self.patch
        gh, gw = active.size

        def build():
            mask = torch.zeros(gh * gw, dtype=torch.bool, device=x.device)
            mask[active.index] = True
            return repeat_region(mask.reshape(1, gh, gw), p, p).expand(x.shape[0], -1, -1)

        return st.memo(("dit pixels", id(active.index), x.shape[0]), (active.index,), build)

    def grid(self, x) -> tuple[int, int]:
        return (x.shape[-2] // self.patch, x.shape[-1] // self.patch)

    def tokens(self, x) -> int:
        gh, gw = self.grid(x)
        return gh * gw

    def patchify(self, out: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` output as its tokens `[B, N, p*p*C]` (the head's rows, before unpatchifying)."""
        b, c, h, w = out.shape
        p = self.patch
        t = out.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return t.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        t = tokens.reshape(b, h // p, w // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", t).reshape(b, -1, h, w)


@register_handler(SD3Transformer2DModel)
class SD3TransformerHandler(DiTHandler):
    """`SD3Transformer2DModel` (SD3, SD3.5 with dual attention and RMS qk-norm): joint blocks run on the active rows
    through their own `forward`; `pos_embed`'s stride-p projection on the active patches only; `norm_out`/`proj_out`
    per token. ControlNet residuals are added at the active rows; `skip_layers` skip the same blocks as captured."""

    plain_processors = (JointAttnProcessor2_0,)
    capture_processor = _CaptureJoint
    caches_hidden = True

    @property
    def patch(self) -> int:
        return self.module.config.patch_size

    def blocks(self):
        return list(self.module.transformer_blocks)

    def attentions(self, block):
        return {"": block.attn, **({"b": block.attn2} if block.attn2 is not None else {})}

    def check_call(self, call):
        super().check_call(call)
        extra = call.get("joint_attention_kwargs")
        if extra:
            raise UnsupportedLayerError(
                f"{self.name}: joint_attention_kwargs ({', '.join(map(str, extra))}) are not supported by the "
                "token-sparse engine (IP-Adapter and custom processors read them); edit without them, or densely."
            )
        x = call["hidden_states"]
        if x.dim() != 4 or x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise ValueError(f"{self.name}: expected latents [B, C, H, W] with H, W multiples of {self.patch}.")

    def context_length(self, call) -> int:
        ctx = call.get("encoder_hidden_states")
        return 0 if ctx is None else ctx.shape[1]

    def embed_rows(self, x: torch.Tensor, active: ActiveTokens) -> torch.Tensor:
        """`pos_embed` (PatchEmbed) at the active patches: the stride-p projection as one GEMM over their pixels, the
        position embedding gathered."""
        pe, p = self.module.pos_embed, self.patch
        b, c, h, w = x.shape
        gw = w // p
        iy, ix = active.index // gw, active.index % gw
        patches = x.reshape(b, c, h // p, p, gw, p)[:, :, iy, :, ix, :]  # [n, B, C, p, p]
        patches = patches.permute(1, 0, 2, 3, 4).reshape(b, -1, c * p * p)
        rows = F.linear(patches, pe.proj.weight.reshape(pe.proj.out_channels, -1), pe.proj.bias)
        if pe.layer_norm:
            rows = pe.norm(rows)
        if pe.pos_embed is None:
            return rows
        if pe.pos_embed_max_size:
            pos = pe.cropped_pos_embed(h, w)
        elif (pe.height, pe.width) == (h // p, w // p):
            pos = pe.pos_embed
        else:
            raise UnsupportedLayerError(
                f"{self.name}: position embeddings interpolated to a {h}x{w} latent are not supported sparse; use the "
                "model's sample size or a model with `pos_embed_max_size`."
            )
        return (rows + pos[:, active.index]).to(rows.dtype)

    def run_rows(self, call, entry, active: ActiveTokens, recompute: bool) -> torch.Tensor:
        """The active rows through the model: embedding, every block, the output head (`[B, n, p*p*C_out]`)."""
        st, m = self.state, self.module
        x = call["hidden_states"]
        temb = m.time_text_embed(call["timestep"], call["pooled_projections"])
        rows = self.embed_rows(x, active)
        if recompute:
            ctx = m.context_embedder(call["encoder_hidden_states"])
            n_img = self.tokens(x)
            context_at = ActiveTokens(torch.arange(n_img, n_img + ctx.shape[1], device=x.device), (1, ctx.shape[1]))
        else:
            ctx, context_at = rows.new_empty(rows.shape[0], 0, rows.shape[-1]), None

        def make(i, tag):
            at = context_at if not tag else None
            if self.keeps_inputs:
                return _SparseJoint(
                    st, active, None, None, at, {"h": entry[f"h{i}{tag}"], "c": entry.get(f"c{i}{tag}")}
                )
            return _SparseJoint(st, active, entry[f"k{i}{tag}"], entry[f"v{i}{tag}"], at)

        skip = set(call.get("skip_layers") or ())
        residuals = call.get("block_controlnet_hidden_states")
        blocks = self.blocks()
        with self.processors(make):
            for i, block in enumerate(blocks):
                if i not in skip:
                    ctx, rows = block(hidden_states=rows, encoder_hidden_states=ctx, temb=temb)
                if residuals is not None and block.context_pre_only is False:
                    interval = len(blocks) / len(residuals)
                    rows = rows + residuals[int(i / interval)][:, active.index]
        return m.proj_out(m.norm_out(rows, temb))

    def kv_macs(self, b: int, n: int, m: int) -> list[int]:
        """Per block, the multiply-accumulates of projecting `n` image and `m` context tokens' keys and values from
        their cached inputs (`dit_cache="hidden"`)."""
        out = []
        for blk in self.blocks():
            attn = blk.attn
            total = n * _numel(attn.to_k, attn.to_v)
            if m and attn.add_k_proj is not None:
                total += m * _numel(attn.add_k_proj, attn.add_v_proj)
            if blk.attn2 is not None:
                total += n * _numel(blk.attn2.to_k, blk.attn2.to_v)
            out.append(b * total)
        return out

    def macs(self, b: int, nq: int, n: int, mq: int, m: int) -> dict:
        """Multiply-accumulates of a call with `nq` image and `mq` context query rows (per sample) over `n` image and
        `m` context tokens: linear layers per row, attention (QK^T and AV) by hand, modulation per sample."""
        model = self.module
        blocks = []
        for blk in self.blocks():
            attn, inner = blk.attn, blk.attn.inner_dim
            image = _numel(attn.to_q, attn.to_k, attn.to_v, attn.to_out, blk.ff)
            context = _numel(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, blk.ff_context)
            total = nq * image + mq * context + _numel(blk.norm1, blk.norm1_context)
            total += 2 * (nq + mq) * (n + m) * inner
            if blk.attn2 is not None:
                total += nq * _numel(blk.attn2) + 2 * nq * n * inner
            blocks.append(b * total)
        embed = nq * _numel(model.pos_embed) + mq * _numel(model.context_embedder) + _numel(model.time_text_embed)
        head = nq * _numel(model.proj_out) + _numel(model.norm_out)
        return {"blocks": blocks, "ends": b * (embed + head)}
