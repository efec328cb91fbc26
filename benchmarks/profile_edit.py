"""Where one sparse edit's time goes: per part (plan, gather, compute, scatter, dense layers, everything else) and per
layer, beside the dense forward, from `sparsedit.last_stats(model)["time"]` and `["layers"]`.

    python benchmarks/profile_edit.py --model sd15
    python benchmarks/profile_edit.py --model ddpm-church --fraction 0.01 --top 15

The models and the brush stroke are those of `benchmarks/unet_edit.py` (random weights). The profiled run is a warm
one (the edit's plan is built on the first run and reused, as in a denoising loop); `--cold` profiles the first run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsedit
from sparsedit import SparseConfig


sys.path.insert(0, str(Path(__file__).parent))
from unet_edit import MODELS, build_case, edited_input, forward, loadavg, stroke_region  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_amx() -> bool:
    try:
        return "amx" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15")
    ap.add_argument("--fraction", type=float, default=0.012)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating dense/sparse pairs after one warm-up pair")
    ap.add_argument("--top", type=int, default=12, help="layers to list, slowest first")
    ap.add_argument("--cold", action="store_true", help="profile the edit's first run (plan built in it)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    _, size, batch, _, _, dilation = MODELS[args.model]
    model, x, t, extra, g = build_case(args.model, dtype)
    sparsedit.sparsify_(model, SparseConfig(input_dilation=dilation))
    with torch.no_grad():
        with sparsedit.capturing(model):
            forward(model, x, t, extra)
        region = stroke_region(size, args.fraction, batch)
        x_edit = edited_input(x, region, g)
        dense_t, sparse_t, stats = [], [], None
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            forward(model, x_edit, t, extra)
            t1 = time.perf_counter()
            with sparsedit.editing(model, region=region):
                forward(model, x_edit, t, extra)
                run = sparsedit.last_stats(model)
            if i == 0 and args.cold or i == args.repeats and not args.cold:
                stats = run
            if i:
                dense_t.append(t1 - t0)
                sparse_t.append(run["seconds"])
    dense_s, sparse_s = statistics.median(dense_t), statistics.median(sparse_t)
    macs_ratio = stats["macs_dense"] / max(1, stats["macs_sparse"])
    print(f"{args.model}, {args.dtype}, {100 * float(region.float().mean()):.1f}% stroke, threads {args.threads}, "
          f"CPU {cpu_name()} (AMX: {'yes' if has_amx() else 'no'}), load {loadavg()}")  # fmt: skip
    print(f"dense {dense_s * 1e3:.1f} ms, sparse {sparse_s * 1e3:.1f} ms (median of {args.repeats}): "
          f"{dense_s / sparse_s:.2f}x, MACs {macs_ratio:.1f}x, efficiency {dense_s / sparse_s / macs_ratio:.2f}")  # fmt: skip
    total = stats["seconds"]
    print(f"\nthe profiled {'cold' if args.cold else 'warm'} run: {total * 1e3:.1f} ms")
    for part, sec in stats["time"].items():
        print(f"  {part:<8} {sec * 1e3:8.1f} ms  {100 * sec / total:5.1f}%")
    layers = sorted(stats["layers"], key=lambda r: -r["seconds"])
    print(f"\nslowest {args.top} layer calls:")
    print(f"  {'layer':<58} {'res':>7} {'active':>6} {'ms':>7}  parts (ms)")
    for r in layers[: args.top]:
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["time"].items() if v > 5e-5)
        res = f"{r['resolution'][0]}x{r['resolution'][1]}"
        note = f" [{r['dense_reason']}]" if r["dense_reason"] else ""
        print(
            f"  {r['name'][-58:]:<58} {res:>7} {r['active_fraction']:>6.2f} {r['seconds'] * 1e3:>7.2f}  {parts}{note}"
        )
    by_res: dict[str, list[float]] = {}
    for r in stats["layers"]:
        by_res.setdefault(f"{r['resolution'][0]}x{r['resolution'][1]}", []).append(r["seconds"])
    print("\nby resolution: " + ", ".join(f"{k} {sum(v) * 1e3:.1f} ms" for k, v in by_res.items()))
    out = args.json or Path(f"benchmarks/results/profile_edit_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "cpu": cpu_name(), "amx": has_amx(),
            "loadavg": loadavg(), "dense_s": dense_s, "sparse_s": sparse_s, "macs_ratio": macs_ratio}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "time": stats["time"], "layers": stats["layers"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
