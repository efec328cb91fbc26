"""Same edit, same bits (issue 34): the probes that found results depending on the machine's load, as numbers.

On the shipped scene-ddpm at 96 px (SDEdit, 20 steps x 0.7, `input_dilation=2` as the server uses it), a stroke of
about 3% of the image:
1. one editor: the same uncommitted edit twice, then committed: max difference between the three results;
2. fresh editors in one process (a new pipeline and editor each): how many different results;
3. the same with another process keeping a core busy (bounded: it stops itself after 300 s and is killed at the end).

    python benchmarks/determinism.py            # prints a table, writes benchmarks/results/determinism.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from unet_edit import loadavg  # noqa: E402

import sparsedit  # noqa: E402


def stroke(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[:, :, 30:46, 40:58] = torch.tensor([0.9, -0.6, 0.2])[:, None, None]
    return y


def fresh_edit(size: int, image: torch.Tensor, commit: bool = True) -> torch.Tensor:
    pipe = sparsedit.pretrained.load("scene-ddpm", size=size)
    editor = sparsedit.SparseEditor(pipe, sparsedit.SparseConfig(input_dilation=2))
    editor.capture(image=image, strength=0.7, num_inference_steps=20, generator=torch.Generator().manual_seed(0),
                   output_type="pt")  # fmt: skip
    out = editor.edit(image=stroke(image), commit=commit, output_type="pt").images
    editor.remove()
    return out


def distinct(results: list[torch.Tensor]) -> tuple[int, float]:
    """How many different results, and the largest difference from the first, in 8-bit units."""
    groups = []
    for r in results:
        if not any(torch.equal(r, g) for g in groups):
            groups.append(r)
    return len(groups), max(float((r - results[0]).abs().max()) * 255 for r in results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--fresh", type=int, default=8)
    ap.add_argument("--busy", type=int, default=6)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/determinism.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    print(f"scene-ddpm {args.size} px, threads {torch.get_num_threads()}, torch {torch.__version__}, load {loadavg()}")
    rows = {}
    pipe = sparsedit.pretrained.load("scene-ddpm", size=args.size)
    editor = sparsedit.SparseEditor(pipe, sparsedit.SparseConfig(input_dilation=2))
    editor.capture(image=image, strength=0.7, num_inference_steps=20, generator=torch.Generator().manual_seed(0),
                   output_type="pt")  # fmt: skip
    runs = [editor.edit(image=stroke(image), commit=c, output_type="pt").images for c in (False, False, True)]
    rows["preview, preview, commit"] = distinct(runs) + (editor.last_stats.get("ran_dense"),)
    editor.remove()
    rows[f"{args.fresh} fresh editors"] = distinct([fresh_edit(args.size, image) for _ in range(args.fresh)]) + (None,)
    code = "import time\nt = time.time()\nwhile time.time() - t < 300: pass"
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1)
        results = [fresh_edit(args.size, image) for _ in range(args.busy)]
    finally:
        busy.kill()
        busy.wait()
    rows[f"{args.busy} fresh editors, one busy process beside"] = distinct(results) + (None,)
    print(f"{'probe':<45} {'distinct results':>16} {'max diff /255':>13}")
    for name, (n, diff, _) in rows.items():
        print(f"{name:<45} {n:>16} {diff:>13.2f}")
    print(f"load at end {loadavg()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({k: {"distinct": v[0], "max_diff_255": v[1]} for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
