"""Pixel-space diffusion: `DDPMPipeline` and `DDIMPipeline` (SDEdit on the image itself, as SIGE's LSUN church model)."""

from __future__ import annotations

import numpy as np

from .base import PipelineAdapter, randn, register_pipeline, to_tensor


@register_pipeline("DDPMPipeline", "DDIMPipeline")
class PixelAdapter(PipelineAdapter):
    """Unconditional pixel-space DDPM/DDIM pipelines: SDEdit on the image itself (SIGE's LSUN church model)."""

    kind = "pixel"
    latent = False
    encodes_image = False

    def preprocess(self, image, height=None, width=None):
        return to_tensor(image, self.device, self.dtype)

    def embeds(self, prompt, negative_prompt, guidance_scale, batch, prompt_embeds=None, negative_prompt_embeds=None):
        if any(p is not None for p in (prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)):
            raise ValueError(f"{type(self.pipe).__name__} is unconditional: it takes no prompt.")
        return None

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        return {"z": self.pipe.scheduler.add_noise(x0, noise, timesteps[0][None]), "noise": noise}

    def step_kwargs(self, generator, eta: float = 0.0):
        import inspect

        kwargs = {"generator": generator}
        if eta:
            if "eta" not in inspect.signature(self.pipe.scheduler.step).parameters:
                raise ValueError(f"eta is for DDIM-style schedulers; {type(self.pipe.scheduler).__name__} takes none.")
            kwargs["eta"] = eta
        return kwargs

    def decode(self, z):
        return z

    def output(self, x, output_type, return_dict, latents=None):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        if output_type == "latent":
            raise ValueError(f"{type(self.pipe).__name__} works on pixels: output_type is 'pil', 'np' or 'pt'.")
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
