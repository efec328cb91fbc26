"""Dense vs sparse on a conv stack shaped like one Stable Diffusion 1.5 UNet level.

C=320 at 64x64 (the latent resolution of a 512 px image), batch 2 (classifier-free guidance), three GroupNorm+SiLU
ResNet blocks (six 3x3 convs). Regions of ~1%, ~5% and ~20% of the map; dense and sparse runs alternate in one
process; the median of the timed runs is reported with MACs, the error against the dense edited result, dtype, thread
count and /proc/loadavg.

    python benchmarks/conv_stack.py                       # the table in BENCHMARKS.md
    python benchmarks/conv_stack.py --tiles 4 8 16        # tile-size sweep
    python benchmarks/conv_stack.py --device cuda --dtypes float16 bfloat16 --fractions 0.01 0.05

On CUDA (`--device cuda`) every timed region is synchronized before the clock is read and the GPU's name is recorded;
inputs are drawn on the CPU and moved.
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
import torch.nn as nn
from bench_args import device_args

import sparsedit
from sparsedit import SparseConfig


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` before a host clock is read (CUDA runs asynchronously); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(channels: int, blocks: int, dtype: torch.dtype, memory_format=torch.channels_last) -> nn.Module:
    torch.manual_seed(0)
    layers = [sparsedit.nn.ResBlock(channels, channels, groups=32, eps=1e-5) for _ in range(blocks)]
    return nn.Sequential(*layers).eval().to(dtype).to(memory_format=memory_format)


def disk_region(size: int, fraction: float, batch: int) -> torch.Tensor:
    """A filled disk covering `fraction` of the map, off-centre (as a brush edit would be)."""
    r = math.sqrt(fraction * size * size / math.pi)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = 0.37 * size, 0.58 * size
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return disk[None].expand(batch, -1, -1).contiguous()


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()
    except OSError:
        return "n/a"


def measure(model, x, x_edit, region, repeats: int, warmup: int = 2):
    dense_t, sparse_t = [], []
    device = x_edit.device
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            dense = model(x_edit)
            sync(device)
            t1 = time.perf_counter()
            with sparsedit.editing(model, region=region):
                sync(device)
                t2 = time.perf_counter()
                sparse = model(x_edit)
                sync(device)
                t3 = time.perf_counter()
                stats = sparsedit.last_stats(model)
            if i >= warmup:
                dense_t.append(t1 - t0)
                sparse_t.append(t3 - t2)
    return dense, sparse, statistics.median(dense_t), statistics.median(sparse_t), stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.20])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--tiles", type=int, nargs="+", default=[8])
    ap.add_argument("--dilation", type=int, default=1, help="SparseConfig.dilation: pixels added at every resolution")
    ap.add_argument("--repeats", type=int, default=7)
    device_args(ap)
    ap.add_argument(
        "--memory-format",
        choices=["channels_last", "contiguous"],
        default="channels_last",
        help="layout of weights and input; channels-last is the faster dense baseline on CPU",
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/conv_stack.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    fallback = {"measured_fallback": False} if args.no_measured_fallback else {}

    rows = []
    header = f"{'dtype':<9} {'region':>7} {'tile':>4} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8} "
    header += f"{'MACs ratio':>10} {'max err':>9} {'PSNR dB':>8}"
    print(f"torch {torch.__version__}, {platform.machine()}{gpu}, threads {torch.get_num_threads()}, load {loadavg()}")
    print(header)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for tile in args.tiles:
            fmt = getattr(
                torch, f"{args.memory_format}_format" if args.memory_format == "contiguous" else "channels_last"
            )
            model = build(args.channels, args.blocks, dtype, fmt).to(device)
            sparsedit.sparsify_(model, SparseConfig(tile_size=tile, dilation=args.dilation, **fallback))
            g = torch.Generator().manual_seed(1)
            x = torch.randn(args.batch, args.channels, args.size, args.size, generator=g).to(dtype)
            x = x.contiguous(memory_format=fmt).to(device)
            with sparsedit.capturing(model):
                model(x)
            for frac in args.fractions:
                region = disk_region(args.size, frac, args.batch).to(device)
                noise = torch.randn(x.shape, generator=g).to(dtype).to(device)
                x_edit = torch.where(region[:, None], x + noise, x).contiguous(memory_format=fmt)
                dense, sparse, td, ts, stats = measure(model, x, x_edit, region, args.repeats)
                err = (sparse.float() - dense.float()).abs()
                peak = float(dense.float().amax() - dense.float().amin())
                mse = float(err.square().mean())
                row = {
                    "dtype": dtype_name,
                    "region_fraction": float(region.float().mean()),
                    "tile": tile,
                    "dense_ms": td * 1e3,
                    "sparse_ms": ts * 1e3,
                    "speedup": td / ts,
                    "macs_dense": stats["macs_dense"],
                    "macs_sparse": stats["macs_sparse"],
                    "macs_ratio": stats["macs_dense"] / max(1, stats["macs_sparse"]),
                    "max_abs_error": float(err.max()),
                    "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
                    "dense_layers": stats["dense_layers"],
                }
                rows.append(row)
                print(
                    f"{dtype_name:<9} {100 * row['region_fraction']:>6.1f}% {tile:>4} {row['dense_ms']:>9.1f} "
                    f"{row['sparse_ms']:>9.1f} {row['speedup']:>7.2f}x {row['macs_ratio']:>9.1f}x "
                    f"{row['max_abs_error']:>9.2e} {row['psnr_db']:>8.1f}"
                )
            sparsedit.unsparsify_(model)
    meta = {
        "benchmark": "conv_stack",
        "shape": [args.batch, args.channels, args.size, args.size],
        "blocks": args.blocks,
        "threads": torch.get_num_threads(),
        "memory_format": args.memory_format,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "loadavg_end": loadavg(),
        "config": f"SparseConfig(tile_size=tile, dilation={args.dilation}) (approximate mode, frozen GroupNorm statistics)",
    }
    if args.no_measured_fallback:
        meta["measured_fallback"] = False
    if device.type == "cuda":
        meta.update(device=str(device), device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
