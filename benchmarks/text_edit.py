"""Prompt edits through `SparseEditor` vs regenerating densely (issue 4).

Stable Diffusion 1.5 architecture (random weights, built offline: see `sdedit_e2e.py`), `StableDiffusionPipeline`
(text to image) with a DDIM scheduler, 20 steps, classifier-free guidance 7.5. The capture generates "a photo of a red
house by a lake"; the edit asks for "a photo of a blue house by a lake". Random weights give meaningless regions, so
the timed edits use explicit regions (centred ellipses of ~5%, ~15% and ~30% of the image, like FISEdit's object
masks): `editor.edit(prompt=new, region=mask, commit=False)`, every step sparse, the VAE decoder sparse. Dense is
`pipe(prompt=new, ...)` with the same seed. Dense and sparse alternate in one process; medians. The detection
methods are timed separately (`editor.find_region`): that is the overhead an edit without a mask adds.

    python benchmarks/text_edit.py --cache-dtype bfloat16            # 512 px: the capture holds 14.3 GiB
    # On a 24 GiB machine, also set MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576, or glibc keeps
    # freed GiBs and the process is killed for memory (it was, once, in its second region).
    python benchmarks/text_edit.py --size 256 --repeats 3           # quicker
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from sdedit_e2e import sd15_pipeline
from unet_edit import loadavg

from sparsedit import SparseConfig, SparseEditor, TextEditConfig


SOURCE = "a photo of a red house by a lake"
TARGET = "a photo of a blue house by a lake"


def ellipse(size: int, fraction: float) -> torch.Tensor:
    """A centred ellipse (aspect 4:3) covering `fraction` of a `size`x`size` image."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    c = size / 2
    b = math.sqrt(fraction * size * size / (math.pi * 4 / 3))
    return ((xx - c) / (b * 4 / 3)) ** 2 + ((yy - c) / b) ** 2 <= 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.15, 0.30])
    ap.add_argument("--repeats", type=int, default=1, help="timed dense/sparse pairs per region")
    ap.add_argument("--methods", nargs="*", default=["latent_diff", "cross_attention", "noise_diff"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--cache-dtype",
        default="auto",
        help="SparseConfig.cache_dtype: auto (the default: bf16 maps), none (the model's), a dtype",
    )
    ap.add_argument("--input-dilation", type=int, default=2, help="latent pixels (the UNet's input)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/text_edit.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd15_pipeline(dtype).components)
    pipe.set_progress_bar_config(disable=True)
    config = SparseConfig(
        input_dilation=args.input_dilation, cache_dtype=None if args.cache_dtype == "none" else args.cache_dtype
    )
    editor = SparseEditor(pipe, config, text_config=TextEditConfig())
    kw = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": args.size, "width": args.size}
    t0 = time.perf_counter()
    editor.capture(prompt=SOURCE, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    capture_s = time.perf_counter() - t0
    print(f"SD 1.5 architecture txt2img, {args.size} px, {args.steps} steps, CFG {args.guidance}, {args.dtype}, "
          f"cache dtype {args.cache_dtype or args.dtype}, input dilation {args.input_dilation} latent px, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, load {loadavg()}")  # fmt: skip
    print(f"capture {capture_s:.1f} s, cache {editor.cache_bytes / 2**30:.2f} GiB")
    print(f"{'mask':>6} {'region':>7} {'dense s':>8} {'sparse s':>8} {'speed-up':>8} {'MACs ratio':>10} "
          f"{'PSNR in':>8}")  # fmt: skip
    rows = []
    for frac in args.fractions:
        mask = ellipse(args.size, frac)
        dense_t, sparse_t = [], []
        for _ in range(args.repeats):
            gc.collect()
            t0 = time.perf_counter()
            dense = pipe(prompt=TARGET, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
            dense_t.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            sparse = editor.edit(prompt=TARGET, region=mask, commit=False, output_type="pt").images
            sparse_t.append(time.perf_counter() - t0)
        stats = editor.last_stats
        inside = editor.last_region[0]
        row = {
            "mask_fraction": float(mask.float().mean()),
            "region_fraction": stats["region_fraction"],  # after TextEditConfig.dilation
            "dense_s": statistics.median(dense_t),
            "sparse_s": statistics.median(sparse_t),
            "dense_runs": dense_t,
            "sparse_runs": sparse_t,
            "macs_dense": stats["macs_dense"],
            "macs_sparse": stats["macs_sparse"],
            "psnr_in_region": psnr(sparse[..., inside], dense[..., inside]),
            "load": loadavg(),
        }
        row["speedup"] = row["dense_s"] / row["sparse_s"]
        rows.append(row)
        print(f"{100 * row['mask_fraction']:>5.1f}% {100 * row['region_fraction']:>6.1f}% {row['dense_s']:>8.1f} "
              f"{row['sparse_s']:>8.1f} {row['speedup']:>7.2f}x {row['macs_dense'] / row['macs_sparse']:>9.2f}x "
              f"{row['psnr_in_region']:>7.1f}", flush=True)  # fmt: skip
    detection = []
    for method in args.methods:
        t0 = time.perf_counter()
        region = editor.find_region(prompt=TARGET, text_config=TextEditConfig(region=method))
        seconds = time.perf_counter() - t0
        stats = editor.last_stats
        detection.append({"method": method, "seconds": seconds, "detect_seconds": stats["detect_seconds"],
                          "macs_detect": stats["macs_detect"], "macs_dense": stats["macs_dense"],
                          "region_fraction": float(region.float().mean())})  # fmt: skip
        print(f"detect {method:>15}: {seconds:6.1f} s ({stats['macs_detect'] / stats['macs_dense']:.2f} of a dense "
              f"generation's MACs), region {100 * float(region.float().mean()):.1f}%", flush=True)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": "SD 1.5 architecture, random weights, StableDiffusionPipeline, DDIM",
        "size": args.size, "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype,
        "cache_dtype": args.cache_dtype, "input_dilation": args.input_dilation, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "capture_s": capture_s, "cache_bytes": editor.cache_bytes,
        "rows": rows, "detection": detection,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
