"""FLUX.1: img2img (SDEdit with flow matching), inpainting (latent blending) and Fill (the mask and masked image as
input channels), the transformer token-sparse through `adapters/flux.py`.

The loop keeps FLUX's latents unpacked (`[B, 16, h, w]`, as the other families): packing 2x2 patches into tokens is a
permutation, and the flow-matching step and `scale_noise` act per element, so the trajectory is the pipeline's bit
for bit. The adapter packs the latents for each transformer call and unpacks its prediction; the edit region goes to
the transformer as its tokens (`denoiser_region`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import (
    FlowMatchLatents,
    PipelineAdapter,
    TransformerDenoiser,
    images_per_prompt,
    randn,
    register_pipeline,
    strength_timesteps,
)
from .sd import InpaintAdapter


class _Flux(TransformerDenoiser, FlowMatchLatents):
    """FLUX.1's conditioning and latents: the T5 hidden states are the context, CLIP's pooled embedding and the
    distilled guidance (`guidance`, FLUX-dev) are inputs of the transformer (no batched classifier-free guidance; true
    CFG with a negative prompt is not supported yet), with the text ids; latents `(sample - shift) * scale`; the
    schedule shifted by the image's token count (`mu`)."""

    condition_inputs = ("pooled_projections",)  # a prompt edit changes them with the context
    batches_guidance = False
    fixed_size = True  # the pipeline resizes the image to `default_sample_size * vae_scale_factor` unless told
    guidance_scale = 7.0  # FluxImg2ImgPipeline's default
    default_strength = 0.6

    def size_multiple(self) -> int:
        return 2

    def size_note(self, multiple: int) -> str:
        return "FLUX's 2x2 latent packing"

    def input_shape(self, batch, height, width):
        f = self.pipe.vae_scale_factor  # the loop's latents, unpacked: a quarter of the packed channels
        return (batch, self.unet.config.in_channels // 4, height // f, width // f)

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def timesteps(self, sched, num_inference_steps, strength, device, size=None):
        from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift, retrieve_timesteps

        h, w = size
        f = self.pipe.vae_scale_factor
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(
            (int(h) // f // 2) * (int(w) // f // 2),
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(sched, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return strength_timesteps(sched, num_inference_steps, strength)

    def embeds(self, prompt, negative_prompt, guidance_scale, batch, prompt_embeds=None, negative_prompt_embeds=None):
        per_prompt = images_per_prompt("FLUX", prompt, batch, prompt_embeds, negative_prompt_embeds)
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=per_prompt
        )
        self.conditions = {"pooled_projections": pooled, "txt_ids": text_ids}
        if self.unet.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32)
            self.conditions["guidance"] = guidance.expand(embeds.shape[0])
        return embeds

    def denoise(self, model, zin, t, embeds, extra):
        pipe = self.pipe
        b, c, h, w = zin.shape
        packed = pipe._pack_latents(zin, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, zin.device, embeds.dtype)
        timestep = torch.as_tensor(t, device=zin.device).expand(b).to(zin.dtype)
        out = model(hidden_states=packed, timestep=timestep / 1000, guidance=self.conditions.get("guidance"),
                    pooled_projections=self.conditions["pooled_projections"], encoder_hidden_states=embeds,
                    txt_ids=self.conditions["txt_ids"], img_ids=img_ids, return_dict=False, **extra)[0]  # fmt: skip
        f = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * f, w * f, f)

    def denoiser_region(self, region):
        tokens = F.max_pool2d(region[:, None].float(), 2)[:, 0] > 0
        return tokens.reshape(tokens.shape[0], 1, -1)

    def decode(self, z):
        vae = self.pipe.vae
        return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    def output(self, x, output_type, return_dict, latents=None):
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        if output_type == "latent":
            b, c, h, w = latents.shape
            images = self.pipe._pack_latents(latents, b, c, h, w)  # the pipeline returns packed latents
        else:
            images = self.pipe.image_processor.postprocess(x, output_type)
        return FluxPipelineOutput(images=images) if return_dict else (images,)


@register_pipeline("FluxPipeline")
class FluxText2ImgAdapter(_Flux, PipelineAdapter):
    """`FluxPipeline`: generation from the prompt; edits change the prompt (FISEdit). The region comes from the
    latents' difference over the first dense steps (`TextEditConfig(region="latent_diff")`: FLUX's joint attention has
    no cross-attention maps) or the caller's `region=`, and the sparse steps run the new prompt's tokens again in every
    block (with the new pooled embedding), whatever `dit_context` says."""

    kind = "flux_txt2img"
    takes_image = False
    text_editable = True
    default_strength = 1.0
    encodes_image = False
    guidance_scale = 3.5  # FluxPipeline's default (distilled guidance)

    def batch(self, x0) -> int:
        return x0[0]  # text-to-image's x0 is (batch, height, width)

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        # FluxPipeline.prepare_latents draws the unpacked latents, then packs them (a permutation)
        f = self.pipe.vae_scale_factor
        b, h, w = x0
        shape = (b, self.unet.config.in_channels // 4, 2 * (h // (2 * f)), 2 * (w // (2 * f)))
        noise = randn(shape, generator, self.device, self.dtype)
        return {"z": noise, "noise": noise}


@register_pipeline("FluxImg2ImgPipeline")
class FluxImg2ImgAdapter(_Flux, PipelineAdapter):
    """`FluxImg2ImgPipeline`: SDEdit with flow matching (`scale_noise`); stroke edits."""

    kind = "flux_img2img"
    text_editable = True  # prompt edits as on FluxPipeline

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        image = kept("image", encode(x0, "image"))
        noise = randn(image.shape, generator, image.device, image.dtype)
        t0 = timesteps[0][None].repeat(image.shape[0])
        return {"z": self.pipe.scheduler.scale_noise(image, t0, noise), "noise": noise, "image": image}


class _FluxMasked(_Flux, InpaintAdapter):
    """FLUX.1's mask-taking pipelines: the region comes from the change of `mask_image` (and of the image), as for
    Stable Diffusion's inpainting; the image is encoded and noised with `scale_noise` at the first timestep."""

    def check(self):
        _Flux.check(self)
        want = self.transformer_channels()
        if self.unet.config.in_channels != want:
            raise ValueError(
                f"{type(self.pipe).__name__} takes a transformer with {want} packed input channels, this one "
                f"{self.unet.config.in_channels} (FLUX.1 Fill's 384-channel transformer goes with FluxFillPipeline, "
                "FLUX.1 dev/schnell's 64-channel one with FluxInpaintPipeline)."
            )

    def latent_channels(self) -> int:
        return self.pipe.vae.config.latent_channels

    def start(self, x0, generator, timesteps, encode, kept) -> dict:
        # The pipelines' prepare_latents: the image encoded (one draw), then the noise (the next draw).
        image = kept("image", encode(x0, "image").to(self.dtype))
        noise = randn(image.shape, generator, image.device, image.dtype)
        t0 = timesteps[0][None].repeat(image.shape[0])
        return {"z": self.pipe.scheduler.scale_noise(image, t0, noise), "noise": noise, "image": image}


@register_pipeline("FluxInpaintPipeline")
class FluxInpaintAdapter(_FluxMasked):
    """`FluxInpaintPipeline` (64-channel FLUX.1 transformers): latent blending, the image's latents noised to the next
    timestep outside the mask after every step."""

    kind = "flux_inpaint"
    default_strength = 0.6  # the pipeline's defaults
    guidance_scale = 7.0

    def transformer_channels(self) -> int:
        return 4 * self.latent_channels()

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        out = self.start(x0, generator, timesteps, encode, kept)
        out["mask"] = F.interpolate(mask, size=out["z"].shape[-2:]).to(out["z"].dtype)
        # The pipeline encodes the masked image too, a last draw from the generator, whose latents a 64-channel
        # transformer never reads: skipped.
        return out

    def unet_condition(self, prep, copies):
        return None

    def after_step(self, z, prep, timesteps, i):
        proper = prep["image"]
        if i < len(timesteps) - 1:
            proper = self.pipe.scheduler.scale_noise(proper, torch.tensor([timesteps[i + 1]]), prep["noise"])
        return (1 - prep["mask"]) * proper + prep["mask"] * z


@register_pipeline("FluxFillPipeline")
class FluxFillAdapter(_FluxMasked):
    """`FluxFillPipeline` (FLUX.1 Fill): the masked image's latents and the mask at pixel resolution (each latent
    pixel's 8x8 mask pixels as 64 channels) are concatenated to the latents' channels; packing the concatenation is
    the pipeline's concatenation of the packed parts, so the loop hands them to `denoise` as extra channels."""

    kind = "flux_fill"
    default_strength = 1.0  # the pipeline's defaults
    guidance_scale = 30.0

    def transformer_channels(self) -> int:
        f = self.pipe.vae_scale_factor
        return 4 * (2 * self.latent_channels() + f * f)

    def input_shape(self, batch, height, width):
        f = self.pipe.vae_scale_factor
        return (batch, 2 * self.latent_channels() + f * f, height // f, width // f)

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        out = self.start(x0, generator, timesteps, encode, kept)
        dtype = out["z"].dtype
        out["masked"] = kept("masked", encode(x0 * (1 - mask), "masked").to(dtype))  # the pipeline's `1 - mask`
        b, _, h, w = out["z"].shape
        f = self.pipe.vae_scale_factor
        out["mask"] = mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w).to(dtype)
        return out

    def unet_condition(self, prep, copies):
        return torch.cat([prep["masked"], prep["mask"]], dim=1).repeat(copies, 1, 1, 1)

    def after_step(self, z, prep, timesteps, i):
        return z  # no latent blending: the transformer sees the mask
