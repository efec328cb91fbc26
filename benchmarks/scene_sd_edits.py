"""Prompt edits on the trained scene-sd model, measured against the renderer's truth (issue 21).

Each held-out scene (seeds >= 1,000,000) is rendered and captioned; `captions.prompt_edits` changes its description
(delete or insert the lake, trees or rocks; melt the snow; clear the clouds), renders it again and gives the edit's
true region: the pixels that changed. On scene-sd's img2img pipeline we capture the render with its caption, then:

- **Detectors.** For each `TextEditConfig.region` method, `editor.find_region(prompt=edited caption)` against the
  true region: area, IoU, recall (share of the true region found), enrichment (how much denser the true region is
  inside the found one than in the image: 1.0 is a random region of that area) and the time detection takes.
- **Edits.** For each method (and `mask`, the true region passed as `edit(region=...)`: the oracle) the edit itself,
  uncommitted: how far it moves the true region toward the edited render (`toward`: 1 - |out - target| / |orig -
  target| inside the true region, 0 for no move, 1 for reaching the render), how much more it changes the true region
  than the rest (`focus`: mean |out - orig| inside over outside), PSNR against the dense regeneration inside the
  edited region and the largest change outside it (exact by design: 0). The dense regeneration with the edited
  caption is measured the same way.
- **Speed.** The default edit against the dense img2img call with the edited caption, alternating, median of pairs.

    python benchmarks/scene_sd_edits.py                   # the shipped weights
    python benchmarks/scene_sd_edits.py --weights training/runs/scene-sd/scene-sd.safetensors --scenes 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from profile_edit import cpu_name, has_amx
from unet_edit import loadavg

from sparsedit import SparseConfig, SparseEditor, TextEditConfig, pretrained
from sparsedit.data import captions, scenes
from sparsedit.metrics import psnr


HELD_OUT_SEED = 1_000_000
METHODS = {
    "latent_diff": TextEditConfig(region="latent_diff"),
    "cross_attention": TextEditConfig(region="cross_attention"),
    "cross_attention 16x16 maps": TextEditConfig(region="cross_attention", attention_downscale=1),
    "cross_attention 16x16, threshold 0.6": TextEditConfig(
        region="cross_attention", attention_downscale=1, attention_threshold=0.6
    ),
    "noise_diff": TextEditConfig(region="noise_diff"),
}


def pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def region_scores(found: torch.Tensor, truth: torch.Tensor) -> dict:
    inter = float((found & truth).sum())
    area = float(found.float().mean())
    recall = inter / float(truth.sum())
    return {
        "area": area,
        "iou": inter / float((found | truth).sum()),
        "recall": recall,
        "enrichment": recall / area if area > 0 else 0.0,
    }


def edit_scores(out, orig, target, dense, truth, region) -> dict:
    """`out`, `orig` (the capture), `target` (the edited render), `dense` ([3, H, W] in [-1, 1]); `truth`, `region`
    bool [H, W]."""
    d = (out - orig).abs().mean(0)
    before = float((orig - target).abs().mean(0)[truth].mean())
    after = float((out - target).abs().mean(0)[truth].mean())
    rest = d[~truth].mean() if (~truth).any() else torch.tensor(0.0)
    scores = {"toward": 1 - after / before, "focus": float(d[truth].mean() / rest.clamp_min(1e-6))}
    if region is not None:
        inside = region.expand_as(out)
        scores["psnr_in_region_vs_dense_db"] = float(
            psnr(out[inside].view(1, 1, 1, -1), dense[inside].view(1, 1, 1, -1))
        )
        scores["max_change_outside"] = float(d[~region].max()) if (~region).any() else 0.0
    return scores


def med(rows, key):
    vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return statistics.median(vals) if vals else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped one)")
    ap.add_argument("--scenes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.7)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--pairs", type=int, default=5, help="alternating dense/sparse pairs per timed edit")
    ap.add_argument("--timed", type=int, default=6, help="edits timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/scene_sd_edits.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = pretrained.load("scene-sd", path=args.weights, pipeline="img2img")
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    kw = {"num_inference_steps": args.steps, "strength": args.strength, "guidance_scale": args.guidance,
          "output_type": "pt"}  # fmt: skip

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    detect = {m: [] for m in METHODS}
    edits = {m: [] for m in ["dense regeneration", *METHODS, "mask (true region)"]}
    timing = []
    n_edits = 0
    for i in range(args.scenes):
        for e in captions.prompt_edits(scenes.describe(HELD_OUT_SEED, i), (64, 64)):
            seed = 1000 + n_edits
            truth, image, target = e["region"], pil(e["image"]), e["edited_image"]
            orig = editor.capture(image=image, prompt=e["prompt"], generator=gen(seed), **kw).images[0] * 2 - 1
            dense = pipe(image=image, prompt=e["edited_prompt"], generator=gen(seed), **kw).images[0] * 2 - 1
            info = {"scene": i, "kind": e["kind"], "what": e["what"], "truth_area": float(truth.float().mean())}
            edits["dense regeneration"].append({**info, **edit_scores(dense, orig, target, dense, truth, None)})
            for m, tcfg in METHODS.items():
                t0 = time.perf_counter()
                found = editor.find_region(prompt=e["edited_prompt"], text_config=tcfg)[0]
                seconds = time.perf_counter() - t0
                detect[m].append({**info, **region_scores(found, truth), "seconds": seconds})
                out = editor.edit(prompt=e["edited_prompt"], text_config=tcfg, commit=False, output_type="pt")
                region = editor.last_region[0]
                edits[m].append({**info, **edit_scores(out.images[0] * 2 - 1, orig, target, dense, truth, region)})
            out = editor.edit(prompt=e["edited_prompt"], region=truth, commit=False, output_type="pt")
            region = editor.last_region[0]
            edits["mask (true region)"].append({**info, **edit_scores(out.images[0] * 2 - 1, orig, target, dense,
                                                                       truth, region)})  # fmt: skip
            if len(timing) < args.timed:
                pairs = []
                for _ in range(args.pairs):
                    t0 = time.perf_counter()
                    pipe(image=image, prompt=e["edited_prompt"], generator=gen(seed), **kw)
                    t1 = time.perf_counter()
                    editor.edit(prompt=e["edited_prompt"], commit=False, output_type="pt")
                    t2 = time.perf_counter()
                    pairs.append((t1 - t0, t2 - t1))
                d, s = (statistics.median(p[k] for p in pairs) for k in (0, 1))
                timing.append({**info, "dense_s": d, "sparse_s": s, "speedup": d / s,
                               "region_fraction": editor.last_stats["region_fraction"],
                               "macs_ratio": editor.last_stats["macs_dense"] / max(1, editor.last_stats["macs_sparse"])})  # fmt: skip
            n_edits += 1
            print(f"scene {i} {e['kind']} {e['what']}: truth {100 * info['truth_area']:.1f}%", flush=True)

    head = (f"scene-sd img2img, 64 px, {args.steps} steps x strength {args.strength}, guidance {args.guidance}, "
            f"{n_edits} edits on {args.scenes} held-out scenes, threads {torch.get_num_threads()}, CPU {cpu_name()} "
            f"(AMX: {'yes' if has_amx() else 'no'}), load {loadavg()}")  # fmt: skip
    print(head)
    print(f"{'detector':>36} {'area':>6} {'IoU':>6} {'recall':>7} {'enrich':>7} {'detect s':>9}")
    summary = {"detectors": {}, "edits": {}}
    for m, rows in detect.items():
        s = {k: med(rows, k) for k in ("area", "iou", "recall", "enrichment", "seconds")}
        summary["detectors"][m] = s
        print(f"{m:>36} {100 * s['area']:>5.1f}% {s['iou']:>6.2f} {100 * s['recall']:>6.1f}% {s['enrichment']:>7.2f} "
              f"{s['seconds']:>9.3f}")  # fmt: skip
    print(f"{'edit':>36} {'toward':>7} {'focus':>6} {'PSNR in region vs dense':>24} {'max change outside':>19}")
    for m, rows in edits.items():
        s = {k: med(rows, k) for k in ("toward", "focus", "psnr_in_region_vs_dense_db", "max_change_outside")}
        summary["edits"][m] = s
        print(f"{m:>36} {s['toward']:>7.2f} {s['focus']:>6.2f} {s['psnr_in_region_vs_dense_db']:>21.1f} dB "
              f"{s['max_change_outside']:>19.2e}")  # fmt: skip
    if timing:
        summary["speed"] = {k: statistics.median(t[k] for t in timing)
                            for k in ("dense_s", "sparse_s", "speedup", "region_fraction", "macs_ratio")}  # fmt: skip
        sp = summary["speed"]
        print(f"default edit ({editor.text_config.region}) vs dense img2img, {len(timing)} edits x {args.pairs} pairs: "
              f"dense {sp['dense_s']:.3f} s, edit {sp['sparse_s']:.3f} s, {sp['speedup']:.2f}x at "
              f"{100 * sp['region_fraction']:.0f}% region, MACs {sp['macs_ratio']:.2f}x")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"header": head, "summary": summary, "detect": detect, "edits": edits,
                                     "timing": timing, "args": {k: str(v) for k, v in vars(args).items()}},
                                    indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
