"""End-to-end SDEdit on a Stable Diffusion 3-shaped pipeline through `SparseEditor` vs the plain pipeline (issue 36).

`StableDiffusion3Img2ImgPipeline` with the SD3-medium transformer shape (24 joint blocks, 1536 wide; `--layers` to
reduce), SD3's VAE shape (`AutoencoderKL` 128/256/512/512, two layers per block, 16 latent channels, SD3's shift and
scale), random weights, built offline. The text encoders are small stand-ins with SD3's output shapes (two CLIP
encoders with 1024-wide projections, pooled 2048; a one-layer T5 encoder 4096 wide over 256 tokens), so the
transformer sees SD3's 333 context tokens; real SD3 encoders would only add to the dense pipeline's time (an edit
reuses the capture's embeddings). Flow-matching Euler, `--steps` x `--strength`, classifier-free guidance. A brush
stroke of `--fractions` of the image; dense (`pipe(image=edited, ...)`) and sparse (`editor.edit(image=edited)`)
alternate in one process; medians; MACs from `editor.last_stats`; PSNR against the dense result of the same edit.

    python benchmarks/dit_sdedit_e2e.py --size 512 --steps 20 --strength 0.6 --fractions 0.02
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from dit_edit import sd3_medium
from unet_edit import PIPELINE_HEADER, alternate, loadavg, pipeline_row, stroke_region

from sparsedit import SparseConfig, SparseEditor
from sparsedit.demo import load_photo
from sparsedit.testing import write_clip_tokenizer


def sd3_pipeline(dtype: torch.dtype, layers: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    directory = tempfile.mkdtemp()
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    tokenizer_3 = CLIPTokenizer.from_pretrained(directory, model_max_length=256)  # T5's 256 tokens
    encoders = []
    for seed, width in ((0, 768), (1, 1280)):
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=8, max_position_embeddings=77,
                                projection_dim=1024, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        encoders.append(CLIPTextModelWithProjection(config).eval())
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=64, num_layers=1,
                                 num_heads=1)).eval()  # fmt: skip
    torch.manual_seed(3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()  # fmt: skip
    torch.manual_seed(4)
    pipe = StableDiffusion3Img2ImgPipeline(
        transformer=sd3_medium(layers).eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="untimed dense/sparse pairs before the timed ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache-dtype", default="auto", help="SparseConfig.cache_dtype (auto: bf16 under SparseEditor)")
    ap.add_argument("--cache-budget", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = sd3_pipeline(dtype, args.layers)
    config = SparseConfig(input_dilation=1, cache_dtype=None if args.cache_dtype == "none" else args.cache_dtype,
                          cache_budget=args.cache_budget)  # fmt: skip
    editor = SparseEditor(pipe, config)
    photo, source = load_photo(args.size)
    image = (photo / 2 + 0.5).clamp(0, 1)
    kw = {"prompt": "a photo of an astronaut", "strength": args.strength, "num_inference_steps": args.steps,
          "height": args.size, "width": args.size}  # fmt: skip
    t0 = time.perf_counter()
    editor.capture(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    capture_s = time.perf_counter() - t0
    cache = editor.cache_bytes
    print(f"SD3-medium-shaped img2img ({args.layers} blocks), {args.size} px, {args.steps} steps x strength "
          f"{args.strength}, {args.dtype}, cache dtype {args.cache_dtype}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, {platform.machine()}, load {loadavg()}")  # fmt: skip
    print(f"capture {capture_s:.1f} s, cache {cache / 2**30:.2f} GiB ({dict(cache.items())}), photo: {source}")
    print(PIPELINE_HEADER)
    rows = []
    for frac in args.fractions:
        region = stroke_region(args.size, frac, 1)
        edited = torch.where(region[:, None], torch.tensor([0.95, 0.1, 0.15])[:, None, None], image).to(dtype)
        dense_t, sparse_t, dense, sparse = alternate(
            lambda: pipe(image=edited, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images,
            lambda: editor.edit(image=edited, commit=False, output_type="pt").images,
            args.repeats, args.warmup,
        )  # fmt: skip
        stats = editor.last_stats
        rows.append(pipeline_row(stats, dense_t, sparse_t, dense, sparse, unet_time=stats["unet_time"],
                                 ran_dense=stats["ran_dense"]))  # fmt: skip
    meta = {"dtype": args.dtype, "cache_dtype": args.cache_dtype, "threads": torch.get_num_threads(),
            "layers": args.layers, "repeats": args.repeats, "warmup": args.warmup, "size": args.size,
            "steps": args.steps, "strength": args.strength, "capture_s": capture_s, "cache_bytes": int(cache),
            "cache_parts": dict(cache.items()), "config": config.to_dict(), "loadavg_end": loadavg()}  # fmt: skip
    args.json = args.json or Path(f"benchmarks/results/dit_sdedit_e2e_{args.size}_{args.dtype}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
