"""Thin models, dense vs sparse (issue 39): models of 64-256 channels written the way users write them.

    python benchmarks/thin_models.py                    # every case, 7 alternating pairs
    python benchmarks/thin_models.py --cases resnet-gen --repeats 5

Cases (random weights, `sparsedit.testing`'s user-style modules, no sparsedit layers in them):
- `user-cnn`: `UserSRNet`, a super-resolution CNN (64 channels, 17 3x3 convs, PReLU, a Python residual, PixelShuffle
  x4), 256 px input, exact mode.
- `resnet-gen`: `UserResnetGenerator`, the pix2pix/CycleGAN ResNet generator (9 blocks, InstanceNorm,
  ReflectionPad2d, the residual added in Python), 512 px, approximate mode (InstanceNorm statistics frozen).
- `bn-trunk`, `unet-level`: `make report`'s two small models (`sparsedit.demo.bn_stack`, exact; `UNetLevel`,
  approximate, frozen GroupNorm statistics), 256 px.
- `resnet-gen-exact`: the same generator in exact mode, where the InstanceNorm after the first convolution makes
  every later layer change everywhere: the whole forward should cost what dense costs.

The edit is a brush stroke covering ~1% of the input (`--fraction`). Dense and sparse runs alternate in one process
(`--repeats` timed pairs after two warm-up pairs); the medians are reported with the engine's MACs, the speed-up's
share of the MACs ratio (efficiency), the error against the dense result (max and PSNR over the output's range),
thread count and /proc/loadavg.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
from bench_args import device_args
from conv_stack import measure
from unet_edit import device_label, loadavg

import sparsedit
from sparsedit import SparseConfig
from sparsedit.testing import UserResnetGenerator, UserSRNet


def _report(name):
    from sparsedit.demo import UNetLevel, bn_stack

    torch.manual_seed(0)
    return bn_stack() if name == "bn" else UNetLevel().eval()


CASES = {
    "user-cnn": {"build": lambda: UserSRNet(64, 13), "size": 256, "exact": True},
    "resnet-gen": {"build": lambda: UserResnetGenerator(64, 9), "size": 512, "exact": False},
    "resnet-gen-exact": {"build": lambda: UserResnetGenerator(64, 9), "size": 512, "exact": True},
    "bn-trunk": {"build": lambda: _report("bn"), "size": 256, "exact": True},
    "unet-level": {"build": lambda: _report("unet"), "size": 256, "exact": False},
}


def stroke(size: int, fraction: float) -> torch.Tensor:
    """A brush stroke (a thick arc) covering about `fraction` of a `size` x `size` image, `[1, H, W]` bool."""
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    r = ((yy - 0.75) ** 2 + (xx - 0.45) ** 2).sqrt()
    lo, hi = 0.30, 0.30
    while True:  # widen the ring until it covers the fraction, on the upper-left arc only
        hi += 0.5 / size
        m = (r >= lo) & (r <= hi) & (xx < 0.55) & (yy < 0.6)
        if float(m.float().mean()) >= fraction:
            return m[None]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=None, help="input size (default: each case's)")
    device_args(ap)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/thin_models.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fallback = {"measured_fallback": False} if args.no_measured_fallback else {}
    print(f"torch {torch.__version__}, {platform.machine()} {device_label(device)}, threads {torch.get_num_threads()}, "
          f"load {loadavg()}")  # fmt: skip
    print(f"{'case':<17} {'region':>6} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8} {'MACs ratio':>10} "
          f"{'eff.':>5} {'max err':>9} {'PSNR dB':>8}  dense layers")  # fmt: skip
    rows = []
    for name in args.cases:
        case = CASES[name]
        size = args.size or case["size"]
        torch.manual_seed(0)
        model = case["build"]().eval().to(dtype).to(memory_format=torch.channels_last).to(device)
        g = torch.Generator().manual_seed(1)
        x = torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1, size=size,
                                            mode="bilinear")  # fmt: skip
        x = x.to(dtype).contiguous(memory_format=torch.channels_last).to(device)
        region = stroke(size, args.fraction).to(device)
        color = torch.tensor([0.9, -0.6, 0.2], dtype=dtype, device=device).view(1, 3, 1, 1)
        x_edit = torch.where(region[:, None], color, x).contiguous(memory_format=torch.channels_last)
        sparsedit.sparsify_(model, SparseConfig(exact=case["exact"], **fallback))
        with torch.no_grad(), sparsedit.capturing(model):
            model(x)
        dense, sparse, td, ts, stats = measure(model, x, x_edit, region, args.repeats)
        err = (sparse.float() - dense.float()).abs()
        peak = float(dense.float().amax() - dense.float().amin())
        mse = float(err.square().mean())
        macs_ratio = stats["macs_dense"] / max(1, stats["macs_sparse"])
        row = {
            "case": name, "size": size, "exact": case["exact"], "dtype": args.dtype,
            "region_fraction": float(region.float().mean()), "dense_ms": td * 1e3, "sparse_ms": ts * 1e3,
            "speedup": td / ts, "macs_dense": stats["macs_dense"], "macs_sparse": stats["macs_sparse"],
            "macs_ratio": macs_ratio, "efficiency": td / ts / macs_ratio, "max_abs_error": float(err.max()),
            "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
            "dense_layers": len(stats["dense_layers"]), "dense_run": stats.get("dense_run"),
        }  # fmt: skip
        rows.append(row)
        print(f"{name:<17} {100 * row['region_fraction']:>5.2f}% {row['dense_ms']:>9.1f} {row['sparse_ms']:>9.1f} "
              f"{row['speedup']:>7.2f}x {macs_ratio:>9.1f}x {row['efficiency']:>5.2f} {row['max_abs_error']:>9.2e} "
              f"{row['psnr_db']:>8.1f}  {row['dense_layers']} {row['dense_run'] or ''}", flush=True)  # fmt: skip
        sparsedit.unsparsify_(model)
    meta = {"benchmark": "thin_models", "threads": torch.get_num_threads(), "repeats": args.repeats,
            "torch": torch.__version__, "device": device_label(device), "loadavg_end": loadavg(),
            "measured_fallback": not args.no_measured_fallback}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
