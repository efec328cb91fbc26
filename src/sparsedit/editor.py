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

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

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
        pipe: a `DDPMPipeline` or `DDIMPipeline` (pixel-space UNet, as SIGE's LSUN church model). Stable Diffusion
            pipelines are not supported yet.
        config: the `SparseConfig` for the UNet. Defaults to SIGE's diffusion setting (`input_dilation=5`).
    """

    def __init__(self, pipe, config: SparseConfig | None = None):
        unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
        supported = ("DDPMPipeline", "DDIMPipeline")
        if type(pipe).__name__ not in supported or unet is None or scheduler is None:
            raise NotImplementedError(
                f"SparseEditor supports {', '.join(supported)} so far, not {type(pipe).__name__}; for other models "
                "use the model-level API (`sparsedit.sparsify_`, `capturing`, `editing`)."
            )
        self.pipe = pipe
        self.config = DIFFUSION_DEFAULTS if config is None else config
        sparsify_(unet, self.config)
        self._capture: _Capture | None = None
        self.last_stats: dict = {}

    @property
    def unet(self):
        return self.pipe.unet

    def remove(self) -> None:
        """Detach everything: the pipeline computes bit-identically to before. The caches are dropped."""
        unsparsify_(self.unet)
        self._capture = None

    # -- the SDEdit loop, shared by capture (dense) and edit (sparse) ----------------------------------------------
    def _timesteps(self, num_inference_steps: int, strength: float) -> list:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        self.pipe.scheduler.set_timesteps(num_inference_steps)
        start = num_inference_steps - int(num_inference_steps * strength)
        timesteps = list(self.pipe.scheduler.timesteps[start:])
        if not timesteps:
            raise ValueError(f"strength={strength} with {num_inference_steps} steps leaves no step to run.")
        return timesteps

    def _run(self, x0, timesteps, generator, step_fn):
        """Noise `x0` to the first timestep, then denoise; `step_fn(i, t, x)` returns the noise prediction."""
        sched = self.pipe.scheduler
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        x = sched.add_noise(x0, noise.to(x0.device, x0.dtype), timesteps[0][None])
        trajectory = [x]
        for i, t in enumerate(timesteps):
            eps = step_fn(i, t, x)
            x = sched.step(eps, t, x, generator=generator).prev_sample
            x = self._after_step(i, x)
            trajectory.append(x)
        return x, trajectory

    def _after_step(self, i, x):
        return x

    def _generator(self, generator) -> torch.Generator:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be one torch.Generator (it is replayed to reuse the capture's noise).")
        return generator

    @torch.no_grad()
    def capture(
        self,
        image,
        strength: float = 0.7,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Run SDEdit on `image` densely and cache what edits need. Returns the pipeline's output type."""
        unet = self.unet
        x0 = _to_tensor(image, unet.device, unet.dtype)
        generator = self._generator(generator)
        state = generator.get_state()
        timesteps = self._timesteps(num_inference_steps, strength)
        started = time.perf_counter()
        macs = 0

        def step(i, t, x):
            nonlocal macs
            with scope(unet, i):
                out = unet(x, t).sample
            macs += last_stats(unet)["macs_dense"]
            return out

        with capturing(unet):
            x, trajectory = self._run(x0, timesteps, generator, step)
        self._capture = _Capture(
            image=x0.clone(),
            trajectory=trajectory,
            timesteps=timesteps,
            generator_state=state,
            generator_device=str(generator.device),
            settings={"strength": strength, "num_inference_steps": num_inference_steps, "shape": tuple(x0.shape)},
        )
        self.last_stats = {
            "macs_dense": macs,
            "macs_sparse": macs,
            "active_fraction": {},
            "seconds": time.perf_counter() - started,
            "cache_bytes": self.cache_bytes,
        }
        return _output(x, output_type, return_dict)

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
            region: bool `[H, W]` or `[B, H, W]`; `None` uses every pixel where `image` differs from the current image.
            commit: make the result the new current image, so the next edit is incremental against it.
        """
        cap = self._capture
        if cap is None:
            raise RuntimeError(
                "Nothing captured yet: call `editor.capture(image=..., ...)` before `editor.edit(...)`."
            )
        unet = self.unet
        x0 = cap.image if image is None else _to_tensor(image, unet.device, unet.dtype)
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
        # The composite region: outside it, every step's latents are the capture's, bit for bit.
        keep = dilate(region, self.config.input_dilation)
        generator = torch.Generator(device=cap.generator_device)
        generator.set_state(cap.generator_state)
        started = time.perf_counter()
        totals = defaultdict(int)
        fractions = defaultdict(list)

        def step(i, t, x):
            with editing(unet, region=keep, commit=commit), scope(unet, i):
                out = unet(x, t).sample
                stats = last_stats(unet)
            totals["macs_dense"] += stats["macs_dense"]
            totals["macs_sparse"] += stats["macs_sparse"]
            for res, frac in stats["active_fraction"].items():
                fractions[res].append(frac)
            return out

        def composite(i, x):
            return torch.where(keep[:, None], x, cap.trajectory[i + 1])

        self._after_step = composite
        try:
            x, trajectory = self._run(x0, cap.timesteps, generator, step)
        finally:
            del self._after_step
        if commit:
            cap.image = x0.clone()
            cap.trajectory = trajectory
        self.last_stats = {
            "macs_dense": totals["macs_dense"],
            "macs_sparse": totals["macs_sparse"],
            "active_fraction": {k: sum(v) / len(v) for k, v in fractions.items()},
            "region_fraction": float(region.float().mean()),
            "seconds": time.perf_counter() - started,
            "cache_bytes": self.cache_bytes,
            "background": "exact: latents outside the dilated region are the capture's at every step",
        }
        return _output(x, output_type, return_dict)
