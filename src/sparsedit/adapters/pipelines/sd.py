"""Stable Diffusion 1.x/2.x: text-to-image, img2img (SDEdit in latent space) and inpainting (9-channel UNets, and
4-channel UNets with latent blending)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PipelineAdapter, randn, register_pipeline


@register_pipeline("StableDiffusionPipeline")
class Text2ImgAdapter(PipelineAdapter):
    """`StableDiffusionPipeline`: generation from the prompt; edits change the prompt (FISEdit)."""

    kind = "txt2img"
    takes_image = False
    text_editable = True
    default_strength = 1.0
    fixed_size = True
    encodes_image = False

    def batch(self, x0) -> int:
        return x0[0]  # text-to-image's x0 is (batch, height, width)

    def prepare(
        self, x0, mask, generator, timesteps, strength, encode, kept
    ):  # StableDiffusionPipeline.prepare_latents
        f = self.pipe.vae_scale_factor
        b, h, w = x0
        shape = (b, self.unet.config.in_channels, h // f, w // f)
        noise = randn(shape, generator, self.device, self.dtype)
        return {"z": noise * self.pipe.scheduler.init_noise_sigma, "noise": noise}


@register_pipeline("StableDiffusionImg2ImgPipeline")
class Img2ImgAdapter(PipelineAdapter):
    """`StableDiffusionImg2ImgPipeline`: SDEdit in latent space; stroke edits and prompt edits."""

    kind = "img2img"
    text_editable = True

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        image = kept("image", encode(x0, "image"))
        noise = randn(image.shape, generator, image.device, image.dtype)
        return {"z": self.pipe.scheduler.add_noise(image, noise, timesteps[0][None]), "noise": noise, "image": image}


@register_pipeline("StableDiffusionInpaintPipeline")
class InpaintAdapter(PipelineAdapter):
    """`StableDiffusionInpaintPipeline`: the region comes from the change of `mask_image`; 9-channel inpainting UNets
    (mask and masked image as extra input channels) and 4-channel UNets with latent blending."""

    kind = "inpaint"
    takes_mask = True
    default_strength = 1.0
    fixed_size = True

    def check(self):
        if self.unet.config.in_channels not in (4, 9):
            raise ValueError(f"an inpainting UNet has 4 or 9 input channels, this one {self.unet.config.in_channels}.")

    def preprocess_mask(self, mask_image, like):
        if mask_image is None:  # nothing masked: the pipeline reproduces the image
            return torch.zeros_like(like[:, :1], dtype=torch.float32)
        h, w = like.shape[-2:]
        mask = self.pipe.mask_processor.preprocess(mask_image, height=h, width=w).to(like.device)
        if mask.shape[0] == 1 and like.shape[0] > 1:
            mask = mask.repeat(like.shape[0], 1, 1, 1)
        if mask.shape[0] != like.shape[0] or tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(f"mask_image has shape {tuple(mask.shape)}; the image is {tuple(like.shape)}.")
        return mask

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        # StableDiffusionInpaintPipeline.prepare_latents, then prepare_mask_latents
        sched = self.pipe.scheduler
        dtype = self.dtype
        strength_max = strength == 1.0
        f = self.pipe.vae_scale_factor
        shape = (x0.shape[0], self.pipe.vae.config.latent_channels, x0.shape[-2] // f, x0.shape[-1] // f)
        out = {}
        if self.unet.config.in_channels == 4 or not strength_max:
            out["image"] = kept("image", encode(x0, "image").to(dtype))
        noise = randn(shape, generator, x0.device, dtype)
        out["noise"] = noise
        t0 = timesteps[0][None]
        out["z"] = noise * sched.init_noise_sigma if strength_max else sched.add_noise(out["image"], noise, t0)
        out["mask"] = F.interpolate(mask, size=shape[-2:]).to(dtype)
        out["masked"] = kept("masked", encode(x0 * (mask < 0.5), "masked").to(dtype))
        return out

    def unet_condition(self, prep, copies):
        if self.unet.config.in_channels != 9:
            return None
        return torch.cat([prep["mask"], prep["masked"]], dim=1).repeat(copies, 1, 1, 1)

    def after_step(self, z, prep, timesteps, i):
        if self.unet.config.in_channels != 4:
            return z
        proper = prep["image"]  # the pipeline's latent blending for 4-channel UNets
        if i < len(timesteps) - 1:
            proper = self.pipe.scheduler.add_noise(proper, prep["noise"], torch.tensor([timesteps[i + 1]]))
        return (1 - prep["mask"]) * proper + prep["mask"] * z
