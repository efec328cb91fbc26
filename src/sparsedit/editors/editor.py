"""`SparseEditor`: spatially sparse image editing on a diffusers pipeline (SIGE, Li et al., NeurIPS 2022).

```python
editor = sparsedit.SparseEditor(pipe, sparsedit.SparseConfig())
out0 = editor.capture(image=img, strength=0.7, num_inference_steps=20, generator=g)  # dense; fills the caches
out1 = editor.edit(image=img_with_stroke)  # sparse, the pipeline's own output type
editor.last_stats  # macs_dense, macs_sparse, active_fraction, seconds, cache_bytes
editor.remove()  # the pipeline computes exactly as before
```

Capture runs the pipeline densely (SDEdit: noise the image to `strength`, denoise; inpainting: the pipeline's own
loop with its mask), storing every step's UNet activations under that step's scope and the latent trajectory. An edit
replays the same noise. Each step recomputes only the edited region
and reuses the capture elsewhere, and the latents outside the (dilated) region are the capture's, bit for bit, at
every step. Accepted edits update the caches, so the next edit is incremental against the last result.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..cache import CacheBytes, StaleCacheError
from ..config import OnStale, SparseConfig, TemporalConfig, TextEditConfig
from ..guard import check_commit, make_lock, serialized
from ..spatial import transaction
from ..stats import EditStats
from . import sessions
from .budget import cache_parts, fit_budget, peak_memory
from .capture import Capture, guidance_copies
from .inputs import (
    capture_call,
    check_call_values,
    check_editor,
    edit_call,
    edit_inputs,
    prompt_change,
    unchanged_note,
)
from .loop import Loop, image_size


__all__ = ["SparseEditor"]

# SIGE's setting for diffusion models: the edit region is dilated by 5 pixels before sparse computation.
DIFFUSION_DEFAULTS = SparseConfig(input_dilation=5)


def pinned(method):
    """Run an editor method with its adapter's device and dtype read once (`PipelineAdapter.pinned`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.adapter.pinned():
            return method(self, *args, **kwargs)

    return run


def family_config(adapter) -> SparseConfig:
    """The `SparseConfig` a `SparseEditor` uses when given none: its pipeline family's own (`adapter.default_config`;
    diffusion transformers: `input_dilation=1`, one token), else SIGE's for diffusion models (`input_dilation=5`).
    `adapter`: a pipeline adapter, or a pipeline (its adapter is looked up)."""
    from ..adapters.pipelines import PipelineAdapter, adapter_for

    if not isinstance(adapter, PipelineAdapter):
        adapter = adapter_for(adapter)
    return getattr(adapter, "default_config", None) or DIFFUSION_DEFAULTS


# Committed image edits between dense refreshes (measured drift: benchmarks/drift.py, BENCHMARKS.md).
REFRESH_EVERY = 20


class SparseEditor:
    """Spatially sparse image editing on a diffusers pipeline.

    Args:
        pipe: a `StableDiffusionImg2ImgPipeline` (SDEdit in latent space), a `StableDiffusionInpaintPipeline` (the
            region comes from the change of `mask_image`; 9-channel inpainting UNets and 4-channel UNets with latent
            blending), or a `DDPMPipeline`/`DDIMPipeline` (pixel-space SDEdit, as SIGE's LSUN church model). For
            Stable Diffusion, classifier-free guidance is batched as the pipeline batches it, the VAE decoder runs
            sparse and the decoded image is composited outside the region; the VAE encoder runs sparse too.
        config: the `SparseConfig` for the UNet. Defaults to SIGE's diffusion setting (`input_dilation=5`, in pixels
            of the UNet's input: latent pixels for Stable Diffusion). `cache_dtype` (default `"auto"`: bfloat16 in
            approximate mode) sets the storage of the UNet's per-step cache and of the VAE encoder's and decoder's
            (which take this config with their own input dilation); `cache_device` moves the UNet's;
            `cache_budget` bounds the whole capture (see `capture`).
        on_stale: `"raise"` (default): an edit whose capture no longer matches the pipeline (weights, scheduler)
            raises `StaleCacheError`. `"recapture"`: capture again densely with the same arguments on the current
            image, then edit.
        text_config: the default `TextEditConfig` for prompt edits.
        temporal: a `TemporalConfig`: the capture and every edit reuse features across steps (Faster Diffusion's
            encoder propagation, DeepCache's deep reuse). In an edit, key steps run the encoder sparsely and the other
            steps reuse it, so the two savings multiply. Outside the region the latents stay the capture's, bit for
            bit. Parallel decoding does not compose with per-step caches: `parallel=False`.
        blocking: an editor runs one call at a time (its methods hold a lock). With `True` (default) a call from
            another thread waits for the running one; with `False` it raises `EditorBusyError` instead.
        refresh_every: after this many committed image edits, capture the current image again densely
            (`refresh`), which resets the drift that committed edits accumulate (measured in BENCHMARKS.md). `None`:
            never on its own. Sessions with a committed prompt edit are not refreshed on their own (a dense
            regeneration would change the image outside the edited regions).

    Every call is a transaction: a capture or a committing edit that fails (any exception, Ctrl-C) leaves the
    editor, its caches and its history exactly as they were.
    """

    def __init__(
        self,
        pipe,
        config: SparseConfig | None = None,
        on_stale: OnStale | str = OnStale.RAISE,
        text_config: TextEditConfig | None = None,
        temporal: TemporalConfig | None = None,
        blocking: bool = True,
        refresh_every: int | None = REFRESH_EVERY,
    ):
        adapter, on_stale = check_editor(pipe, temporal, on_stale)
        self.pipe = pipe
        self.adapter = adapter  # what this pipeline family does around the loop (adapters/pipelines.py)
        self.kind = adapter.kind
        self.latent = adapter.latent
        self.on_stale = on_stale
        self.config = family_config(adapter) if config is None else config
        self.text_config = TextEditConfig() if text_config is None else text_config
        if not isinstance(self.text_config, TextEditConfig):
            raise TypeError(f"text_config must be a TextEditConfig, got {type(self.text_config).__name__}.")
        self.temporal = temporal
        self.blocking = bool(blocking)
        if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
            raise ValueError(f"refresh_every must be a positive number of edits or None, got {refresh_every!r}.")
        self.refresh_every = refresh_every
        self._since_refresh = 0
        self._lock = make_lock()
        self._removed = False
        self.loop = Loop(pipe, adapter, self.config, temporal)  # sparsifies the models
        self.controlnet = self.loop.controlnet
        self._capture: Capture | None = None
        self.history: list[dict] = []  # one entry per committed edit since the capture (`history`)
        self.last_stats: EditStats = EditStats()
        self.last_region: torch.Tensor | None = None  # the last edit's regenerated region, bool [B, H, W]

    @property
    def unet(self):
        return self.adapter.unet

    @property
    def progress(self):
        """A callable `progress(steps_done, steps)` called after every denoising step of captures and edits (a
        server's progress bar), or None. It observes only: the results do not depend on it."""
        return self.loop.progress

    @progress.setter
    def progress(self, fn) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"progress must be a callable (steps_done, steps) or None, got {type(fn).__name__}.")
        self.loop.progress = fn

    @serialized
    def remove(self) -> None:
        """Detach everything: the pipeline computes bit-identically to before. The caches are dropped. Calling it
        again does nothing."""
        if self._removed:
            return
        self._removed = True
        self.loop.remove()
        self._capture = None

    @property
    def current(self) -> Capture | None:
        """The current capture (`loop.Capture`): what the next edit runs against; `None` before `capture`."""
        return self._capture

    def _generator(self, generator) -> torch.Generator:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        if isinstance(generator, (list, tuple)):
            raise NotImplementedError(
                "a list of generators (one per image) is not supported yet: pass one torch.Generator (the editor "
                "replays its state to reuse the capture's noise in every edit)."
            )
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be one torch.Generator (it is replayed to reuse the capture's noise).")
        return generator

    def _output(self, x, output_type, return_dict):
        return self.adapter.output(x, output_type, return_dict, latents=self.loop.last_latents)

    # -- capture ------------------------------------------------------------------------------------------------------
    @serialized
    @pinned
    @torch.no_grad()
    def capture(
        self,
        image=None,
        prompt: str | list[str] | None = None,
        strength: float | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        mask_image=None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        **pipeline_kwargs,
    ):
        """Run the pipeline densely on `image` and cache what edits need. Returns the pipeline's own output type,
        bit-identical to calling the pipeline with the same arguments.

        Args:
            strength: SDEdit's noise level; defaults to 0.7 for SDEdit, to the pipeline's 1.0 for inpainting and to
                the ControlNet pipelines' own defaults.
            mask_image: inpainting only; `None` masks nothing (edits then bring masks in).
            height, width: the size the image is resized to, as the pipeline takes them. The inpainting pipeline's
                default is the UNet's sample size (512 px for SD 1.5); the others keep the image's size.
            output_type: as the pipeline takes it, `"latent"` included (the final latents, not decoded).
            eta, prompt_embeds, negative_prompt_embeds: as the pipeline takes them (a capture from embeddings cannot
                be saved with `save`, and prompt edits need prompts).
            callback_on_step_end: called after every step as the pipeline calls it, with the tensors named in
                `callback_on_step_end_tensor_inputs` (`"latents"`); it may observe them but not change them (edits
                replay the capture's trajectory).
            pipeline_kwargs: the pipeline family's own arguments, with the pipeline's defaults: for the ControlNet
                pipelines `control_image` (required), `controlnet_conditioning_scale`, `guess_mode`,
                `control_guidance_start` and `control_guidance_end`.
        """
        x0, mask, call, inputs = capture_call(
            self, image, prompt, strength, num_inference_steps, guidance_scale, negative_prompt, mask_image, height,
            width, eta, prompt_embeds, negative_prompt_embeds, callback_on_step_end_tensor_inputs, pipeline_kwargs,
        )  # fmt: skip
        self.loop.callback = (callback_on_step_end, tuple(callback_on_step_end_tensor_inputs))
        if callback_on_step_end is None:
            self.loop.callback = None
        try:
            decoded = self._run_capture(x0, mask, call, self._generator(generator), inputs)
        finally:
            self.loop.callback = None
        self.history = []
        return self._output(decoded, output_type, return_dict)

    @serialized
    @pinned
    @torch.no_grad()
    def refresh(self):
        """Capture the current (committed) state again, densely: the caches become a fresh capture's, dropping the
        drift that committed edits accumulate near their regions. The result is the pipeline's own for the current
        image; after a prompt edit, the current prompt regenerates the whole image. Returns the result as `edit`
        does (`output_type="pt"`) and records a `"refresh"` entry in `history`."""
        cap = self._capture
        if cap is None:
            raise RuntimeError("Nothing captured yet: call `editor.capture(...)` first.")
        self._recapture(cap)
        self._since_refresh = 0
        self.history.append({"edit": cap.version, "kind": "refresh", "seconds": self.last_stats["seconds"]})
        return self._output(self._capture.decoded, "pt", True)

    def _run_capture(self, x0, mask, call, generator, inputs) -> torch.Tensor:
        loop = self.loop
        state = generator.get_state()
        timesteps = loop.timesteps(call["num_inference_steps"], call["strength"], image_size(x0))
        self.adapter.use_options(call)
        embeds = loop.embeds(call["prompt"], call["negative_prompt"], call["guidance_scale"], self.adapter.batch(x0),
                             call.get("prompt_embeds"), call.get("negative_prompt_embeds"))  # fmt: skip
        budget = None
        # One transaction: a capture that fails (any exception, Ctrl-C) leaves the previous one in place; it is kept
        # (by reference) until the new one completes.
        with transaction(*loop.models().values()):
            if self.config.budget_bytes is not None:  # measured by dry runs, before anything is stored
                copies = guidance_copies(embeds, call["guidance_scale"], self.adapter.batches_guidance)
                budget = fit_budget(self, x0, call, embeds, timesteps, copies)
                loop.sync_attention_storage()
            with peak_memory(self.adapter.device) as peak:
                capture, stats = loop.capture(x0, mask, call, generator, state, timesteps, embeds, inputs,
                                              self.text_config)  # fmt: skip
        self._capture, self.last_stats = capture, stats
        self._since_refresh = 0
        self.last_stats["cache_bytes"] = self.cache_bytes
        self.last_stats.update(peak)
        if budget is not None:
            self.last_stats["budget"] = budget
        return self._capture.decoded

    @property
    def cache_bytes(self) -> CacheBytes:
        """Bytes held for edits (an int), by part: `"unet"` (the per-step activations), `"vae_encoder"`,
        `"vae_decoder"`, `"text"` (prompt embeddings and stored cross-attention probabilities) and `"latents"` (the
        trajectory, the encoded images and the decoded result). `.offloaded` says how many of them are on disk."""
        if self._removed:
            raise RuntimeError("this SparseEditor was removed (`editor.remove()`): it holds no caches any more.")
        return cache_parts(self)

    @serialized
    def save(self, path) -> None:
        """Write this session (the capture, every cache, the edit state and the pipeline's fingerprint) to the
        directory `path` (safetensors files and a JSON manifest). `SparseEditor.load(pipe, path)` resumes it: the
        next edit is bit-identical to the one this editor would make."""
        sessions.save_editor(self, path)

    @classmethod
    def load(cls, pipe, path, *, mmap: bool = True) -> SparseEditor:
        """Resume a session written by `editor.save(path)` on `pipe` (a pipeline of the same class, weights,
        scheduler and config; otherwise `StaleCacheError` names what differs). With `mmap`, the caches are
        memory-mapped copy-on-write from the files (the OS pages them in as edits touch them); `mmap=False` reads
        them into memory."""
        editor = sessions.load_editor(cls, pipe, path)
        try:
            editor._capture, editor.history = sessions.load_capture(editor, path, mmap=mmap)
            editor.loop.check(editor._capture)
        except BaseException:
            editor.remove()
            raise
        return editor

    # -- edit ---------------------------------------------------------------------------------------------------------
    @serialized
    @pinned
    @torch.no_grad()
    def edit(
        self,
        image=None,
        region: torch.Tensor | None = None,
        mask_image=None,
        commit: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        text_config: TextEditConfig | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        strength: float | None = None,
        **pipeline_kwargs,
    ):
        """Edit the captured result: only the changed region is recomputed, at every step.

        Args:
            image: the edited image. `None` keeps the current image.
            region: bool `[H, W]` or `[B, H, W]` at image resolution. For an image edit, `None` uses every pixel where
                `image` (or the inpainting mask) differs from the current one. For a prompt edit, an explicit region
                is the region to regenerate (`TextEditConfig(region="mask")`); `None` detects it. With neither a
                change nor a region, the current result comes back at no cost.
            mask_image: inpainting: the new mask (`None` keeps the current one). The region covers every pixel
                whose masking changed.
            commit: make the result the new current image (and prompt), so the next edit is incremental against it.
            prompt, negative_prompt: a prompt edit (`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`): the
                new prompt; `None` keeps the current one. The region the change affects is found as `text_config`
                says (default: the editor's), then regenerated sparsely; outside it the latents are the current
                ones. An unchanged prompt gives an empty region and the current image.
            text_config: a `TextEditConfig` for this edit (default: the one the editor was made with).
            generator, num_inference_steps, guidance_scale, strength: only to check: the capture fixed them, and a
                different value means the cache belongs to another generation (`StaleCacheError`, or a new capture
                with these values under `on_stale="recapture"`).
            pipeline_kwargs: the pipeline family's own arguments. An extra image (the ControlNet's `control_image`)
                is part of the edit: the region covers every pixel where it changed. An option
                (`controlnet_conditioning_scale`, ...) is checked like `strength`.
        """
        commit = check_commit(commit)
        check_call_values(num_inference_steps, strength, guidance_scale)
        cap, tcfg, text, options, images = edit_call(self, prompt, negative_prompt, text_config, region,
                                                     pipeline_kwargs)  # fmt: skip
        cap, recaptured = self._check_call(cap, generator, num_inference_steps, guidance_scale, strength, options)
        x0, mask, inputs, region, changed, ignored = edit_inputs(self, cap, image, mask_image, images, region)
        unchanged = None if text else unchanged_note(ignored, region, self.config.change_threshold)
        if unchanged is not None:
            warnings.warn(unchanged, RuntimeWarning, stacklevel=3)
        change = None
        if text:
            change, region = prompt_change(cap, prompt, negative_prompt, tcfg, region, changed)
        out, again = self._run_or_recapture(cap, x0, mask, inputs, region, commit, output_type, return_dict, change)
        if again is not None or recaptured is not None:
            self.last_stats["recaptured_seconds"] = again if again is not None else recaptured
        self.last_stats["ignored_pixels"] = ignored  # changed by no more than change_threshold, or outside region
        if unchanged is not None:
            self.last_stats["unchanged"] = unchanged
        return out

    def _run_or_recapture(self, cap, *args):
        """`_run_edit`; under `on_stale="recapture"`, a capture found stale is captured again first. Returns the
        output and the seconds the recapture took (`None`: none)."""
        try:
            return self._run_edit(cap, *args), None
        except StaleCacheError:
            if self.on_stale is not OnStale.RECAPTURE:
                raise
        # The capture no longer matches the pipeline: capture the current image again, then edit.
        self._recapture(cap)
        seconds = self.last_stats["seconds"]
        return self._run_edit(self._capture, *args), seconds

    def _recapture(self, cap) -> None:
        generator = cap.generator()
        version = cap.version
        self._run_capture(cap.image, cap.mask, cap.call, generator, cap.inputs or {})
        self._capture.version = version  # the same state, captured afresh

    def _check_call(self, cap, generator, num_inference_steps, guidance_scale, strength, options=None):
        """An edit that names another seed, step count, guidance, strength or pipeline option than the capture's
        asks for another generation: refuse (the cache would be stale), or capture again with those values
        (`on_stale="recapture"`)."""
        asked = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "strength": strength,
                 **(options or {})}  # fmt: skip
        differ = [f"{k}={v} (captured: {cap.call[k]})" for k, v in asked.items() if v is not None and v != cap.call[k]]
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError("generator must be one torch.Generator.")
            same = str(generator.device) == cap.generator_device and torch.equal(
                generator.get_state(), cap.generator_state
            )
            if not same:
                differ.append("generator (its seed or state differs from the capture's)")
        if not differ:
            return cap, None
        if self.on_stale is not OnStale.RECAPTURE:
            raise StaleCacheError(
                f"this edit asks for {', '.join(differ)}: the cache holds another generation. Capture again with "
                "these values, or make the editor with on_stale='recapture'."
            )
        cap.call.update({k: v for k, v in asked.items() if v is not None})
        if generator is not None:
            cap.generator_state, cap.generator_device = generator.get_state(), str(generator.device)
        self._recapture(cap)
        return self._capture, self.last_stats["seconds"]

    @serialized
    @pinned
    @torch.no_grad()
    def find_region(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        text_config: TextEditConfig | None = None,
    ) -> torch.Tensor:
        """The region `edit(prompt=..., negative_prompt=...)` would regenerate, without editing: bool `[B, H, W]` at
        image resolution (after `TextEditConfig.dilation`). Nothing is committed; `last_stats["detect_seconds"]`
        says what finding it cost. Useful to show the region before accepting an edit."""
        tcfg = self.text_config if text_config is None else text_config
        region, self.last_stats = self.loop.prompt.find_region(self._capture, prompt, negative_prompt, tcfg)
        return region

    def _run_edit(self, cap, x0, mask, inputs, region, commit, output_type, return_dict, change=None):
        with peak_memory(self.adapter.device) as peak:
            decoded, self.last_stats, self.last_region = self.loop.edit(cap, x0, mask, inputs, region, commit, change)
        self.last_stats["cache_bytes"] = self.cache_bytes
        self.last_stats.update(peak)
        frac = self.last_stats["region_fraction"]
        if self.last_stats.get("ran_dense") and frac > 0.9:
            warnings.warn(
                f"this edit changed {100 * frac:.0f}% of the image, so it ran as a dense regeneration "
                f"({self.last_stats['ran_dense']}). If you painted on the result instead of the input image, paint on "
                "the input (`editor.current.image`); if the image was re-encoded (JPEG) or converted, raise "
                "SparseConfig(change_threshold=...) above its noise.",
                RuntimeWarning,
                stacklevel=4,
            )
        if commit and self.last_stats["macs_sparse"]:
            self.history.append({
                "edit": cap.version,
                "kind": "prompt" if change is not None else "image",
                "prompt": cap.call["prompt"] if isinstance(cap.call["prompt"], (str, list, type(None))) else None,
                "region_fraction": self.last_stats["region_fraction"],
                "seconds": self.last_stats["seconds"],
            })  # fmt: skip
            self._since_refresh += 1
            prompted = any(h["kind"] == "prompt" for h in self.history)
            if self.refresh_every and self._since_refresh >= self.refresh_every and not prompted:
                stats = self.last_stats
                self.refresh()  # the committed state, captured afresh; this edit's result is that capture's
                stats["refresh_seconds"] = self.last_stats["seconds"]
                self.last_stats = stats
                decoded = self._capture.decoded
        return self.adapter.output(decoded, output_type, return_dict, latents=self.loop.last_latents)
