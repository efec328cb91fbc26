"""What `SparseEditor`'s calls take: the checks of its arguments and the inputs of an edit, kept apart from the
editor's front so that editor.py holds the verbs and the session.

Each function takes the editor and reads only its public state (`adapter`, `pipe`, `config`, `unet`, `current`).
"""

from __future__ import annotations

import torch

from .. import temporal as temporal_reuse
from ..config import OnStale, RegionMethod, TemporalConfig, TextEditConfig
from ..guard import check_finite
from ..regions import as_region, change_mask, difference_mask
from ..spatial import is_sparsified


__all__ = [
    "capture_call",
    "check_call_values",
    "check_editor",
    "check_number",
    "check_prompt",
    "check_size",
    "check_steps",
    "edit_call",
    "edit_inputs",
    "pipeline_kwargs",
    "prompt_change",
    "unchanged_note",
]


def check_editor(pipe, temporal, on_stale):
    """The pipeline's adapter and the parsed `on_stale`, or the error that says why this pipeline cannot be edited."""
    from ..adapters.pipelines import adapter_for, supported_pipelines

    adapter, scheduler = adapter_for(pipe), getattr(pipe, "scheduler", None)
    if adapter is None or getattr(pipe, "transformer" if not adapter.cross_attention else "unet", None) is None:
        adapter = None
    if adapter is None or scheduler is None:
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
    unet = adapter.unet
    if temporal is not None and not adapter.cross_attention:
        raise NotImplementedError(
            f"temporal reuse (Faster Diffusion's encoder propagation) is for UNets; {type(pipe).__name__} denoises "
            "with a transformer: make the editor without `temporal=`."
        )
    if is_sparsified(unet):
        raise RuntimeError(
            "this pipeline already has a SparseEditor (or `sparsedit.sparsify_`) attached: call `editor.remove()` "
            "on that editor first (or `sparsedit.unsparsify_(pipe.unet)` for the model-level API)."
        )
    if temporal_reuse.is_applied(unet):
        raise RuntimeError(
            "this UNet already carries temporal reuse (`sparsedit.temporal.enable`); call `temporal.disable(pipe)` "
            "and pass the config as `SparseEditor(pipe, temporal=...)` instead."
        )
    on_stale = OnStale.parse(on_stale, "on_stale")
    adapter.check()
    if adapter.controlnet is not None and temporal is not None:
        raise NotImplementedError("temporal reuse with a ControlNet is not supported yet: make the editor without it.")
    return adapter, on_stale


def pipeline_kwargs(ed, kwargs: dict, verb: str) -> tuple[dict, dict]:
    """Split the pipeline family's own arguments into options and extra images; refuse anything else."""
    a = ed.adapter
    unknown = sorted(set(kwargs) - set(a.option_names) - set(a.extra_images))
    if unknown:
        takes = ", ".join((*a.extra_images, *a.option_names)) or "no other arguments"
        raise TypeError(
            f"{verb}() got unexpected keyword argument(s) {', '.join(unknown)}; on {type(ed.pipe).__name__} "
            f"it takes the common ones and {takes}."
        )
    return ({k: v for k, v in kwargs.items() if k in a.option_names},
            {k: v for k, v in kwargs.items() if k in a.extra_images})  # fmt: skip


def capture_call(ed, image, prompt, strength, num_inference_steps, guidance_scale, negative_prompt, mask_image, height,
                 width, eta, prompt_embeds, negative_prompt_embeds, callback_on_step_end_tensor_inputs,
                 pipeline_kw):  # fmt: skip
    """`capture`'s arguments → the input (`x0`: the image, or `(batch, height, width)` for text-to-image), the mask,
    the call (what a recapture repeats) and the adapter's extra inputs."""
    unsupported = sorted(set(callback_on_step_end_tensor_inputs) - {"latents"})
    if unsupported:
        raise ValueError(f"callback_on_step_end_tensor_inputs: only 'latents' is passed, not {unsupported}.")
    check_prompt("prompt", prompt)
    check_prompt("negative_prompt", negative_prompt)
    check_steps(num_inference_steps)
    check_call_values(num_inference_steps, strength, guidance_scale)
    options, images = pipeline_kwargs(ed, pipeline_kw, "capture")
    if ed.adapter.fixed_size:
        size = ed.adapter.default_size()
        height, width = height or size, width or size
    if not ed.adapter.takes_image:
        if image is not None or mask_image is not None:
            raise ValueError(
                "StableDiffusionPipeline generates from the prompt alone; it takes no image. For stroke edits, "
                "make the editor on `StableDiffusionImg2ImgPipeline(**pipe.components)`."
            )
        check_size(ed, height, width)
        n = len(prompt) if isinstance(prompt, list) else 1 if prompt_embeds is None else prompt_embeds.shape[0]
        x0, mask = (n, height, width), None
    else:
        if image is None:
            raise ValueError(f"{type(ed.pipe).__name__} edits an image: capture(image=..., ...).")
        x0 = ed.adapter.preprocess(image, height, width)
        check_size(ed, *x0.shape[-2:])
        check_finite("image", x0)
        mask = ed.adapter.preprocess_mask(mask_image, x0) if ed.adapter.takes_mask or mask_image is not None else None
        check_finite("mask_image", mask)
    if guidance_scale is None:
        guidance_scale = ed.adapter.guidance_scale  # the pipeline's own default (7.5 for SD, 5.0 for SDXL)
    call = {
        "prompt": prompt,
        "strength": ed.adapter.default_strength if strength is None else strength,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "height": height,
        "width": width,
        **ed.adapter.parse_options({**ed.adapter.options, **options}),
    }
    if eta:
        call["eta"] = float(eta)
    if prompt_embeds is not None or negative_prompt_embeds is not None:
        call["prompt_embeds"], call["negative_prompt_embeds"] = prompt_embeds, negative_prompt_embeds
    inputs = {name: ed.adapter.preprocess_input(name, images.get(name), x0) for name in ed.adapter.extra_images}
    for name, t in inputs.items():
        check_finite(name, t)
    return x0, mask, call, inputs


def check_size(ed, height: int, width: int) -> None:
    """The image size the UNet can take: multiples of the VAE's factor times the UNet's downsamplings (a skip
    connection of another size fails deep inside the UNet otherwise)."""
    factor = ed.pipe.vae_scale_factor if ed.latent else 1
    down = ed.adapter.size_multiple()
    multiple = factor * down
    if height % multiple or width % multiple:
        why = f"the VAE's {factor}x times " if factor > 1 else ""
        raise ValueError(
            f"the image is {width}x{height} pixels; this pipeline takes widths and heights that are multiples of "
            f"{multiple} ({why}{ed.adapter.size_note(down)}). Resize or pad it, or pass height= and width=."
        )


def check_prompt(name: str, value) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return
    raise TypeError(f"{name} must be a string or a non-empty list of strings (one per image), got {value!r:.60}.")


def check_steps(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_inference_steps must be a whole number of steps, at least 1; got {value!r}.")


def check_number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    """A real number inside `[low, high]` (`(low, high]` with `low_open`), or an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not (low < value if low_open else low <= value) or not value <= high:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}.")


def check_call_values(num_inference_steps, strength, guidance_scale) -> None:
    """The generation's numbers, where given (`None`: the capture's, or the pipeline's default)."""
    if num_inference_steps is not None:
        check_steps(num_inference_steps)
    if strength is not None:
        check_number("strength", strength, low=0.0, high=1.0, low_open=True)
    if guidance_scale is not None:
        check_number("guidance_scale", guidance_scale, low=0.0, high=1e4)


def unchanged_note(ignored: int, region: torch.Tensor, threshold: float) -> str | None:
    """Why an image edit whose input did differ changes nothing (every difference under `change_threshold`), or
    `None`."""
    if not ignored or bool(region.any()):
        return None
    return (
        f"the input differs from the current one at {ignored} pixels, all by no more than "
        f"change_threshold={threshold:g} (8-bit units, the re-encoding noise a JPEG re-save makes), so this edit "
        "changed nothing and returned the current image. To edit that finely, make the editor with a lower "
        "SparseConfig(change_threshold=...) (0: every bit counts)."
    )


def prompt_change(cap, prompt, negative_prompt, text_config, region, changed) -> tuple[dict, torch.Tensor]:
    """A prompt edit's change (the new prompts, its config, the region given for it) and the image part's region."""
    change = {
        "prompt": cap.call["prompt"] if prompt is None else prompt,
        "negative_prompt": cap.call["negative_prompt"] if negative_prompt is None else negative_prompt,
        "config": text_config,
        "region": region if region is not changed else None,
    }
    return change, (changed if change["region"] is not None else region)  # a given region is the prompt's


def edit_call(ed, prompt, negative_prompt, text_config, region, pipeline_kw):
    """`edit`'s checks before anything runs: the current capture, the text config, whether this is a prompt edit,
    and the pipeline options (normalised as the capture's) and extra images."""
    check_prompt("prompt", prompt)
    check_prompt("negative_prompt", negative_prompt)
    options, images = pipeline_kwargs(ed, pipeline_kw, "edit")
    cap = ed.current
    if cap is None:
        raise RuntimeError("Nothing captured yet: call `editor.capture(image=..., ...)` before `editor.edit(...)`.")
    tcfg = ed.text_config if text_config is None else text_config
    if not isinstance(tcfg, TextEditConfig):
        raise TypeError(f"text_config must be a TextEditConfig, got {type(tcfg).__name__}.")
    text = prompt is not None or negative_prompt is not None
    if text and not ed.adapter.text_editable:
        from ..adapters.pipelines import supported_pipelines

        raise ValueError(
            f"prompt edits need one of {', '.join(supported_pipelines(text_editable=True))}, not "
            f"{type(ed.pipe).__name__}" + (" (an unconditional model takes no prompt)." if not ed.latent else ".")
        )
    if text and not ed.adapter.cross_attention and region is None:
        if tcfg.region is RegionMethod.CROSS_ATTENTION or tcfg.inject_attention > 0:
            raise ValueError(
                f"{type(ed.pipe).__name__}'s transformer has no cross-attention maps to find a region with or to inject "
                "(its prompt and image tokens attend jointly); use TextEditConfig(region='latent_diff') (the default) "
                "or region='mask' with edit(region=...), and inject_attention=0."
            )
    if text and tcfg.region is RegionMethod.MASK and region is None:
        raise ValueError(
            "TextEditConfig(region='mask') regenerates the region you pass: edit(prompt=..., region=...)."
        )
    if options:  # normalised as the capture's were
        parsed = ed.adapter.parse_options({**{k: cap.call[k] for k in ed.adapter.option_names}, **options})
        options = {k: parsed[k] for k in options}
    return cap, tcfg, text, options, images


def edit_inputs(ed, cap, image, mask_image, images, region):
    """An edit's inputs against the current state: the image (re-encoding noise below `change_threshold` taken from
    the current one), the mask, the extra images, the region (checked, or honoured with `check_region=False`), what
    changed and how many differing pixels were ignored."""
    if not ed.adapter.takes_image:
        if image is not None or mask_image is not None:
            raise ValueError(
                "a text-to-image capture has no input image to edit; change the prompt, or make the editor on "
                "`StableDiffusionImg2ImgPipeline(**pipe.components)` for stroke edits."
            )
        b, h, w = cap.image
        changed = torch.zeros(b, h, w, dtype=torch.bool, device=ed.adapter.device)
        x0, mask, inputs, ignored = cap.image, None, {}, 0
    else:
        x0, mask, inputs, changed, ignored = _image_inputs(ed, cap, image, mask_image, images)
        b, _, h, w = x0.shape
    if region is None:
        return x0, mask, inputs, changed, changed, ignored
    region = as_region(region, b, h, w, ed.adapter.device)
    missed = changed & ~region
    if bool(missed.any()) and ed.config.check_region:
        raise ValueError(
            f"the image (or mask) differs from the current one at {int(missed.sum())} pixels outside "
            "`region`; enlarge the region, pass region=None to detect it, or make the editor with "
            "SparseConfig(check_region=False) to keep the current pixels outside the region."
        )
    if bool(missed.any()):  # check_region=False: outside the region the current input stays
        keep = region[:, None]
        x0 = torch.where(keep, x0, cap.image) if isinstance(x0, torch.Tensor) else x0
        mask = None if mask is None else torch.where(keep, mask, cap.mask)
        inputs = {k: torch.where(keep, v, cap.inputs[k]) for k, v in inputs.items()}
        ignored += int(missed.sum())
    return x0, mask, inputs, region, changed, ignored


def _image_inputs(ed, cap, image, mask_image, images):
    """The edited image, mask and extra images against the capture's, with what changed and how many differing
    pixels were ignored as re-encoding noise."""
    x0 = cap.image if image is None else ed.adapter.preprocess(image, cap.call["height"], cap.call["width"])
    if x0.shape[1] != cap.image.shape[1]:
        raise ValueError(
            f"the edited image has {x0.shape[1]} channels but the capture had {cap.image.shape[1]}; give the "
            "edited image in the same color mode (e.g. `image.convert('RGB')`)."
        )
    if tuple(x0.shape) != tuple(cap.image.shape):
        raise ValueError(
            f"the edited image has shape {tuple(x0.shape)} but the capture had {tuple(cap.image.shape)}; "
            "edits must keep the size. Capture again for a new image size."
        )
    check_finite("the edited image", x0)
    mask = cap.mask if mask_image is None else ed.adapter.preprocess_mask(mask_image, x0)
    check_finite("mask_image", mask)
    # Re-encoding noise below change_threshold (8-bit units; images here are in [-1, 1]) is no change: the current
    # image's pixel stays there (regions.change_mask).
    noise = ed.config.change_threshold
    differs = difference_mask(x0, cap.image, eps=0.0)
    changed = change_mask(x0, cap.image, noise, unit=127.5, differs=differs)
    x0 = torch.where(changed[:, None], x0, cap.image)
    if mask is not None:
        changed = changed | (mask != cap.mask).any(dim=1)  # not in place: `changed` may be `differs`
    inputs = dict(cap.inputs or {})
    for name, value in images.items():  # extra images (a control image) are in [0, 1]
        new = ed.adapter.preprocess_input(name, value, x0)
        check_finite(name, new)
        moved_at_all = difference_mask(new, cap.inputs[name], eps=0.0)
        moved = change_mask(new, cap.inputs[name], noise, unit=255.0, differs=moved_at_all)
        differs = differs | moved_at_all
        inputs[name] = torch.where(moved[:, None], new, cap.inputs[name])
        changed = changed | moved
    return x0, mask, inputs, changed, int((differs & ~changed).sum())
