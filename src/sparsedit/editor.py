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

import contextlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import session, textedit
from . import temporal as temporal_reuse
from .cache import CacheBytes, StaleCacheError, module_fingerprint
from .config import OnStale, SparseConfig, TemporalConfig, TextEditConfig
from .regions import as_region, difference_mask, dilate
from .spatial import (
    capturing,
    editing,
    last_stats,
    output_regions,
    prefetch,
    scope,
    sparse_state,
    sparsify_,
    unsparsify_,
)
from .stats import EditStats


__all__ = ["SparseEditor"]

# SIGE's setting for diffusion models: the edit region is dilated by 5 pixels before sparse computation.
DIFFUSION_DEFAULTS = SparseConfig(input_dilation=5)


@dataclass
class _Capture:
    """What a capture run depended on and produced, for the staleness check and for edits.

    `latents` holds the tensors an edit recomputes only inside the region and takes from here outside it: the
    encoded image (`"image"`), the encoded masked image and the latent mask (inpainting), and the decoded result.
    """

    image: torch.Tensor  # the current (last accepted) input image, [-1, 1]
    mask: torch.Tensor | None  # inpainting: the current mask, [B, 1, H, W] in {0, 1}
    trajectory: list[torch.Tensor]  # latents entering each step, then the final latents
    timesteps: list
    generator_state: torch.Tensor
    generator_device: str
    call: dict  # the capture's arguments (prompt, strength, steps, guidance...), to recapture
    embeds: torch.Tensor | None
    latents: dict
    decoded: torch.Tensor
    scheduler: tuple
    attention: dict | None = (
        None  # prompt edits: the cross-attention maps/probabilities recorded, and for which version
    )
    version: int = 0  # bumped by every committed edit
    step_macs: int = 0  # one dense UNet step
    macs: int = 0  # the whole dense run
    conditions: dict | None = None  # the adapter's conditioning besides the text context (SDXL's pooled embedding)
    text_fingerprint: tuple | None = None  # the text encoders the embeddings came from (`_text_fingerprint`)
    inputs: dict | None = None  # the adapter's `extra_images` (the ControlNet's control image), at image resolution


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
    """

    def __init__(
        self,
        pipe,
        config: SparseConfig | None = None,
        on_stale: str = "raise",
        text_config: TextEditConfig | None = None,
        temporal: TemporalConfig | None = None,
    ):
        from .adapters.pipelines import adapter_for, supported_pipelines

        unet, scheduler, adapter = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None), adapter_for(pipe)
        if adapter is None or unet is None or scheduler is None:
            raise NotImplementedError(
                f"SparseEditor supports {', '.join(supported_pipelines())} (and their subclasses) so far, not "
                f"{type(pipe).__name__}; for other models use the model-level API (`sparsedit.sparsify_`, "
                "`capturing`, `editing`)."
            )
        if temporal is not None and not isinstance(temporal, TemporalConfig):
            raise TypeError(f"temporal must be a TemporalConfig, got {type(temporal).__name__}.")
        if temporal is not None and temporal.parallel:
            raise ValueError(
                "SparseEditor keeps a cache per denoising step, and parallel decoding batches several steps in one "
                "call: use TemporalConfig(parallel=False) (the encoder is still reused at non-key steps)."
            )
        if temporal_reuse.is_applied(unet):
            raise RuntimeError(
                "this UNet already carries temporal reuse (`sparsedit.temporal.enable`); call `temporal.disable(pipe)` "
                "and pass the config as `SparseEditor(pipe, temporal=...)` instead."
            )
        on_stale = OnStale.parse(on_stale, "on_stale")
        adapter.check()
        if adapter.controlnet is not None and temporal is not None:
            raise NotImplementedError(
                "temporal reuse with a ControlNet is not supported yet: make the editor without it."
            )
        self.pipe = pipe
        self.adapter = adapter  # what this pipeline family does around the loop (adapters/pipelines.py)
        self.kind = adapter.kind
        self.latent = adapter.latent
        self.on_stale = on_stale
        self.config = DIFFUSION_DEFAULTS if config is None else config
        self.text_config = TextEditConfig() if text_config is None else text_config
        if not isinstance(self.text_config, TextEditConfig):
            raise TypeError(f"text_config must be a TextEditConfig, got {type(self.text_config).__name__}.")
        self._control = None
        # The UNet's per-step cache: "auto" stores feature maps in bfloat16 in approximate mode (measured within
        # 0.1 dB of a float32 cache); the budget is the editor's to divide between the models (see `capture`).
        unet_dtype = self.config.cache_dtype
        if unet_dtype == "auto":
            unet_dtype = "bfloat16" if not self.config.exact and unet.dtype == torch.float32 else None
        unet_config = SparseConfig.from_dict({**self.config.to_dict(), "cache_dtype": unet_dtype,
                                              "cache_budget": None})  # fmt: skip
        if self.latent:  # prompt edits: the cross-attention layers record the capture's maps and inject them
            self._control = textedit.AttentionControl()
            self._processors = textedit.install(unet, self._control)
        sparsify_(unet, unet_config)
        self.controlnet = adapter.controlnet  # runs sparse on the UNet's region, step by step
        if self.controlnet is not None:
            sparsify_(self.controlnet, unet_config)
        self._sync_attention_storage()
        self.temporal = temporal
        if temporal is not None:  # after sparsify_: the reuse hooks sit outside the sparse ones
            temporal_reuse.apply_encoder_propagation(unet, temporal)
            temporal_reuse.drive(unet)  # steps come from the editor's loops; other calls run whole
        if self.latent:
            # The VAE decoder runs sparse on the latent region (already dilated for the UNet: one more pixel here).
            vae = {**self.config.to_dict(), "cache_dtype": unet_dtype, "cache_budget": None}
            self._decoder_config = SparseConfig.from_dict({**vae, "input_dilation": 1})
            sparsify_(pipe.vae.decoder, self._decoder_config)
            # The encoder runs sparse on the image region dilated by one latent pixel; outside the UNet's region its
            # output is replaced by the capture's anyway.
            self._encoder_config = SparseConfig.from_dict({**vae, "input_dilation": pipe.vae_scale_factor})
            sparsify_(pipe.vae.encoder, self._encoder_config)
        self._encoder_stats: list[dict] = []
        self._capture: _Capture | None = None
        self.last_stats: EditStats = EditStats()
        self.last_region: torch.Tensor | None = None  # the last edit's regenerated region, bool [B, H, W]
        self._extra_macs = 0
        self._prompt = textedit.PromptEdits(self)

    def _sync_attention_storage(self) -> None:
        """Stored cross-attention probabilities (prompt edits) take the UNet cache's storage dtype, bfloat16 at the
        smallest (they are not quantized)."""
        if self._control is not None:
            dtype = sparse_state(self.unet).cache.storage_dtype
            self._control.storage_dtype = torch.bfloat16 if dtype == torch.int8 else dtype

    @property
    def unet(self):
        return self.pipe.unet

    def remove(self) -> None:
        """Detach everything: the pipeline computes bit-identically to before. The caches are dropped."""
        if self.temporal is not None:
            temporal_reuse.remove_encoder_propagation(self.unet)
        unsparsify_(self.unet)
        if self.controlnet is not None:
            unsparsify_(self.controlnet)
        if self.latent:
            unsparsify_(self.pipe.vae.decoder)
            unsparsify_(self.pipe.vae.encoder)
            textedit.uninstall(self.unet, self._processors)
        self._capture = None

    # -- the loop, shared by capture (dense) and edit (sparse) ------------------------------------------------------
    def _timesteps(self, num_inference_steps: int, strength: float) -> list:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        sched = self.pipe.scheduler
        sched.set_timesteps(num_inference_steps, device=self.unet.device)
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        timesteps = list(sched.timesteps[start * sched.order :])
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        if not timesteps:
            raise ValueError(f"strength={strength} with {num_inference_steps} steps leaves no step to run.")
        return timesteps

    def _encode(self, x, generator, name: str):
        """Image → VAE latent sample, scaled, as the pipelines do (one draw from `generator`). Inside a capture or an
        edit of the encoder, each encoded image (`name`) has its own cache scope."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        with scope(vae.encoder, name):
            z = vae.config.scaling_factor * retrieve_latents(vae.encode(x.to(vae.dtype)), generator=generator)
        if sparse_state(vae.encoder).mode is not None:
            self._encoder_stats.append(last_stats(vae.encoder))
        return z

    def _check_vae(self) -> None:
        vae = self.pipe.vae
        if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
            raise ValueError(
                "SparseEditor runs the VAE sparse on whole images; call `pipe.vae.disable_tiling()` and "
                "`pipe.vae.disable_slicing()` first (sparse editing already does the work of tiling)."
            )

    def _encoder_mode(self, context, **kwargs):
        if not self.adapter.encodes_image:  # text-to-image and pixel pipelines encode no image
            return contextlib.nullcontext()
        self._check_vae()
        return context(self.pipe.vae.encoder, **kwargs)

    def _decode(self, z):
        return self.adapter.decode(z)

    def _prepare(self, x0, mask, generator, timesteps, call, inputs, copies, keep=None, cap=None) -> dict:
        """The loop's starting point (the adapter's `prepare`, then `prepare_inputs` for its extra inputs). In an
        edit (`keep`, `cap`), every encoded tensor is the capture's outside `keep`: the sparse VAE encoder is
        approximate near the region, and the UNet must see the captured input there. Text-to-image takes
        `x0 = (batch, height, width)`."""

        def kept(name, t):
            return t if keep is None else torch.where(keep[:, None], t, cap.latents[name])

        def encode(x, name):
            return self._encode(x, generator, name)

        prep = self.adapter.prepare(x0, mask, generator, timesteps, call["strength"], encode, kept)
        self.adapter.prepare_inputs(prep, inputs, call, copies, None if cap is None else cap.latents)
        prep["call"], prep["steps"] = call, len(timesteps)
        return prep

    def _loop(self, prep, timesteps, generator, predict, composite, start=0, stop=None, z=None):
        """Denoise steps `start` to `stop` from `z` (default: `prep["z"]`). `predict(i, t, z)` returns the guided
        noise prediction; `composite(i, z)` puts the capture's latents back outside the region (identity in a
        capture). Returns the last latents and the trajectory from step `start` on."""
        sched = self.pipe.scheduler
        extra = self.adapter.step_kwargs(generator)
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
                trajectory.append(z)
        finally:
            if reuse is not None:
                reuse.step = None  # calls outside the loop (noise_diff's) run whole
        return z, trajectory

    def _predictor(self, embeds, guidance_scale, prep, run_unet, run_control=None):
        """The per-step noise prediction, with classifier-free guidance batched as the pipeline batches it.
        `run_unet(i, fn)` runs the UNet call `fn` of step `i` under the capture or edit; with a ControlNet,
        `run_control(i, fn, copies)` runs its call and returns `(output, output regions)`, and the UNet's call is
        `run_unet(i, fn, regions)` with the regions of the ControlNet's residuals."""
        unet, sched = self.unet, self.pipe.scheduler
        if run_control is None:
            run_control = lambda i, fn, n: (fn(), None)  # noqa: E731
        cfg = embeds is not None and guidance_scale > 1.0
        copies = 2 if cfg else 1
        cond = self.adapter.unet_condition(prep, copies) if prep else None

        def predict(i, t, z):
            if self._control is not None:
                self._control.step = i
            if embeds is None:
                return run_unet(i, lambda: unet(z, t).sample)
            zin = sched.scale_model_input(torch.cat([z] * copies), t)
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
                return unet(zin, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]

            eps = run_unet(i, call_unet) if regions is None else run_unet(i, call_unet, regions)
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            return eps

        return predict, copies

    def _embeds(self, prompt, negative_prompt, guidance_scale, batch):
        return self.adapter.embeds(prompt, negative_prompt, guidance_scale, batch)

    def _scheduler_fingerprint(self) -> tuple:
        sched = self.pipe.scheduler
        return type(sched).__name__, json.dumps(dict(sched.config), sort_keys=True, default=str)

    def _text_fingerprint(self) -> tuple:
        """Identity of the text encoders' weights and LoRA adapters: the capture's prompt embeddings are reused."""
        out = []
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                out.append((name, module_fingerprint(module)))
        return tuple(out)

    def _check_capture(self, cap) -> None:
        """Refuse a capture that the pipeline no longer matches outside the UNet (whose own fingerprint the engine
        checks on every run): the text encoders (weights, LoRA adapters loaded, fused or re-weighted), and the
        scheduler, which may have been swapped, reconfigured or reset (a plain `pipe(...)` call resets its
        timesteps): the capture's timesteps are derived again."""
        if cap.text_fingerprint is not None and self._text_fingerprint() != cap.text_fingerprint:
            raise StaleCacheError(
                "the pipeline's text encoder changed since the capture (its weights, or LoRA adapters loaded, fused, "
                "unfused or re-weighted with set_adapters), so the captured prompt embeddings are stale; capture "
                "again, or make the editor with on_stale='recapture'."
            )
        if self._scheduler_fingerprint() != cap.scheduler:
            raise StaleCacheError(
                "the pipeline's scheduler (or its config) changed since the capture, so the cached trajectory no "
                "longer matches; capture again with `editor.capture(...)`."
            )
        timesteps = self._timesteps(cap.call["num_inference_steps"], cap.call["strength"])
        if [int(t) for t in timesteps] != [int(t) for t in cap.timesteps]:
            raise StaleCacheError("the scheduler's timesteps differ from the capture's; capture again.")

    def _generator(self, generator) -> torch.Generator:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be one torch.Generator (it is replayed to reuse the capture's noise).")
        return generator

    def _preprocess(self, image, height=None, width=None):
        return self.adapter.preprocess(image, height, width)

    def _preprocess_mask(self, mask_image, like: torch.Tensor) -> torch.Tensor:
        return self.adapter.preprocess_mask(mask_image, like)

    def _output(self, x, output_type, return_dict):
        return self.adapter.output(x, output_type, return_dict)

    # -- capture ------------------------------------------------------------------------------------------------------
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
            pipeline_kwargs: the pipeline family's own arguments, with the pipeline's defaults: for the ControlNet
                pipelines `control_image` (required), `controlnet_conditioning_scale`, `guess_mode`,
                `control_guidance_start` and `control_guidance_end`.
        """
        options, images = self._pipeline_kwargs(pipeline_kwargs, "capture")
        if self.adapter.fixed_size:
            f = self.pipe.vae_scale_factor
            height, width = height or self.unet.config.sample_size * f, width or self.unet.config.sample_size * f
        if not self.adapter.takes_image:
            if image is not None or mask_image is not None:
                raise ValueError(
                    "StableDiffusionPipeline generates from the prompt alone; it takes no image. For stroke edits, "
                    "make the editor on `StableDiffusionImg2ImgPipeline(**pipe.components)`."
                )
            if height % self.pipe.vae_scale_factor or width % self.pipe.vae_scale_factor:
                raise ValueError(f"height and width must be multiples of {self.pipe.vae_scale_factor}.")
            x0, mask = (len(prompt) if isinstance(prompt, list) else 1, height, width), None
        else:
            if image is None:
                raise ValueError(f"{type(self.pipe).__name__} edits an image: capture(image=..., ...).")
            x0 = self._preprocess(image, height, width)
            mask = self._preprocess_mask(mask_image, x0) if self.adapter.takes_mask or mask_image is not None else None
        if guidance_scale is None:
            guidance_scale = self.adapter.guidance_scale  # the pipeline's own default (7.5 for SD, 5.0 for SDXL)
        call = {
            "prompt": prompt,
            "strength": self.adapter.default_strength if strength is None else strength,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "height": height,
            "width": width,
            **self.adapter.parse_options({**self.adapter.options, **options}),
        }
        inputs = {
            name: self.adapter.preprocess_input(name, images.get(name), x0) for name in self.adapter.extra_images
        }
        decoded = self._run_capture(x0, mask, call, self._generator(generator), inputs)
        return self._output(decoded, output_type, return_dict)

    def _pipeline_kwargs(self, kwargs: dict, verb: str) -> tuple[dict, dict]:
        """Split the pipeline family's own arguments into options and extra images; refuse anything else."""
        a = self.adapter
        unknown = sorted(set(kwargs) - set(a.option_names) - set(a.extra_images))
        if unknown:
            takes = ", ".join((*a.extra_images, *a.option_names)) or "no other arguments"
            raise TypeError(
                f"{verb}() got unexpected keyword argument(s) {', '.join(unknown)}; on {type(self.pipe).__name__} "
                f"it takes the common ones and {takes}."
            )
        return ({k: v for k, v in kwargs.items() if k in a.option_names},
                {k: v for k, v in kwargs.items() if k in a.extra_images})  # fmt: skip

    def _batch(self, x0) -> int:
        return self.adapter.batch(x0)

    def _run_capture(self, x0, mask, call, generator, inputs) -> torch.Tensor:
        state = generator.get_state()
        timesteps = self._timesteps(call["num_inference_steps"], call["strength"])
        embeds = self._embeds(call["prompt"], call["negative_prompt"], call["guidance_scale"], self._batch(x0))
        budget = None
        if self.config.budget_bytes is not None:  # measured by dry runs, before anything is stored
            copies = 2 if embeds is not None and call["guidance_scale"] > 1.0 else 1
            budget = session.fit_budget(self, x0, call, embeds, timesteps, copies)
            self._sync_attention_storage()
        with session.peak_memory(self.unet.device) as peak:
            decoded = self._capture_dense(x0, mask, call, generator, state, timesteps, embeds, inputs)
        self.last_stats.update(peak)
        if budget is not None:
            self.last_stats["budget"] = budget
        return decoded

    def _capture_dense(self, x0, mask, call, generator, state, timesteps, embeds, inputs) -> torch.Tensor:
        unet, controlnet = self.unet, self.controlnet
        started = time.perf_counter()
        macs = computed = step_macs = control_macs = 0

        def run_unet(i, call_unet, regions=None):
            nonlocal computed, step_macs
            with scope(unet, i):
                out = call_unet()
            # A step that reuses features (temporal) computes less; a whole step (a key step) is the dense cost.
            computed += last_stats(unet)["macs_dense"]
            step_macs = max(step_macs, last_stats(unet)["macs_dense"])
            return out

        def run_control(i, call_control, n):
            nonlocal computed, control_macs
            with scope(controlnet, i):
                out = call_control()
            computed += last_stats(controlnet)["macs_dense"]
            control_macs = max(control_macs, last_stats(controlnet)["macs_dense"])
            return out, None

        self._encoder_stats = []
        copies = 2 if embeds is not None and call["guidance_scale"] > 1.0 else 1
        with self._encoder_mode(capturing):
            prep = self._prepare(x0, mask, generator, timesteps, call, inputs, copies)
        macs += sum(s["macs_dense"] for s in self._encoder_stats)
        predict, copies = self._predictor(embeds, call["guidance_scale"], prep, run_unet, run_control)
        n = len(timesteps)
        recording = self._record_attention(range(n), range(self.text_config.inject_steps(n)), prep["z"], copies,
                                           self.text_config)  # fmt: skip
        try:
            with capturing(unet, spatial_inputs=self._residual_inputs()), self._capturing_control():
                z, trajectory = self._loop(prep, timesteps, generator, predict, lambda i, z: z)
        finally:
            attention = recording()
        step_macs += control_macs
        vae_macs = macs + prep.get("extra_macs", 0)  # once (the ControlNet's conditioning embedding)
        macs += (step_macs + prep.get("extra_macs", 0)) * len(timesteps)
        if self.latent:
            with capturing(self.pipe.vae.decoder):
                decoded = self._decode(z)
            macs += last_stats(self.pipe.vae.decoder)["macs_dense"]
            vae_macs += last_stats(self.pipe.vae.decoder)["macs_dense"]
        else:
            decoded = z
        self._capture = _Capture(
            image=x0.clone() if isinstance(x0, torch.Tensor) else x0,
            mask=None if mask is None else mask.clone(),
            trajectory=trajectory,
            timesteps=timesteps,
            generator_state=state,
            generator_device=str(generator.device),
            call=call,
            embeds=embeds,
            latents={k: prep[k] for k in self.adapter.kept if k in prep},
            decoded=decoded,
            scheduler=self._scheduler_fingerprint(),
            attention=attention,
            step_macs=step_macs,
            macs=macs,
            conditions=dict(self.adapter.conditions),
            text_fingerprint=self._text_fingerprint(),
            inputs={k: v.clone() for k, v in inputs.items()},
        )
        self.last_stats = EditStats.of(
            {
                "macs_dense": macs,
                "macs_sparse": vae_macs + computed,  # less than macs_dense when temporal reuse skips work
                "active_fraction": {},
                "seconds": time.perf_counter() - started,
                "cache_bytes": self.cache_bytes,
            }
        )
        return decoded

    def _residual_inputs(self) -> tuple:
        """The UNet's inputs that come from the ControlNet, with their regions (`spatial.capturing`)."""
        from .adapters.controlnet import RESIDUALS

        return RESIDUALS if self.controlnet is not None else ()

    def _capturing_control(self):
        """The ControlNet's capture: its control image is read through the precomputed embedding, not stored."""
        if self.controlnet is None:
            return contextlib.nullcontext()
        return capturing(self.controlnet, spatial_inputs=("controlnet_cond",))

    @property
    def cache_bytes(self) -> CacheBytes:
        """Bytes held for edits (an int), by part: `"unet"` (the per-step activations), `"vae_encoder"`,
        `"vae_decoder"`, `"text"` (prompt embeddings and stored cross-attention probabilities) and `"latents"` (the
        trajectory, the encoded images and the decoded result). `.offloaded` says how many of them are on disk."""
        return session.cache_parts(self)

    def _models(self) -> dict:
        """The sparsified models by part name."""
        models = {"unet": self.unet}
        if self.controlnet is not None:
            models["controlnet"] = self.controlnet
        if self.latent:
            models.update(vae_encoder=self.pipe.vae.encoder, vae_decoder=self.pipe.vae.decoder)
        return models

    def save(self, path) -> None:
        """Write this session (the capture, every cache, the edit state and the pipeline's fingerprint) to the
        directory `path` (safetensors files and a JSON manifest). `SparseEditor.load(pipe, path)` resumes it: the
        next edit is bit-identical to the one this editor would make."""
        session.save_editor(self, path)

    @classmethod
    def load(cls, pipe, path, *, mmap: bool = True) -> SparseEditor:
        """Resume a session written by `editor.save(path)` on `pipe` (a pipeline of the same class, weights,
        scheduler and config; otherwise `StaleCacheError` names what differs). With `mmap`, the caches are
        memory-mapped copy-on-write from the files (the OS pages them in as edits touch them); `mmap=False` reads
        them into memory."""
        return session.load_editor(cls, pipe, path, mmap=mmap)

    # -- prompt edits: attention records and region detection ---------------------------------------------------------
    def _text_editable(self) -> bool:
        return self.adapter.text_editable

    # -- prompt edits (the technique lives in textedit.PromptEdits) ----------------------------------------------------
    def _record_attention(self, map_steps, prob_steps, z, copies, text_config, version=0):
        return self._prompt.record_attention(map_steps, prob_steps, z, copies, text_config, version)

    def _attention(self, cap, text_config, map_steps, prob_steps) -> dict:
        return self._prompt.attention(cap, text_config, map_steps, prob_steps)

    def _injection(self, cap, change, b, copies):
        return self._prompt.injection(cap, change, b, copies)

    def _detect(self, cap, change, embeds, prep, generator, copies, predict_dense):
        return self._prompt.detect(cap, change, embeds, prep, generator, copies, predict_dense)

    # -- edit ---------------------------------------------------------------------------------------------------------
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
        options, images = self._pipeline_kwargs(pipeline_kwargs, "edit")
        cap = self._capture
        if cap is None:
            raise RuntimeError(
                "Nothing captured yet: call `editor.capture(image=..., ...)` before `editor.edit(...)`."
            )
        tcfg = self.text_config if text_config is None else text_config
        if not isinstance(tcfg, TextEditConfig):
            raise TypeError(f"text_config must be a TextEditConfig, got {type(tcfg).__name__}.")
        text = prompt is not None or negative_prompt is not None
        if text and not self._text_editable():
            from .adapters.pipelines import supported_pipelines

            raise ValueError(
                f"prompt edits need one of {', '.join(supported_pipelines(text_editable=True))}, not "
                f"{type(self.pipe).__name__}"
                + (" (an unconditional model takes no prompt)." if not self.latent else ".")
            )
        if text and tcfg.region == "mask" and region is None:
            raise ValueError(
                "TextEditConfig(region='mask') regenerates the region you pass: edit(prompt=..., region=...)."
            )
        if options:  # normalised as the capture's were
            parsed = self.adapter.parse_options({**{k: cap.call[k] for k in self.adapter.option_names}, **options})
            options = {k: parsed[k] for k in options}
        cap, recaptured = self._check_call(cap, generator, num_inference_steps, guidance_scale, strength, options)
        if not self.adapter.takes_image:
            if image is not None or mask_image is not None:
                raise ValueError(
                    "a text-to-image capture has no input image to edit; change the prompt, or make the editor on "
                    "`StableDiffusionImg2ImgPipeline(**pipe.components)` for stroke edits."
                )
            x0, mask, inputs = cap.image, None, {}
            b, h, w = x0
            changed = torch.zeros(b, h, w, dtype=torch.bool, device=self.unet.device)
        else:
            x0 = cap.image if image is None else self._preprocess(image, cap.call["height"], cap.call["width"])
            if tuple(x0.shape) != tuple(cap.image.shape):
                raise ValueError(
                    f"the edited image has shape {tuple(x0.shape)} but the capture had {tuple(cap.image.shape)}; "
                    "edits must keep the size. Capture again for a new image size."
                )
            mask = cap.mask if mask_image is None else self._preprocess_mask(mask_image, x0)
            b, _, h, w = x0.shape
            changed = difference_mask(x0, cap.image, eps=0.0)
            if mask is not None:
                changed |= (mask != cap.mask).any(dim=1)
            inputs = dict(cap.inputs or {})
            for name, value in images.items():
                inputs[name] = self.adapter.preprocess_input(name, value, x0)
                changed |= difference_mask(inputs[name], cap.inputs[name], eps=0.0)
        if region is None:
            region = changed
        else:
            region = as_region(region, b, h, w, self.unet.device)
            missed = changed & ~region
            if bool(missed.any()):
                raise ValueError(
                    f"the image (or mask) differs from the current one at {int(missed.sum())} pixels outside "
                    "`region`; enlarge the region or pass region=None to detect it."
                )
        change = None
        if text:
            change = {
                "prompt": cap.call["prompt"] if prompt is None else prompt,
                "negative_prompt": cap.call["negative_prompt"] if negative_prompt is None else negative_prompt,
                "config": tcfg,
                "region": region if region is not changed else None,
            }
            if change["region"] is not None:
                region = changed  # the image part; the given region is the prompt's
        try:
            out = self._run_edit(cap, x0, mask, inputs, region, commit, output_type, return_dict, change)
            if recaptured is not None:
                self.last_stats["recaptured_seconds"] = recaptured
            return out
        except StaleCacheError:
            if self.on_stale != "recapture":
                raise
        # The capture no longer matches the pipeline: capture the current image again, then edit.
        self._recapture(cap)
        recapture_seconds = self.last_stats["seconds"]
        out = self._run_edit(self._capture, x0, mask, inputs, region, commit, output_type, return_dict, change)
        self.last_stats["recaptured_seconds"] = recapture_seconds
        return out

    def _recapture(self, cap) -> None:
        generator = torch.Generator(device=cap.generator_device)
        generator.set_state(cap.generator_state)
        self._run_capture(cap.image, cap.mask, cap.call, generator, cap.inputs or {})

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
        if self.on_stale != "recapture":
            raise StaleCacheError(
                f"this edit asks for {', '.join(differ)}: the cache holds another generation. Capture again with "
                "these values, or make the editor with on_stale='recapture'."
            )
        cap.call.update({k: v for k, v in asked.items() if v is not None})
        if generator is not None:
            cap.generator_state, cap.generator_device = generator.get_state(), str(generator.device)
        self._recapture(cap)
        return self._capture, self.last_stats["seconds"]

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
        return self._prompt.find_region(prompt, negative_prompt, text_config)

    def _run_edit(self, cap, x0, mask, inputs, region, commit, output_type, return_dict, change=None):
        with session.peak_memory(self.unet.device) as peak:
            out = self._edit_sparse(cap, x0, mask, inputs, region, commit, output_type, return_dict, change)
        self.last_stats.update(peak)
        return out

    def _edit_sparse(self, cap, x0, mask, inputs, region, commit, output_type, return_dict, change=None):
        self._check_capture(cap)  # also resets the scheduler's step index to the capture's first step
        self.adapter.conditions = dict(cap.conditions or {})  # the capture's (a load or a prompt edit may follow)
        unet, controlnet = self.unet, self.controlnet
        b = self._batch(x0)
        h, w = cap.decoded.shape[-2:]
        z_shape = cap.trajectory[0].shape[-2:]
        gs = cap.call["guidance_scale"]
        started = time.perf_counter()
        totals = defaultdict(int)
        fractions = defaultdict(list)
        embeds = cap.embeds
        copies = 2 if embeds is not None and gs > 1.0 else 1
        if change is not None:
            embeds = self._embeds(change["prompt"], change["negative_prompt"], gs, b)
            if torch.equal(embeds, cap.embeds) and change["region"] is None:
                change["unchanged"] = True  # e.g. only the negative prompt changed, without guidance
        text = change is not None and not change.get("unchanged")
        # The image part's composite region at the UNet's resolution (dilated as the config says).
        keep = dilate(F.adaptive_max_pool2d(region[:, None].float(), z_shape)[:, 0] > 0, self.config.input_dilation)
        if not text and not bool(keep.any()):  # nothing changed: the current result, at no cost
            if commit and change is not None:
                cap.call["prompt"], cap.call["negative_prompt"] = change["prompt"], change["negative_prompt"]
            self.last_region = torch.zeros(b, h, w, dtype=torch.bool, device=keep.device)
            self.last_stats = EditStats.of({"macs_dense": cap.macs, "macs_sparse": 0, "active_fraction": {}, "region_fraction": 0.0,
                               "detect_seconds": 0.0, "seconds": time.perf_counter() - started,
                               "cache_bytes": self.cache_bytes, "background": "unchanged"})  # fmt: skip
            return self._output(cap.decoded.clone(), output_type, return_dict)
        generator = torch.Generator(device=cap.generator_device)
        generator.set_state(cap.generator_state)
        inject = self._injection(cap, change, b, copies) if text else None

        def count(stats):
            totals["macs_dense"] += stats["macs_dense"]
            totals["macs_sparse"] += stats["macs_sparse"]

        def run_control(i, call_control, n):
            with (
                editing(controlnet, region=keep.repeat(n, 1, 1), commit=commit, changeable=changeable),
                scope(controlnet, i),
            ):
                out = call_control()
                stats, regions = last_stats(controlnet), output_regions(controlnet)
            count(stats)
            totals["dense_steps"] += stats["dense_run"] is not None
            return out, regions

        def run_unet(i, call_unet, regions=None):
            if prefetching and i + 1 < len(cap.timesteps):
                prefetch(unet, i + 1)  # the next step's entries, copied while this step computes
                if controlnet is not None:
                    prefetch(controlnet, i + 1)
            with (
                editing(unet, region=unet_region, commit=commit, changeable=changeable, input_regions=regions),
                scope(unet, i),
            ):
                out = call_unet()
                stats = last_stats(unet)
            # With temporal reuse a step runs only some layers; the dense reference is a whole step.
            totals["macs_dense"] += cap.step_macs if self.temporal is not None else stats["macs_dense"]
            totals["macs_sparse"] += stats["macs_sparse"]
            for res, frac in stats["active_fraction"].items():
                fractions[res].append(frac)
            for part, t in stats["time"].items():
                unet_time[part] += t
            totals["dense_steps"] += stats["dense_run"] is not None
            return out

        def run_dense(i, call_unet):
            totals["macs_dense"] += per_step_macs
            totals["macs_sparse"] += per_step_macs
            return call_unet()

        per_step_macs = 0
        prefetching = self.config.prefetch
        if prefetching is None:
            prefetching = unet.device.type == "cuda"
        unet_time = defaultdict(float)
        self._extra_macs = 0
        changeable = ("encoder_hidden_states",) if self.latent else ()
        if text and cap.conditions:  # SDXL: the pooled embedding changes with the prompt
            changeable += ("added_cond_kwargs",)
        if self._control is not None:
            self._control.inject = inject
        try:
            self._encoder_stats = []
            with self._encoder_mode(editing, region=region, commit=commit):
                prep = self._prepare(x0, mask, generator, cap.timesteps, cap.call, inputs, copies, keep=keep, cap=cap)
            for stats in self._encoder_stats:
                count(stats)
            # Computed once per edit (the ControlNet's conditioning embedding); the pipeline does it at every step.
            totals["macs_dense"] += prep.get("extra_macs", 0) * len(cap.timesteps)
            totals["macs_sparse"] += prep.get("extra_macs", 0)
            start, z = 0, None
            detect_seconds = 0.0
            if text:
                detect_started = time.perf_counter()
                per_step_macs = cap.step_macs
                predict_dense, _ = self._predictor(embeds, gs, prep, run_dense)
                found, start, z_dense = self._detect(cap, change, embeds, prep, generator, copies, predict_dense)
                keep = keep | dilate(found, change["config"].dilation)
                if start:
                    z = torch.where(keep[:, None], z_dense, cap.trajectory[start])
                detect_seconds = time.perf_counter() - detect_started
            unet_region = keep.repeat(copies, 1, 1)
            predict, _ = self._predictor(embeds, gs, prep, run_unet, run_control)

            def composite(i, z):
                return torch.where(keep[:, None], z, cap.trajectory[i + 1])

            if bool(keep.any()):
                z, trajectory = self._loop(prep, cap.timesteps, generator, predict, composite, start=start, z=z)
                trajectory = cap.trajectory[:start] + trajectory
            else:  # nothing to regenerate: the current result, at no cost
                z, trajectory = cap.trajectory[-1], cap.trajectory
        finally:
            if self._control is not None:
                self._control.idle()
        totals["macs_sparse"] += self._extra_macs  # detection work a dense regeneration does not do
        decoded = z
        if self.latent:
            decoder = self.pipe.vae.decoder
            if bool(keep.any()):
                with editing(decoder, region=keep, commit=commit):
                    decoded = self._decode(z)
                    stats = last_stats(decoder)
                totals["macs_dense"] += stats["macs_dense"]
                totals["macs_sparse"] += stats["macs_sparse"]
            else:
                decoded = cap.decoded
            # The decoder is approximate near the region and its reach spans the image: outside the region, the
            # pixels are the current image's decode, bit for bit.
            px = F.interpolate(keep[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0
            decoded = torch.where(px[:, None], decoded, cap.decoded)
        if commit:
            if self.adapter.takes_image:
                cap.image = x0.clone()
                cap.mask = None if mask is None else mask.clone()
            cap.trajectory = trajectory
            cap.decoded = decoded
            cap.latents = {k: prep[k] for k in cap.latents}
            cap.inputs = dict(inputs)
            if change is not None:
                cap.call["prompt"], cap.call["negative_prompt"] = change["prompt"], change["negative_prompt"]
                cap.embeds = embeds
                cap.conditions = dict(self.adapter.conditions)
            cap.version += 1
        self.last_region = F.interpolate(keep[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0
        self.last_stats = EditStats.of(
            {
                # A prompt edit is compared with regenerating densely: the capture's whole dense run.
                "macs_dense": cap.macs if text else totals["macs_dense"],
                "macs_sparse": totals["macs_sparse"],
                "active_fraction": {k: sum(v) / len(v) for k, v in fractions.items()},
                "region_fraction": float(self.last_region.float().mean()) if text else float(region.float().mean()),
                "detect_seconds": detect_seconds,
                "seconds": time.perf_counter() - started,
                "unet_time": dict(unet_time),  # the UNet's seconds by part, summed over the steps (spatial.last_stats)
                "dense_steps": totals[
                    "dense_steps"
                ],  # UNet steps the run-level cost model ran as plain dense forwards
                "cache_bytes": self.cache_bytes,
                "background": (
                    "latents outside the dilated region are the capture's at every step; the VAE encoder and decoder run "
                    "sparse and the pixels outside the region are composited from the current image's decode"
                    if self.latent
                    else "exact: the pixels outside the dilated region are the capture's at every step"
                ),
            }
        )
        if change is not None:
            self.last_stats["region_method"] = "mask" if change["region"] is not None else change["config"].region
            self.last_stats["detect_steps"] = start
        return self._output(decoded, output_type, return_dict)
