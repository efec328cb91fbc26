"""Every shipped scene model at its native size, as the web editor runs it: a sparse edit against the dense call.

    python benchmarks/shipped_models.py                    # 64 px, 5 alternating pairs per model
    python benchmarks/shipped_models.py --size 128 --repeats 7

The demo's scene and brush stroke (`sparsedit.demo.scene_inputs`: a lake painted into a meadow, about 4% of the
image). Each model with the editor's default config (the measured sparse-or-dense fallback on, as users get it):

- scene-ddpm: SDEdit through `SparseEditor` (50 steps x 0.5) against the editor's own dense loop on the edited
  image (`DDPMPipeline` has no image input; the capture is that loop);
- scene-sd-img2img: `SparseEditor` (20 steps x 0.7, guidance as the server uses it) against
  `StableDiffusionImg2ImgPipeline(image=edited)` with the same seed;
- scene-spade: `GANEditor.edit` of the label map against the plain generator;
- scene-dit: the 256 px transformer (always at 256 px, its native size; `--dit-weights` for a file not yet installed)
  as the web editor runs it: `SparseEditor` with the server's config (20 steps x 0.6, guidance as served, the SD3
  adapter's input dilation of 1: one token) against `StableDiffusion3Img2ImgPipeline(image=edited)` with the same seed.

The capture (what the web editor shows as its "dense run") and the first edit after it (it builds the plan; any
weight packing happens there) are timed apart, then `--repeats` pairs alternate uncommitted edits and dense calls;
medians. PSNR of the sparse result against the dense
one (images in [0, 1]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
from profile_edit import cpu_name
from unet_edit import loadavg

from sparsedit import GANEditor, pretrained
from sparsedit.data import captions
from sparsedit.demo import scene_inputs
from sparsedit.editors import SparseEditor
from sparsedit.editors.editor import family_config
from sparsedit.serve.models import SCENE_DIT_GUIDANCE, SCENE_SD_GUIDANCE, ddpm_sdedit
from sparsedit.spatial import SparseConfig


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).square().mean())
    return 10 * math.log10(1 / mse) if mse else math.inf


def plain_sdedit(pipe, image: torch.Tensor, strength: float, steps: int, seed: int) -> torch.Tensor:
    """The server's plain SDEdit loop (`serve.models.ddpm_sdedit`) on an image in [0, 1]."""
    with torch.no_grad():
        x = ddpm_sdedit(pipe, image * 2 - 1, strength, steps, torch.Generator().manual_seed(seed))
    return (x / 2 + 0.5).clamp(0, 1)


def default_editor(pipe, override: dict) -> SparseEditor:
    """A `SparseEditor` with the pipeline family's default config (as `SparseEditor(pipe)` and the server's sessions
    make it), with `override`'s fields replaced."""
    return SparseEditor(pipe, dataclasses.replace(family_config(pipe), **override))


def pairs(edit, dense, repeats: int):
    first_t = time.perf_counter()
    sparse_out = edit()
    first = time.perf_counter() - first_t
    ts, td = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sparse_out = edit()
        t1 = time.perf_counter()
        dense_out = dense()
        t2 = time.perf_counter()
        ts.append(t1 - t0)
        td.append(t2 - t1)
    return sparse_out, dense_out, first, statistics.median(ts), statistics.median(td)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["scene-ddpm", "scene-sd-img2img", "scene-spade"])
    ap.add_argument("--dit-weights", default=None, help="scene-dit's weights file (default: the installed one)")
    ap.add_argument("--no-measured-fallback", action="store_true", help="sparse edits never fall back to dense")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/shipped_models.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fallback = {"measured_fallback": False} if args.no_measured_fallback else {}
    print(f"threads {torch.get_num_threads()}, load {loadavg()}")
    print(f"{'model':<18} {'capture ms':>10} {'first ms':>9} {'sparse ms':>9} {'dense ms':>9} {'speed-up':>8} {'MACs ratio':>10} "
          f"{'PSNR dB':>8}  dense run")  # fmt: skip
    rows = []
    for name in args.models:
        seed = 7
        size = 256 if name == "scene-dit" else args.size
        inputs = scene_inputs(size)
        image, stroke = (inputs["image"] + 1) / 2, (inputs["stroke"] + 1) / 2  # [0, 1], as pipelines take images
        prompt = captions.caption(inputs["labels"][0])
        if name == "scene-ddpm":
            pipe = pretrained.load("scene-ddpm", size=args.size)
            kw = {"strength": 0.5, "num_inference_steps": 50, "output_type": "pt"}
            reference = SparseEditor(pipe)  # the editor's dense loop on the edited image: what PSNR compares with
            target = reference.capture(image=stroke, generator=torch.Generator().manual_seed(seed), **kw).images
            reference.remove()
            editor = default_editor(pipe, fallback)
            t0 = time.perf_counter()
            editor.capture(image=image, generator=torch.Generator().manual_seed(seed), **kw)
            capture = time.perf_counter() - t0

            def dense():  # timed: the plain SDEdit loop (the capture also stores the cache), the target returned
                plain_sdedit(pipe, stroke, 0.5, 50, seed)
                return target

            def edit():
                return editor.edit(image=stroke, output_type="pt", commit=False).images
        elif name in ("scene-sd-img2img", "scene-dit"):
            sd = name == "scene-sd-img2img"
            if sd:
                pipe = pretrained.load("scene-sd", pipeline="img2img", size=args.size)
            else:
                pipe = pretrained.load("scene-dit", pipeline="img2img", path=args.dit_weights)
            kw = {"prompt": prompt, "strength": 0.7 if sd else 0.6, "num_inference_steps": 20,
                  "guidance_scale": SCENE_SD_GUIDANCE if sd else SCENE_DIT_GUIDANCE, "output_type": "pt"}  # fmt: skip
            editor = default_editor(pipe, fallback)  # the family's default config, as the server's sessions
            t0 = time.perf_counter()
            editor.capture(image=image, generator=torch.Generator().manual_seed(seed), **kw)
            capture = time.perf_counter() - t0

            def dense():
                with torch.no_grad():
                    return pipe(image=stroke, generator=torch.Generator().manual_seed(seed), **kw).images

            def edit():
                return editor.edit(image=stroke, output_type="pt", commit=False).images
        else:
            model = pretrained.load("scene-spade", size=args.size)
            config = (
                model.default_sparse_config() if hasattr(model, "default_sparse_config") else SparseConfig(exact=True)
            )
            editor = GANEditor(model, dataclasses.replace(config, **fallback))
            with torch.no_grad():
                t0 = time.perf_counter()
                editor.capture(inputs["labels"])
                capture = time.perf_counter() - t0

            def dense():
                with torch.no_grad():
                    return (model(inputs["new_labels"]) + 1) / 2

            def edit():
                return (editor.edit(inputs["new_labels"], commit=False) + 1) / 2

        sparse_out, dense_out, first, ts, td = pairs(edit, dense, args.repeats)
        stats = editor.last_stats
        macs = stats["macs_dense"] / max(1, stats["macs_sparse"])
        dense_run = stats.get("dense_run") or (
            f"{stats['dense_steps']} steps dense" if stats.get("dense_steps") else ""
        )
        row = {"model": name, "size": size, "capture_s": capture, "first_s": first, "sparse_s": ts, "dense_s": td, "speedup": td / ts,
               "macs_ratio": macs, "psnr_db": psnr(sparse_out, dense_out), "dense_run": dense_run}  # fmt: skip
        rows.append(row)
        print(f"{name:<18} {capture * 1e3:>10.1f} {first * 1e3:>9.1f} {ts * 1e3:>9.1f} {td * 1e3:>9.1f} {td / ts:>7.2f}x {macs:>9.1f}x "
              f"{row['psnr_db']:>8.1f}  {dense_run}", flush=True)  # fmt: skip
        if hasattr(editor, "remove"):
            editor.remove()
    meta = {"benchmark": "shipped_models", "cpu": cpu_name(), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "torch": torch.__version__, "loadavg_end": loadavg()}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
