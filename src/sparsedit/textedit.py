"""Prompt edits (FISEdit, Yu et al., AAAI 2024): find the region a prompt change affects, regenerate only that.

```python
editor = sparsedit.SparseEditor(pipe)  # StableDiffusionPipeline or StableDiffusionImg2ImgPipeline
editor.capture(prompt="a red house by a lake", generator=torch.Generator().manual_seed(0))
out = editor.edit(prompt="a blue house by a lake")  # region found, then regenerated sparsely
editor.last_stats["region_fraction"], editor.last_stats["detect_seconds"], editor.last_region
```

This module holds the pieces `SparseEditor.edit(prompt=...)` puts together: token alignment between two prompts,
the three region detectors (latent difference with Otsu's threshold, cross-attention maps of the changed words,
noise-prediction difference), and the cross-attention processor that records the capture's attention and injects
it into edits (Prompt-to-Prompt's refine/replace).
"""

from __future__ import annotations

import difflib
import math
import time

import torch
import torch.nn.functional as F

from .config import Injection, RegionMethod, TextEditConfig
from .regions import dilate, to_latents, to_pixels
from .spatial import editing
from .stats import EditStats


__all__ = [
    "AttentionControl",
    "TextEditConfig",
    "align_tokens",
    "cross_attention_region",
    "noise_diff_region",
    "latent_diff_region",
    "opening",
    "otsu_threshold",
]


# -- tokens -------------------------------------------------------------------------------------------------------------


def token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The padded token ids the text encoder sees, as `encode_prompt` tokenizes them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def align_tokens(source: list[int], target: list[int], special: set[int] = frozenset()):
    """Align two token sequences (prompts of any length) with a longest-matching-blocks diff.

    Returns:
        `(mapping, changed_source, changed_target)`: `mapping[j]` is the source position of target token `j`, or -1
        where the target token is new; the two bool lists mark the word tokens (not `special` ones: start, end,
        padding) that were replaced, inserted or deleted.
    """
    matcher = difflib.SequenceMatcher(a=source, b=target, autojunk=False)
    mapping = [-1] * len(target)
    changed_s = [False] * len(source)
    changed_t = [False] * len(target)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for k in range(i2 - i1):
                mapping[j1 + k] = i1 + k
            continue
        for i in range(i1, i2):
            changed_s[i] = source[i] not in special
        for j in range(j1, j2):
            changed_t[j] = target[j] not in special
    return mapping, changed_s, changed_t


# -- masks --------------------------------------------------------------------------------------------------------------


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D set of values: the cut that maximises the between-class variance."""
    v = values.flatten().float()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0)
    mu0 = m0 / w0.clamp(min=1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    k = int(between.argmax())
    return lo + (k + 1) * (hi - lo) / bins  # the upper edge of the last bin of the lower class


def opening(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Morphological opening of a `[B, H, W]` bool mask with a `size`x`size` square: removes specks narrower than
    `size`, keeps every larger shape as it is. The border does not erode."""
    if size <= 1:
        return mask
    m = mask[:, None].float()
    lo, hi = (size - 1) // 2, size // 2
    eroded = -F.max_pool2d(F.pad(-m, (lo, hi, lo, hi), value=-1.0), size, stride=1)
    opened = F.max_pool2d(F.pad(eroded, (hi, lo, hi, lo), value=0.0), size, stride=1)
    return opened[:, 0] > 0.5


def latent_diff_region(edited: list[torch.Tensor], original: list[torch.Tensor], config: TextEditConfig):
    """FISEdit's region: per step `sum_c |z_edit - z_orig|`, min-max normalised per image, summed over the steps,
    Otsu-thresholded per image, opened. Returns `[B, h, w]` bool."""
    total = 0
    for a, b in zip(edited, original, strict=True):
        d = (a.float() - b.float()).abs().sum(dim=1)
        lo = d.amin(dim=(1, 2), keepdim=True)
        hi = d.amax(dim=(1, 2), keepdim=True)
        total = total + (d - lo) / (hi - lo).clamp(min=1e-12)
    return _threshold_each(total, otsu_threshold, config)


def _threshold_each(score: torch.Tensor, cut, config: TextEditConfig) -> torch.Tensor:
    region = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    for n, s in enumerate(score):
        if float(s.max()) > float(s.min()):  # a flat score carries no region
            region[n] = s > cut(s)
    opened = opening(region, config.opening)
    # An opening that removes everything found would turn a small change into no edit at all (measured on scene-sd:
    # a snow-line swap at 16x16 latents): keep the specks then.
    lost = ~opened.flatten(1).any(dim=1)
    opened[lost] = region[lost]
    return opened


def cross_attention_region(maps: torch.Tensor, words: torch.Tensor, size, config: TextEditConfig) -> torch.Tensor:
    """LocalBlend's mask from cross-attention maps `[B, h, w, L]` (mean over heads, layers and steps) of the chosen
    tokens (`words`: bool `[B, L]`): summed over the words, 3x3 max-pooled, resized to the latent `size`, normalised
    by its maximum and thresholded. Returns `[B, H, W]` bool (empty where no word is chosen)."""
    m = (maps.float() * words[:, None, None, :].float()).sum(-1)[:, None]
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    m = F.interpolate(m, size=tuple(size), mode="nearest")[:, 0]
    peak = m.amax(dim=(1, 2), keepdim=True)
    return (m / peak.clamp(min=1e-12) > config.attention_threshold) & (peak > 0)


def noise_diff_region(diff: torch.Tensor, config: TextEditConfig) -> torch.Tensor:
    """DiffEdit-like: `diff` `[B, h, w]` (mean |eps_target - eps_source|), thresholded at `noise_threshold` times its
    per-image mean, opened."""
    return _threshold_each(diff, lambda s: config.noise_threshold * float(s.mean()), config)


# -- cross-attention: record the capture's maps and probabilities, inject them into edits ------------------------------


def _heads(attn, t):
    b, n, _ = t.shape
    return t.view(b, n, attn.heads, -1).transpose(1, 2)


def _probs(attn, q_in, context):
    q = _heads(attn, attn.to_q(q_in))
    k = _heads(attn, attn.to_k(context))
    return (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(dim=-1)


def _attend_probs(attn, probs, context, dtype):
    b, heads, n, _ = probs.shape
    v = _heads(attn, attn.to_v(context))
    o = (probs @ v.float()).transpose(1, 2).reshape(b, n, -1).to(dtype)
    return attn.to_out[1](attn.to_out[0](o))


class AttentionControl:
    """What the UNet's cross-attention layers record or inject at the current step; shared by their processors.

    Attributes:
        step: the denoising step being run (the editor sets it before each UNet call).
        record_maps: steps at which to add the maps of the `map_tokens`-sized layers (mean over heads) to `maps`.
        record_probs: steps at which to store each layer's conditional-branch probabilities in `probs`.
        inject: `None`, or `(steps, mapping [Bc, L] long, probs)`: at those steps the conditional rows of every layer
            take `probs[(layer, step)]` for the tokens `mapping` aligns (-1: keep the new token's own map).
        cond: the rows of the conditional branch in the UNet's batch (the second half under guidance).
    """

    def __init__(self):
        self.step: int | None = None
        self.record_maps: set[int] = set()
        self.record_probs: set[int] = set()
        self.map_tokens: int | None = None
        self.maps: dict[int, list] = {}  # step -> [sum of maps, layers counted]
        self.probs: dict[tuple[str, int], torch.Tensor] = {}
        self.storage_dtype: torch.dtype | None = None
        self.inject = None
        self.cond = slice(None)

    def idle(self) -> None:
        self.record_maps, self.record_probs, self.inject, self.step = set(), set(), None, None

    def _injecting(self, name):
        if self.inject is None or self.step not in self.inject[0]:
            return None
        src = self.inject[2].get((name, self.step))
        if src is None:
            raise RuntimeError(f"no captured attention for {name} at step {self.step}; capture again.")
        return self.inject[1], src

    def _injected(self, probs, mapping, src):
        cond = probs[self.cond]
        src = src.to(cond.dtype)
        index = mapping.clamp(min=0)[:, None, None, :].expand_as(src)
        taken = torch.gather(src, -1, index)
        mixed = torch.where((mapping >= 0)[:, None, None, :], taken, cond)
        out = probs.clone()
        out[self.cond] = mixed
        return out

    def _record(self, name, probs, tokens):
        if self.step in self.record_maps and tokens == self.map_tokens:
            entry = self.maps.setdefault(self.step, [0, 0])
            entry[0] = entry[0] + probs.mean(dim=1)
            entry[1] += 1
        if self.step in self.record_probs:
            p = probs[self.cond]
            self.probs[(name, self.step)] = p.to(self.storage_dtype) if self.storage_dtype else p.clone()

    def wants(self, name) -> bool:
        return self.step is not None and (
            self.step in self.record_maps or self.step in self.record_probs or self._injecting(name) is not None
        )


class ControlledCrossAttention:
    """A cross-attention processor: the wrapped processor's exact result unless its `AttentionControl` records or
    injects at this step. Recording keeps the wrapped result (a capture stays bit-identical to the pipeline); the
    maps are computed beside it. Sparse runs call `sparse_attend` for the active query tokens."""

    def __init__(self, control: AttentionControl, name: str, wrapped):
        self.control = control
        self.name = name
        self.wrapped = wrapped

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        ctl = self.control
        plain = encoder_hidden_states is None or attention_mask is not None or hidden_states.dim() != 3 or a or kw
        if plain or not ctl.wants(self.name):
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *a, **kw)
        probs = _probs(attn, hidden_states, encoder_hidden_states)
        ctl._record(self.name, probs, hidden_states.shape[1])
        inject = ctl._injecting(self.name)
        if inject is None:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        probs = ctl._injected(probs, *inject)
        return _attend_probs(attn, probs, encoder_hidden_states, hidden_states.dtype)

    def sparse_attend(self, attn, q_in, context, active, plain):
        """Cross-attention of the active query tokens `q_in` (`[B, n, C]`, pixels `active` of the map); `plain` is
        the uncontrolled computation."""
        inject = self.control._injecting(self.name)
        if inject is None:
            return plain()
        mapping, src = inject
        probs = self.control._injected(_probs(attn, q_in, context), mapping, src[:, :, active])
        return _attend_probs(attn, probs, context, q_in.dtype)


def install(unet, control: AttentionControl) -> dict:
    """Wrap every cross-attention processor of `unet`; returns the originals (by module name) for `uninstall`."""
    originals = {}
    for name, module in unet.named_modules():
        if type(module).__name__ == "Attention" and getattr(module, "is_cross_attention", False):
            originals[name] = module.processor
            module.set_processor(ControlledCrossAttention(control, name, module.processor))
    return originals


def uninstall(unet, originals: dict) -> None:
    modules = dict(unet.named_modules())
    for name, processor in originals.items():
        modules[name].set_processor(processor)


def check_installed(unet, control: AttentionControl) -> None:
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and type(module).__name__ == "Attention":
            p = module.processor
            if not isinstance(p, ControlledCrossAttention) or p.control is not control:
                raise RuntimeError(
                    f"the cross-attention processor of {name} was replaced after the editor was made (e.g. by "
                    "`set_attn_processor`); make the SparseEditor after changing processors."
                )


def map_resolution(unet, latent_size, downscale: int) -> tuple[int, int]:
    """The cross-attention resolution nearest `latent / downscale` (ties: the larger), as LocalBlend's 16x16 at 64."""
    h, w = latent_size
    sizes = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sizes.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = (h + 1) // 2, (w + 1) // 2
    if not sizes:
        raise ValueError("this UNet has no cross-attention layers; use TextEditConfig(region='latent_diff').")
    goal = math.log(latent_size[0] / downscale)
    return min(sizes, key=lambda s: (abs(math.log(s[0]) - goal), -s[0]))


class PromptEdits:
    """The prompt-edit technique (FISEdit's region detection, Prompt-to-Prompt's attention injection) on a
    `SparseEditor`: recording the capture's cross-attention, aligning the old and new prompts' tokens, and finding
    the region a prompt change affects. The `Loop` owns the runs and the caches; this owns the technique, drives the
    loop's public steps (`prepare`, `predictor`, `run`) on the capture it is given for its dense detection steps, and
    returns what it found and cost (`take_macs`); the run that asked decides what to keep."""

    def __init__(self, loop):
        self.loop = loop
        self.macs = 0  # dense work beyond the steps (recomputed attention, guided predictions) since `take_macs`

    def take_macs(self) -> int:
        """The MACs of dense work this technique did since the last call (a dense regeneration does not do it)."""
        macs, self.macs = self.macs, 0
        return macs

    def record_attention(self, map_steps, prob_steps, z, copies, text_config, version=0):
        """Make the cross-attention layers record maps (at `map_steps`) and probabilities (at `prob_steps`) during
        the UNet calls that follow; returns the function that stops recording and returns what was recorded."""
        ed = self.loop
        ctl = ed.attention
        if ctl is None or not ed.adapter.text_editable:
            return lambda: None
        size = map_resolution(ed.unet, tuple(z.shape[-2:]), text_config.attention_downscale)
        ctl.maps, ctl.probs = {}, {}
        ctl.map_tokens = size[0] * size[1]
        ctl.cond = slice(z.shape[0], None) if copies == 2 else slice(None)
        ctl.record_maps, ctl.record_probs = set(map_steps), set(prob_steps)

        def done():
            maps = {i: (total / n).reshape(total.shape[0], *size, -1) for i, (total, n) in ctl.maps.items()}
            out = {"maps": maps, "probs": dict(ctl.probs), "size": size, "version": version}
            ctl.record_maps, ctl.record_probs = set(), set()
            ctl.maps, ctl.probs = {}, {}
            return out

        return done

    def attention(self, cap, text_config, map_steps, prob_steps) -> dict:
        """The current image's cross-attention maps and probabilities at the given steps: the capture's records, or
        (after a committed edit changed the trajectory or the prompt) recomputed by dense UNet calls on the current
        trajectory, which give exactly what a capture of it would have recorded."""
        ed = self.loop
        size = map_resolution(ed.unet, tuple(cap.trajectory[0].shape[-2:]), text_config.attention_downscale)
        att = cap.attention
        if att is None or att["version"] != cap.version or att["size"] != size:
            att = {"maps": {}, "probs": {}, "size": size, "version": cap.version}
        have_probs = {step for _, step in att["probs"]}
        need_maps = [i for i in map_steps if i not in att["maps"]]
        need_probs = [i for i in prob_steps if i not in have_probs]
        if need_maps or need_probs:
            gs = cap.call["guidance_scale"]
            predict, copies = ed.predictor(cap.embeds, gs, {}, lambda i, call_unet: call_unet())
            recording = self.record_attention(need_maps, need_probs, cap.trajectory[0], copies, text_config,
                                               cap.version)  # fmt: skip
            inject, ed.attention.inject = ed.attention.inject, None  # the current image's own attention
            try:
                for i in sorted(set(need_maps) | set(need_probs)):
                    predict(i, cap.timesteps[i], cap.trajectory[i])
                    self.macs += cap.step_macs
            finally:
                fresh = recording()
                ed.attention.inject = inject
            att["maps"].update(fresh["maps"])
            att["probs"].update(fresh["probs"])
            ed.check(cap)  # scale_model_input may have moved a scheduler's step index
        cap.attention = att
        return att

    def prompt_tokens(self, prompt, negative, b):
        """Per image: the prompt's and the negative prompt's padded token ids."""
        ed = self.loop

        def per_image(p):
            plist = [p if p is not None else ""] if not isinstance(p, list) else p
            return token_ids(ed.pipe.tokenizer, [q for q in plist for _ in range(b // len(plist))])

        return per_image(prompt), per_image(negative)

    def alignment(self, cap, prompt, negative, b, copies):
        """Token alignment of the current and the new prompts: `mapping` `[b, L]` (cond rows) and the changed word
        tokens of every UNet batch row, in the source and in the target (`[copies * b, L]` bool each)."""
        ed = self.loop
        tok = ed.pipe.tokenizer
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        src_p, src_n = self.prompt_tokens(cap.call["prompt"], cap.call["negative_prompt"], b)
        tgt_p, tgt_n = self.prompt_tokens(prompt, negative, b)
        rows = list(zip(src_n, tgt_n)) * (copies == 2) + list(zip(src_p, tgt_p))
        aligned = [align_tokens(s, t, special) for s, t in rows]
        device = ed.adapter.device
        mapping = torch.tensor([m for m, _, _ in aligned[-b:]], device=device)
        changed_s = torch.tensor([c for _, c, _ in aligned], device=device)
        changed_t = torch.tensor([c for _, _, c in aligned], device=device)
        return mapping, changed_s, changed_t

    def guided(self, z, t, embeds_list, guidance_scale, step_macs: int):
        """Guided noise predictions of `z` at `t` under each of `embeds_list`, in one UNet call (no scheduler
        scaling: `z` is a variance-preserving noised latent)."""
        ed = self.loop
        copies = embeds_list[0].shape[0] // z.shape[0]
        n = len(embeds_list)
        ed.attention.step = None  # no step's recording or injection applies
        self.macs += step_macs * n
        eps = ed.unet(torch.cat([z] * (copies * n)), t, encoder_hidden_states=torch.cat(embeds_list),
                        return_dict=False)[0]  # fmt: skip
        out = []
        for e in eps.chunk(n):
            if copies == 2:
                uncond, text = e.chunk(2)
                e = uncond + guidance_scale * (text - uncond)
            out.append(e)
        return out

    def noise_diff(self, cap, embeds, text_config) -> torch.Tensor:
        """DiffEdit's score: mean over noise draws of `|eps(new prompt) - eps(current prompt)|`, channels averaged,
        on the current result noised to `noise_strength`."""
        ed = self.loop
        sched = ed.pipe.scheduler
        if getattr(sched, "alphas_cumprod", None) is None:
            raise NotImplementedError(
                f"{type(sched).__name__} has no alphas_cumprod; use TextEditConfig(region='latent_diff')."
            )
        z0 = cap.trajectory[-1]
        goal = text_config.noise_strength * sched.config.num_train_timesteps
        t = min(cap.timesteps, key=lambda s: abs(float(s) - goal))
        ab = sched.alphas_cumprod[int(t)].to(device=z0.device, dtype=torch.float32)
        g = torch.Generator(device=z0.device).manual_seed(text_config.seed)
        score = 0
        for _ in range(text_config.noise_samples):
            noise = torch.randn(z0.shape, generator=g, device=z0.device, dtype=torch.float32)
            zt = (ab.sqrt() * z0.float() + (1 - ab).sqrt() * noise).to(z0.dtype)
            src, tgt = self.guided(zt, t, [cap.embeds, embeds], cap.call["guidance_scale"], cap.step_macs)
            score = score + (tgt.float() - src.float()).abs().mean(dim=1)
        return score / text_config.noise_samples

    def injection(self, cap, change, b, copies):
        """Prompt-to-Prompt's attention injection for this edit (`AttentionControl.inject`), or `None`."""
        ed = self.loop
        tcfg = change["config"]
        if tcfg.inject_attention <= 0:
            return None
        n_inject = tcfg.inject_steps(len(cap.timesteps))
        probs = self.attention(cap, tcfg, [], range(n_inject))["probs"]
        mapping, _, _ = self.alignment(cap, change["prompt"], change["negative_prompt"], b, copies)
        if tcfg.injection is Injection.REPLACE:
            src, tgt = (self.prompt_tokens(p, None, b)[0] for p in (cap.call["prompt"], change["prompt"]))
            eos = ed.pipe.tokenizer.eos_token_id
            if any(s.index(eos) != t.index(eos) for s, t in zip(src, tgt, strict=True)):
                raise ValueError(
                    "injection='replace' swaps words of equal token length; these prompts differ in length. "
                    "Use TextEditConfig(injection='refine')."
                )
            mapping = torch.arange(mapping.shape[1], device=mapping.device).expand_as(mapping)
        check_installed(ed.unet, ed.attention)
        ed.attention.cond = slice(b, None) if copies == 2 else slice(None)
        return set(range(n_inject)), mapping, probs

    def detect(self, cap, change, embeds, prep, generator, copies, predict_dense):
        """The latent region a prompt change affects (`[b, h, w]` bool), the step the sparse run starts at and the
        dense latents there (latent_diff, cross_attention: the first steps run densely)."""
        ed = self.loop
        tcfg = change["config"]
        z_shape = cap.trajectory[0].shape[-2:]
        if change["region"] is not None:
            return to_latents(change["region"], z_shape), 0, None
        if tcfg.region is RegionMethod.NOISE_DIFF:
            return noise_diff_region(self.noise_diff(cap, embeds, tcfg), tcfg), 0, None
        k = tcfg.steps_for(len(cap.timesteps))
        attention = recording = None
        if tcfg.region is RegionMethod.CROSS_ATTENTION:
            attention = self.attention(cap, tcfg, range(k), [])
            recording = self.record_attention(range(k), [], prep["z"], copies, tcfg)
        try:
            z, dense = ed.run(prep, cap.timesteps, generator, predict_dense, lambda i, z: z, stop=k)
        finally:
            target = recording() if recording is not None else None
        if tcfg.region is RegionMethod.LATENT_DIFF:
            region = latent_diff_region(dense[1:], cap.trajectory[1 : k + 1], tcfg)
        else:
            b = cap.trajectory[0].shape[0]
            _, words_s, words_t = self.alignment(cap, change["prompt"], change["negative_prompt"], b, copies)
            src = torch.stack([attention["maps"][i] for i in range(k)]).mean(0)
            tgt = torch.stack([target["maps"][i] for i in range(k)]).mean(0)
            rows = cross_attention_region(src, words_s, z_shape, tcfg)
            rows |= cross_attention_region(tgt, words_t, z_shape, tcfg)
            region = rows.reshape(copies, b, *z_shape).any(dim=0)
        return region, k, z

    def find_region(self, cap, prompt, negative_prompt, tcfg) -> tuple[torch.Tensor, EditStats]:
        """`SparseEditor.find_region`: the region a prompt change would regenerate, found without editing, and what
        finding it cost."""
        ed = self.loop
        if cap is None:
            raise RuntimeError("Nothing captured yet: call `editor.capture(...)` first.")
        if not ed.adapter.text_editable:
            raise ValueError(f"prompt edits need a Stable Diffusion text pipeline, not {type(ed.pipe).__name__}.")
        if tcfg.region is RegionMethod.MASK:
            raise ValueError("TextEditConfig(region='mask') finds nothing: the region is the one you pass.")
        change = {
            "prompt": cap.call["prompt"] if prompt is None else prompt,
            "negative_prompt": cap.call["negative_prompt"] if negative_prompt is None else negative_prompt,
            "config": tcfg,
            "region": None,
        }
        ed.check(cap)
        ed.adapter.use_options(cap.call)
        started = time.perf_counter()
        b = ed.adapter.batch(cap.image)
        h, w = cap.decoded.shape[-2:]
        gs = cap.call["guidance_scale"]
        copies = cap.copies
        embeds = ed.embeds(change["prompt"], change["negative_prompt"], gs, b)
        found = torch.zeros(b, *cap.trajectory[0].shape[-2:], dtype=torch.bool, device=ed.adapter.device)
        self.take_macs()
        if not torch.equal(embeds, cap.embeds):
            generator = cap.generator()
            try:
                ed.attention.inject = self.injection(cap, change, b, copies)
                x0 = cap.image
                empty = torch.zeros(b, h, w, dtype=torch.bool, device=ed.adapter.device)
                with ed.encoder_mode(editing, region=empty, commit=False):
                    prep = ed.prepare(x0, None, generator, cap.timesteps, cap.call, cap.inputs or {}, copies,
                                       keep=found, cap=cap)  # fmt: skip
                predict, _ = ed.predictor(embeds, gs, prep, lambda i, call_unet: call_unet())
                found, k, _ = self.detect(cap, change, embeds, prep, generator, copies, predict)
                found = dilate(found, tcfg.dilation)
                self.macs += k * cap.step_macs
            finally:
                ed.attention.idle()
                ed.check(cap)
        region = to_pixels(found, (h, w))
        stats = EditStats.of(
            {
                "detect_seconds": time.perf_counter() - started,
                "region_fraction": float(region.float().mean()),
                "region_method": tcfg.region,
                "macs_detect": self.take_macs(),
                "macs_dense": cap.macs,
            }
        )
        return region, stats
