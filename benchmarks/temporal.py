"""Temporal reuse (issue 5): encoder propagation, parallel decoding, deep reuse and their combination, against dense.

Stable Diffusion 1.5 architecture (random weights, built offline), `StableDiffusionPipeline` with DDIM, 256 px by
default (32x32 latents; 512 px takes ~4x longer per run), 20 steps, classifier-free guidance 7.5, `output_type="latent"`
(the VAE decode is the same for every mode and left out). The modes run one after another in each round, rounds
repeat, medians. Drift: relative L2 distance of the final latent from the dense one, same seed. MACs: one whole step
and one reusing step of each mode, profiled (`sparsedit.profiling`), times the schedule's counts.

Then one sparse edit (img2img, a ~5% stroke, strength 0.7) through `SparseEditor` without and with temporal reuse,
each against the dense pipeline run alternately.

    python benchmarks/temporal.py                     # 256 px
    python benchmarks/temporal.py --size 512 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from sdedit_e2e import sd15_pipeline
from unet_edit import loadavg, stroke_region

from sparsedit import (
    SparseConfig,
    SparseEditor,
    TemporalConfig,
    last_stats,
    profiling,
    sparsify_,
    temporal,
    unsparsify_,
)
from sparsedit.demo import load_photo


def modes(steps: int) -> dict[str, TemporalConfig | None]:
    return {
        "dense": None,
        "encoder propagation": TemporalConfig(parallel=False),
        "encoder propagation, parallel": TemporalConfig(parallel=True),
        "deep reuse (every 3)": TemporalConfig(reuse="deep", every=3, skip_level=1),
        "deep reuse (every 3), skip level 0": TemporalConfig(reuse="deep", every=3, skip_level=0),
        "deep reuse, paper key steps": TemporalConfig(reuse="deep", skip_level=1),
        "encoder+deep, paper key steps": TemporalConfig(reuse="encoder+deep", skip_level=1),
        "encoder+deep, paper key steps, parallel": TemporalConfig(reuse="encoder+deep", skip_level=1, parallel=True),
        "encoder+deep (every 3), parallel": TemporalConfig(reuse="encoder+deep", every=3, skip_level=1, parallel=True),
    }


def generate(pipe, args):
    return pipe("a photo of an astronaut", num_inference_steps=args.steps, height=args.size, width=args.size,
                guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def step_macs(pipe, cfg: TemporalConfig | None, args) -> tuple[int, int]:
    """MACs of a whole step and of a reusing step (one UNet call each, guidance batched)."""
    unet = pipe.unet
    sparsify_(unet, SparseConfig())
    per_call = []
    handle = unet.register_forward_hook(lambda *a: per_call.append(last_stats(unet)["macs_dense"]))
    # Parallel mode does the same work as sequential, batched: profile it sequentially.
    probe = TemporalConfig(
        **{**(cfg or TemporalConfig()).to_dict(), "key_steps": [0], "every": None, "parallel": False}
    )
    temporal.enable(pipe, probe)
    with profiling(unet):
        pipe("a photo", num_inference_steps=2, height=args.size, width=args.size, output_type="latent")
    temporal.disable(pipe)
    handle.remove()
    unsparsify_(unet)
    return per_call[0], per_call[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edit-fraction", type=float, default=0.05)
    ap.add_argument("--skip-edit", action="store_true", help="leave out the sparse-edit section")
    ap.add_argument("--edit-only", action="store_true", help="run only the sparse-edit section")
    ap.add_argument("--modes", nargs="+", metavar="SUBSTRING",
                    help="run only the modes whose names contain one of these (dense always runs)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/temporal.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    img2img = sd15_pipeline(torch.float32)
    pipe = StableDiffusionPipeline(**img2img.components)
    pipe.set_progress_bar_config(disable=True)
    print(f"SD 1.5 architecture txt2img, {args.size} px, {args.steps} steps DDIM, CFG 7.5, float32, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, load {loadavg()}")  # fmt: skip
    configs = modes(args.steps)
    if args.modes:
        configs = {k: v for k, v in configs.items() if v is None or any(m in k for m in args.modes)}
    if args.edit_only:
        configs = {}
    times = {name: [] for name in configs}
    latents = {}
    if configs:
        generate(pipe, args)  # warm-up
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            if cfg is not None:
                temporal.enable(pipe, cfg)
            t0 = time.perf_counter()
            latents[name] = generate(pipe, args)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)  # partial results survive an interrupted run
            if cfg is not None:
                temporal.disable(pipe)
    rows = []
    full = step_macs(pipe, None, args)[0] if configs else None
    if configs:
        dense_s = statistics.median(times["dense"])
        ref = latents["dense"].float()
        print(f"{'mode':<42} {'key steps':>9} {'s':>7} {'speed-up':>8} {'MACs ratio':>10} {'drift':>7}")
    for name, cfg in configs.items():
        keys = len(cfg.key_steps_for(args.steps)) if cfg is not None else args.steps
        reuse_macs = step_macs(pipe, cfg, args)[1] if cfg is not None else full
        macs = keys * full + (args.steps - keys) * reuse_macs
        s = statistics.median(times[name])
        drift = float((latents[name].float() - ref).norm() / ref.norm())
        row = {"mode": name, "config": cfg.to_dict() if cfg else None, "key_steps": keys, "seconds": s,
               "times": times[name], "speedup": dense_s / s, "macs": macs, "macs_ratio": args.steps * full / macs,
               "drift": drift}  # fmt: skip
        rows.append(row)
        print(f"{name:<42} {keys:>9} {s:>7.1f} {row['speedup']:>7.2f}x {row['macs_ratio']:>9.2f}x {drift:>7.4f}")
    edit_rows = [] if args.skip_edit else sparse_edit(img2img, args)
    meta = {"size": args.size, "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "dtype": "float32", "loadavg_end": loadavg(), "step_macs": full}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "edit": edit_rows}, indent=2, default=float))
    print(f"load at end {loadavg()}; wrote {args.json}")


def sparse_edit(pipe, args) -> list[dict]:
    """One stroke edit through SparseEditor without and with temporal reuse, each against the dense pipeline."""
    photo, _ = load_photo(args.size)
    image = (photo / 2 + 0.5).clamp(0, 1)
    region = stroke_region(args.size, args.edit_fraction, 1)
    edited = torch.where(region[:, None], torch.tensor([0.95, 0.1, 0.15])[:, None, None], image)
    kw = {"prompt": "a photo of an astronaut", "strength": 0.7, "num_inference_steps": args.steps}
    rows = []
    print(f"sparse edit, img2img, {100 * args.edit_fraction:.0f}% stroke, strength 0.7:")
    for name, cfg in [("sparse", None), ("sparse + encoder propagation", TemporalConfig()),
                      ("sparse + deep reuse (every 3)", TemporalConfig(reuse="deep", every=3))]:  # fmt: skip
        editor = SparseEditor(pipe, SparseConfig(input_dilation=2), temporal=cfg)
        editor.capture(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
        dense_t, sparse_t = [], []
        for i in range(args.repeats + 1):  # the first pair warms up
            t0 = time.perf_counter()
            sparse = editor.edit(image=edited, commit=False, output_type="pt").images
            t1 = time.perf_counter()
            stats = dict(editor.last_stats)
            # The dense reference is the plain pipeline; the editor's hooks stay attached, idle (outside its loops
            # they compute nothing of their own).
            dense = pipe(image=edited, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
            t2 = time.perf_counter()
            if i:
                sparse_t.append(t1 - t0)
                dense_t.append(t2 - t1)
        editor.remove()
        row = {"mode": name, "dense_s": statistics.median(dense_t), "sparse_s": statistics.median(sparse_t),
               "macs_dense": stats["macs_dense"], "macs_sparse": stats["macs_sparse"],
               "max_abs_error": float((sparse - dense).abs().max()), "region_fraction": stats["region_fraction"]}  # fmt: skip
        row["speedup"] = row["dense_s"] / row["sparse_s"]
        row["macs_ratio"] = row["macs_dense"] / row["macs_sparse"]
        rows.append(row)
        print(f"  {name:<32} dense {row['dense_s']:.1f} s, sparse {row['sparse_s']:.1f} s: {row['speedup']:.2f}x, "
              f"MACs {row['macs_ratio']:.2f}x, max error vs dense {row['max_abs_error']:.3f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
