"""End-to-end SDEdit through `SparseEditor` vs the plain diffusers pipeline (issue 3, benchmark d).

Stable Diffusion 1.5 architecture (UNet 320/640/1280/1280 with cross-attention 768, the SD VAE, a 12-layer CLIP text
encoder of width 768), random weights, built offline. `StableDiffusionImg2ImgPipeline` with a DDIM scheduler,
`skimage.data.astronaut()` at 512 px, strength 0.7, 20 steps (14 denoising steps), classifier-free guidance. The edit
is a brush stroke covering ~1% (and ~5%) of the image. Dense (`pipe(image=edited, ...)`, the VAE encoder, every UNet
step and the VAE decoder) and sparse (`editor.edit(image=edited, commit=False)`) runs alternate in one process;
medians; MACs from `editor.last_stats`; PSNR of the sparse result against the dense result of the same edit.

    python benchmarks/sdedit_e2e.py                       # fp32 cache (needs ~20 GiB of RAM at 512 px)
    python benchmarks/sdedit_e2e.py --cache-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from unet_edit import PIPELINE_HEADER, alternate, loadavg, pipeline_row, sd15, sd_vae, stroke_region

from sparsedit import SparseConfig, SparseEditor
from sparsedit.demo import load_photo
from sparsedit.testing import clip_text_encoder


def sd15_pipeline(dtype):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    tokenizer, text_encoder = clip_text_encoder(
        tempfile.mkdtemp(), 768, layers=12, heads=12, intermediate=3072, length=77
    )
    vae = sd_vae().eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=sd15().eval(),
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.7)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed dense/sparse pairs before the timed ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--cache-dtype",
        default="auto",
        help="SparseConfig.cache_dtype: auto (the default: bf16 maps), none (the model's), a dtype",
    )
    ap.add_argument("--input-dilation", type=int, default=2, help="latent pixels (the UNet's input)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/sdedit_e2e.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = sd15_pipeline(dtype)
    config = SparseConfig(
        input_dilation=args.input_dilation, cache_dtype=None if args.cache_dtype == "none" else args.cache_dtype
    )
    editor = SparseEditor(pipe, config)
    photo, source = load_photo(args.size)
    image = (photo / 2 + 0.5).clamp(0, 1)  # the pipeline's tensor convention: [0, 1]
    kw = {"prompt": "a photo of an astronaut", "strength": args.strength, "num_inference_steps": args.steps}
    t0 = time.perf_counter()
    editor.capture(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    capture_s = time.perf_counter() - t0
    cache = editor.cache_bytes
    print(f"SD 1.5 architecture img2img, {args.size} px, {args.steps} steps x strength {args.strength}, "
          f"{args.dtype}, cache dtype {args.cache_dtype or args.dtype}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, {platform.machine()}, load {loadavg()}")  # fmt: skip
    print(f"capture {capture_s:.1f} s, cache {cache / 2**30:.2f} GiB, photo: {source}")
    print(PIPELINE_HEADER)
    rows = []
    for frac in args.fractions:
        region = stroke_region(args.size, frac, 1)
        edited = torch.where(region[:, None], torch.tensor([0.95, 0.1, 0.15])[:, None, None], image)
        dense_t, sparse_t, dense, sparse = alternate(
            lambda: pipe(image=edited, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images,
            lambda: editor.edit(image=edited, commit=False, output_type="pt").images,
            args.repeats, args.warmup,
        )  # fmt: skip
        stats = editor.last_stats
        rows.append(pipeline_row(stats, dense_t, sparse_t, dense, sparse, active_fraction=stats["active_fraction"]))
    meta = {"dtype": args.dtype, "cache_dtype": args.cache_dtype, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "warmup": args.warmup, "size": args.size, "steps": args.steps, "strength": args.strength,
            "capture_s": capture_s, "cache_bytes": cache, "config": config.to_dict(), "loadavg_end": loadavg()}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
