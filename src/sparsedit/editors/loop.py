"""The denoising loop under `SparseEditor`: the sparsified models of one pipeline, the dense capture run that fills
their caches, and the sparse edit run that recomputes only the region at every step.

`SparseEditor` (editor.py) is the front: it checks arguments, keeps the session (the current `Capture`, the history,
`last_stats`) and calls `Loop.capture` and `Loop.edit`. The adapter (adapters/pipelines.py) says what differs between
pipeline families; the prompt-edit technique (textedit.PromptEdits) drives `Loop.prepare`, `Loop.predictor` and
`Loop.run` for its dense detection steps.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .. import temporal as temporal_reuse
from .. import textedit
from ..cache import StaleCacheError
from ..config import SparseConfig, TemporalConfig
from ..fingerprints import COMPONENTS, changed_tensors, scheduler_fingerprint, text_fingerprint, weights_checksum
from ..spatial import (
    capturing,
    last_stats,
    scope,
    sparse_state,
    sparsify_,
    transaction,
    unsparsify_,
)
from .capture import Capture, guidance_copies
from .runs import CaptureRun, EditRun


__all__ = ["Capture", "Loop", "image_size"]


def image_size(x0) -> tuple[int, int]:
    """Height and width in pixels of a loop's input: an image `[B, C, H, W]`, or text-to-image's `(B, H, W)`."""
    return tuple(x0.shape[-2:]) if isinstance(x0, torch.Tensor) else tuple(x0[1:])


class Loop:
    """One pipeline's models made sparse, and the two runs over its denoising loop.

    Args:
        pipe: the pipeline; `adapter`: its family's adapter.
        config: the `SparseConfig` the UNet (and the ControlNet) take; the VAE's encoder and decoder take it with their
            own input dilation. `cache_dtype="auto"` is resolved here (bfloat16 in approximate mode).
        temporal: a `TemporalConfig` or `None`.
    """

    def __init__(self, pipe, adapter, config: SparseConfig, temporal: TemporalConfig | None):
        self.pipe = pipe
        self.adapter = adapter
        self.config = config
        self.temporal = temporal
        self.latent = adapter.latent
        self.controlnet = adapter.controlnet  # runs sparse on the UNet's region, step by step
        self.attention = None  # textedit.AttentionControl: prompt edits record and inject cross-attention
        self.prompt = textedit.PromptEdits(self)  # the prompt-edit technique, driving this loop's steps
        self.encoder_stats: list[dict] = []
        self.callback = None  # the capture's (callback_on_step_end, tensor input names) while it runs
        self.progress = None  # `progress(steps done, steps)` after every denoising step (`SparseEditor.progress`)
        self.last_latents = None  # the last run's final latents (output_type="latent")
        unet = adapter.unet
        # The UNet's per-step cache: "auto" stores feature maps in bfloat16 in approximate mode (measured within
        # 0.1 dB of a float32 cache); a budget is divided between the models at capture (session.fit_budget).
        # A transformer's keys and values take the adapter's choice (int8 for SD3: a 1024 px capture in bfloat16 would
        # not fit 8 GiB; see docs/engine.md).
        dtype = config.cache_dtype
        if dtype == "auto":
            dtype = "bfloat16" if not config.exact and unet.dtype == torch.float32 else None
        models = {**config.to_dict(), "cache_dtype": dtype, "cache_budget": None}
        denoiser = config.cache_dtype if config.cache_dtype != "auto" else adapter.auto_cache_dtype or dtype
        unet_config = SparseConfig.from_dict({**models, "cache_dtype": denoiser})
        if self.latent and adapter.cross_attention:  # prompt edits: cross-attention maps recorded and injected
            self.attention = textedit.AttentionControl()
            self._processors = textedit.install(unet, self.attention)
        sparsify_(unet, unet_config)
        if self.controlnet is not None:
            sparsify_(self.controlnet, unet_config)
        self.sync_attention_storage()
        if temporal is not None:  # after sparsify_: the reuse hooks sit outside the sparse ones
            temporal_reuse.apply_encoder_propagation(unet, temporal)
            temporal_reuse.drive(unet)  # steps come from the editor's loops; other calls run whole
        if self.latent:
            # The VAE decoder runs sparse on the latent region (already dilated for the UNet: one more pixel here).
            sparsify_(pipe.vae.decoder, SparseConfig.from_dict({**models, "input_dilation": 1}))
            # The encoder runs sparse on the image region dilated by one latent pixel; outside the UNet's region its
            # output is replaced by the capture's anyway.
            sparsify_(pipe.vae.encoder, SparseConfig.from_dict({**models, "input_dilation": pipe.vae_scale_factor}))

    @property
    def unet(self):
        return self.adapter.unet

    def remove(self) -> None:
        """Detach everything from the pipeline's models (`SparseEditor.remove`)."""
        if self.temporal is not None:
            temporal_reuse.remove_encoder_propagation(self.unet)
        unsparsify_(self.unet)
        if self.controlnet is not None:
            unsparsify_(self.controlnet)
        if self.latent:
            unsparsify_(self.pipe.vae.decoder)
            unsparsify_(self.pipe.vae.encoder)
            if self.attention is not None:
                textedit.uninstall(self.unet, self._processors)

    def sync_attention_storage(self) -> None:
        """Stored cross-attention probabilities (prompt edits) take the UNet cache's storage dtype, bfloat16 at the
        smallest (they are not quantized)."""
        if self.attention is not None:
            dtype = sparse_state(self.unet).cache.storage_dtype
            self.attention.storage_dtype = torch.bfloat16 if dtype == torch.int8 else dtype

    def models(self) -> dict:
        """The sparsified models by part name."""
        models = {"unet": self.unet}
        if self.controlnet is not None:
            models["controlnet"] = self.controlnet
        if self.latent:
            models.update(vae_encoder=self.pipe.vae.encoder, vae_decoder=self.pipe.vae.decoder)
        return models

    def timesteps(self, num_inference_steps: int, strength: float, size: tuple[int, int] | None = None) -> list:
        """The run's timesteps; `size`: the image's height and width in pixels (FLUX shifts its schedule by it)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        timesteps = self.adapter.timesteps(
            self.pipe.scheduler, num_inference_steps, strength, self.adapter.device, size
        )
        if not timesteps:
            raise ValueError(f"strength={strength} with {num_inference_steps} steps leaves no step to run.")
        return timesteps

    def encode(self, x, generator, name: str):
        """Image → VAE latent sample, scaled, as the pipelines do (one draw from `generator`). Inside a capture or an
        edit of the encoder, each encoded image (`name`) has its own cache scope."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        with scope(vae.encoder, name):
            posterior = vae.encode(x.to(self.adapter.placement(vae, "dtype")))
            z = self.adapter.latents_of(retrieve_latents(posterior, generator, self.adapter.encode_mode))
        if sparse_state(vae.encoder).mode is not None:
            self.encoder_stats.append(last_stats(vae.encoder, detail=False))
        return z

    def check_vae(self) -> None:
        vae = self.pipe.vae
        if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
            raise ValueError(
                "SparseEditor runs the VAE sparse on whole images; call `pipe.vae.disable_tiling()` and "
                "`pipe.vae.disable_slicing()` first (sparse editing already does the work of tiling)."
            )

    def encoder_mode(self, context, **kwargs):
        if not self.adapter.encodes_image:  # text-to-image and pixel pipelines encode no image
            return contextlib.nullcontext()
        self.check_vae()
        return context(self.pipe.vae.encoder, **kwargs)

    def prepare(self, x0, mask, generator, timesteps, call, inputs, copies, keep=None, cap=None) -> dict:
        """The loop's starting point (the adapter's `prepare`, then `prepare_inputs` for its extra inputs). In an
        edit (`keep`, `cap`), every encoded tensor is the capture's outside `keep`: the sparse VAE encoder is
        approximate near the region, and the UNet must see the captured input there. Text-to-image takes
        `x0 = (batch, height, width)`."""

        def kept(name, t):
            return t if keep is None else torch.where(keep[:, None], t, cap.latents[name])

        def encode(x, name):
            return self.encode(x, generator, name)

        prep = self.adapter.prepare(x0, mask, generator, timesteps, call["strength"], encode, kept)
        self.adapter.prepare_inputs(prep, inputs, call, copies, None if cap is None else cap.latents)
        prep["call"], prep["steps"] = call, len(timesteps)
        return prep

    def run(self, prep, timesteps, generator, predict, composite, start=0, stop=None, z=None):
        """Denoise steps `start` to `stop` from `z` (default: `prep["z"]`). `predict(i, t, z)` returns the guided
        noise prediction; `composite(i, z)` puts the capture's latents back outside the region (identity in a
        capture). Returns the last latents and the trajectory from step `start` on."""
        sched = self.pipe.scheduler
        extra = self.adapter.step_kwargs(generator, prep.get("call", {}).get("eta", 0.0))
        z = prep["z"] if z is None else z
        trajectory = [z]
        stop = len(timesteps) if stop is None else stop
        reuse = None
        if self.temporal is not None:
            # A loop from step 0 starts a new generation; a continuation (a prompt edit after its dense detection
            # steps) keeps the features of the last key step.
            reuse = temporal_reuse.begin_loop(self.unet, len(timesteps)) if start == 0 else None
            reuse = reuse or temporal_reuse.loop_state(self.unet)
            z_T = prep["z"] / float(getattr(sched, "init_noise_sigma", 1.0))
        try:
            for i in range(start, stop):
                t = timesteps[i]
                if reuse is not None:
                    reuse.step = i
                z = sched.step(predict(i, t, z), t, z, **extra, return_dict=False)[0]
                if reuse is not None and reuse.reuses:
                    z = temporal_reuse.inject_prior_noise(z, t, z_T, self.temporal)
                z = self.adapter.after_step(z, prep, timesteps, i)
                z = composite(i, z)
                if self.callback is not None:
                    self._call_back(i, t, z)
                if self.progress is not None:
                    self.progress(i + 1, stop)
                trajectory.append(z)
        finally:
            if reuse is not None:
                reuse.step = None  # calls outside the loop (noise_diff's) run whole
        return z, trajectory

    def _call_back(self, i, t, z) -> None:
        """The capture's `callback_on_step_end`, called as the pipeline calls it. It may observe; a callback that
        changes the latents could not be replayed by edits, so that is refused."""
        fn, names = self.callback
        out = fn(self.pipe, i, t, {"latents": z} if "latents" in names else {})
        new = (out or {}).get("latents", z)
        if new is not z and not torch.equal(new, z):
            raise NotImplementedError(
                "callback_on_step_end changed the latents: edits replay the capture's trajectory and could not "
                "replay that. Observe the latents in the callback without changing them, or edit its result instead."
            )

    def predictor(self, embeds, guidance_scale, prep, run_unet, run_control=None):
        """The per-step noise prediction, with classifier-free guidance batched as the pipeline batches it.
        `run_unet(i, fn)` runs the UNet call `fn` of step `i` under the capture or edit; with a ControlNet,
        `run_control(i, fn, copies)` runs its call and returns `(output, output regions)`, and the UNet's call is
        `run_unet(i, fn, regions)` with the regions of the ControlNet's residuals."""
        unet = self.unet
        if run_control is None:
            run_control = lambda i, fn, n: (fn(), None)  # noqa: E731
        copies = guidance_copies(embeds, guidance_scale, self.adapter.batches_guidance)
        cfg = copies == 2
        cond = self.adapter.unet_condition(prep, copies) if prep else None

        def predict(i, t, z):
            if self.attention is not None:
                self.attention.step = i
            if embeds is None:
                return run_unet(i, lambda: unet(z, t).sample)
            zin = self.adapter.scale_input(torch.cat([z] * copies), t)
            extra = self.adapter.unet_kwargs(z, copies)
            regions = None
            if self.controlnet is not None:  # its residuals, from the 4-channel latents
                n = self.adapter.control_copies(copies, prep["call"])
                residuals, regions = self.adapter.control(i, t, z, zin, embeds, prep, prep["call"], copies,
                                                          prep["steps"], lambda fn: run_control(i, fn, n))  # fmt: skip
                extra = {**extra, **residuals}
            if cond is not None:
                zin = torch.cat([zin, cond], dim=1)

            def call_unet():
                return self.adapter.denoise(unet, zin, t, embeds, extra)

            eps = run_unet(i, call_unet) if regions is None else run_unet(i, call_unet, regions)
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            return eps

        return predict, copies

    def embeds(self, prompt, negative_prompt, guidance_scale, batch, prompt_embeds=None, negative_prompt_embeds=None):
        return self.adapter.embeds(
            prompt, negative_prompt, guidance_scale, batch, prompt_embeds, negative_prompt_embeds
        )

    def components(self) -> dict:
        """Every model the output depends on: the UNet, the VAE, the text encoders and the ControlNet."""
        found = {n: getattr(self.pipe, n, None) for n in COMPONENTS}
        return {n: m for n, m in found.items() if isinstance(m, torch.nn.Module)}

    def check(self, cap, weights: bool = False) -> None:
        """Refuse a capture that the pipeline no longer matches outside the UNet (whose own fingerprint the engine
        checks at the first sparse step of every edit): the text encoders (weights, LoRA adapters loaded, fused or re-weighted), and the
        scheduler, which may have been swapped, reconfigured or reset (a plain `pipe(...)` call resets its
        timesteps): the capture's timesteps are derived again. With `weights` (once per edit), the content checksum
        of every component too, which sees in-place writes through `param.data` that version counters miss."""
        if cap.text_fingerprint is not None and text_fingerprint(self.pipe) != cap.text_fingerprint:
            raise StaleCacheError(
                "the pipeline's text encoder changed since the capture (its weights, or LoRA adapters loaded, fused, "
                "unfused or re-weighted with set_adapters), so the captured prompt embeddings are stale; capture "
                "again, or make the editor with on_stale='recapture'."
            )
        if scheduler_fingerprint(self.pipe.scheduler) != cap.scheduler:
            raise StaleCacheError(
                "the pipeline's scheduler (or its config) changed since the capture, so the cached trajectory no "
                "longer matches; capture again with `editor.capture(...)`."
            )
        timesteps = self.timesteps(cap.call["num_inference_steps"], cap.call["strength"], image_size(cap.image))
        if [int(t) for t in timesteps] != [int(t) for t in cap.timesteps]:
            raise StaleCacheError("the scheduler's timesteps differ from the capture's; capture again.")
        if weights and cap.checksums is not None:
            changed = changed_tensors(cap.checksums, weights_checksum(self.components()))
            if changed:
                raise StaleCacheError(
                    f"the weights of the pipeline's {changed} changed since the capture (written in place, e.g. "
                    "through `param.data`, permuted, LoRA adapters fused or unfused, or loaded anew), so the cache "
                    "holds another model's activations; restore those weights, capture again, or make the editor "
                    "with on_stale='recapture'."
                )

    def residual_inputs(self) -> tuple:
        """The UNet's inputs that come from the ControlNet, with their regions (`spatial.capturing`)."""
        from ..adapters.pipelines.controlnet import RESIDUALS

        return RESIDUALS if self.controlnet is not None else ()

    def capturing_control(self):
        """The ControlNet's capture: its control image is read through the precomputed embedding, not stored."""
        if self.controlnet is None:
            return contextlib.nullcontext()
        return capturing(self.controlnet, spatial_inputs=("controlnet_cond",), calibrate=False)

    def capture(self, x0, mask, call, generator, state, timesteps, embeds, inputs, text_config) -> tuple:
        """Run the pipeline densely, filling every model's cache. Returns the `Capture` and its statistics."""
        cap, stats = CaptureRun(self, x0, mask, call, generator, state, timesteps, embeds, inputs, text_config).run()
        self.last_latents = cap.trajectory[-1]
        return cap, stats

    def edit(self, cap, x0, mask, inputs, region, commit, change=None) -> tuple:
        """Run the pipeline sparsely against `cap`: every step recomputes only the region (and, for a prompt edit,
        the region its detection finds), with the capture's latents outside it. A committed edit updates `cap` and
        the caches as one transaction: if anything raises (`KeyboardInterrupt` too), every model's cache and `cap`
        stay as they were. Returns the decoded result, the statistics and the regenerated region at image
        resolution."""
        if not commit:
            return self._edit(cap, x0, mask, inputs, region, commit, change)
        with transaction(*self.models().values()):
            return self._edit(cap, x0, mask, inputs, region, commit, change)

    def _edit(self, cap, x0, mask, inputs, region, commit, change=None) -> tuple:
        checked = time.perf_counter()
        self.check(cap, weights=True)  # also resets the scheduler's step index to the capture's first step
        check_seconds = time.perf_counter() - checked
        return EditRun(self, cap, x0, mask, inputs, region, commit, change).run(check_seconds)
