"""ControlNet pipeline families: `StableDiffusionControlNetImg2ImgPipeline` and
`StableDiffusionControlNetInpaintPipeline`.

The ControlNet is sparsified like the UNet and runs sparse at every step on the same region; its residuals reach the
UNet with the regions where they differ from the capture's (`spatial.output_regions` → `editing(input_regions=...)`),
so the UNet stays sparse where the ControlNet changed nothing. A change of `control_image` is an edit region like a
change of the image. The control image's conditioning embedding does not depend on the step, so it is computed once
per capture or edit (the pipeline computes it at every step; the result is the same tensor) and the ControlNet's
forward reads it; its region is where it differs from the capture's, exactly. A changed
`controlnet_conditioning_scale` (or `guess_mode`, `control_guidance_start`/`_end`) asks for another generation: a
stale capture (`StaleCacheError`, or a recapture under `on_stale="recapture"`).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ... import attachments
from ...nn.state import Mode
from ...regions import difference_mask
from .base import register_pipeline
from .sd import Img2ImgAdapter, InpaintAdapter


__all__ = ["ControlNetImg2ImgAdapter", "ControlNetInpaintAdapter"]

RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


def _defaults(pipe, names) -> dict:
    """The pipeline's own defaults of its call arguments `names` (they differ between the ControlNet pipelines)."""
    params = inspect.signature(type(pipe).__call__).parameters
    return {n: params[n].default for n in names}


def _conv_macs(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`module(x)` and its convolutions' multiply-accumulates."""
    macs = 0

    def count(m, args, out):
        nonlocal macs
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        macs += out.numel() * k

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        out = module(x)
    finally:
        for h in hooks:
            h.remove()
    return out, macs


class _ControlNet:
    """What the ControlNet pipelines add to their base family (mixed in before it)."""

    text_editable = False  # prompt edits would have to steer the ControlNet's cross-attention too: not yet
    extra_images = ("control_image",)
    kept = ("image", "masked", "control_embed")
    option_names = ("controlnet_conditioning_scale", "guess_mode", "control_guidance_start", "control_guidance_end")

    def __init__(self, pipe):
        super().__init__(pipe)
        self.options = _defaults(pipe, self.option_names)
        self.default_strength = _defaults(pipe, ("strength",))["strength"]

    @property
    def controlnet(self):
        return self.pipe.controlnet

    def check(self):
        super().check()
        cn = self.controlnet
        if not isinstance(cn, torch.nn.Module) or type(cn).__name__ != "ControlNetModel":
            raise NotImplementedError(
                f"SparseEditor runs one ControlNetModel, not a {type(cn).__name__}; several ControlNets "
                "(MultiControlNetModel) are not supported yet."
            )

    def parse_options(self, options: dict) -> dict:
        for name in ("control_guidance_start", "control_guidance_end", "controlnet_conditioning_scale"):
            v = options[name]
            if isinstance(v, (list, tuple)):
                if len(v) != 1:
                    raise ValueError(f"{name}: one ControlNet takes one value, got {list(v)}.")
                options[name] = v[0]
        if not 0.0 <= options["control_guidance_start"] < options["control_guidance_end"] <= 1.0:
            raise ValueError("control_guidance_start must be below control_guidance_end, both in [0, 1].")
        options["guess_mode"] = bool(options["guess_mode"] or self.controlnet.config.global_pool_conditions)
        return options

    def preprocess_input(self, name: str, value, like: torch.Tensor) -> torch.Tensor:
        """`control_image` as `prepare_control_image` takes it: `[B, 3, H, W]` in [0, 1] at the image's size."""
        if value is None:
            raise ValueError(f"{type(self.pipe).__name__} needs a control image: capture(control_image=..., ...).")
        h, w = like.shape[-2:]
        x = self.pipe.control_image_processor.preprocess(value, height=h, width=w).to(dtype=torch.float32)
        b = like.shape[0]
        if x.shape[0] == 1 and b > 1:
            x = x.repeat_interleave(b, dim=0)
        if x.shape[0] != b:
            raise ValueError(f"{x.shape[0]} control images for {b} images: give one, or one per image.")
        return x.to(device=self.device, dtype=self.placement(self.controlnet, "dtype"))

    # -- the loop -------------------------------------------------------------------------------------------------
    def control_copies(self, copies: int, call: dict) -> int:
        """The ControlNet's batch in guidance branches: guess mode runs it on the conditional half only."""
        return 1 if call["guess_mode"] else copies

    def prepare_inputs(self, prep: dict, inputs: dict, call: dict, copies: int, captured: dict | None) -> None:
        control = inputs["control_image"]
        if self.control_copies(copies, call) == 2:
            control = torch.cat([control] * 2)
        prep["control"] = control
        embed, macs = _conv_macs(self.controlnet.controlnet_cond_embedding, control)
        prep["control_embed"] = embed
        prep["control_region"] = None if captured is None else difference_mask(embed, captured["control_embed"], 0.0)
        prep["extra_macs"] = macs  # computed once here; the pipeline computes it at every step

    @contextlib.contextmanager
    def embedding(self, prep):
        """The ControlNet's forward reads the precomputed conditioning embedding, tagged with its changed region in a
        sparse run."""
        module = self.controlnet.controlnet_cond_embedding
        embed, region = prep["control_embed"], prep["control_region"]

        def forward(_cond):
            st = attachments.engine_state(self.controlnet)
            if region is not None and st is not None and st.mode is Mode.SPARSE:
                st.set_region(embed, region)
            return embed

        module.forward = forward
        try:
            yield
        finally:
            del module.forward

    def control(self, i, t, z, zin, embeds, prep, call, copies, n_steps, run):
        """The ControlNet's residuals for step `i` as UNet keyword arguments, and their changed regions (`None`:
        unknown, changed everywhere). `run(fn)` runs the ControlNet call `fn` under the editor's capture or edit
        and returns its output and `spatial.output_regions`."""
        start, end = call["control_guidance_start"], call["control_guidance_end"]
        keep = 1.0 - float(i / n_steps < start or (i + 1) / n_steps > end)
        scale = call["controlnet_conditioning_scale"] * keep
        guess = call["guess_mode"]
        if guess and copies == 2:  # the conditional branch only
            cin, ctx = self.pipe.scheduler.scale_model_input(z, t), embeds.chunk(2)[1]
        else:
            cin, ctx = zin, embeds
        with self.embedding(prep):
            (down, mid), regions = run(
                lambda: self.controlnet(cin, t, encoder_hidden_states=ctx, controlnet_cond=prep["control"],
                                        conditioning_scale=scale, guess_mode=guess, return_dict=False)
            )  # fmt: skip
        down_regions, mid_region = (None, None) if regions is None else regions
        if guess and copies == 2:  # zeros for the unconditional branch: unchanged there
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
            if regions is not None:
                down_regions = [torch.cat([torch.zeros_like(r), r]) for r in down_regions]
                mid_region = torch.cat([torch.zeros_like(mid_region), mid_region])
        kwargs = {RESIDUALS[0]: list(down), RESIDUALS[1]: mid}
        input_regions = {} if regions is None else {RESIDUALS[0]: list(down_regions), RESIDUALS[1]: mid_region}
        return kwargs, input_regions


@register_pipeline("StableDiffusionControlNetImg2ImgPipeline")
class ControlNetImg2ImgAdapter(_ControlNet, Img2ImgAdapter):
    """`StableDiffusionControlNetImg2ImgPipeline`: SDEdit with a ControlNet; stroke edits and control-image edits."""

    kind = "controlnet_img2img"


@register_pipeline("StableDiffusionControlNetInpaintPipeline")
class ControlNetInpaintAdapter(_ControlNet, InpaintAdapter):
    """`StableDiffusionControlNetInpaintPipeline`: inpainting with a ControlNet (9-channel inpainting UNets and
    4-channel UNets with latent blending); the region covers the changes of the image, the mask and the control
    image. Unlike `StableDiffusionInpaintPipeline`, it keeps the image's size by default."""

    kind = "controlnet_inpaint"
    fixed_size = False
