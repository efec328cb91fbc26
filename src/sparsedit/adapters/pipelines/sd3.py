"""Stable Diffusion 3 / 3.5 (MMDiT transformer, flow matching): img2img (SDEdit with `scale_noise`) and inpainting,
the transformer token-sparse through `adapters/dit.py`."""

from __future__ import annotations

import torch

from ...config import SparseConfig
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


class _SD3(TransformerDenoiser, FlowMatchLatents):
    """SD3's conditioning and latents, shared by its pipeline families: three text encoders' hidden states are the
    joint context, the pooled CLIP embeddings go to the transformer as `pooled_projections` (kept with the capture
    and checked like its other inputs); latents are `(sample - shift_factor) * scaling_factor`; flow-matching
    timesteps (`retrieve_timesteps`, then the pipeline's `get_timesteps`) and no input scaling."""

    condition_inputs = ("pooled_projections",)  # a prompt edit changes them with the context
    # The T5 part of the context: its token count (without T5, that many zero tokens; the pipeline's default 256).
    option_names = ("max_sequence_length",)
    fixed_size = True  # the pipeline resizes the image to `default_sample_size * vae_scale_factor` unless told
    guidance_scale = 7.0
    default_strength = 0.6
    # One step's keys and values for every 2 neighbouring steps: half their memory, at no measured cost on the trained
    # scene-dit (SD3's architecture; BENCHMARKS.md, `dit_fidelity.py`: 4 scenes, 1-5% strokes, every row within 0.1 dB
    # of per-step keys and values or above). FLUX families keep per-step ones: no trained model here measured them.
    default_config = SparseConfig(input_dilation=1, dit_kv_share=2)

    def __init__(self, pipe):
        super().__init__(pipe)
        import inspect

        self.options = {"max_sequence_length": inspect.signature(type(pipe).__call__).parameters[
            "max_sequence_length"].default}  # fmt: skip
        self.max_sequence_length = self.options["max_sequence_length"]

    def parse_options(self, options: dict) -> dict:
        n = options["max_sequence_length"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 512:
            raise ValueError(f"max_sequence_length must be a whole number of tokens from 0 to 512, got {n!r}.")
        return options

    def use_options(self, call: dict) -> None:
        self.max_sequence_length = call.get("max_sequence_length", self.options["max_sequence_length"])

    def size_multiple(self) -> int:
        return self.unet.config.patch_size

    def size_note(self, multiple: int) -> str:
        return f"the transformer's {multiple}x{multiple} patches"

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def timesteps(self, sched, num_inference_steps, strength, device, size=None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_timesteps

        if sched.config.get("use_dynamic_shifting", None):
            raise NotImplementedError(
                "this scheduler shifts its timesteps by the image size (use_dynamic_shifting); SparseEditor on SD3 "
                "takes a FlowMatchEulerDiscreteScheduler without it (SD3 and SD3.5's own)."
            )
        retrieve_timesteps(sched, num_inference_steps, device)
        return strength_timesteps(sched, num_inference_steps, strength)

    def embeds(self, prompt, negative_prompt, guidance_scale, batch, prompt_embeds=None, negative_prompt_embeds=None):
        per_prompt = images_per_prompt("Stable Diffusion 3", prompt, batch, prompt_embeds, negative_prompt_embeds)
        cfg = guidance_scale > 1.0
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg, device=self.device, num_images_per_prompt=per_prompt,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        self.conditions = {"pooled_projections": torch.cat([uncond_pooled, pooled]) if cfg else pooled}
        return torch.cat([uncond, cond]) if cfg else cond

    def denoise(self, model, zin, t, embeds, extra):
        timestep = torch.as_tensor(t, device=zin.device).expand(zin.shape[0])
        return model(hidden_states=zin, timestep=timestep, encoder_hidden_states=embeds, return_dict=False,
                     pooled_projections=self.conditions["pooled_projections"], **extra)[0]  # fmt: skip

    def decode(self, z):
        vae = self.pipe.vae
        return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]

    def output(self, x, output_type, return_dict, latents=None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

        images = latents if output_type == "latent" else self.pipe.image_processor.postprocess(x, output_type)
        return StableDiffusion3PipelineOutput(images=images) if return_dict else (images,)


@register_pipeline("StableDiffusion3Pipeline")
class SD3Text2ImgAdapter(_SD3, PipelineAdapter):
    """`StableDiffusion3Pipeline`: generation from the prompt; edits change the prompt (FISEdit). The region comes
    from the latents' difference over the first dense steps (`TextEditConfig(region="latent_diff")`; the joint
    transformer has no cross-attention maps), and the sparse steps run the prompt's tokens again in every block (their
    keys and values are the old prompt's), whatever `dit_context` says."""

    kind = "sd3_txt2img"
    takes_image = False
    text_editable = True
    default_strength = 1.0
    encodes_image = False

    def batch(self, x0) -> int:
        return x0[0]  # text-to-image's x0 is (batch, height, width)

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        # StableDiffusion3Pipeline.prepare_latents: the noise is the start (flow matching's sigma is 1)
        f = self.pipe.vae_scale_factor
        b, h, w = x0
        noise = randn((b, self.unet.config.in_channels, h // f, w // f), generator, self.device, self.dtype)
        return {"z": noise, "noise": noise}


@register_pipeline("StableDiffusion3Img2ImgPipeline")
class SD3Img2ImgAdapter(_SD3, PipelineAdapter):
    """`StableDiffusion3Img2ImgPipeline`: SDEdit in latent space with flow matching (`scale_noise`); stroke edits.
    The transformer runs token-sparse: the edited tokens' rows in every block, the other tokens' keys and values
    from the capture (`adapters/dit.py`)."""

    kind = "sd3_img2img"
    text_editable = True  # prompt edits as on StableDiffusion3Pipeline

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        image = kept("image", encode(x0, "image"))
        noise = randn(image.shape, generator, image.device, image.dtype)
        t0 = timesteps[0][None].repeat(image.shape[0])
        return {"z": self.pipe.scheduler.scale_noise(image, t0, noise), "noise": noise, "image": image}


@register_pipeline("StableDiffusion3InpaintPipeline")
class SD3InpaintAdapter(_SD3, InpaintAdapter):
    """`StableDiffusion3InpaintPipeline`: the region comes from the change of `mask_image`; 16-channel transformers
    with latent blending (`scale_noise` of the image latents outside the mask after every step) and 33-channel
    inpainting transformers (mask and masked-image latents as extra input channels)."""

    kind = "sd3_inpaint"
    default_strength = 0.6  # the pipeline's own default

    def check(self):
        _SD3.check(self)
        latent = self.pipe.vae.config.latent_channels
        if self.unet.config.in_channels not in (latent, 2 * latent + 1):
            raise ValueError(
                f"an SD3 inpainting transformer takes {latent} or {2 * latent + 1} input channels, this one "
                f"{self.unet.config.in_channels}."
            )

    def decode(self, z):
        # As StableDiffusion3InpaintPipeline decodes (diffusers 0.42): scaled back without adding `shift_factor`,
        # unlike its img2img and text-to-image pipelines. The capture is the pipeline's own result.
        vae = self.pipe.vae
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    def _blends(self) -> bool:
        return self.unet.config.in_channels == self.pipe.vae.config.latent_channels

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        # StableDiffusion3InpaintPipeline.prepare_latents, then prepare_mask_latents (both draw from the generator)
        dtype = self.dtype
        f = self.pipe.vae_scale_factor
        shape = (x0.shape[0], self.pipe.vae.config.latent_channels, x0.shape[-2] // f, x0.shape[-1] // f)
        strength_max = strength == 1.0
        out = {}
        if self._blends() or not strength_max:
            out["image"] = kept("image", encode(x0, "image").to(dtype))
        noise = randn(shape, generator, x0.device, dtype)
        t0 = timesteps[0][None].repeat(shape[0])
        out["noise"] = noise
        out["z"] = noise if strength_max else self.pipe.scheduler.scale_noise(out["image"], t0, noise)
        out["mask"] = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(dtype)
        out["masked"] = kept("masked", encode(x0 * (mask < 0.5), "masked").to(dtype))
        return out

    def unet_condition(self, prep, copies):
        if self._blends():
            return None
        return torch.cat([prep["mask"].repeat(copies, 1, 1, 1), prep["masked"].repeat(copies, 1, 1, 1)], dim=1)

    def after_step(self, z, prep, timesteps, i):
        if not self._blends():
            return z
        proper = prep["image"]
        if i < len(timesteps) - 1:
            proper = self.pipe.scheduler.scale_noise(proper, torch.tensor([timesteps[i + 1]]), prep["noise"])
        return (1 - prep["mask"]) * proper + prep["mask"] * z
