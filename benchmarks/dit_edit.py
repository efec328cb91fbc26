"""One diffusion-transformer step, dense vs token-sparse, on real architectures with random weights (issue 36).

`--model sd3-medium`: the SD3-medium transformer shape (`SD3Transformer2DModel`: 24 joint blocks, 1536 wide, 24 heads
of 64, patch 2, 16 latent channels, context 4096 wide), a prompt of 333 tokens (77 CLIP + 256 T5), classifier-free
guidance batch 2. `--size` is the image size in pixels (latents are 1/8). `--layers` reduces the depth to fit a
smaller machine (say so in the results).

A diagonal brush stroke of `--fractions` of the latent gets fresh noise; dense and sparse forwards alternate in one
process (the first pair warms up); medians; MACs counted by hand (attention included), efficiency = speed-up / MACs
ratio, and the error of the sparse step against the dense edited step.

    python benchmarks/dit_edit.py --model sd3-medium --size 512 --dtype float32 --fractions 0.02
    python benchmarks/dit_edit.py --model sd3-medium --size 1024 --dtype bfloat16 --fractions 0.02
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from unet_edit import loadavg, stroke_region

import sparsedit
from sparsedit import SparseConfig


def sd3_medium(layers: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        out_channels=16, pos_embed_max_size=192,
    )  # fmt: skip


# name: (builder, default layers, latent channels, prompt tokens, prompt width, pooled width)
MODELS = {"sd3-medium": (sd3_medium, 24, 16, 333, 4096, 2048)}


def build_case(name: str, layers: int, size: int, batch: int, dtype: torch.dtype):
    build, _, channels, tokens, width, pooled = MODELS[name]
    torch.manual_seed(0)
    model = build(layers).eval()
    model = model if dtype == torch.float32 else model.to(dtype)
    g = torch.Generator().manual_seed(1)
    latent = size // 8
    x = torch.randn(batch, channels, latent, latent, generator=g).to(dtype)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, tokens, width, generator=g).to(dtype),
        "pooled_projections": torch.randn(batch, pooled, generator=g).to(dtype),
        "timestep": torch.full((batch,), 500.0),
    }
    return model, x, kwargs, g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sd3-medium")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (latents are 1/8)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the model's)")
    ap.add_argument("--batch", type=int, default=2, help="2: classifier-free guidance")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dilation", type=int, default=SparseConfig().dilation, help="tokens of dilation")
    ap.add_argument("--context", default="cache", choices=["cache", "recompute"], help="SparseConfig.dit_context")
    ap.add_argument("--cache-dtype", default=None, help="SparseConfig.cache_dtype (default: the model's dtype)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    layers = args.layers or MODELS[args.model][1]
    model, x, kwargs, g = build_case(args.model, layers, args.size, args.batch, dtype)
    config = SparseConfig(
        dilation=args.dilation, dit_context=args.context, cache_dtype=args.cache_dtype, max_region_fraction=1.0
    )
    sparsedit.sparsify_(model, config)
    with torch.no_grad(), sparsedit.capturing(model, calibrate=False):
        t0 = time.perf_counter()
        captured = model(x, **kwargs).sample
        capture_s = time.perf_counter() - t0
    cache_bytes = sparsedit.last_stats(model)["cache_bytes"]
    print(f"{args.model} ({layers} blocks), {args.size} px, batch {args.batch}, {args.dtype}, context {args.context}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, load {loadavg()}, "
          f"capture {capture_s:.1f} s, cache {cache_bytes / 2**20:.0f} MiB")  # fmt: skip
    print(f"{'region':>7} {'tokens':>7} {'dense s':>8} {'sparse s':>8} {'speed-up':>8} {'MACs ratio':>10} "
          f"{'effic.':>6} {'max err':>8} {'PSNR':>6}")  # fmt: skip
    rows = []
    latent = x.shape[-1]
    for frac in args.fractions:
        region = stroke_region(latent, frac, args.batch)
        x_edit = torch.where(region[:, None], torch.randn(x.shape, generator=g).to(dtype), x)
        dense_t, sparse_t = [], []
        with torch.no_grad():
            for i in range(args.repeats + 1):  # the first pair warms up
                t0 = time.perf_counter()
                dense = model(x_edit, **kwargs).sample
                t1 = time.perf_counter()
                with sparsedit.editing(model, region=region):
                    t2 = time.perf_counter()
                    sparse = model(x_edit, **kwargs).sample
                    t3 = time.perf_counter()
                    stats = sparsedit.last_stats(model)
                if i:
                    dense_t.append(t1 - t0)
                    sparse_t.append(t3 - t2)
                print(f"  pair {i}: dense {t1 - t0:.2f} s, sparse {t3 - t2:.2f} s, load {loadavg()}", flush=True)
        err = (sparse.float() - dense.float()).abs()
        mse = float(err.square().mean())
        peak = float(dense.float().amax() - dense.float().amin())
        row = {
            "region_fraction": float(region.float().mean()),
            "token_fraction": stats["layers"][0]["active_fraction"],
            "dense_s": statistics.median(dense_t),
            "sparse_s": statistics.median(sparse_t),
            "dense_runs": dense_t,
            "sparse_runs": sparse_t,
            "macs_dense": stats["macs_dense"],
            "macs_sparse": stats["macs_sparse"],
            "max_abs_error": float(err.max()),
            "edit_effect_max": float((dense.float() - captured.float()).abs().max()),
            "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
        }
        row["speedup"] = row["dense_s"] / row["sparse_s"]
        row["macs_ratio"] = row["macs_dense"] / max(1, row["macs_sparse"])
        row["efficiency"] = row["speedup"] / row["macs_ratio"]
        rows.append(row)
        print(
            f"{100 * row['region_fraction']:>6.1f}% {100 * row['token_fraction']:>6.1f}% {row['dense_s']:>8.2f} "
            f"{row['sparse_s']:>8.2f} {row['speedup']:>7.2f}x {row['macs_ratio']:>9.1f}x {row['efficiency']:>6.2f} "
            f"{row['max_abs_error']:>8.3f} {row['psnr_db']:>6.1f}"
        )
    meta = {"model": args.model, "layers": layers, "size": args.size, "batch": args.batch, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "config": config.to_dict(),
            "cpu": platform.processor() or platform.machine(), "loadavg_end": loadavg(), "cache_bytes": cache_bytes,
            "capture_s": capture_s}  # fmt: skip
    args.json = args.json or Path(f"benchmarks/results/dit_edit_{args.model}_{args.size}_{args.dtype}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
