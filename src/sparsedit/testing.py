"""Small pipelines built offline from configs, with random weights, for tests, demos and benchmarks.

Nothing here downloads anything: the CLIP tokenizer is written from a byte-level vocabulary with a few merges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def write_clip_tokenizer(directory: str | Path) -> None:
    """vocab.json + merges.txt with byte-level symbols, a few merges and the start/end tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({ch + "</w>": len(chars) + i for i, ch in enumerate(chars)})
    merges = ["h o", "ho u", "hou s", "hous e</w>", "l a", "la k", "lak e</w>", "r e", "re d</w>", "b l", "bl u"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_text_encoder(directory: str | Path, width: int, layers: int, heads: int, intermediate: int, length: int):
    """An offline CLIP tokenizer (written to `directory`) and a random-weight `CLIPTextModel` of the given size,
    seeded with 0. Returns `(tokenizer, text_encoder)`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=length)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


def sd_style_vae(channels: tuple[int, ...], layers_per_block: int = 1, norm_num_groups: int = 8,
                 latent_channels: int = 4, **kwargs):  # fmt: skip
    """An `AutoencoderKL` of the Stable Diffusion layout (one down/up block per entry of `channels`, 4 latent
    channels by default, 16 for SD3's), random weights from the current RNG state."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        layers_per_block=layers_per_block,
        **kwargs,
    )


def tiny_ddim():
    """The DDIM scheduler of the tiny test pipelines (Stable Diffusion's betas)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def _assemble(name: str, dtype: torch.dtype, **components):
    """The diffusers pipeline class `name` from `components`, its progress bar off, in `dtype`."""
    import diffusers

    pipe = getattr(diffusers, name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


_SD_PIPELINES = {
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "txt2img": "StableDiffusionPipeline",
}


def tiny_sd_img2img(directory: str | Path, dtype: torch.dtype = torch.float32, **kwargs):
    """A `StableDiffusionImg2ImgPipeline` in miniature; see `tiny_sd`."""
    return tiny_sd(directory, "img2img", dtype, **kwargs)


def tiny_sd(
    directory: str | Path,
    pipeline: str = "img2img",
    dtype: torch.dtype = torch.float32,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (8, 16, 16, 16),
    text_width: int = 32,
    unet_in_channels: int | None = None,
):
    """A Stable Diffusion pipeline with the SD architecture in miniature (cross-attention UNet, 4-level VAE, CLIP text
    encoder), random weights, and a DDIM scheduler. `directory` receives the tokenizer files.

    Args:
        pipeline: `"img2img"`, `"inpaint"` or `"txt2img"`.
        unet_in_channels: 4, or 9 for an inpainting UNet (the default for `"inpaint"`).
    """
    from diffusers import UNet2DConditionModel

    tokenizer, text_encoder = clip_text_encoder(directory, text_width, layers=2, heads=4, intermediate=37, length=16)
    vae = sd_style_vae(vae_channels).eval()
    levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_in_channels or (9 if pipeline == "inpaint" else 4),
        out_channels=4,
        layers_per_block=1,
        block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    if pipeline not in _SD_PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(_SD_PIPELINES)}, got {pipeline!r}.")
    return _assemble(
        _SD_PIPELINES[pipeline],
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- label maps for the conditional GANs (Cityscapes ids) ----------------------------------------------------------
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 7, 8, 11, 17, 21, 23, 24, 26


def street_scene(h: int = 256, w: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Cityscapes-like layout: label ids `[1, H, W]` and instance ids (cars get their own)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((h, w), SKY, dtype=torch.long)
    horizon = h * 5 // 8
    x = 0
    while x < w:  # buildings of random widths and heights
        bw = int(torch.randint(w // 16, w // 6, (1,), generator=g))
        top = int(torch.randint(h // 10, h // 3, (1,), generator=g))
        labels[top:horizon, x : x + bw] = BUILDING
        x += bw
    labels[horizon - h // 6 : horizon, : w // 5] = VEGETATION
    labels[horizon - h // 8 : horizon, w * 3 // 4 :] = VEGETATION
    labels[horizon:, :] = ROAD
    labels[horizon : horizon + h // 16, :] = SIDEWALK
    for px in range(w // 10, w, w // 5):
        labels[h // 4 : horizon + h // 16, px : px + 3] = POLE
    instance = labels.clone()
    for k in range(4):
        cx = int(torch.randint(0, w - w // 8, (1,), generator=g))
        cy = horizon + int(torch.randint(h // 16, h // 4, (1,), generator=g))
        labels[cy : cy + h // 12, cx : cx + w // 10] = CAR
        instance[cy : cy + h // 12, cx : cx + w // 10] = CAR * 1000 + k
    labels[horizon - 10 : horizon + 20, w // 2 : w // 2 + 6] = PERSON
    instance[horizon - 10 : horizon + 20, w // 2 : w // 2 + 6] = PERSON * 1000
    return labels[None], instance[None]


def paint_labels(labels, instance, fraction: float, cls: int = VEGETATION):
    """Paint a rectangle of `cls` over the middle of the road and buildings, covering `fraction` of the image."""
    _, h, w = labels.shape
    area = fraction * h * w
    rh = max(1, min(h, round(math.sqrt(area / 2))))
    rw = max(1, min(w, round(area / rh)))
    y0, x0 = max(0, h * 9 // 16 - rh // 2), max(0, w * 2 // 5 - rw // 2)
    new, inst = labels.clone(), instance.clone()
    new[:, y0 : y0 + rh, x0 : x0 + rw] = cls
    inst[:, y0 : y0 + rh, x0 : x0 + rw] = cls
    return new, inst


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm running statistics (random-weight models are otherwise near-identity there); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def tiny_sdxl(directory: str | Path, pipeline: str = "img2img", dtype: torch.dtype = torch.float32):
    """A Stable Diffusion XL pipeline in miniature: two CLIP text encoders (the second with a projection, whose pooled
    output and the size/crop `time_ids` condition the UNet through `addition_embed_type="text_time"`), a
    cross-attention UNet whose context is both encoders' hidden states concatenated, a 4-level VAE, random weights and
    a DDIM scheduler. `pipeline`: `"img2img"`, `"txt2img"`, `"inpaint"` (a 4-channel UNet, latent blending) or
    `"inpaint9"` (a 9-channel inpainting UNet)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, text_encoder = clip_text_encoder(directory, 32, layers=2, heads=4, intermediate=37, length=16)
    torch.manual_seed(1)
    config2 = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text_encoder_2 = CLIPTextModelWithProjection(config2).eval()
    torch.manual_seed(2)
    vae = sd_style_vae((8, 16, 16, 16)).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if pipeline == "inpaint9" else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    ).eval()
    names = {"img2img": "StableDiffusionXLImg2ImgPipeline", "txt2img": "StableDiffusionXLPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline", "inpaint9": "StableDiffusionXLInpaintPipeline"}  # fmt: skip
    if pipeline not in names:
        raise ValueError(f"pipeline must be one of {sorted(names)}, got {pipeline!r}.")
    kwargs = {"requires_aesthetics_score": False} if pipeline != "txt2img" else {}
    return _assemble(
        names[pipeline],
        dtype,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=tiny_ddim(),
        add_watermarker=False,
        **kwargs,
    )


_CONTROLNET_PIPELINES = {
    "img2img": ("img2img", "StableDiffusionControlNetImg2ImgPipeline"),
    "inpaint": ("img2img", "StableDiffusionControlNetInpaintPipeline"),  # a 4-channel UNet: latent blending
    "inpaint9": ("inpaint", "StableDiffusionControlNetInpaintPipeline"),  # a 9-channel inpainting UNet
}


def tiny_controlnet(directory: str | Path, pipeline: str = "img2img", dtype: torch.dtype = torch.float32):
    """A Stable Diffusion ControlNet pipeline in miniature: `tiny_sd`'s components and a `ControlNetModel` made from
    its UNet (`ControlNetModel.from_unet`) with a conditioning embedding that downsamples the control image by the
    VAE's factor. The zero-initialised output convolutions get random weights, or the ControlNet would add nothing.
    `pipeline`: `"img2img"`, `"inpaint"` (4-channel UNet) or `"inpaint9"` (9-channel inpainting UNet)."""
    from diffusers import ControlNetModel

    if pipeline not in _CONTROLNET_PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(_CONTROLNET_PIPELINES)}, got {pipeline!r}.")
    base, name = _CONTROLNET_PIPELINES[pipeline]
    components = tiny_sd(directory, base).components
    torch.manual_seed(5)
    # from_unet copies the UNet's encoder; a 9-channel inpainting UNet's controlnet still takes 4-channel latents.
    unet = components["unet"]
    if unet.config.in_channels != 4:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 4})
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(6)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]  # fmt: skip
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(2.0 * torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
    return _assemble(
        name, dtype, **{k: v for k, v in components.items() if k != "image_encoder"}, controlnet=controlnet.eval()
    )


def tiny_sd3(directory: str | Path, pipeline: str = "img2img", dtype: torch.dtype = torch.float32, **transformer):
    """A Stable Diffusion 3 pipeline in miniature: two CLIP text encoders with projections (their hidden states,
    concatenated and zero-padded, are the joint context; their pooled outputs the `pooled_projections`), no T5 (the
    pipeline then uses zeros for its tokens, as SD3 without `text_encoder_3`), an `SD3Transformer2DModel` with patch
    2 (`transformer` overrides its config, e.g. `qk_norm="rms_norm", dual_attention_layers=(0,)` for SD3.5), a
    4-level VAE with SD3's shift and scale, random weights and the flow-matching Euler scheduler.
    `pipeline`: `"img2img"`, `"txt2img"`, `"inpaint"` (a 16-channel transformer: latent blending) or `"inpaint33"` (a
    33-channel inpainting transformer). Latents have 16 channels, as SD3's (its inpainting pipeline blends only those)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    names = {"img2img": "StableDiffusion3Img2ImgPipeline", "txt2img": "StableDiffusion3Pipeline",
             "inpaint": "StableDiffusion3InpaintPipeline",
             "inpaint33": "StableDiffusion3InpaintPipeline"}  # fmt: skip
    if pipeline not in names:
        raise ValueError(f"pipeline must be one of {sorted(names)}, got {pipeline!r}.")
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=16)
    encoders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        encoders.append(CLIPTextModelWithProjection(config).eval())
    torch.manual_seed(2)
    vae = sd_style_vae((8, 16, 16, 16), latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035).eval()
    torch.manual_seed(3)
    config = {"sample_size": 16, "patch_size": 2, "in_channels": 33 if pipeline == "inpaint33" else 16,
              "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
              "caption_projection_dim": 16, "pooled_projection_dim": 32, "out_channels": 16, **transformer}  # fmt: skip
    return _assemble(
        names[pipeline],
        dtype,
        transformer=SD3Transformer2DModel(**config).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux(directory: str | Path, pipeline: str = "img2img", dtype: torch.dtype = torch.float32, **transformer):
    """A FLUX.1 pipeline in miniature: a CLIP text encoder (its pooled output conditions the transformer), a one-layer
    T5 encoder (its hidden states are the context; an offline CLIP tokenizer stands in for T5's, up to 512 tokens), a
    `FluxTransformer2DModel` with one double- and two single-stream blocks and guidance embeddings (FLUX-dev's), a
    4-level VAE with 16 latent channels and FLUX's shift and scale, random weights and the flow-matching Euler scheduler
    with FLUX's resolution-dependent shift. `pipeline`: `"img2img"`, `"txt2img"`, `"inpaint"` (`FluxInpaintPipeline`, latent
    blending) or `"fill"` (`FluxFillPipeline`: the transformer takes 384 packed channels, latents, masked-image latents
    and the 8x8 pixel mask of each latent pixel, and returns 64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    names = {"img2img": "FluxImg2ImgPipeline", "txt2img": "FluxPipeline", "inpaint": "FluxInpaintPipeline",
             "fill": "FluxFillPipeline"}  # fmt: skip
    if pipeline not in names:
        raise ValueError(f"pipeline must be one of {sorted(names)}, got {pipeline!r}.")
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=16)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(directory), model_max_length=512)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()  # fmt: skip
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=4)).eval()  # fmt: skip
    torch.manual_seed(2)
    vae = sd_style_vae((8, 16, 16, 16), latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                       use_quant_conv=False, use_post_quant_conv=False).eval()  # fmt: skip
    torch.manual_seed(3)
    config = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
              "axes_dims_rope": (4, 2, 2), "guidance_embeds": True, **transformer}  # fmt: skip
    if pipeline == "fill":
        config = {**config, "in_channels": 4 * (16 + 16 + 64), "out_channels": 64}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    pipe = _assemble(
        names[pipeline],
        dtype,
        transformer=FluxTransformer2DModel(**config).eval(),
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
    )
    pipe.default_sample_size = 16  # 128 px images by default (FLUX's own: 1024)
    return pipe


def tiny_flux2_klein(directory: str | Path, distilled: bool = True, dtype: torch.dtype = torch.float32, **transformer):
    """A `Flux2KleinPipeline` in miniature: a 27-layer Qwen3 text encoder 16 wide (the pipeline stacks its layers 9,
    18 and 27), an offline CLIP tokenizer with a chat template standing in for Qwen's (prompts padded to 512 tokens as
    the pipeline pads them), a `Flux2Transformer2DModel` with one double- and two single-stream blocks, a 4-level
    `AutoencoderKLFlux2` with 4 latent channels (16 in 2x2 patches) and batch-norm statistics away from the identity,
    random weights, and Klein's flow-matching scheduler. `distilled`: the 4-step release (no guidance); `False`: the
    base model (classifier-free guidance)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import CLIPTokenizer, Qwen3Config, Qwen3ForCausalLM

    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=512)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )).eval()  # fmt: skip
    torch.manual_seed(2)
    channels = (8, 16, 16, 16)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    vae.bn.running_mean.copy_(0.1 * torch.randn(16))
    vae.bn.running_var.copy_(0.5 + torch.rand(16))
    torch.manual_seed(3)
    config = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 48, "timestep_guidance_channels": 16,
              "axes_dims_rope": (2, 2, 2, 2), "guidance_embeds": False, **transformer}  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    return _assemble(
        "Flux2KleinPipeline",
        dtype,
        transformer=Flux2Transformer2DModel(**config).eval(),
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        is_distilled=distilled,
    )


# -- thin models written the way users write them (issue 39's rows) ---------------------------------------------------
class UserSRNet(torch.nn.Module):
    """A plain super-resolution CNN as a user writes one (EDSR/ESPCN-like, no sparsedit modules): a 3x3 head, a body
    of 3x3 convs with PReLU and a global residual `x + body(x)` in Python, two conv + PixelShuffle(2) stages (x4) and
    a 3x3 tail; 17 convolutions of `channels` channels in all (with the defaults)."""

    def __init__(self, channels: int = 64, body: int = 13):
        super().__init__()
        nn = torch.nn
        c = channels
        self.head = nn.Conv2d(3, c, 3, padding=1)
        layers = []
        for _ in range(body):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.PReLU(c)]
        self.body = nn.Sequential(*layers)
        self.up = nn.Sequential(
            nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(c),
            nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(c),
        )  # fmt: skip
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = h + self.body(h)
        return self.tail(self.up(h))


class UserResnetBlock(torch.nn.Module):
    """The pix2pix/CycleGAN ResNet block as its authors write it: reflection pads, convs without padding, norm, ReLU,
    and the residual added in Python."""

    def __init__(self, c: int, norm=torch.nn.InstanceNorm2d):
        super().__init__()
        nn = torch.nn
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3, bias=True), norm(c), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3, bias=True), norm(c),
        )  # fmt: skip

    def forward(self, x):
        return x + self.conv_block(x)


class UserResnetGenerator(torch.nn.Module):
    """junyanz/pytorch-CycleGAN-and-pix2pix's `ResnetGenerator` (InstanceNorm, the default `resnet_9blocks`) written
    with plain torch modules: a 7x7 conv after a reflection pad, two stride-2 convs, `blocks` residual blocks, two
    transposed convs, a 7x7 conv and tanh. Not sparsedit's `models.Pix2PixGenerator` (whose residual is an `Add`
    module): this one is what a user's own code looks like."""

    def __init__(self, ngf: int = 64, blocks: int = 9, norm=torch.nn.InstanceNorm2d):
        super().__init__()
        nn = torch.nn
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=True), norm(ngf), nn.ReLU(True)]
        for i in range(2):
            m = 2**i
            layers += [nn.Conv2d(ngf * m, ngf * m * 2, 3, stride=2, padding=1, bias=True), norm(ngf * m * 2),
                       nn.ReLU(True)]  # fmt: skip
        layers += [UserResnetBlock(ngf * 4, norm) for _ in range(blocks)]
        for i in range(2):
            m = 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(ngf * m, ngf * m // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                       norm(ngf * m // 2), nn.ReLU(True)]  # fmt: skip
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)
