"""GauGAN label edits, dense vs sparse: the SPADE generator in its Cityscapes configuration (256x512, 35 classes +
instance edges, ngf 64, "more" upsampling layers; random weights with random BatchNorm statistics), batch 1.

A synthetic street-scene label map (sky, buildings, vegetation, road, sidewalk, cars with instance ids) is edited by
painting a rectangle of another class covering ~1.2%, ~5% and ~20% of the image. For each edit, `GANEditor.edit`
(uncommitted) and the plain generator alternate in one process; medians of `--repeats` runs. Two modes: exact
(regions propagated through every kernel's reach; equal to dense to float tolerance) and approximate (SIGE's fixed
per-resolution masks; the error against dense is reported). MACs from
the engine's per-layer accounting; the error is the sparse result's max |difference| from the dense one.

    python benchmarks/gan_edit.py
    python benchmarks/gan_edit.py --fractions 0.012 --repeats 9 --tile 4
    python benchmarks/gan_edit.py --fractions 0.012 --dtype float16 --device cuda

On CUDA (`--device cuda`) every timed region is synchronized before the clock is read and the GPU's name is recorded;
the label maps are painted on the CPU and moved.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_args import device_args
from unet_edit import device_label, device_meta, loadavg, sync

from sparsedit import GANEditor, SparseConfig
from sparsedit.models import SPADEGenerator
from sparsedit.testing import paint_labels, randomize_batchnorm, street_scene


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.012, 0.05, 0.2])
    ap.add_argument("--repeats", type=int, default=5)
    device_args(ap)
    ap.add_argument(
        "--tile",
        type=int,
        default=None,
        help="output tile edge (default: 4 exact, 8 approximate; 0: the engine's default, "
        "SparseConfig(tile_size=None), which GANEditor uses)",
    )
    ap.add_argument("--modes", nargs="+", choices=["exact", "approximate"], default=["exact", "approximate"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/gan_edit.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = randomize_batchnorm(SPADEGenerator.cityscapes()).to(dtype).to(device)
    labels_cpu, instance_cpu = street_scene()
    labels, instance = labels_cpu.to(device), instance_cpu.to(device)
    fallback = {"measured_fallback": False} if args.no_measured_fallback else {}
    configs = {
        "exact": SparseConfig(exact=True, tile_size=4 if args.tile is None else (args.tile or None), **fallback),
        # SIGE's GauGAN setting: fixed per-resolution masks (the label change dilated by 1, resampled, dilated by 1)
        "approximate": SparseConfig(
            exact=False, input_dilation=1, dilation=1, tile_size=8 if args.tile is None else (args.tile or None),
            **fallback,
        ),
    }  # fmt: skip
    configs = {k: v for k, v in configs.items() if k in args.modes}
    print(f"GauGAN Cityscapes 256x512, batch 1, {args.dtype}, threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}, {platform.machine()}{device_label(device)}, load {loadavg()}")  # fmt: skip
    rows = []
    for mode, config in configs.items():
        editor = GANEditor(model, config)
        with torch.no_grad():
            editor.capture(labels, instance)
        macs_dense = editor.last_stats["macs_dense"]
        print(f"{mode}: {config.to_dict()}")
        print(f"capture {editor.last_stats['seconds']:.2f} s, cache {editor.last_stats['cache_bytes'] / 2**20:.0f} "
              f"MiB, {macs_dense / 1e9:.1f} GMACs dense")  # fmt: skip
        print(f"{'edit':>6} {'changed':>8} {'dense s':>8} {'sparse s':>9} {'speed-up':>8} {'MACs ratio':>10} "
              f"{'max err':>8}")  # fmt: skip
        for fraction in args.fractions:
            new, inst = (t.to(device) for t in paint_labels(labels_cpu, instance_cpu, fraction))
            dense_t, sparse_t = [], []
            for i in range(args.repeats + 1):  # the first pair warms up
                sync(device)
                t0 = time.perf_counter()
                sparse = editor.edit(new, inst, commit=False)
                sync(device)
                t1 = time.perf_counter()
                with torch.no_grad():
                    dense = model(new, inst)
                sync(device)
                t2 = time.perf_counter()
                if i:
                    sparse_t.append(t1 - t0)
                    dense_t.append(t2 - t1)
            stats = editor.last_stats
            row = {
                "mode": mode,
                "config": config.to_dict(),
                "fraction": fraction,
                "changed_fraction": stats["region_fraction"],
                "dense_s": statistics.median(dense_t),
                "sparse_s": statistics.median(sparse_t),
                "dense_times": dense_t,
                "sparse_times": sparse_t,
                "macs_dense": stats["macs_dense"],
                "macs_sparse": stats["macs_sparse"],
                "max_abs_error": float((sparse.float() - dense.float()).abs().max()),
                "dense_layers": stats["dense_layers"],
            }
            row["speedup"] = row["dense_s"] / row["sparse_s"]
            row["macs_ratio"] = row["macs_dense"] / max(1, row["macs_sparse"])
            rows.append(row)
            print(f"{100 * fraction:>5.1f}% {100 * row['changed_fraction']:>7.2f}% {row['dense_s']:>8.3f} "
                  f"{row['sparse_s']:>9.3f} {row['speedup']:>7.2f}x {row['macs_ratio']:>9.2f}x "
                  f"{row['max_abs_error']:>8.1e}", flush=True)  # fmt: skip
        editor.remove()
    meta = {"model": "SPADEGenerator.cityscapes()", "dtype": args.dtype, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "torch": torch.__version__, "loadavg_end": loadavg(), **device_meta(device)}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
