"""FLUX.2 [klein] with an input image (`Flux2KleinPipeline(image=...)`): the image is a reference in the transformer's
sequence, and a stroke on it is the edit. The transformer runs token-sparse through `adapters/flux2.py`.

Klein generates from noise (all its steps; there is no strength) while attending to the reference image's tokens,
which sit after the generated image's in one sequence with their own positions (`t = 10`). A stroke changes the
reference tokens under it; the edit recomputes those and the generated image's tokens at the same place (Klein's
edits are local: an instruction-free reference mostly reappears where it was), and every other token of both images
keeps the capture's latents, keys and values. So the region is the stroke on one token grid, used twice: once for
the generated tokens, once for the reference's (`denoiser_region`).

The loop keeps the pipeline's patchified latents `[B, 4C, h/2, w/2]` unpacked (packing is a permutation; the
flow-matching step acts per element, so the trajectory is the pipeline's bit for bit); the reference image's latents
ride into the transformer call as extra channels of the loop's input (`unet_condition`), which `denoise` splits off
and appends to the sequence, as the pipeline's `torch.cat([latents, image_latents], dim=1)` does.
"""

from __future__ import annotations

import numpy as np
import torch

from ...regions import repeat_region
from .base import PipelineAdapter, TransformerDenoiser, images_per_prompt, randn, register_pipeline, strength_timesteps


@register_pipeline("Flux2KleinPipeline")
class Flux2KleinAdapter(TransformerDenoiser, PipelineAdapter):
    """`Flux2KleinPipeline` with one input image: stroke edits of the reference image. The distilled models (the
    4-step [klein] releases) take no guidance; the base models' classifier-free guidance (an empty negative prompt,
    as the pipeline's) is batched with the prompt in one transformer call, which equals the pipeline's two calls to
    float rounding (the distilled capture equals the pipeline bit for bit)."""

    kind = "flux2_klein"
    text_editable = False  # prompt edits (with the reference in the sequence) are not offered yet
    guidance_scale = 4.0  # the pipeline's default (ignored by distilled models)
    default_strength = 1.0  # generation from noise: Klein has no strength
    encode_mode = "argmax"  # the pipeline encodes the reference image with the posterior's mode
    kept = ("image",)  # the loop's latents are 2x2 patches: `input_dilation=1` is one token (16x16 pixels)

    @property
    def batches_guidance(self) -> bool:
        return not self.pipe.config.is_distilled

    def check(self):
        super().check()
        if getattr(self.pipe.vae, "bn", None) is None:
            raise ValueError("Flux2KleinPipeline's VAE normalises its latents with `bn` (AutoencoderKLFlux2).")

    def size_multiple(self) -> int:
        return 2

    def size_note(self, multiple: int) -> str:
        return "FLUX.2's 2x2 latent patches"

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The loop's latents: the VAE's, in 2x2 patches."""
        f = 2 * self.pipe.vae_scale_factor
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def input_shape(self, batch, height, width):
        b, c, h, w = self.latent_shape(batch, height, width)
        return (b, 2 * c, h, w)  # the reference's latents ride as channels (`unet_condition`)

    # -- inputs ------------------------------------------------------------------------------------------------------
    def preprocess(self, image, height=None, width=None) -> torch.Tensor:
        """As the pipeline prepares its reference image: a PIL image larger than 1 MP is resized to 1 MP, then both
        sides are cropped to multiples of 16. The generated image has the reference's size."""
        import PIL.Image

        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise ValueError(
                    f"Flux2KleinPipeline takes a list of images as several references for one picture; SparseEditor "
                    f"edits one reference image, got {len(image)}."
                )
            image = image[0]
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"Flux2KleinPipeline takes PIL images (the pipeline's own check), got {type(image)}.")
        proc = self.pipe.image_processor
        proc.check_image_input(image)
        w, h = image.size
        if w * h > 1024 * 1024:
            image = proc._resize_to_target_area(image, 1024 * 1024)
            w, h = image.size
        m = 2 * self.pipe.vae_scale_factor
        w, h = w // m * m, h // m * m
        if (height or h, width or w) != (h, w):
            raise ValueError(
                f"SparseEditor on Flux2KleinPipeline generates at the reference image's size ({w}x{h}: the edit region "
                f"is the same place in both); got height={height}, width={width}. Resize the image instead."
            )
        x = proc.preprocess(image, height=h, width=w, resize_mode="crop")
        return x.to(self.device, self.placement(self.pipe.vae, "dtype"))

    def latents_of(self, sample):
        """The pipeline's `_encode_vae_image` after the VAE: 2x2 patches, normalised by the VAE's batch norm."""
        z = self.pipe._patchify_latents(sample)
        mean, std = self._bn(z)
        return (z - mean) / std

    def _bn(self, like):
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def scale_input(self, zin, t):
        return zin

    def embeds(self, prompt, negative_prompt, guidance_scale, batch, prompt_embeds=None, negative_prompt_embeds=None):
        if negative_prompt is not None:
            raise ValueError("Flux2KleinPipeline takes no negative_prompt (its guidance uses an empty prompt).")
        per_prompt = images_per_prompt("FLUX.2", prompt, batch, prompt_embeds, negative_prompt_embeds)
        device = self.device
        cond, text_ids = self.pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=per_prompt)
        self.conditions = {"txt_ids": text_ids}
        if not (self.batches_guidance and guidance_scale > 1.0):
            return cond
        empty = [""] * len(prompt) if isinstance(prompt, list) else ""
        uncond, _ = self.pipe.encode_prompt(prompt=empty, device=device, num_images_per_prompt=per_prompt)
        return torch.cat([uncond, cond])

    # -- the loop ----------------------------------------------------------------------------------------------------
    def timesteps(self, sched, num_inference_steps, strength, device, size=None):
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        if strength != 1.0:
            raise ValueError(
                "Flux2KleinPipeline generates from noise with the image as a reference: it has no strength "
                f"(SparseEditor takes strength=1.0 or None), got {strength}."
            )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        f = 2 * self.pipe.vae_scale_factor
        mu = compute_empirical_mu(image_seq_len=(size[0] // f) * (size[1] // f), num_steps=num_inference_steps)
        retrieve_timesteps(sched, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return strength_timesteps(sched, num_inference_steps, 1.0)

    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept):
        if x0.shape[0] != 1:
            raise ValueError(f"Flux2KleinPipeline takes one reference image per call, got a batch of {x0.shape[0]}.")
        # The pipeline draws the noise first; the reference is encoded with the posterior's mode (no draw).
        noise = randn(self.latent_shape(x0.shape[0], *x0.shape[-2:]), generator, x0.device, self.dtype)
        image = kept("image", encode(x0, "image"))
        return {"z": noise, "noise": noise, "image": image}

    def unet_condition(self, prep, copies):
        return prep["image"].to(prep["z"].dtype).repeat(copies, 1, 1, 1)

    def denoiser_region(self, region):
        tokens = region.reshape(region.shape[0], 1, -1)
        return torch.cat([tokens, tokens], dim=-1)  # the generated image's tokens, then the reference's

    def denoise(self, model, zin, t, embeds, extra):
        pipe = self.pipe
        c = self.unet.config.in_channels
        z, ref = zin[:, :c], zin[:, c:]
        ids = pipe._prepare_latent_ids(z).to(z.device)
        ref_ids = pipe._prepare_image_ids([ref[:1]]).to(z.device).expand(z.shape[0], -1, -1)
        hidden = torch.cat([pipe._pack_latents(z), pipe._pack_latents(ref)], dim=1).to(self.placement(model, "dtype"))
        timestep = torch.as_tensor(t, device=z.device).expand(z.shape[0]).to(z.dtype)
        out = model(hidden_states=hidden, timestep=timestep / 1000, guidance=None, encoder_hidden_states=embeds,
                    txt_ids=self.conditions["txt_ids"], img_ids=torch.cat([ids, ref_ids], dim=1), return_dict=False, **extra)[0]  # fmt: skip
        n = z.shape[-2] * z.shape[-1]
        return out[:, :n].transpose(1, 2).reshape(z.shape)

    def decoder_region(self, keep):
        return repeat_region(keep, 2, 2)

    def decode(self, z):
        mean, std = self._bn(z)
        latents = self.pipe._unpatchify_latents(z * std + mean)
        return self.pipe.vae.decode(latents.to(self.placement(self.pipe.vae, "dtype")), return_dict=False)[0]

    def output(self, x, output_type, return_dict, latents=None):
        from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

        if output_type == "latent":
            mean, std = self._bn(latents)
            images = self.pipe._unpatchify_latents(latents * std + mean)
        else:
            images = self.pipe.image_processor.postprocess(x, output_type=output_type)
        return Flux2PipelineOutput(images=images) if return_dict else (images,)
