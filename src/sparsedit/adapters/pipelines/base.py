"""The pipeline adapters' registry and base class: one adapter per diffusers pipeline family, registered by pipeline
class the way handlers are registered by module type (`register_pipeline`), found by `adapter_for(pipe)`.

Imported lazily by the editor: only pipelines pull diffusers in.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ...config import SparseConfig


__all__ = ["PipelineAdapter", "adapter_for", "register_pipeline", "supported_pipelines"]

_REGISTRY: dict[str, type[PipelineAdapter]] = {}


def register_pipeline(*names: str):
    """Register an adapter class for the diffusers pipeline classes `names` (and their subclasses)."""

    def deco(cls):
        for name in names:
            _REGISTRY[name] = cls
        cls.pipelines = names
        return cls

    return deco


def adapter_for(pipe) -> PipelineAdapter | None:
    """The adapter of `pipe`'s class, or of its nearest registered base class; `None` when there is none."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__](pipe)
    return None


def adapter_class(pipeline_class: str) -> type[PipelineAdapter] | None:
    """The adapter class registered for a pipeline class name (as a saved pipeline's `model_index.json` names it),
    without loading the pipeline; `None` when there is none."""
    return _REGISTRY.get(pipeline_class)


def supported_pipelines(text_editable: bool | None = None) -> list[str]:
    """The pipeline classes `SparseEditor` supports (and their subclasses); `text_editable=True`: those that take
    prompt edits."""
    return [name for name, cls in _REGISTRY.items() if text_editable is None or cls.text_editable == text_editable]


def strength_timesteps(sched, num_inference_steps: int, strength: float) -> list:
    """The flow-matching pipelines' `get_timesteps` (SD3, FLUX): the last `strength` of the scheduler's timesteps,
    the scheduler's begin index set to where they start."""
    init = min(num_inference_steps * strength, num_inference_steps)
    start = int(max(num_inference_steps - init, 0))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * sched.order)
    return list(sched.timesteps[start * sched.order :])


def images_per_prompt(family: str, prompt, batch: int, prompt_embeds=None, negative_prompt_embeds=None) -> int:
    """For families whose conditioning comes from prompts only (pooled embeddings, several encoders): the check that
    there is a prompt for every image, and how many images each prompt makes."""
    if prompt_embeds is not None or negative_prompt_embeds is not None:
        raise NotImplementedError(
            f"SparseEditor on {family} takes prompts, not prompt_embeds (the pooled embeddings would be needed too)."
        )
    if prompt is None:
        raise ValueError(f"{family} needs a prompt: capture(prompt=..., image=...).")
    prompts = len(prompt) if isinstance(prompt, list) else 1
    if batch % prompts:
        raise ValueError(f"{prompts} prompts for {batch} images: give one prompt, or one per image.")
    return batch // prompts


class TransformerDenoiser:
    """Families whose denoiser is a diffusion transformer (`pipe.transformer`, token-sparse through `adapters/dit.py`):
    no UNet cross-attention maps; one latent pixel (or token) of input dilation, then the handler's token dilation
    (attention reaches the whole image anyway); under `cache_dtype="auto"` keys and values in int8 with per-channel
    scales, the output tokens exact (SD3-medium at 1024 px, 20 steps x 0.6 with guidance: 7.3 GiB of keys and values
    instead of 14.6 in bfloat16; at 512 px one sparse step took 2.81 s instead of 2.56 in bfloat16, at the same PSNR
    against dense: BENCHMARKS.md)."""

    cross_attention = False
    token_sparse = True  # its cache is per-step keys and values (`SparseConfig.dit_kv_share` applies)
    auto_cache_dtype = "int8"
    default_config = SparseConfig(input_dilation=1)

    @property
    def unet(self):
        return self.pipe.transformer

    def check(self):
        if getattr(self.pipe, "transformer", None) is None:
            raise ValueError(f"{type(self.pipe).__name__} has no transformer to edit with.")


class FlowMatchLatents:
    """Flow-matching families (SD3, FLUX): latents `(sample - shift_factor) * scaling_factor`, no input scaling."""

    def latents_of(self, sample):
        cfg = self.pipe.vae.config
        return (sample - cfg.shift_factor) * cfg.scaling_factor

    def scale_input(self, zin, t):
        return zin


def randn(shape, generator, device, dtype):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class PipelineAdapter:
    """What one pipeline family does around the denoising loop. Attributes say what it takes:

    - `kind`: a short name (`"pixel"`, `"txt2img"`, `"img2img"`, `"inpaint"`), saved with sessions;
    - `latent`: it denoises VAE latents (a VAE encoder/decoder and a text encoder come with it);
    - `takes_image`: `capture(image=...)` is required; `text_editable`: prompt edits apply;
    - `default_strength`: SDEdit's 0.7, 1.0 for generation from noise (txt2img, inpainting), or the pipeline's own;
    - `guidance_scale`: the pipeline's default classifier-free guidance;
    - `fixed_size`: height and width default to the UNet's sample size (not the image's);
    - `encodes_image`: the VAE encoder runs on the image; `takes_mask`: a `mask_image` is part of its input.
    """

    kind = ""
    pipelines: tuple[str, ...] = ()
    latent = True
    takes_image = True
    text_editable = False
    fixed_size = False
    encodes_image = True
    takes_mask = False
    guidance_scale = 7.5
    default_strength = 0.7
    # Pipeline-specific call arguments (`capture(**kwargs)`, `edit(**kwargs)`): options fixed by the capture (a
    # different value is another generation), with the pipeline's defaults, and image-resolution inputs besides the
    # image and mask whose change is an edit region (the ControlNet's `control_image`).
    option_names: tuple[str, ...] = ()
    extra_images: tuple[str, ...] = ()
    kept = ("image", "masked")  # `prepare`'s tensors kept with the capture (an edit composites or compares them)
    controlnet = None

    def __init__(self, pipe):
        self.pipe = pipe
        # UNet conditioning besides the text context that `embeds` derives from the prompt (SDXL's pooled
        # embedding); the editor keeps the capture's copy with the capture.
        self.conditions: dict = {}
        self.options: dict = {}

    @property
    def unet(self):
        """The denoiser: the pipeline's UNet, or its transformer (`pipe.transformer`) for DiT families."""
        return self.pipe.unet

    # -- placement ----------------------------------------------------------------------------------------------------
    _pins: dict | None = None

    @contextlib.contextmanager
    def pinned(self):
        """Within one capture, edit or region search, each model's device and dtype are read once. diffusers'
        `ModelMixin.device` and `.dtype` walk every submodule on each read (looking for group-offloading and
        layerwise-casting hooks): 1-5 ms a read on the scene models, read half a dozen times per edit (issue 39:
        the editor's fixed costs on small models). Nested uses share the outer one's reads."""
        outer = self._pins
        if outer is None:
            self._pins = {}
        try:
            yield
        finally:
            if outer is None:
                self._pins = None

    def placement(self, module, what: str):
        """`module.device` or `module.dtype` (`what`), read once per `pinned` scope (every time outside one)."""
        pins = self._pins
        if pins is None:
            return getattr(module, what)
        key = (id(module), what)
        if key not in pins:
            pins[key] = getattr(module, what)
        return pins[key]

    @property
    def device(self) -> torch.device:
        """The denoiser's device (`placement`)."""
        return self.placement(self.unet, "device")

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype (`placement`)."""
        return self.placement(self.unet, "dtype")

    token_sparse = False  # a diffusion transformer's keys and values are its cache (`TransformerDenoiser`)
    cross_attention = True  # the denoiser has UNet cross-attention layers (prompt edits record their maps)
    default_config = None  # the SparseConfig a SparseEditor uses without one (None: SIGE's, input_dilation=5)
    auto_cache_dtype = None  # what `cache_dtype="auto"` stores the denoiser's cache in (None: bfloat16 for float32)
    batches_guidance = True  # classifier-free guidance batched as (uncond, cond); False: guidance is an input (FLUX)

    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this (the UNet's downsampling)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def default_size(self) -> int:
        """The pipeline's default height and width in pixels, for `fixed_size` families (the UNet's sample size)."""
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def size_note(self, multiple: int) -> str:
        return f"the UNet's {multiple}x downsampling"

    def timesteps(self, sched, num_inference_steps: int, strength: float, device, size=None) -> list:
        """The pipeline's timesteps for `strength` (its `get_timesteps`), with the scheduler's begin index set."""
        sched.set_timesteps(num_inference_steps, device=device)
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        return list(sched.timesteps[start * sched.order :])

    encode_mode = "sample"
    condition_inputs = (
        "added_cond_kwargs",
    )  # the denoiser's arguments that `conditions` fill (a prompt edit changes)  # how the pipeline reads the VAE's posterior (`retrieve_latents`): "sample" or "argmax"

    def input_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of the latents `denoise` takes for a `height` x `width` image, conditioning channels
        (`unet_condition`) included: what the cache budget's dry run feeds the denoiser."""
        f = self.pipe.vae_scale_factor if self.latent else 1  # pixel-space pipelines denoise the image itself
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def decoder_region(self, keep: torch.Tensor) -> torch.Tensor:
        """The loop's region `[B, h, w]` at the VAE decoder's input resolution (FLUX.2 loops over 2x2 patches)."""
        return keep

    def denoiser_region(self, region: torch.Tensor) -> torch.Tensor:
        """The edit region `[B, h, w]` at latent resolution as the denoiser's input takes it (FLUX: its tokens)."""
        return region

    def latents_of(self, sample: torch.Tensor) -> torch.Tensor:
        """A VAE latent sample as the pipeline scales it for the denoiser."""
        return self.pipe.vae.config.scaling_factor * sample

    def scale_input(self, zin: torch.Tensor, t) -> torch.Tensor:
        return self.pipe.scheduler.scale_model_input(zin, t)

    def denoise(self, model, zin: torch.Tensor, t, embeds: torch.Tensor, extra: dict) -> torch.Tensor:
        """One call of the denoiser as the pipeline makes it: the noise (or velocity) prediction for `zin`."""
        return model(zin, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]

    def check(self) -> None:
        """Raise if this pipeline's configuration is not supported."""

    def batch(self, x0) -> int:
        return x0.shape[0]

    # -- inputs ---------------------------------------------------------------------------------------------------
    def preprocess(self, image, height=None, width=None) -> torch.Tensor:
        """Exactly what the pipeline accepts (PIL, numpy, or tensors in [0, 1]) → `[B, C, H, W]` in [-1, 1]."""
        x = self.pipe.image_processor.preprocess(image, height=height, width=width)
        return x.to(self.device, self.dtype)

    def preprocess_mask(self, mask_image, like: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"mask_image is for StableDiffusionInpaintPipeline, not {type(self.pipe).__name__}.")

    def parse_options(self, options: dict) -> dict:
        """Check and normalise the pipeline-specific options (all of `option_names`, defaults filled in)."""
        return options

    def use_options(self, call: dict) -> None:
        """Called with the capture's call before its text conditioning is computed, at the capture and at every
        edit or region search from it (a loaded session's too): options the conditioning depends on (SD3's
        `max_sequence_length`) take the capture's value. Nothing by default."""

    def preprocess_input(self, name: str, value, like: torch.Tensor) -> torch.Tensor:
        """An `extra_images` input → a tensor at the image's resolution."""
        raise NotImplementedError

    def embeds(self, prompt, negative_prompt, guidance_scale: float, batch: int, prompt_embeds=None,
               negative_prompt_embeds=None):  # fmt: skip
        """The UNet's text conditioning, classifier-free guidance batched as the pipeline batches it (uncond first);
        `prompt_embeds`/`negative_prompt_embeds` as the pipeline takes them, instead of the prompts."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("Stable Diffusion needs a prompt: capture(prompt=..., image=...) (or prompt_embeds=...).")
        prompts = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if batch % prompts:
            raise ValueError(f"{prompts} prompts for {batch} images: give one prompt, or one per image.")
        cond, uncond = self.pipe.encode_prompt(prompt, self.device, batch // prompts, guidance_scale > 1.0,
                                               negative_prompt, prompt_embeds=prompt_embeds,
                                               negative_prompt_embeds=negative_prompt_embeds)  # fmt: skip
        return torch.cat([uncond, cond]) if guidance_scale > 1.0 else cond

    # -- the loop -------------------------------------------------------------------------------------------------
    def prepare(self, x0, mask, generator, timesteps, strength, encode, kept) -> dict:
        """The loop's starting point: `{"z": latents, "noise": ..., and any encoded inputs}`, drawing from
        `generator` in the pipeline's order. `encode(x, name)` runs the (sparse) VAE encoder; `kept(name, t)` puts
        the capture's encoded tensor back outside an edit's region."""
        raise NotImplementedError

    def prepare_inputs(self, prep: dict, inputs: dict, call: dict, copies: int, captured: dict | None) -> None:
        """Add what the `extra_images` inputs give the loop to `prep` (`captured`: the capture's kept tensors, in an
        edit)."""

    def unet_kwargs(self, z, copies: int) -> dict:
        """Keyword arguments of the UNet call besides the latents, timestep and text context (SDXL's
        `added_cond_kwargs`), for latents `z` and `copies` guidance branches."""
        return {}

    def unet_condition(self, prep, copies: int) -> torch.Tensor | None:
        """Channels concatenated to the UNet's input (the inpainting UNet's mask and masked image), or `None`."""
        return None

    def step_kwargs(self, generator, eta: float = 0.0) -> dict:
        if not hasattr(self.pipe, "prepare_extra_step_kwargs"):
            return {}
        return self.pipe.prepare_extra_step_kwargs(generator, eta)

    def after_step(self, z, prep, timesteps, i) -> torch.Tensor:
        """Anything the pipeline does to the latents after the scheduler's step (inpainting's latent blending)."""
        return z

    # -- outputs --------------------------------------------------------------------------------------------------
    def decode(self, z) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    def output(self, x, output_type: str, return_dict: bool, latents=None):
        """The pipeline's own return value for decoded images `x` (the final `latents` for `output_type="latent"`),
        after the pipeline's safety checker when it has one."""
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        nsfw = None
        if output_type == "latent":
            images = latents
        else:
            if getattr(self.pipe, "safety_checker", None) is not None:
                x, nsfw = self.pipe.run_safety_checker(x, x.device, x.dtype)
            denormalize = [True] * x.shape[0] if nsfw is None else [not n for n in nsfw]
            images = self.pipe.image_processor.postprocess(x, output_type=output_type, do_denormalize=denormalize)
        return (
            StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw) if return_dict else (images, nsfw)
        )


def to_tensor(image, device, dtype) -> torch.Tensor:
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
