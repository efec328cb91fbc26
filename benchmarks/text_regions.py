"""How well each prompt-edit region detector covers the change a dense regeneration makes (issue 4).

For each seed and prompt pair, on a small SD-architecture txt2img pipeline (random weights, built offline): capture
the source prompt, regenerate the target prompt densely, and take the per-pixel change `|dense - original|`. For each
`TextEditConfig.region` method, `editor.find_region` gives a region; we report its area, the share of the change's
energy inside it (recall), the ratio of the two (enrichment: 1.0 is no better than a random region of that area), and
the detection time. With random weights, prompts change the image almost everywhere, so this measures the detectors'
mechanics rather than their semantic quality; trained weights come with issue 7.

    python benchmarks/text_regions.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from unet_edit import loadavg

from sparsedit import SparseConfig, SparseEditor, TextEditConfig
from sparsedit.testing import tiny_sd


PAIRS = [("a red house", "a blue house"), ("a red house by the lake", "a red house"), ("a lake", "a red lake")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/text_regions.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = tiny_sd(tempfile.mkdtemp(), "txt2img", unet_channels=(32, 64, 128), vae_channels=(16, 32, 32, 32))
    editor = SparseEditor(pipe, SparseConfig(input_dilation=2))
    kw = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "output_type": "pt"}
    methods = ["latent_diff", "cross_attention", "noise_diff"]
    results = {m: [] for m in methods}
    for seed in range(args.seeds):
        for source, target in PAIRS:
            original = editor.capture(prompt=source, generator=torch.Generator().manual_seed(seed), **kw).images
            dense = pipe(prompt=target, generator=torch.Generator().manual_seed(seed), **kw).images
            change = ((dense - original) ** 2).sum(dim=1)[0]
            for m in methods:
                t0 = time.perf_counter()
                region = editor.find_region(prompt=target, text_config=TextEditConfig(region=m))[0]
                seconds = time.perf_counter() - t0
                area = float(region.float().mean())
                recall = float(change[region].sum() / change.sum())
                results[m].append({"seed": seed, "source": source, "target": target, "area": area,
                                   "recall": recall, "seconds": seconds})  # fmt: skip
    print(f"tiny SD-architecture txt2img (UNet 32/64/128), {args.size} px, {args.steps} steps, CFG 7.5, "
          f"{args.seeds} seeds x {len(PAIRS)} prompt pairs, threads {torch.get_num_threads()}, load {loadavg()}")  # fmt: skip
    print(f"{'method':>16} {'area':>6} {'recall':>7} {'enrichment':>10} {'detect s':>9}")
    summary = {}
    for m, rows in results.items():
        area = statistics.median(r["area"] for r in rows)
        recall = statistics.median(r["recall"] for r in rows)
        enrich = statistics.median(r["recall"] / r["area"] for r in rows if r["area"] > 0) if any(
            r["area"] > 0 for r in rows) else float("nan")  # fmt: skip
        secs = statistics.median(r["seconds"] for r in rows)
        summary[m] = {"area": area, "recall": recall, "enrichment": enrich, "seconds": secs}
        print(f"{m:>16} {100 * area:>5.1f}% {100 * recall:>6.1f}% {enrich:>10.2f} {secs:>9.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "runs": results, "size": args.size, "steps": args.steps},
                                    indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
