"""Drift over committed strokes: how far the incremental result moves from a fresh capture of the same image.

Each committed edit reuses the caches outside its region, so approximations near each stroke (the dilated region's
border, frozen normalisation statistics) accumulate. After k committed strokes we compare the editor's result with
a fresh dense capture of the final image (the pipeline's own result for it), with and without the periodic dense
refresh (`SparseEditor(refresh_every=N)`, and `editor.refresh()`).

    python benchmarks/drift.py                  # tiny SD img2img (random weights, 128 px) and scene-ddpm (trained)
    python benchmarks/drift.py --strokes 1 5 20 50 --refresh 0 10
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

import sparsedit
from sparsedit import SparseConfig, SparseEditor


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """On images in [0, 1] (the pipelines' "pt" output)."""
    mse = float((a.float() - b.float()).square().mean())
    return 10 * math.log10(1.0 / mse) if mse else float("inf")


def strokes(n: int, size: int, seed: int = 0):
    """`n` small strokes (~1% of the image each) at random places, with random colours."""
    g = torch.Generator().manual_seed(seed)
    side = max(2, round(size * 0.1))
    for _ in range(n):
        y, x = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        yield y, x, side, torch.rand(3, generator=g)


def paint(img: torch.Tensor, y, x, side, colour) -> torch.Tensor:
    out = img.clone()
    out[:, :, y : y + side, x : x + side] = colour.view(1, 3, 1, 1)
    return out


def case(name: str, tmp: Path):
    if name == "sd":
        from sparsedit.testing import tiny_sd_img2img

        pipe = tiny_sd_img2img(tmp / "tok")
        size = 128
        kw = {"prompt": "a red house", "strength": 0.7, "num_inference_steps": 10, "output_type": "pt"}
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        config = SparseConfig(input_dilation=1)
    else:
        pipe = sparsedit.pretrained.load("scene-ddpm")
        size = 64
        kw = {"strength": 0.5, "num_inference_steps": 20, "output_type": "pt"}
        from sparsedit.data import scenes

        image = scenes.sample(1, size)["image"]  # in [-1, 1], as the pixel pipeline takes tensors
        config = None
    return pipe, size, kw, image, config


def run(name: str, counts: list[int], refresh: int, tmp: Path) -> list[dict]:
    pipe, size, kw, image, config = case(name, tmp)
    editor = SparseEditor(pipe, config, refresh_every=refresh or None)
    editor.capture(image=image, generator=torch.Generator().manual_seed(3), **kw)
    results, current, done = {}, image, 0
    started = time.perf_counter()
    for i, (y, x, side, colour) in enumerate(strokes(max(counts), size), start=1):
        current = paint(current, y, x, side, colour if name == "sd" else colour * 2 - 1)
        out = editor.edit(image=current, output_type="pt").images
        done += 1
        if i in counts:
            refreshes = sum(h["kind"] == "refresh" for h in editor.history)
            results[i] = (current, out, refreshes)
    seconds = (time.perf_counter() - started) / done
    editor.remove()
    rows = []
    for i, (current, out, refreshes) in results.items():  # a fresh capture of the same image: the truth
        fresh_editor = SparseEditor(pipe, config)
        fresh = fresh_editor.capture(image=current, generator=torch.Generator().manual_seed(3), **kw).images
        fresh_editor.remove()
        rows.append({"model": name, "refresh_every": refresh, "strokes": i, "psnr_db": psnr(out, fresh),
                     "max_abs_error": float((out - fresh).abs().max()), "refreshes": refreshes})  # fmt: skip
        print(f"{name:>5} refresh_every={refresh or '-':>3} strokes={i:>3}  PSNR {rows[-1]['psnr_db']:6.1f} dB  "
              f"max err {rows[-1]['max_abs_error']:.4f}  refreshes {refreshes}")  # fmt: skip
    rows.append({"model": name, "refresh_every": refresh, "seconds_per_stroke": seconds})
    print(f"{name:>5} refresh_every={refresh or '-':>3} {seconds:.3f} s per committed stroke (refreshes included)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sd", "ddpm"], choices=["sd", "ddpm"])
    ap.add_argument("--strokes", type=int, nargs="+", default=[1, 5, 19, 20, 39, 50])
    ap.add_argument("--refresh", type=int, nargs="+", default=[0, 20], help="0: no periodic refresh")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/drift.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for refresh in args.refresh:
                rows += run(name, sorted(args.strokes), refresh, Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
