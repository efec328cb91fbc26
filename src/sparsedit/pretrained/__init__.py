"""Small models trained by `training/` on `sparsedit.data.scenes`, shipped with the package, loaded offline.

    >>> pipe = sparsedit.pretrained.load("scene-ddpm")    # a diffusers DDPMPipeline, 64×64 pixel-space scenes
    >>> gen = sparsedit.pretrained.load("scene-spade")    # a SPADEGenerator: scene label maps → 64×64 images
    >>> sd = sparsedit.pretrained.load("scene-sd")         # a StableDiffusionPipeline: captions → 64×64 scenes
    >>> i2i = sparsedit.pretrained.load("scene-sd", pipeline="img2img")  # its StableDiffusionImg2ImgPipeline
    >>> dit = sparsedit.pretrained.load("scene-dit")       # a StableDiffusion3Pipeline: captions → 256×256 scenes
    >>> fix = sparsedit.pretrained.load("scene-dit", pipeline="inpaint")  # its StableDiffusion3InpaintPipeline

The architectures live here (`ARCHITECTURES`), so the training scripts and the loader build the same modules. The
weights are float16 safetensors files next to this module, upcast to the requested dtype on load. scene-sd's
tokenizer (one token per caption word, `sparsedit.data.captions`) lives in `scene-sd-tokenizer/` beside them; scene-dit
uses it too.
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
    # A small latent text-to-image model of the captioned scenes (issue 21): 64 px images, 16×16×4 latents.
    "scene-sd": {
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "sample_size": 64,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 64),
            "norm_num_groups": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
        },
        "unet": {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (64, 128, 128),
            "norm_num_groups": 16,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        },
        # Every word a caption uses (`sparsedit.data.captions`); the tokenizer spells each as one token.
        "words": (
            "a across below clear cloudy desert lake land left meadow mountains on right rocks sea sky snowy the trees"
        ).split(),
    },
    # A text-to-image flow-matching transformer of the captioned scenes at 256 px (issue 38), Stable Diffusion 3's
    # architecture in miniature: a VAE 256 px -> 32x32x16 (16 channels, as SD3's: its inpainting pipeline takes only
    # those), an MMDiT of 8 joint blocks 256 wide on 2x2 patches (16x16 = 256 image tokens; positions up to 32x32
    # patches, 512 px), two small CLIP text encoders with projections (their penultimate hidden states, 64 + 64
    # features, are the joint context; their pooled outputs, 64 + 64, the transformer's `pooled_projections`), no T5,
    # and the flow-matching Euler scheduler with a time shift of 2.
    "scene-dit": {
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 16,
            "sample_size": 256,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 64, 128),
            "norm_num_groups": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "mid_block_add_attention": False,  # convolutional only: it trains on crops and runs on whole images
        },
        "transformer": {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 8,
            "attention_head_dim": 32,
            "num_attention_heads": 8,
            "joint_attention_dim": 128,
            "caption_projection_dim": 256,
            "pooled_projection_dim": 128,
            "pos_embed_max_size": 32,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "projection_dim": 64,
        },
        "scheduler": {"num_train_timesteps": 1000, "shift": 2.0},
    },
}

_TRAINERS = {
    "scene-ddpm": "train_ddpm.py",
    "scene-spade": "train_spade.py",
    "scene-sd": "train_scene_sd.py",
    "scene-dit": "train_scene_dit.py --part vae`, then `--part denoiser`, then `--part export --install",
}
SD_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"}
DIT_PIPELINES = {
    "txt2img": "StableDiffusion3Pipeline",
    "img2img": "StableDiffusion3Img2ImgPipeline",
    "inpaint": "StableDiffusion3InpaintPipeline",
}


def available() -> list[str]:
    """Names that `load` loads: the architectures whose weights ship with this package (an architecture still in
    training, such as scene-dit before its weights are installed, is built by `build` but not listed)."""
    return sorted(name for name in ARCHITECTURES if (WEIGHTS_DIR / f"{name}.safetensors").exists())


def weights_file(name: str) -> Path:
    """Where the shipped weights of `name` live."""
    _check_name(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def build(name: str, dtype: torch.dtype = torch.float32, size: int | tuple[int, int] | None = None):
    """The untrained module of `name`: a `UNet2DModel` ("scene-ddpm"), a `SPADEGenerator` ("scene-spade"), or
    ("scene-sd") a `ModuleDict` of its `vae` (`AutoencoderKL`), `unet` (`UNet2DConditionModel`) and `text`
    (`CLIPTextModel`), or ("scene-dit") a `ModuleDict` of its `vae` (`AutoencoderKL`), `transformer`
    (`SD3Transformer2DModel`), `text` and `text_2` (`CLIPTextModelWithProjection`). `size` sets the UNet's or the
    transformer's default sample size or the generator's label-map size (the networks are convolutional, the
    transformer's positions reach 512 px; they were trained at 64×64, scene-dit at 256×256)."""
    _check_name(name)
    arch = ARCHITECTURES[name]
    if isinstance(size, int):
        size = (size, size)
    if name == "scene-sd":
        model = _build_sd(arch, size)
    elif name == "scene-dit":
        model = _build_dit(arch, size)
    elif name == "scene-ddpm":
        from diffusers import UNet2DModel

        if size is not None and size[0] != size[1]:
            raise ValueError(f"scene-ddpm samples square images; got size {size}.")
        model = UNet2DModel(**{**arch["unet"], **({"sample_size": size[0]} if size else {})})
    else:
        from ..models import SPADEGenerator

        model = SPADEGenerator(**{**arch["generator"], **({"size": tuple(size)} if size else {})})
    return model if dtype == torch.float32 else model.to(dtype)


def _build_sd(arch: dict, size):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size is not None and size[0] != size[1]:
        raise ValueError(f"scene-sd builds square images; got size {size} (the pipeline takes height= and width=).")
    vae = AutoencoderKL(**{**arch["vae"], **({"sample_size": size[0]} if size else {})})
    unet = UNet2DConditionModel(**{**arch["unet"], **({"sample_size": size[0] // 4} if size else {})})
    tok = tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **arch["text"],
        )
    )
    return torch.nn.ModuleDict({"vae": vae, "unet": unet, "text": text})


def _build_dit(arch: dict, size):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if size is not None and size[0] != size[1]:
        raise ValueError(f"scene-dit builds square images; got size {size} (the pipeline takes height= and width=).")
    if size is not None and size[0] % 16:
        raise ValueError(f"scene-dit's images are multiples of 16 pixels (8x VAE, 2x2 patches); got size {size}.")
    vae = AutoencoderKL(**{**arch["vae"], **({"sample_size": size[0]} if size else {})})
    transformer = SD3Transformer2DModel(**{**arch["transformer"], **({"sample_size": size[0] // 8} if size else {})})
    tok = tokenizer()
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}  # fmt: skip
    text = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **arch["text"]))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **arch["text"]))
    return torch.nn.ModuleDict({"vae": vae, "transformer": transformer, "text": text, "text_2": text_2})


def write_tokenizer(directory: str | Path, words=None) -> Path:
    """Write scene-sd's CLIP tokenizer files (`vocab.json`, `merges.txt`) to `directory`: the printable ASCII bytes,
    and merges that spell each of `words` (default: the captions' words) as one token."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = ARCHITECTURES["scene-sd"]["words"] if words is None else words
    chars = [chr(c) for c in range(33, 127)]
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({ch + "</w>": len(chars) + i for i, ch in enumerate(chars)})
    merges = []
    for word in sorted(set(words)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return directory


def tokenizer(directory: str | Path | None = None):
    """scene-sd's `CLIPTokenizer`, from the files shipped beside the weights (or those in `directory`)."""
    from transformers import CLIPTokenizer

    directory = WEIGHTS_DIR / "scene-sd-tokenizer" if directory is None else Path(directory)
    length = ARCHITECTURES["scene-sd"]["text"]["max_position_embeddings"]
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=length)


def scheduler(name: str = "scene-ddpm", kind: str = "ddpm"):
    """The scheduler the diffusion model was trained with (`kind="ddpm"`: `DDPMScheduler`), or (`kind="ddim"`) the
    `DDIMScheduler` its pipeline samples with (scene-sd: Stable Diffusion's settings). scene-dit, a flow-matching
    model, trains and samples with one scheduler (`kind="flow"`): `FlowMatchEulerDiscreteScheduler`, SD3's."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    _check_name(name)
    config = ARCHITECTURES[name]["scheduler"]
    if name == "scene-dit" or kind == "flow":
        if name != "scene-dit" or kind not in ("flow", "ddpm"):
            raise ValueError(f"{name!r} has no {kind!r} scheduler; scene-dit's is 'flow'.")
        return FlowMatchEulerDiscreteScheduler(**config)
    if kind == "ddpm":
        return DDPMScheduler(**config)
    if kind == "ddim":
        extra = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1} if name == "scene-sd" else {}
        return DDIMScheduler(**{**config, **extra})
    raise ValueError(f"scheduler kind {kind!r}: use 'ddpm' or 'ddim'.")


def load(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
    size: int | tuple[int, int] | None = None,
    pipeline: str = "txt2img",
):
    """Load a shipped model, offline. `"scene-ddpm"` → a diffusers `DDPMPipeline`; `"scene-spade"` → a
    `SPADEGenerator` in eval mode; `"scene-sd"` → a `StableDiffusionPipeline` (DDIM sampling, no safety checker), or
    with `pipeline="img2img"` a `StableDiffusionImg2ImgPipeline` on the same components; `"scene-dit"` → a
    `StableDiffusion3Pipeline` (`pipeline="img2img"`: `StableDiffusion3Img2ImgPipeline`, `"inpaint"`:
    `StableDiffusion3InpaintPipeline`). `path` loads another weights file of the same architecture (for example a
    training run's export); `size` builds the network for another resolution than the one it was trained at (see
    `build`)."""
    from safetensors.torch import load_file

    _check_name(name)
    choices = {"scene-sd": SD_PIPELINES, "scene-dit": DIT_PIPELINES}.get(name)
    if choices is not None and pipeline not in choices:
        raise ValueError(f"pipeline={pipeline!r}: {name} offers {sorted(choices)}.")
    file = Path(path) if path is not None else weights_file(name)
    if not file.exists():
        raise FileNotFoundError(
            f"no weights for {name!r} at {file}. Reinstall sparsedit, or train them: "
            f"`python training/{_TRAINERS[name]}` (see docs/training.md)."
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
    if name == "scene-sd":
        return sd_pipeline(model, float(meta.get("scaling_factor", 1.0)), pipeline)
    if name == "scene-dit":
        return dit_pipeline(model, float(meta.get("scaling_factor", 1.0)), float(meta.get("shift_factor", 0.0)),
                            pipeline)  # fmt: skip
    if name == "scene-ddpm":
        from diffusers import DDPMPipeline

        return DDPMPipeline(unet=model, scheduler=scheduler(name))
    return model


def sd_pipeline(model: torch.nn.ModuleDict, scaling_factor: float, pipeline: str = "txt2img"):
    """scene-sd's modules (`build("scene-sd")`) as a diffusers pipeline (`pipeline`: "txt2img" or "img2img")."""
    import diffusers

    if pipeline not in SD_PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}: scene-sd offers {sorted(SD_PIPELINES)}.")
    model["vae"].register_to_config(scaling_factor=scaling_factor)
    pipe = getattr(diffusers, SD_PIPELINES[pipeline])(
        vae=model["vae"],
        text_encoder=model["text"],
        tokenizer=tokenizer(),
        unet=model["unet"],
        scheduler=scheduler("scene-sd", "ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline(model: torch.nn.ModuleDict, scaling_factor: float, shift_factor: float, pipeline: str = "txt2img"):
    """scene-dit's modules (`build("scene-dit")`) as a diffusers Stable Diffusion 3 pipeline (`pipeline`: "txt2img",
    "img2img" or "inpaint"). Both CLIP encoders read scene-sd's tokenizer (32 tokens); there is no T5, so the
    pipeline appends `max_sequence_length` (its default 256) zero tokens to the 32 CLIP tokens of the context. The
    transformer was trained with 0 to 512 of them (256 half of the time), so `max_sequence_length=0` (a context of 32
    tokens instead of 288) should draw nearly the same scenes, faster."""
    import diffusers

    if pipeline not in DIT_PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}: scene-dit offers {sorted(DIT_PIPELINES)}.")
    model["vae"].register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    tok = tokenizer()
    pipe = getattr(diffusers, DIT_PIPELINES[pipeline])(
        transformer=model["transformer"],
        scheduler=scheduler("scene-dit", "flow"),
        vae=model["vae"],
        text_encoder=model["text"],
        tokenizer=tok,
        text_encoder_2=model["text_2"],
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
