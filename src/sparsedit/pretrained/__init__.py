"""Small models trained by `training/` on `sparsedit.data.scenes`, shipped with the package, loaded offline.

    >>> pipe = sparsedit.pretrained.load("scene-ddpm")    # a diffusers DDPMPipeline, 64×64 pixel-space scenes
    >>> gen = sparsedit.pretrained.load("scene-spade")    # a SPADEGenerator: scene label maps → 64×64 images

The architectures live here (`ARCHITECTURES`), so the training scripts and the loader build the same modules. The
weights are float16 safetensors files next to this module, upcast to the requested dtype on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import scenes


WEIGHTS_DIR = Path(__file__).parent

ARCHITECTURES: dict[str, dict] = {
    "scene-ddpm": {
        "unet": {
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 128, 128),
            "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "norm_num_groups": 16,
        },
        "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True},
    },
    "scene-spade": {
        "generator": {
            "label_nc": scenes.NUM_CLASSES,
            "size": (64, 64),
            "ngf": 16,
            "num_upsampling_layers": "normal",
            "use_instance": False,
            "hidden": 32,
        },
    },
}


def available() -> list[str]:
    """Names that `load` accepts."""
    return sorted(ARCHITECTURES)


def weights_file(name: str) -> Path:
    """Where the shipped weights of `name` live."""
    _check_name(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def build(name: str, dtype: torch.dtype = torch.float32, size: int | tuple[int, int] | None = None):
    """The untrained module of `name`: a `UNet2DModel` ("scene-ddpm") or a `SPADEGenerator` ("scene-spade").
    `size` sets the UNet's default sample size or the generator's label-map size (both networks are convolutional;
    they were trained at 64×64)."""
    _check_name(name)
    arch = ARCHITECTURES[name]
    if isinstance(size, int):
        size = (size, size)
    if name == "scene-ddpm":
        from diffusers import UNet2DModel

        if size is not None and size[0] != size[1]:
            raise ValueError(f"scene-ddpm samples square images; got size {size}.")
        model = UNet2DModel(**{**arch["unet"], **({"sample_size": size[0]} if size else {})})
    else:
        from ..models import SPADEGenerator

        model = SPADEGenerator(**{**arch["generator"], **({"size": tuple(size)} if size else {})})
    return model if dtype == torch.float32 else model.to(dtype)


def scheduler(name: str = "scene-ddpm"):
    """The `DDPMScheduler` the diffusion model was trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**ARCHITECTURES[name]["scheduler"])


def load(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
    size: int | tuple[int, int] | None = None,
):
    """Load a shipped model, offline. `"scene-ddpm"` → a diffusers `DDPMPipeline`; `"scene-spade"` → a
    `SPADEGenerator` in eval mode. `path` loads another weights file of the same architecture (for example a
    training run's export); `size` builds the network for another resolution than the 64×64 it was trained at (see
    `build`)."""
    from safetensors.torch import load_file

    file = Path(path) if path is not None else weights_file(name)
    if not file.exists():
        raise FileNotFoundError(
            f"no weights for {name!r} at {file}. Reinstall sparsedit, or train them: "
            f"`python training/train_{name.split('-')[1]}.py` (see training/README.md)."
        )
    state = load_file(str(file))
    meta = _metadata(file)
    if meta.get("architecture") not in (None, json.dumps(_jsonable(ARCHITECTURES[name]), sort_keys=True)):
        raise ValueError(
            f"{file} was trained with a different architecture than sparsedit's {name!r}; load it with the "
            "sparsedit version that wrote it."
        )
    model = build(name, size=size)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = (model if dtype == torch.float32 else model.to(dtype)).to(device).eval()
    if name == "scene-ddpm":
        from diffusers import DDPMPipeline

        return DDPMPipeline(unet=model, scheduler=scheduler(name))
    return model


def save(name: str, model: torch.nn.Module, path: str | Path, **metadata) -> Path:
    """Write `model`'s weights as float16 safetensors with the architecture (and `metadata`) in the header."""
    from safetensors.torch import save_file

    _check_name(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if v.is_floating_point()
    }
    state.update({k: v.detach().contiguous() for k, v in model.state_dict().items() if not v.is_floating_point()})
    meta = {"architecture": json.dumps(_jsonable(ARCHITECTURES[name]), sort_keys=True), "name": name}
    meta.update({k: str(v) for k, v in metadata.items()})
    save_file(state, str(path), metadata=meta)
    return path


def _metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _check_name(name: str):
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown pretrained model {name!r}; available: {available()}.")
