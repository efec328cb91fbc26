"""What an SDEdit capture holds, and what it costs: cache bytes by part and by kind of entry, peak RSS, and the edit's
fidelity and time against the dense pipeline (issue 17).

SD 1.5 architecture img2img (random weights, built offline; the pipeline of `benchmarks/sdedit_e2e.py`),
`skimage.data.astronaut()`, DDIM, CFG 7.5, a red brush stroke over ~1% of the image, `SparseEditor(pipe)` with the
default config unless `--cache-dtype`/`--budget` say otherwise. The dense side is the plain `pipe(image=edited, ...)`.

    python benchmarks/cache_memory.py --size 256 --steps 10        # the quick check
    python benchmarks/cache_memory.py --size 512 --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from sdedit_e2e import sd15_pipeline
from unet_edit import loadavg, stroke_region

from sparsedit import SparseConfig, SparseEditor
from sparsedit.demo import load_photo
from sparsedit.nn.base import handler_of
from sparsedit.spatial import sparse_state


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def by_kind(model) -> dict:
    """Cache bytes of one sparsified model by entry name (`out`, `k`, `mean`...) and layer kind."""
    kinds = {h.name: h.kind for h in map(handler_of, model.modules()) if h is not None}
    out = defaultdict(int)
    for key, fields in sparse_state(model).cache.export():
        name = key[0] if isinstance(key, tuple) else key
        kind = kinds.get(name, "input" if str(name).startswith("__") else "?")
        for field, (t, *_) in fields.items():
            out[f"{kind}.{field}"] += t.numel() * t.element_size()
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.7)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dtype", default="default", help="'default' (the config's), or a dtype name, or 'none'")
    ap.add_argument("--budget", default=None, help="SparseConfig.cache_budget")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = sd15_pipeline(torch.float32)
    weights = sum(
        p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()
    )
    kw = {}
    if args.cache_dtype != "default":
        kw["cache_dtype"] = None if args.cache_dtype == "none" else args.cache_dtype
    if args.budget is not None:
        kw["cache_budget"] = args.budget
    config = SparseConfig(input_dilation=5, **kw)
    editor = SparseEditor(pipe, config)
    photo, source = load_photo(args.size)
    image = (photo / 2 + 0.5).clamp(0, 1)
    call = {"prompt": "a photo of an astronaut", "strength": args.strength, "num_inference_steps": args.steps}
    print(f"SD 1.5 architecture img2img, {args.size} px, {args.steps} x {args.strength}, CFG, fp32 weights, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, load {loadavg()}")  # fmt: skip
    print(f"config: {config.to_dict()}")
    t0 = time.perf_counter()
    editor.capture(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    capture_s = time.perf_counter() - t0
    cache = editor.last_stats["cache_bytes"]
    parts = dict(getattr(cache, "parts", {}))
    print(
        f"capture {capture_s:.1f} s; cache {int(cache) / 2**30:.3f} GiB { ({k: round(v / 2**30, 3) for k, v in parts.items()}) }"
    )
    for name, model in (("unet", pipe.unet), ("vae_decoder", pipe.vae.decoder), ("vae_encoder", pipe.vae.encoder)):
        top = list(by_kind(model).items())[:6]
        print(f"  {name}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in top))
    region = stroke_region(args.size, args.fraction, 1)
    edited = torch.where(region[:, None], torch.tensor([0.95, 0.1, 0.15])[:, None, None], image)
    dense_t, sparse_t = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        dense = pipe(image=edited, generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
        t1 = time.perf_counter()
        sparse = editor.edit(image=edited, commit=False, output_type="pt").images
        t2 = time.perf_counter()
        dense_t.append(t1 - t0)
        sparse_t.append(t2 - t1)
    mse = float((sparse.float() - dense.float()).square().mean())
    row = {
        "size": args.size, "steps": args.steps, "config": config.to_dict(), "capture_s": capture_s,
        "cache_bytes": int(cache), "cache_parts": parts, "weights_bytes": weights, "peak_rss": peak_rss(),
        "dense_s": statistics.median(dense_t), "sparse_s": statistics.median(sparse_t),
        "psnr_db": 10 * math.log10(1.0 / mse) if mse else float("inf"),
        "region_fraction": editor.last_stats["region_fraction"], "loadavg_end": loadavg(),
    }  # fmt: skip
    print(f"edit {100 * row['region_fraction']:.1f}%: dense {row['dense_s']:.1f} s, sparse {row['sparse_s']:.1f} s "
          f"({row['dense_s'] / row['sparse_s']:.2f}x), PSNR vs dense {row['psnr_db']:.1f} dB; peak RSS "
          f"{row['peak_rss'] / 2**30:.2f} GiB (weights {weights / 2**30:.2f} GiB); load {loadavg()}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2, default=float))


if __name__ == "__main__":
    main()
