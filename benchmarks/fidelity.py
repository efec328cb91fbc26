"""Fidelity of sparse and temporal results against the dense result of the same edit, with the trained scene models.

Diffusion (`scene-ddpm`, SDEdit): a flat blue brush stroke (a lake, ~4% of the image) is painted on `--scenes`
held-out scenes; `SparseEditor` captures each scene and edits it (uncommitted). The reference is the dense SDEdit of
the stroked image from the same noise. Rows vary one `SparseConfig` choice at a time from the default
(`input_dilation=5`, frozen GroupNorm statistics, sparse attention, every resolution sparse), then temporal schedules
(`TemporalConfig`) with and without the sparse edit. A second table compares unconditional DDPM generation with
temporal reuse against plain generation from the same noise.

GAN (`scene-spade`): water painted into the same meadow label maps; `GANEditor` exact and approximate (SIGE's
masks) against the plain generator.

Metrics per image, averaged over scenes: PSNR (dB, images in [-1, 1], peak-to-peak 2), SSIM (Gaussian window 11),
max |error|, and the same PSNR restricted to the pixels outside the stroke. MACs ratio from the engine's accounting;
time ratio: median of `--repeats` alternating dense/sparse edits.

    python benchmarks/fidelity.py
    python benchmarks/fidelity.py --scenes 8 --size 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from unet_edit import loadavg

from sparsedit import GANEditor, SparseConfig, SparseEditor, TemporalConfig, pretrained
from sparsedit import temporal as temporal_reuse
from sparsedit.data import scenes
from sparsedit.demo import SCENE_SEED, lake_mask, paint_lake
from sparsedit.metrics import psnr, ssim


def diffusion_configs() -> list[tuple[str, SparseConfig, TemporalConfig | None]]:
    d = {"input_dilation": 5}
    rows = [
        ("default (input_dilation 5, frozen norms, sparse attention)", SparseConfig(**d), None),
        ("norm_stats recompute", SparseConfig(**d, norm_stats="recompute"), None),
        ("input_dilation 0", SparseConfig(input_dilation=0), None),
        ("input_dilation 2", SparseConfig(input_dilation=2), None),
        ("input_dilation 8", SparseConfig(input_dilation=8), None),
        ("dilation 0 (per level)", SparseConfig(**d, dilation=0), None),
        ("dilation 2 (per level)", SparseConfig(**d, dilation=2), None),
        ("attention dense", SparseConfig(**d, attention="dense"), None),
        ("low-res dense: maps <= 8 px", SparseConfig(**d, dense_below=8), None),
        ("low-res dense: maps <= 16 px", SparseConfig(**d, dense_below=16), None),
        ("exact", SparseConfig(exact=True), None),
        ("sparse + temporal encoder (auto keys)", SparseConfig(**d), TemporalConfig(reuse="encoder")),
        ("sparse + temporal deep every 3", SparseConfig(**d), TemporalConfig(reuse="deep", every=3)),
    ]
    return rows


def temporal_configs() -> list[tuple[str, TemporalConfig]]:
    return [
        ("encoder, auto key steps", TemporalConfig(reuse="encoder")),
        ("encoder, every 2", TemporalConfig(reuse="encoder", every=2)),
        ("encoder, auto keys, parallel", TemporalConfig(reuse="encoder", parallel=True)),
        ("deep every 3, skip level 1", TemporalConfig(reuse="deep", every=3)),
        ("deep every 3, skip level 0", TemporalConfig(reuse="deep", every=3, skip_level=0)),
        ("encoder+deep every 3", TemporalConfig(reuse="encoder+deep", every=3)),
    ]


def metrics(out: torch.Tensor, ref: torch.Tensor, outside: torch.Tensor) -> dict:
    """`out`, `ref` in [-1, 1]; `outside` a [H, W] bool mask of the pixels away from the edit."""
    diff = (out - ref).abs()
    m = outside[None, None].expand_as(diff)
    mse_out = diff[m].square().mean().clamp_min(1e-20)
    return {
        "psnr_db": float(psnr(out, ref).mean()),
        "ssim": float(ssim(out, ref).mean()),
        "max_abs_error": float(diff.max()),
        "psnr_outside_db": float(10 * torch.log10(4 / mse_out)),
    }


def mean_rows(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    out = {k: statistics.fmean(r[k] for r in rows) for k in keys if k != "max_abs_error"}
    out["max_abs_error"] = max(r["max_abs_error"] for r in rows)
    return out


def run_diffusion(args, scene_list, lake, outside):
    pipe = pretrained.load("scene-ddpm", size=args.size)
    kw = {"strength": args.strength, "num_inference_steps": args.steps, "output_type": "pt"}
    to11 = lambda x: x * 2 - 1  # noqa: E731  (the editor returns [0, 1])
    refs = []
    for k, (img, _) in enumerate(scene_list):  # the dense SDEdit of each stroked scene, from the capture's noise
        reference = SparseEditor(pipe, SparseConfig())
        refs.append(to11(reference.capture(image=paint_lake(img, lake), generator=torch.Generator().manual_seed(k),
                                           **kw).images))  # fmt: skip
        dense_s = reference.last_stats["seconds"]
        reference.remove()
    table = []
    for name, config, temporal in diffusion_configs():
        per, macs, times = [], [], []
        for k, (img, _) in enumerate(scene_list):
            editor = SparseEditor(pipe, config, temporal=temporal)
            editor.capture(image=img, generator=torch.Generator().manual_seed(k), **kw)
            out = None
            for _ in range(args.repeats):
                out = to11(editor.edit(image=paint_lake(img, lake), output_type="pt", commit=False).images)
                times.append(editor.last_stats["seconds"])
            s = editor.last_stats
            macs.append(s["macs_dense"] / max(s["macs_sparse"], 1))
            editor.remove()
            per.append(metrics(out, refs[k], outside))
        row = {"config": name, **mean_rows(per), "macs_ratio": statistics.fmean(macs),
               "speedup": dense_s / statistics.median(times)}  # fmt: skip
        table.append(row)
        print(fmt(row), flush=True)
    return table


def run_temporal_generation(args):
    pipe = pretrained.load("scene-ddpm", size=args.size)
    n = args.scenes
    kw = {"batch_size": n, "num_inference_steps": args.gen_steps, "output_type": "np"}

    def generate():
        started = time.perf_counter()
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1, time.perf_counter() - started

    ref, dense_s = generate()
    table = []
    everywhere = torch.ones(args.size, args.size, dtype=torch.bool)
    for name, config in temporal_configs():
        temporal_reuse.enable(pipe, config)
        try:
            out, seconds = generate()
        finally:
            temporal_reuse.disable(pipe)
        again, dense_again = generate()  # alternate: the dense run after each reuse run
        assert torch.equal(again, ref), "disable() must restore the plain pipeline"
        row = {"schedule": name, **metrics(out, ref, everywhere),
               "speedup": statistics.fmean([dense_s, dense_again]) / seconds}  # fmt: skip
        row.pop("psnr_outside_db")
        table.append(row)
        print(fmt(row), flush=True)
    return table


def run_gan(args, scene_list, lake, outside):
    model = pretrained.load("scene-spade", size=args.size)
    configs = [
        ("exact (default)", SparseConfig(exact=True)),
        ("exact, tile 4", SparseConfig(exact=True, tile_size=4)),
        ("approximate, input_dilation 1, dilation 1 (SIGE)", SparseConfig(input_dilation=1, dilation=1)),
        ("approximate, input_dilation 0, dilation 0", SparseConfig(input_dilation=0, dilation=0)),
        ("approximate, input_dilation 2, dilation 2", SparseConfig(input_dilation=2, dilation=2)),
    ]
    table = []
    for name, config in configs:
        per, macs, ratios = [], [], []
        for _, labels in scene_list:
            new = labels.clone()
            new[0][lake] = scenes.WATER
            editor = GANEditor(model, config)
            with torch.no_grad():
                editor.capture(labels)
                for _ in range(args.repeats):
                    out = editor.edit(new, commit=False)
                    sparse_s = editor.last_stats["seconds"]
                    started = time.perf_counter()
                    ref = model(new)
                    ratios.append((time.perf_counter() - started) / sparse_s)
            s = editor.last_stats
            macs.append(s["macs_dense"] / max(s["macs_sparse"], 1))
            editor.remove()
            per.append(metrics(out, ref, outside))
        row = {"config": name, **mean_rows(per), "macs_ratio": statistics.fmean(macs),
               "speedup": statistics.median(ratios)}  # fmt: skip
        table.append(row)
        print(fmt(row), flush=True)
    return table


def fmt(row: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{v}" for k, v in row.items())


def markdown(table: list[dict], first: str) -> str:
    cols = [
        c for c in ("psnr_db", "ssim", "max_abs_error", "psnr_outside_db", "macs_ratio", "speedup") if c in table[0]
    ]
    head = {"psnr_db": "PSNR dB", "ssim": "SSIM", "max_abs_error": "max error", "psnr_outside_db": "PSNR outside dB",
            "macs_ratio": "MACs ratio", "speedup": "speed-up"}  # fmt: skip
    lines = [f"| {first} | " + " | ".join(head[c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in table:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.2f}×" if c in ("macs_ratio", "speedup") else f"{v:.4f}" if c == "ssim"
                         else f"{v:.2e}" if c == "max_abs_error" else f"{v:.1f}")  # fmt: skip
        lines.append(f"| {r[first]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=4, help="held-out scenes (meadow, lake and alpine layouts)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--gen-steps", type=int, default=50, help="DDPM steps of the temporal generation table")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=["diffusion", "temporal", "gan"],
                    default=["diffusion", "temporal", "gan"])  # fmt: skip
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/fidelity.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"scene models, {args.size}x{args.size}, float32, threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}, {platform.machine()}, load {loadavg()}", flush=True)  # fmt: skip
    picks = [i for i in range(200) if scenes.describe(SCENE_SEED, i)["layout"] in ("meadow", "lake", "alpine")]
    scene_list = []
    for i in picks[: args.scenes]:
        img, lab = scenes.render(scenes.describe(SCENE_SEED, i), (args.size, args.size))
        scene_list.append((img[None], lab[None]))
    lake = lake_mask(args.size)
    grow = torch.nn.functional.max_pool2d(lake[None, None].float(), 2 * (args.size // 8) + 1, 1, args.size // 8)
    outside = grow[0, 0] == 0  # farther than 1/8 of the image from the stroke
    result = {"size": args.size, "scenes": picks[: args.scenes], "threads": torch.get_num_threads(),
              "load": loadavg(), "torch": torch.__version__, "edit_fraction": float(lake.float().mean())}  # fmt: skip
    if "diffusion" in args.parts:
        print(f"\nSDEdit, {args.steps} steps, strength {args.strength}:")
        result["diffusion"] = run_diffusion(args, scene_list, lake, outside)
    if "temporal" in args.parts:
        print(f"\nDDPM generation, {args.gen_steps} steps, batch {args.scenes}:")
        result["temporal_generation"] = run_temporal_generation(args)
    if "gan" in args.parts:
        print("\nSPADE label edit:")
        result["gan"] = run_gan(args, scene_list, lake, outside)
    result["load_after"] = loadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    for key, first in (("diffusion", "config"), ("temporal_generation", "schedule"), ("gan", "config")):
        if key in result:
            print(f"\n{key}:\n" + markdown(result[key], first))


if __name__ == "__main__":
    main()
