"""`SparseEditor`: spatially sparse image editing on a diffusers pipeline (SIGE, Li et al., NeurIPS 2022).

```python
editor = sparsedit.SparseEditor(pipe, sparsedit.SparseConfig())
out0 = editor.capture(image=img, strength=0.7, num_inference_steps=20, generator=g)  # dense; fills the caches
out1 = editor.edit(image=img_with_stroke)  # sparse, the pipeline's own output type
editor.last_stats  # macs_dense, macs_sparse, active_fraction, seconds, cache_bytes
editor.remove()  # the pipeline computes exactly as before
```

Capture runs SDEdit densely (noise the image to `strength`, denoise), storing every step's UNet activations under that
step's scope and the latent trajectory. An edit replays the same noise. Each step recomputes only the edited region
and reuses the capture elsewhere, and the latents outside the (dilated) region are the capture's, bit for bit, at
every step. Accepted edits update the caches, so the next edit is incremental against the last result.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .cache import StaleCacheError
from .config import SparseConfig
from .regions import as_region, difference_mask, dilate
from .spatial import capturing, editing, last_stats, scope, sparsify_, unsparsify_


__all__ = ["SparseEditor"]

# SIGE's setting for diffusion models: the edit region is dilated by 5 pixels before sparse computation.
DIFFUSION_DEFAULTS = SparseConfig(input_dilation=5)


def _to_tensor(image, device, dtype) -> torch.Tensor:
    """PIL image(s), numpy `[H, W, C]`/`[B, H, W, C]` in [0, 1] or uint8, or a `[B, C, H, W]` tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image[None]
        return x.to(device=device, dtype=dtype)
    images = image if isinstance(image, (list, tuple)) else [image]
    arrays = []
    for im in images:
        a = np.asarray(im)
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        arrays.append(a[..., :3])
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
    return x.to(device=device, dtype=dtype)


def _output(x: torch.Tensor, output_type: str, return_dict: bool):
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    images = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        result = images
    else:
        result = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            from PIL import Image

            result = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in result]
        elif output_type != "np":
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
    return ImagePipelineOutput(images=result) if return_dict else (result,)


@dataclass
class _Capture:
    """What a capture run depended on and produced, for the staleness check and for edits."""

    image: torch.Tensor  # the current (last accepted) input image, [-1, 1]
    trajectory: list[torch.Tensor]  # latents entering each step, then the final latents
    timesteps: list
    generator_state: torch.Tensor
    generator_device: str
    settings: dict


class SparseEditor:
    """Spatially sparse SDEdit on a diffusers pipeline.

    Args:
        pipe: a `StableDiffusionImg2ImgPipeline` (SDEdit in latent space, classifier-free guidance; the VAE decoder
            runs sparse and the decoded image is composited outside the region; the encoder runs densely), or a `DDPMPipeline`/`DDIMPipeline` (pixel-space
            UNet, as SIGE's LSUN church model).
        config: the `SparseConfig` for the UNet. Defaults to SIGE's diffusion setting (`input_dilation=5`, in pixels
            of the UNet's input: latent pixels for Stable Diffusion).
    """

    def __init__(self, pipe, config: SparseConfig | None = None):
        unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
        supported = ("DDPMPipeline", "DDIMPipeline", "StableDiffusionImg2ImgPipeline")
        if type(pipe).__name__ not in supported or unet is None or scheduler is None:
            raise NotImplementedError(
                f"SparseEditor supports {', '.join(supported)} so far, not {type(pipe).__name__}; for other models "
                "use the model-level API (`sparsedit.sparsify_`, `capturing`, `editing`)."
            )
        self.pipe = pipe
        self.latent = type(pipe).__name__.startswith("StableDiffusion")
        self.config = DIFFUSION_DEFAULTS if config is None else config
        sparsify_(unet, self.config)
        if self.latent:
            # The VAE decoder runs sparse on the latent region (already dilated for the UNet: one more pixel here).
            self._decoder_config = SparseConfig.from_dict({**self.config.to_dict(), "input_dilation": 1})
            sparsify_(pipe.vae.decoder, self._decoder_config)
        self._capture: _Capture | None = None
        self.last_stats: dict = {}

    @property
    def unet(self):
        return self.pipe.unet

    def remove(self) -> None:
        """Detach everything: the pipeline computes bit-identically to before. The caches are dropped."""
        unsparsify_(self.unet)
        if self.latent:
            unsparsify_(self.pipe.vae.decoder)
        self._capture = None

    # -- the SDEdit loop, shared by capture (dense) and edit (sparse) ----------------------------------------------
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

    def _encode(self, x0, generator):
        """Image → the space the UNet denoises (the VAE latent sample for Stable Diffusion), as the pipeline does."""
        if not self.latent:
            return x0
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        return vae.config.scaling_factor * retrieve_latents(vae.encode(x0.to(vae.dtype)), generator=generator)

    def _decode(self, z):
        if not self.latent:
            return z
        vae = self.pipe.vae
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    def _run(self, z0, timesteps, generator, predict, after_step):
        """Noise `z0` to the first timestep, then denoise. `predict(i, t, z)` returns the guided noise prediction."""
        sched = self.pipe.scheduler
        noise = torch.randn(z0.shape, generator=generator, device=generator.device, dtype=z0.dtype).to(z0.device)
        z = sched.add_noise(z0, noise, timesteps[0][None])
        trajectory = [z]
        for i, t in enumerate(timesteps):
            z = sched.step(predict(i, t, z), t, z, generator=generator, return_dict=False)[0]
            z = after_step(i, z)
            trajectory.append(z)
        return z, trajectory

    def _predictor(self, embeds, guidance_scale, run_unet):
        """The per-step noise prediction, with classifier-free guidance batched as the pipeline batches it."""
        unet, sched = self.unet, self.pipe.scheduler
        cfg = embeds is not None and guidance_scale > 1.0

        def predict(i, t, z):
            if embeds is None:
                return run_unet(i, lambda: unet(z, t).sample)
            zin = sched.scale_model_input(torch.cat([z] * 2) if cfg else z, t)
            eps = run_unet(i, lambda: unet(zin, t, encoder_hidden_states=embeds, return_dict=False)[0])
            if cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            return eps

        return predict, (2 if cfg else 1)

    def _embeds(self, prompt, negative_prompt, guidance_scale, batch):
        if not self.latent:
            if prompt is not None or negative_prompt is not None:
                raise ValueError(f"{type(self.pipe).__name__} is unconditional: it takes no prompt.")
            return None
        if prompt is None:
            raise ValueError("Stable Diffusion needs a prompt: capture(prompt=..., image=...).")
        cond, uncond = self.pipe.encode_prompt(prompt, self.unet.device, batch // (len(prompt) if isinstance(prompt, list) else 1),
                                               guidance_scale > 1.0, negative_prompt)  # fmt: skip
        return torch.cat([uncond, cond]) if guidance_scale > 1.0 else cond

    def _scheduler_fingerprint(self) -> tuple:
        sched = self.pipe.scheduler
        return type(sched).__name__, json.dumps(dict(sched.config), sort_keys=True, default=str)

    def _check_scheduler(self, cap) -> None:
        """The scheduler may have been swapped, reconfigured or reset (a plain `pipe(...)` call resets its timesteps)
        since the capture: re-derive the capture's timesteps, and refuse a different scheduler."""
        if self._scheduler_fingerprint() != cap.settings["scheduler"]:
            raise StaleCacheError(
                "the pipeline's scheduler (or its config) changed since the capture, so the cached trajectory no "
                "longer matches; capture again with `editor.capture(...)`."
            )
        timesteps = self._timesteps(cap.settings["steps"], cap.settings["strength"])
        if [int(t) for t in timesteps] != [int(t) for t in cap.timesteps]:
            raise StaleCacheError("the scheduler's timesteps differ from the capture's; capture again.")

    def _generator(self, generator) -> torch.Generator:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be one torch.Generator (it is replayed to reuse the capture's noise).")
        return generator

    def _preprocess(self, image):
        if self.latent:  # exactly what the pipeline accepts (PIL, numpy, or tensors in [0, 1])
            return self.pipe.image_processor.preprocess(image).to(self.unet.device, self.unet.dtype)
        return _to_tensor(image, self.unet.device, self.unet.dtype)

    def _output(self, x, output_type, return_dict):
        if not self.latent:
            return _output(x, output_type, return_dict)
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        images = self.pipe.image_processor.postprocess(x, output_type=output_type, do_denormalize=[True] * x.shape[0])
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict else (images,)

    @torch.no_grad()
    def capture(
        self,
        image,
        prompt: str | list[str] | None = None,
        strength: float = 0.7,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Run SDEdit on `image` densely and cache what edits need. Returns the pipeline's own output type."""
        unet = self.unet
        x0 = self._preprocess(image)
        generator = self._generator(generator)
        state = generator.get_state()
        timesteps = self._timesteps(num_inference_steps, strength)
        embeds = self._embeds(prompt, negative_prompt, guidance_scale, x0.shape[0])
        started = time.perf_counter()
        macs = 0

        def run_unet(i, call):
            nonlocal macs
            with scope(unet, i):
                out = call()
            macs += last_stats(unet)["macs_dense"]
            return out

        predict, _ = self._predictor(embeds, guidance_scale, run_unet)
        z0 = self._encode(x0, generator)
        with capturing(unet):
            z, trajectory = self._run(z0, timesteps, generator, predict, lambda i, z: z)
        if self.latent:
            with capturing(self.pipe.vae.decoder):
                decoded = self._decode(z)
            macs += last_stats(self.pipe.vae.decoder)["macs_dense"]
        else:
            decoded = z
        self._capture = _Capture(
            image=x0.clone(),
            trajectory=trajectory,
            timesteps=timesteps,
            generator_state=state,
            generator_device=str(generator.device),
            settings={
                "shape": tuple(x0.shape),
                "embeds": embeds,
                "guidance_scale": guidance_scale,
                "decoded": decoded,
                "z0": z0,
                "steps": num_inference_steps,
                "strength": strength,
                "scheduler": self._scheduler_fingerprint(),
            },  # fmt: skip
        )
        self.last_stats = {
            "macs_dense": macs,
            "macs_sparse": macs,
            "active_fraction": {},
            "seconds": time.perf_counter() - started,
            "cache_bytes": self.cache_bytes,
        }
        return self._output(decoded, output_type, return_dict)

    @property
    def cache_bytes(self) -> int:
        from .spatial import _attachment

        traj = sum(t.numel() * t.element_size() for t in self._capture.trajectory) if self._capture else 0
        return _attachment(self.unet).state.cache.nbytes + traj

    @torch.no_grad()
    def edit(
        self,
        image=None,
        region: torch.Tensor | None = None,
        commit: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Edit the captured image: only the changed region is recomputed, at every step.

        Args:
            image: the edited image. `None` keeps the current image (then `region` must say what to regenerate).
            region: bool `[H, W]` or `[B, H, W]` at image resolution; `None` uses every pixel where `image` differs
                from the current image.
            commit: make the result the new current image, so the next edit is incremental against it.
        """
        cap = self._capture
        if cap is None:
            raise RuntimeError(
                "Nothing captured yet: call `editor.capture(image=..., ...)` before `editor.edit(...)`."
            )
        unet = self.unet
        x0 = cap.image if image is None else self._preprocess(image)
        if tuple(x0.shape) != cap.settings["shape"]:
            raise ValueError(
                f"the edited image has shape {tuple(x0.shape)} but the capture had {cap.settings['shape']}; edits must "
                "keep the size. Capture again for a new image size."
            )
        b, _, h, w = x0.shape
        if region is None:
            region = difference_mask(x0, cap.image, eps=0.0)
        else:
            region = as_region(region, b, h, w, x0.device)
            missed = difference_mask(x0, cap.image, eps=0.0) & ~region
            if bool(missed.any()):
                raise ValueError(
                    f"the image differs from the current image at {int(missed.sum())} pixels outside `region`; "
                    "enlarge the region or pass region=None to detect it."
                )
        z_shape = cap.trajectory[0].shape[-2:]
        # The composite region at the UNet's resolution: outside it, every step's latents are the capture's.
        keep = dilate(F.adaptive_max_pool2d(region[:, None].float(), z_shape)[:, 0] > 0, self.config.input_dilation)
        self._check_scheduler(cap)
        generator = torch.Generator(device=cap.generator_device)
        generator.set_state(cap.generator_state)
        started = time.perf_counter()
        totals = defaultdict(int)
        fractions = defaultdict(list)
        embeds, gs = cap.settings["embeds"], cap.settings["guidance_scale"]
        _, copies = self._predictor(embeds, gs, None)
        unet_region = keep.repeat(copies, 1, 1)

        def run_unet(i, call):
            with editing(unet, region=unet_region, commit=commit), scope(unet, i):
                out = call()
                stats = last_stats(unet)
            totals["macs_dense"] += stats["macs_dense"]
            totals["macs_sparse"] += stats["macs_sparse"]
            for res, frac in stats["active_fraction"].items():
                fractions[res].append(frac)
            return out

        predict, _ = self._predictor(embeds, gs, run_unet)
        z0 = self._encode(x0, generator)
        # The VAE encoder is dense: its GroupNorms move every latent a little. Keep the capture's outside the region.
        z0 = torch.where(keep[:, None], z0, cap.settings["z0"])

        def composite(i, z):
            return torch.where(keep[:, None], z, cap.trajectory[i + 1])

        z, trajectory = self._run(z0, cap.timesteps, generator, predict, composite)
        decoded = z
        if self.latent:
            decoder = self.pipe.vae.decoder
            with editing(decoder, region=keep, commit=commit):
                decoded = self._decode(z)
                stats = last_stats(decoder)
            totals["macs_dense"] += stats["macs_dense"]
            totals["macs_sparse"] += stats["macs_sparse"]
            # The decoder is approximate near the region and its reach spans the image: outside the region, the
            # pixels are the current image's decode, bit for bit.
            px = F.interpolate(keep[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0
            decoded = torch.where(px[:, None], decoded, cap.settings["decoded"])
        if commit:
            cap.image = x0.clone()
            cap.trajectory = trajectory
            cap.settings["decoded"] = decoded
            cap.settings["z0"] = z0
        self.last_stats = {
            "macs_dense": totals["macs_dense"],
            "macs_sparse": totals["macs_sparse"],
            "active_fraction": {k: sum(v) / len(v) for k, v in fractions.items()},
            "region_fraction": float(region.float().mean()),
            "seconds": time.perf_counter() - started,
            "cache_bytes": self.cache_bytes,
            "background": (
                "latents outside the dilated region are the capture's at every step; the VAE decoder runs sparse and "
                "the pixels outside the region are composited from the current image's decode (the VAE encoder runs "
                "densely)"
                if self.latent
                else "exact: the pixels outside the dilated region are the capture's at every step"
            ),
        }
        return self._output(decoded, output_type, return_dict)
