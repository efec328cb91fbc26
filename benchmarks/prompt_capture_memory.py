"""What a prompt-edit capture holds (issue 17): `StableDiffusionPipeline` with the SD 1.5 architecture (random
weights, the pipeline of `sdedit_e2e.py`), txt2img at 512 px, 20 steps, CFG 7.5, `SparseEditor(pipe)` with the
editor's defaults (`--cache-dtype` to override). Prints `cache_bytes` by part and the peak RSS of the capture.

    python benchmarks/prompt_capture_memory.py
    python benchmarks/prompt_capture_memory.py --cache-dtype int8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sdedit_e2e import sd15_pipeline
from unet_edit import loadavg

from sparsedit import SparseConfig, SparseEditor


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dtype", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd15_pipeline(torch.float32).components)
    pipe.set_progress_bar_config(disable=True)
    editor = SparseEditor(pipe, SparseConfig(input_dilation=2, cache_dtype=args.cache_dtype))
    print(f"txt2img {args.size} px, {args.steps} steps, cache dtype {args.cache_dtype}, load {loadavg()}")
    t0 = time.perf_counter()
    editor.capture(prompt="a photo of a red house by a lake", height=args.size, width=args.size,
                   num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    stats = editor.last_stats
    cache = stats["cache_bytes"]
    row = {"seconds": time.perf_counter() - t0, "cache_bytes": int(cache), "parts": cache.parts,
           "peak_bytes": stats["peak_bytes"], "cache_dtype": args.cache_dtype, "load_end": loadavg()}  # fmt: skip
    print(f"capture {row['seconds']:.0f} s; cache {int(cache) / 2**30:.2f} GiB "
          f"{ {k: round(v / 2**30, 3) for k, v in cache.parts.items()} }; capture peak RSS "
          f"{row['peak_bytes'] / 2**30:.2f} GiB; load {loadavg()}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
