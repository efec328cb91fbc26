"""How much an SD3-shaped SDEdit capture holds at the default, and what a tight `cache_budget` costs an edit (issue 36).

The pipeline of `dit_sdedit_e2e.py` (SD3-medium-shaped transformer, SD3's VAE shape, text-encoder stand-ins with
SD3's output shapes, random weights). First the default editor (`SparseEditor(pipe, SparseConfig(input_dilation=1))`:
keys and values in int8, VAE caches in bf16) captures and edits `--repeats` times (previews, `commit=False`); then it
is removed and an editor with `cache_budget=--budget` does the same (the budget's choice printed: at 1024 px the
transformer's per-step cache streams from disk, the next step's entries prefetched while this one computes). Edit
times are medians; both editors edit the same stroke. The dense pipeline is not run here (see `dit_sdedit_e2e.py`).

    python benchmarks/dit_cache_budget.py --size 1024 --steps 20 --strength 0.6 --budget 4GiB
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from dit_sdedit_e2e import sd3_pipeline
from unet_edit import loadavg, stroke_region

from sparsedit import SparseConfig, SparseEditor
from sparsedit.demo import load_photo


def run(pipe, config, image, edited, kw, repeats):
    editor = SparseEditor(pipe, config)
    t0 = time.perf_counter()
    editor.capture(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    capture_s = time.perf_counter() - t0
    cache, stats = editor.cache_bytes, dict(editor.last_stats)
    print(f"  capture {capture_s:.1f} s, cache {cache / 2**30:.2f} GiB ({dict(cache.items())}, offloaded "
          f"{cache.offloaded / 2**30:.2f} GiB), peak RSS {stats.get('peak_bytes', 0) / 2**30:.2f} GiB, budget "
          f"{stats.get('budget')}, load {loadavg()}", flush=True)  # fmt: skip
    times, out = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = editor.edit(image=edited, commit=False, output_type="pt").images
        times.append(time.perf_counter() - t0)
        print(f"  edit {i}: {times[-1]:.1f} s ({editor.last_stats['unet_time']}), load {loadavg()}", flush=True)
    row = {"capture_s": capture_s, "cache_bytes": int(cache), "cache_parts": dict(cache.items()),
           "offloaded_bytes": int(cache.offloaded), "peak_bytes": stats.get("peak_bytes"),
           "budget": stats.get("budget"), "edit_runs": times, "edit_s": statistics.median(times),
           "ran_dense": editor.last_stats["ran_dense"], "macs_sparse": editor.last_stats["macs_sparse"]}  # fmt: skip
    editor.remove()
    return row, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--fraction", type=float, default=0.02)
    ap.add_argument("--budget", default="4GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = sd3_pipeline(dtype, args.layers)
    photo, source = load_photo(args.size)
    image = (photo / 2 + 0.5).clamp(0, 1)
    region = stroke_region(args.size, args.fraction, 1)
    edited = torch.where(region[:, None], torch.tensor([0.95, 0.1, 0.15])[:, None, None], image).to(dtype)
    kw = {"prompt": "a photo of an astronaut", "strength": args.strength, "num_inference_steps": args.steps,
          "height": args.size, "width": args.size}  # fmt: skip
    print(f"SD3-medium-shaped img2img ({args.layers} blocks), {args.size} px, {args.steps} steps x {args.strength}, "
          f"CFG, {args.dtype}, threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, "
          f"load {loadavg()}, photo: {source}")  # fmt: skip
    print("default (in memory):", flush=True)
    memory, a = run(pipe, SparseConfig(input_dilation=1), image, edited, kw, args.repeats)
    print(f"cache_budget={args.budget}:", flush=True)
    budget, b = run(pipe, SparseConfig(input_dilation=1, cache_budget=args.budget), image, edited, kw, args.repeats)
    ratio = memory["edit_s"] / budget["edit_s"]
    diff = float((a.float() - b.float()).abs().max())
    print(f"edit {memory['edit_s']:.1f} s in memory, {budget['edit_s']:.1f} s under the budget: {ratio:.2f}x the "
          f"in-memory speed; max difference between the two edits {diff:.4f}; load {loadavg()}")  # fmt: skip
    meta = {"size": args.size, "steps": args.steps, "strength": args.strength, "layers": args.layers,
            "dtype": args.dtype, "threads": torch.get_num_threads(), "budget": args.budget,
            "cpu": platform.processor() or platform.machine(), "loadavg_end": loadavg()}  # fmt: skip
    args.json = args.json or Path(f"benchmarks/results/dit_cache_budget_{args.size}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "memory": memory, "budget": budget, "speed_ratio": ratio,
                                     "max_difference": diff}, indent=2, default=str))  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
