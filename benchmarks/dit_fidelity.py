"""Fidelity of token-sparse edits on the trained scene-dit (SD3 in miniature, 256 px), against the dense edit (issue 38).

Held-out scenes (seeds >= 1,000,000, as `training/evaluate_scene_sd.py`) are rendered at `--size` and captioned by the
renderer (`captions.caption`). For every edit the dense reference is the same pipeline call on the edited input with
the same generator seed; the sparse edit is `SparseEditor.edit(..., commit=False)` after one capture per scene (shared
by every fraction of a case). Scores, on the pipelines' "pt" output (images in [0, 1]):

- **background exact**: outside the recomputed region (`editor.last_region`, at image resolution) the sparse result
  equals the capture bit for bit;
- **PSNR** of the sparse edit against the dense edit over the whole image, inside the recomputed region and outside
  it, beside the dense edit against the capture inside that region (how far the edit moves it: the sparse edit must be
  much closer to the dense edit than the capture is, or the edit is too weak to judge). Outside the region the sparse
  edit is the capture bit for bit, so "outside" is how far the dense regeneration's own background moved (attention
  carries the edit everywhere): the floor of the whole-image error of any background-exact edit;
- **MACs ratio** dense / sparse from `editor.last_stats` (the edit's whole run: transformer and VAE).

Cases (`--cases`):

- `sdedit`: a red diagonal stroke of `--fractions` of the image on `StableDiffusion3Img2ImgPipeline` (`--strength`),
  for every transformer cache option of `SparseConfig` (`--options`: `cache_dtype` auto = int8 keys and values with
  the VAE caches in bfloat16, int8, bfloat16, float32; `dit_context` cache or recompute; `dit_kv_share` 2 or 4:
  one step's keys and values kept for that many neighbouring steps; `dit_cache="hidden"`: the attentions' inputs
  kept instead of keys and values).
- `inpaint`: `StableDiffusion3InpaintPipeline` captured with an empty mask, then a stroke-shaped mask of each fraction
  (`--inpaint-strength`, 1.0 by default: the hole regenerated from noise), when sparsedit supports that pipeline.
- `prompt`: `captions.prompt_edits` (delete/insert the lake, trees, rocks; melt the snow; clear the clouds) with the
  renderer's true region passed as `edit(prompt=edited caption, region=true region)`, on `--prompt-pipelines`
  (txt2img: the capture is the caption's generation; img2img: SDEdit of the render). Also how concentrated the change
  is in the true region, for the sparse and the dense edit: the share of sum |result - capture| inside it.
- `drift`: `--drift-strokes` small strokes (~1% each, `benchmarks/drift.py`'s) committed one after another on one
  img2img session (no periodic refresh); after each of `--drift-at` commits, PSNR of the session's result against the
  dense img2img of the same edited image, beside one sparse edit of that image from a fresh capture (the error of a
  single edit, without accumulation).

Quick smoke run (random weights, tiny): `--random --size 64 --steps 4 --scenes 1`. Use at least 4 steps: with 2 steps
at strength 0.6 the img2img pipeline starts from sigma 1 (pure noise), so the input, and the edit, change nothing.

    python benchmarks/dit_fidelity.py                                   # the shipped weights, 8 scenes, 256 px
    python benchmarks/dit_fidelity.py --weights training/runs/scene-dit/scene-dit.safetensors
    python benchmarks/dit_fidelity.py --random --size 64 --steps 4 --scenes 1 --fractions 0.01 0.05 --options auto
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from drift import paint, strokes
from profile_edit import cpu_name, has_amx
from unet_edit import loadavg, stroke_region

from sparsedit import SparseConfig, SparseEditor, pretrained
from sparsedit.adapters.pipelines import supported_pipelines
from sparsedit.data import captions, scenes
from sparsedit.editors.editor import family_config
from sparsedit.metrics import psnr
from sparsedit.serve.models import SCENE_DIT_GUIDANCE


HELD_OUT_SEED = 1_000_000  # training/common.HELD_OUT_SEED: scenes no training run drew
FRACTIONS = [0.005, 0.01, 0.02, 0.05, 0.10]
RED = torch.tensor([0.95, 0.1, 0.15])
CASES = ("sdedit", "inpaint", "prompt", "drift")
# The transformer cache options SparseConfig has (docs/engine.md, "Diffusion transformers"): name -> config fields.
OPTIONS = {
    # The SD3 family's default (`editors.editor.family_config`): keys and values in int8 (adapter.auto_cache_dtype),
    # one step's kept for every 2 neighbouring steps (`dit_kv_share=2`), VAE caches in bfloat16.
    "auto": {},
    "auto+per-step": {"dit_kv_share": 1},  # every step keeps its own keys and values (the default before issue 38)
    "int8": {"cache_dtype": "int8"},  # every cache in int8 (VAE's too)
    "bfloat16": {"cache_dtype": "bfloat16"},
    "float32": {"cache_dtype": "float32", "dit_kv_share": 1},  # the most faithful cache
    "auto+recompute": {"dit_context": "recompute"},  # the context tokens run again in every block
    "float32+recompute": {"cache_dtype": "float32", "dit_kv_share": 1, "dit_context": "recompute"},
    "auto+share4": {"dit_kv_share": 4},
    "auto+share12": {"dit_kv_share": 12},  # at 20 steps x 0.6: the first step's keys and values for all 12 steps
    "hidden": {"dit_cache": "hidden"},  # the attentions' inputs (int8) instead of keys and values, shared by 2 steps
    "hidden+per-step": {"dit_cache": "hidden", "dit_kv_share": 1},
}
# Named by issue 38 (from the transformer-engine issue), absent from the library (docs/engine.md: "Not built").
NOT_BUILT = ()


def load_pipe(args, pipeline: str):
    if args.random:
        torch.manual_seed(0)  # the same random weights for every pipeline
        model = pretrained.build("scene-dit", size=args.size).eval()
        return pretrained.dit_pipeline(model, 1.0, 0.0, pipeline)
    return pretrained.load("scene-dit", pipeline=pipeline, path=args.weights, size=args.size)


def make_config(args, pipe, option: str = "auto") -> SparseConfig:
    """The editor's default for the pipeline's family (`family_config`; `--input-dilation` if given) with `option`'s
    cache fields. Unless `--fallback`, the measured sparse-or-dense fallback is off: this benchmark measures the sparse
    approximation, so every edit runs sparse (a row whose edit ran dense anyway says so)."""
    extra = {} if args.fallback else {"measured_fallback": False, "max_region_fraction": 1.0}
    if args.input_dilation is not None:
        extra["input_dilation"] = args.input_dilation
    return dataclasses.replace(family_config(pipe), **extra, **OPTIONS[option])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def held_out(args):
    """The held-out scenes: (index, description, image [1, 3, H, W] in [0, 1], caption)."""
    for i in range(args.scenes):
        scene = scenes.describe(HELD_OUT_SEED, i)
        image, labels = scenes.render(scene, (args.size, args.size))
        yield i, scene, ((image[None] + 1) / 2).clamp(0, 1), captions.caption(labels)


def psnr_in(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR (images in [0, 1]) over the pixels of `where` (bool [H, W]), every channel; NaN for an empty set."""
    if not where.any():
        return float("nan")
    where = where.expand_as(a)
    return float(psnr(a[where].view(1, 1, 1, -1), b[where].view(1, 1, 1, -1), data_range=1.0)[0])


def pixel_region(region: torch.Tensor, size: int) -> torch.Tensor:
    """`editor.last_region[0]` as bool [H, W] at image resolution (upsampled if the editor ever gives it coarser)."""
    region = region[0] if region.dim() == 3 else region
    if region.shape[-1] != size:
        region = torch.nn.functional.interpolate(region[None, None].float(), size=(size, size))[0, 0] > 0
    return region.bool()


def score(sparse, dense, base, region, stats) -> dict:
    """The sparse edit against the dense one (both [1, 3, H, W] in [0, 1]); `base` the capture, `region` the
    recomputed region bool [H, W]."""
    outside = ~region
    return {
        "region_fraction": float(stats["region_fraction"]),
        "recomputed_fraction": float(region.float().mean()),
        "background_exact": bool(torch.equal(sparse[..., outside], base[..., outside])),
        "psnr_db": float(psnr(sparse, dense, data_range=1.0)[0]),
        "psnr_region_db": psnr_in(sparse, dense, region),
        "psnr_outside_db": psnr_in(sparse, dense, outside),
        "dense_vs_capture_region_db": psnr_in(base, dense, region),
        "max_abs_error": float((sparse - dense).abs().max()),
        "macs_dense": int(stats["macs_dense"]),
        "macs_sparse": int(stats["macs_sparse"]),
        "macs_ratio": stats["macs_dense"] / max(1, stats["macs_sparse"]),
        "ran_dense": stats.get("ran_dense"),
        "sparse_s": float(stats["seconds"]),
    }


def concentration(out, base, truth) -> float:
    """The share of the change `sum |out - base|` (over channels and pixels) that lies inside `truth`."""
    d = (out - base).abs().sum(1)[0]
    total = float(d.sum())
    return float(d[truth].sum()) / total if total > 0 else float("nan")


def stroked(x: torch.Tensor, frac: float) -> torch.Tensor:
    region = stroke_region(x.shape[-1], frac, 1)
    return torch.where(region[:, None], RED[:, None, None], x)


def dense_call(pipe, seed, **kw):
    t0 = time.perf_counter()
    out = pipe(generator=gen(seed), **kw).images
    return out, time.perf_counter() - t0


def show(row: dict, label: str):
    print(f"  {label}: region {100 * row['region_fraction']:.1f}% (recomputed {100 * row['recomputed_fraction']:.1f}%), "
          f"MACs {row['macs_ratio']:.1f}x, bg exact {row['background_exact']}, PSNR {row['psnr_db']:.1f} dB, "
          f"in region {row['psnr_region_db']:.1f} dB (dense vs capture {row['dense_vs_capture_region_db']:.1f} dB)"
          f"{'' if row['ran_dense'] is None else ', RAN DENSE: ' + str(row['ran_dense'])}, load {loadavg()}",
          flush=True)  # fmt: skip


# -- cases ---------------------------------------------------------------------------------------------------------
def run_strokes(args, kw) -> list[dict]:
    """SDEdit stroke edits, every selected cache option, one capture per scene and option."""
    pipe = load_pipe(args, "img2img")
    kw = {**kw, "strength": args.strength}
    rows = []
    for i, _, x, prompt in held_out(args):
        seed = 1000 + i
        dense = {f: dense_call(pipe, seed, image=stroked(x, f), prompt=prompt, **kw) for f in args.fractions}
        for option in args.options:
            editor = SparseEditor(pipe, make_config(args, pipe, option), refresh_every=None)
            base = editor.capture(image=x, prompt=prompt, generator=gen(seed), **kw).images
            cache = int(editor.cache_bytes)
            for f in args.fractions:
                sparse = editor.edit(image=stroked(x, f), commit=False, output_type="pt").images
                region = pixel_region(editor.last_region, args.size)
                row = {"case": "sdedit", "option": option, "scene": i, "fraction": f, "cache_bytes": cache,
                       "dense_s": dense[f][1], **score(sparse, dense[f][0], base, region, editor.last_stats)}  # fmt: skip
                rows.append(row)
                show(row, f"scene {i} {option} stroke {100 * f:g}%")
            editor.remove()
    return rows


def run_inpaint(args, kw) -> list[dict]:
    if "StableDiffusion3InpaintPipeline" not in supported_pipelines():
        print("inpaint: StableDiffusion3InpaintPipeline is not supported by sparsedit's adapters: skipped")
        return []
    pipe = load_pipe(args, "inpaint")
    kw = {**kw, "strength": args.inpaint_strength}
    empty = torch.zeros(1, 1, args.size, args.size)
    rows = []
    for i, _, x, prompt in held_out(args):
        seed = 2000 + i
        masks = {f: stroke_region(args.size, f, 1)[:, None].float() for f in args.fractions}
        dense = {f: dense_call(pipe, seed, image=x, mask_image=masks[f], prompt=prompt, **kw) for f in args.fractions}
        editor = SparseEditor(pipe, make_config(args, pipe), refresh_every=None)
        base = editor.capture(image=x, mask_image=empty, prompt=prompt, generator=gen(seed), **kw).images
        for f in args.fractions:
            sparse = editor.edit(mask_image=masks[f], commit=False, output_type="pt").images
            region = pixel_region(editor.last_region, args.size)
            row = {"case": "inpaint", "option": "auto", "scene": i, "fraction": f, "dense_s": dense[f][1],
                   "cache_bytes": int(editor.cache_bytes),
                   **score(sparse, dense[f][0], base, region, editor.last_stats)}  # fmt: skip
            rows.append(row)
            show(row, f"scene {i} inpaint mask {100 * f:g}%")
        editor.remove()
    return rows


def run_prompts(args, kw) -> list[dict]:
    """Prompt edits with the renderer's true region, `edit(prompt=..., region=truth)`."""
    rows = []
    for name in args.prompt_pipelines:
        pipe = load_pipe(args, name)
        if type(pipe).__name__ not in supported_pipelines(text_editable=True):
            print(f"prompt edits on {type(pipe).__name__}: not supported by sparsedit's adapters: skipped")
            continue
        call = dict(kw) if name == "txt2img" else {**kw, "strength": args.strength}
        for i, scene, x, prompt in held_out(args):
            seed = 3000 + i
            image = {} if name == "txt2img" else {"image": x}
            edits = captions.prompt_edits(scene, (args.size, args.size))
            if not edits:
                continue
            dense = [dense_call(pipe, seed, prompt=e["edited_prompt"], **image, **call) for e in edits]
            editor = SparseEditor(pipe, make_config(args, pipe), refresh_every=None)
            base = editor.capture(prompt=prompt, generator=gen(seed), **image, **call).images
            for e, (dense, dense_s) in zip(edits, dense):
                truth = e["region"]
                sparse = editor.edit(prompt=e["edited_prompt"], region=truth, commit=False, output_type="pt").images
                region = pixel_region(editor.last_region, args.size)
                row = {"case": f"prompt/{name}", "option": "auto", "scene": i, "kind": e["kind"], "what": e["what"],
                       "fraction": float(truth.float().mean()), "dense_s": dense_s, "cache_bytes": int(editor.cache_bytes),
                       **score(sparse, dense, base, region, editor.last_stats),
                       "psnr_truth_db": psnr_in(sparse, dense, truth),
                       "share_in_truth_sparse": concentration(sparse, base, truth),
                       "share_in_truth_dense": concentration(dense, base, truth)}  # fmt: skip
                if name == "img2img":  # how far each moves the true region toward the edited render
                    target = ((e["edited_image"][None] + 1) / 2).clamp(0, 1)
                    before = float((base - target).abs().mean(1)[0][truth].mean())
                    for who, out in (("sparse", sparse), ("dense", dense)):
                        row[f"toward_{who}"] = 1 - float((out - target).abs().mean(1)[0][truth].mean()) / before
                rows.append(row)
                show(row, f"scene {i} {name} {e['kind']} {e['what']} (truth {100 * row['fraction']:.1f}%)")
                print(f"    change inside the true region: sparse {row['share_in_truth_sparse']:.2f}, dense "
                      f"{row['share_in_truth_dense']:.2f}; PSNR in the true region {row['psnr_truth_db']:.1f} dB")  # fmt: skip
            editor.remove()
    return rows


def run_drift(args, kw) -> list[dict]:
    """Committed strokes on one img2img session against the dense img2img of the same image."""
    pipe = load_pipe(args, "img2img")
    kw = {**kw, "strength": args.strength}
    at = sorted(k for k in set(args.drift_at) if k <= args.drift_strokes)
    rows = []
    for (i, _, x, prompt), option in itertools.product(itertools.islice(held_out(args), args.drift_scenes),
                                                      args.drift_options):  # fmt: skip
        seed = 4000 + i
        editor = SparseEditor(pipe, make_config(args, pipe, option), refresh_every=None)
        editor.capture(image=x, prompt=prompt, generator=gen(seed), **kw)
        current, kept = x, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a stroke too close to the picture changes nothing
            for k, (y0, x0, side, colour) in enumerate(strokes(args.drift_strokes, args.size, seed=i), start=1):
                current = paint(current, y0, x0, side, colour)
                out = editor.edit(image=current, commit=True, output_type="pt").images
                if k in at:
                    kept[k] = (current, out, float(editor.last_stats["region_fraction"]))
        editor.remove()
        fresh = SparseEditor(pipe, make_config(args, pipe, option), refresh_every=None)  # one edit per image
        fresh.capture(image=x, prompt=prompt, generator=gen(seed), **kw)
        once = {}
        for k, (image, _, _) in kept.items():
            once[k] = (fresh.edit(image=image, commit=False, output_type="pt").images,
                       float(fresh.last_stats["region_fraction"]))  # fmt: skip
        fresh.remove()
        for k, (image, out, frac) in kept.items():  # the dense references, no editor attached
            dense, _ = dense_call(pipe, seed, image=image, prompt=prompt, **kw)
            row = {"case": "drift", "option": option, "scene": i, "commits": k, "last_region_fraction": frac,
                   "psnr_db": float(psnr(out, dense, data_range=1.0)[0]),
                   "one_edit_psnr_db": float(psnr(once[k][0], dense, data_range=1.0)[0]),
                   "one_edit_region_fraction": once[k][1],
                   "max_abs_error": float((out - dense).abs().max())}  # fmt: skip
            rows.append(row)
            print(f"  scene {i} {option} after {k} commits: PSNR {row['psnr_db']:.1f} dB vs dense (one edit of the same image "
                  f"{row['one_edit_psnr_db']:.1f} dB at {100 * row['one_edit_region_fraction']:.1f}%), "
                  f"load {loadavg()}", flush=True)  # fmt: skip
    return rows


# -- tables --------------------------------------------------------------------------------------------------------
def med(rows, key) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return statistics.median(vals) if vals else float("nan")


def low(rows, key) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return min(vals) if vals else float("nan")


def edit_table(rows: list[dict]) -> list[str]:
    lines = ["| case | cache option | edit | n | region | MACs ratio | bg exact | PSNR dB (min) | in region dB (min) "
             "| outside dB (min) | dense vs capture in region dB | ran dense | cache MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["case"] == "drift":
            continue
        edit = r["kind"] + " " + r["what"] if "kind" in r else f"{100 * r['fraction']:g}%"
        groups.setdefault((r["case"], r["option"], edit), []).append(r)
    for (case, option, edit), g in groups.items():
        exact = sum(r["background_exact"] for r in g)
        dense = sum(r["ran_dense"] is not None for r in g)
        lines.append(f"| {case} | {option} | {edit} | {len(g)} | {100 * med(g, 'region_fraction'):.1f}% | "
                     f"{med(g, 'macs_ratio'):.1f}x | {exact}/{len(g)} | {med(g, 'psnr_db'):.1f} ({low(g, 'psnr_db'):.1f}) "
                     f"| {med(g, 'psnr_region_db'):.1f} ({low(g, 'psnr_region_db'):.1f}) | "
                     f"{med(g, 'psnr_outside_db'):.1f} ({low(g, 'psnr_outside_db'):.1f}) | "
                     f"{med(g, 'dense_vs_capture_region_db'):.1f} | {dense} | {med(g, 'cache_bytes') / 2**20:.1f} |")  # fmt: skip
    return lines


def prompt_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["case"].startswith("prompt/")]
    if not rows:
        return []
    lines = ["| case | n | true region | PSNR in true region dB (min) | change in true region: sparse | dense "
             "| toward render: sparse | dense |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for case in dict.fromkeys(r["case"] for r in rows):
        g = [r for r in rows if r["case"] == case]
        lines.append(f"| {case} | {len(g)} | {100 * med(g, 'fraction'):.1f}% | {med(g, 'psnr_truth_db'):.1f} "
                     f"({low(g, 'psnr_truth_db'):.1f}) | {med(g, 'share_in_truth_sparse'):.2f} | "
                     f"{med(g, 'share_in_truth_dense'):.2f} | {med(g, 'toward_sparse'):.2f} | "
                     f"{med(g, 'toward_dense'):.2f} |")  # fmt: skip
    return lines


def drift_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["case"] == "drift"]
    if not rows:
        return []
    lines = ["| cache option | commits | n | PSNR vs dense dB (min) | one edit of the same image dB |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for option, k in sorted({(r["option"], r["commits"]) for r in rows}):
        g = [r for r in rows if r["commits"] == k and r["option"] == option]
        lines.append(f"| {option} | {k} | {len(g)} | {med(g, 'psnr_db'):.1f} ({low(g, 'psnr_db'):.1f}) | "
                     f"{med(g, 'one_edit_psnr_db'):.1f} |")  # fmt: skip
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="a scene-dit weights file (default: the shipped one)")
    ap.add_argument("--random", action="store_true", help="random weights (smoke tests: the numbers mean nothing)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.6, help="SDEdit (img2img) strength")
    ap.add_argument("--inpaint-strength", type=float, default=1.0)
    ap.add_argument("--input-dilation", type=int, default=None, help="latent pixels (default: the family's, SD3: 1)")
    ap.add_argument("--guidance", type=float, default=SCENE_DIT_GUIDANCE, help="default: as the web editor serves it")
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    ap.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS),
                    help="cache options for the sdedit case")  # fmt: skip
    ap.add_argument("--prompt-pipelines", nargs="+", choices=["txt2img", "img2img"], default=["txt2img", "img2img"])
    ap.add_argument("--drift-strokes", type=int, default=20)
    ap.add_argument("--drift-at", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--drift-scenes", type=int, default=2)
    ap.add_argument("--drift-options", nargs="+", choices=list(OPTIONS), default=["auto"])
    ap.add_argument("--fallback", action="store_true",
                    help="keep the library's sparse-or-dense fallback (default: off, every edit runs sparse)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": args.size,
          "width": args.size, "output_type": "pt"}  # fmt: skip
    weights = "random" if args.random else str(args.weights or pretrained.weights_file("scene-dit"))
    pipe = load_pipe(args, "img2img")  # for the configs' record (the family's default)
    head = (f"scene-dit ({weights}), {args.size} px, {args.steps} steps, strength {args.strength} (inpaint "
            f"{args.inpaint_strength}), guidance {args.guidance}, input dilation {make_config(args, pipe).input_dilation}, {args.scenes} "
            f"held-out scenes, threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}, CPU {cpu_name()} (AMX: "
            f"{'yes' if has_amx() else 'no'}), load {loadavg()}")  # fmt: skip
    print(head, flush=True)
    started, load_start = time.perf_counter(), loadavg()
    rows = []
    runners = {"sdedit": run_strokes, "inpaint": run_inpaint, "prompt": run_prompts, "drift": run_drift}
    for case in args.cases:
        print(f"{case}:", flush=True)
        rows += runners[case](args, kw)
    not_built = [{"case": "sdedit", "option": name, "status": "not built"} for name in NOT_BUILT]
    print()
    print(head)
    for line in edit_table(rows):
        print(line)
    if "sdedit" in args.cases:
        for r in not_built:
            print(f"| sdedit | {r['option']} | not built | | | | | | | | | | |")
    for table in (prompt_table(rows), drift_table(rows)):
        if table:
            print()
            print("\n".join(table))
    meta = {"header": head, "weights": weights, "args": {k: v if isinstance(v, (int, float, list, type(None))) else
            str(v) for k, v in vars(args).items()}, "configs": {o: make_config(args, pipe, o).to_dict() for o in OPTIONS},
            "cpu": cpu_name(), "amx": has_amx(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": loadavg(),
            "seconds": time.perf_counter() - started}  # fmt: skip
    tag = "random" if args.random else "trained"
    args.json = args.json or Path(f"benchmarks/results/dit_fidelity_{args.size}_{tag}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "not_built": not_built}, indent=1, default=str))
    print(f"load at end {loadavg()}; {meta['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
