"""Stable Diffusion XL: two text encoders, pooled embeddings and `text_time` conditioning, over the SD families."""

from __future__ import annotations

import torch

from .base import images_per_prompt, register_pipeline
from .sd import Img2ImgAdapter, InpaintAdapter, Text2ImgAdapter


class _SDXLConditioning:
    """SDXL's conditioning, shared by its pipeline families: both text encoders' hidden states are the
    cross-attention context; the second encoder's pooled embedding and the size/crop `time_ids` go to the UNet as
    `added_cond_kwargs` (`text_time`), recorded with the capture and checked like the other inputs. A prompt edit
    changes the pooled embedding with the prompt (`StableDiffusionXLPipeline`; the img2img and inpainting families
    are stroke and mask edits only so far)."""

    text_editable = False
    guidance_scale = 5.0

    def check(self):
        super().check()
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            raise NotImplementedError(
                "this SDXL VAE upcasts to float32 inside the pipeline (force_upcast); load it in float32, or use the "
                "fp16-fixed VAE with `vae.config.force_upcast = False`, before making a SparseEditor."
            )

    def embeds(self, prompt, negative_prompt, guidance_scale, batch, prompt_embeds=None, negative_prompt_embeds=None):
        per_prompt = images_per_prompt("Stable Diffusion XL", prompt, batch, prompt_embeds, negative_prompt_embeds)
        cfg = guidance_scale > 1.0
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompt, device=self.device, num_images_per_prompt=per_prompt,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt,
        )  # fmt: skip
        self.conditions = {"text_embeds": torch.cat([uncond_pooled, pooled]) if cfg else pooled}
        return torch.cat([uncond, cond]) if cfg else cond

    def unet_kwargs(self, z, copies):
        pipe = self.pipe
        f = pipe.vae_scale_factor
        size = (z.shape[-2] * f, z.shape[-1] * f)
        text = self.conditions["text_embeds"]
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(text.shape[-1])
        time_ids, neg_time_ids = pipe._get_add_time_ids(size, (0, 0), size, 6.0, 2.5, size, (0, 0), size,
                                                        dtype=text.dtype, text_encoder_projection_dim=proj)  # fmt: skip
        b = z.shape[0]
        time_ids = time_ids.repeat(b, 1)
        if copies == 2:
            time_ids = torch.cat([neg_time_ids.repeat(b, 1), time_ids])
        return {"added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids.to(text.device)}}

    def decode(self, z):
        vae = self.pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
            return vae.decode(z * std / vae.config.scaling_factor + mean, return_dict=False)[0]
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    def output(self, x, output_type, return_dict, latents=None):
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        if output_type == "latent":
            return StableDiffusionXLPipelineOutput(images=latents) if return_dict else (latents,)
        if getattr(self.pipe, "watermark", None) is not None:
            x = self.pipe.watermark.apply_watermark(x)
        images = self.pipe.image_processor.postprocess(x, output_type=output_type)
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)


@register_pipeline("StableDiffusionXLPipeline")
class SDXLText2ImgAdapter(_SDXLConditioning, Text2ImgAdapter):
    """`StableDiffusionXLPipeline`: generation from the prompt with SDXL's conditioning; prompt edits change both
    encoders' hidden states and the pooled embedding (the UNet's `added_cond_kwargs` are then changeable inputs,
    FISEdit's approximation: outside the region the maps keep the capture's values)."""

    kind = "sdxl_txt2img"
    text_editable = True

    def unet_kwargs(self, z, copies):
        pipe = self.pipe  # StableDiffusionXLPipeline._get_add_time_ids: sizes and crop, no aesthetic score
        f = pipe.vae_scale_factor
        size = (z.shape[-2] * f, z.shape[-1] * f)
        text = self.conditions["text_embeds"]
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(text.shape[-1])
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=text.dtype, text_encoder_projection_dim=proj)
        time_ids = time_ids.repeat(z.shape[0] * copies, 1)  # the negative time ids are the same sizes
        return {"added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids.to(text.device)}}


@register_pipeline("StableDiffusionXLImg2ImgPipeline")
class SDXLImg2ImgAdapter(_SDXLConditioning, Img2ImgAdapter):
    """`StableDiffusionXLImg2ImgPipeline`: SDEdit in latent space with SDXL's conditioning; stroke edits."""

    kind = "sdxl_img2img"


@register_pipeline("StableDiffusionXLInpaintPipeline")
class SDXLInpaintAdapter(_SDXLConditioning, InpaintAdapter):
    """`StableDiffusionXLInpaintPipeline`: inpainting with SDXL's conditioning (4-channel UNets with latent blending,
    9-channel inpainting UNets); the region comes from the change of `mask_image`."""

    kind = "sdxl_inpaint"
    default_strength = 0.9999  # the pipeline's own defaults
    guidance_scale = 7.5

    def check(self):
        _SDXLConditioning.check(self)
        InpaintAdapter.check(self)
