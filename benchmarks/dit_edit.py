"""One diffusion-transformer step, dense vs token-sparse, on real architectures with random weights (issue 36).

`--model sd3-medium`: the SD3-medium transformer shape (`SD3Transformer2DModel`: 24 joint blocks, 1536 wide, 24 heads
of 64, patch 2, 16 latent channels, context 4096 wide), a prompt of 333 tokens (77 CLIP + 256 T5), classifier-free
guidance batch 2. `--model flux2-klein-4b`: FLUX.2 [klein] 4B's transformer shape (`Flux2Transformer2DModel`:
3072 wide, 24 heads of 128, 128 packed latent channels, context 7680 wide, 5 double- and 20 single-stream blocks),
a 512-token prompt, no guidance batch (distilled), and a reference image of the same size in the sequence (Klein's
image editing: the stroke is on the reference, so its tokens and the generated image's at the same place are the
region). `--size` is the image size in pixels (latents are 1/8; FLUX.2 packs 2x2 of them into a token). `--layers`
(and `--single-layers`) reduce the depth to fit a smaller machine (say so in the results).

A diagonal brush stroke of `--fractions` of the latent gets fresh noise; dense and sparse forwards alternate in one
process (the first pair warms up); medians; MACs counted by hand (attention included), efficiency = speed-up / MACs
ratio, and the error of the sparse step against the dense edited step.

    python benchmarks/dit_edit.py --model sd3-medium --size 512 --dtype float32 --fractions 0.02
    python benchmarks/dit_edit.py --model sd3-medium --size 1024 --dtype bfloat16 --fractions 0.02
    python benchmarks/dit_edit.py --model flux2-klein-4b --size 1024 --dtype bfloat16 --batch 1 --layers 1 \
        --single-layers 4 --fractions 0.02
    python benchmarks/dit_edit.py --model sd3-medium --size 1024 --dtype bfloat16 --fractions 0.02 --device cuda

On CUDA (`--device cuda`) every timed region is synchronized before the clock is read and the GPU's name is recorded;
weights and inputs are drawn on the CPU as before and then moved.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_args import device_args
from unet_edit import device_label, device_meta, loadavg, stroke_region, sync, to_device

import sparsedit
from sparsedit import SparseConfig


def sd3_medium(layers: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        out_channels=16, pos_embed_max_size=192,
    )  # fmt: skip


def flux2_klein_4b(layers: int, single: int):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=layers, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False,
    )  # fmt: skip


# name: (builder, default layers, default single-stream layers, latent channels, prompt tokens, prompt width, pooled)
MODELS = {
    "sd3-medium": (lambda layers, single: sd3_medium(layers), 24, 0, 16, 333, 4096, 2048),
    "flux2-klein-4b": (flux2_klein_4b, 5, 20, 128, 512, 7680, 0),
}


def _ids(t: int, side: int) -> torch.Tensor:
    """FLUX.2's four-axis positions `(t, h, w, l)` of a `side` x `side` token grid."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    n = side * side
    return torch.stack([torch.full((n,), t), rows.reshape(-1), cols.reshape(-1), torch.zeros(n)], 1)


def build_case(
    name: str, layers: int, single: int, size: int, batch: int, dtype: torch.dtype, device=torch.device("cpu")
):
    build, _, _, channels, tokens, width, pooled = MODELS[name]
    torch.manual_seed(0)
    model = build(layers, single).eval()
    model = model if dtype == torch.float32 else model.to(dtype)
    g = torch.Generator().manual_seed(1)
    latent = size // 8
    kwargs = {"encoder_hidden_states": torch.randn(batch, tokens, width, generator=g).to(dtype)}
    if name.startswith("flux2"):
        side = latent // 2  # 2x2 latents per token
        x = torch.randn(batch, 2 * side * side, channels, generator=g).to(dtype)  # the image's tokens, the reference's
        kwargs["img_ids"] = torch.cat([_ids(0, side), _ids(10, side)])[None].expand(batch, -1, -1)
        kwargs["txt_ids"] = torch.stack([torch.zeros(tokens)] * 3 + [torch.arange(tokens)], 1)[None].expand(
            batch, -1, -1
        )
        kwargs["timestep"] = torch.full((batch,), 0.5)
    else:
        x = torch.randn(batch, channels, latent, latent, generator=g).to(dtype)
        kwargs["pooled_projections"] = torch.randn(batch, pooled, generator=g).to(dtype)
        kwargs["timestep"] = torch.full((batch,), 500.0)
    return model.to(device), x.to(device), {k: to_device(v, device) for k, v in kwargs.items()}, g


def edit_region(name: str, x: torch.Tensor, frac: float, batch: int) -> torch.Tensor:
    """The stroke as the model's input takes it: latent pixels `[B, h, w]`, or (FLUX.2) the tokens of the generated
    image and of the reference image at the stroke, `[B, 1, 2N]`."""
    if not name.startswith("flux2"):
        return stroke_region(x.shape[-1], frac, batch)
    side = math.isqrt(x.shape[1] // 2)
    tokens = stroke_region(side, frac, batch).reshape(batch, 1, -1)
    return torch.cat([tokens, tokens], dim=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="sd3-medium")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (latents are 1/8)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the model's)")
    ap.add_argument(
        "--single-layers", type=int, default=None, help="single-stream blocks (FLUX.2; default: the model's)"
    )
    ap.add_argument("--batch", type=int, default=2, help="2: classifier-free guidance")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    device_args(ap, fallback=False)
    ap.add_argument("--dilation", type=int, default=SparseConfig().dilation, help="tokens of dilation")
    ap.add_argument("--context", default="cache", choices=["cache", "recompute"], help="SparseConfig.dit_context")
    ap.add_argument("--cache-dtype", default=None, help="SparseConfig.cache_dtype (default: the model's dtype)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    layers = args.layers or MODELS[args.model][1]
    single = MODELS[args.model][2] if args.single_layers is None else args.single_layers
    model, x, kwargs, g = build_case(args.model, layers, single, args.size, args.batch, dtype, device)
    config = SparseConfig(
        dilation=args.dilation, dit_context=args.context, cache_dtype=args.cache_dtype, max_region_fraction=1.0
    )
    sparsedit.sparsify_(model, config)
    with torch.no_grad(), sparsedit.capturing(model, calibrate=False):
        sync(device)
        t0 = time.perf_counter()
        captured = model(x, **kwargs).sample
        sync(device)
        capture_s = time.perf_counter() - t0
    cache_bytes = sparsedit.last_stats(model)["cache_bytes"]
    print(f"{args.model} ({layers} + {single} blocks), {args.size} px, batch {args.batch}, {args.dtype}, context {args.context}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}{device_label(device)}, load {loadavg()}, "
          f"capture {capture_s:.1f} s, cache {cache_bytes / 2**20:.0f} MiB")  # fmt: skip
    print(f"{'region':>7} {'tokens':>7} {'dense s':>8} {'sparse s':>8} {'speed-up':>8} {'MACs ratio':>10} "
          f"{'effic.':>6} {'max err':>8} {'PSNR':>6}")  # fmt: skip
    rows = []
    for frac in args.fractions:
        region = edit_region(args.model, x, frac, args.batch).to(device)
        where = region.reshape(args.batch, -1)[..., None] if x.dim() == 3 else region[:, None]
        x_edit = torch.where(where, torch.randn(x.shape, generator=g).to(dtype).to(device), x)
        dense_t, sparse_t = [], []
        with torch.no_grad():
            for i in range(args.repeats + 1):  # the first pair warms up
                sync(device)
                t0 = time.perf_counter()
                dense = model(x_edit, **kwargs).sample
                sync(device)
                t1 = time.perf_counter()
                with sparsedit.editing(model, region=region):
                    sync(device)
                    t2 = time.perf_counter()
                    sparse = model(x_edit, **kwargs).sample
                    sync(device)
                    t3 = time.perf_counter()
                    stats = sparsedit.last_stats(model)
                if i:
                    dense_t.append(t1 - t0)
                    sparse_t.append(t3 - t2)
                print(f"  pair {i}: dense {t1 - t0:.2f} s, sparse {t3 - t2:.2f} s, load {loadavg()}", flush=True)
        err = (sparse.float() - dense.float()).abs()
        mse = float(err.square().mean())
        peak = float(dense.float().amax() - dense.float().amin())
        row = {
            "region_fraction": float(region.float().mean()),
            "token_fraction": stats["layers"][0]["active_fraction"],
            "dense_s": statistics.median(dense_t),
            "sparse_s": statistics.median(sparse_t),
            "dense_runs": dense_t,
            "sparse_runs": sparse_t,
            "macs_dense": stats["macs_dense"],
            "macs_sparse": stats["macs_sparse"],
            "max_abs_error": float(err.max()),
            "edit_effect_max": float((dense.float() - captured.float()).abs().max()),
            "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
        }
        row["speedup"] = row["dense_s"] / row["sparse_s"]
        row["macs_ratio"] = row["macs_dense"] / max(1, row["macs_sparse"])
        row["efficiency"] = row["speedup"] / row["macs_ratio"]
        rows.append(row)
        print(
            f"{100 * row['region_fraction']:>6.1f}% {100 * row['token_fraction']:>6.1f}% {row['dense_s']:>8.2f} "
            f"{row['sparse_s']:>8.2f} {row['speedup']:>7.2f}x {row['macs_ratio']:>9.1f}x {row['efficiency']:>6.2f} "
            f"{row['max_abs_error']:>8.3f} {row['psnr_db']:>6.1f}"
        )
    meta = {"model": args.model, "layers": layers, "single_layers": single, "size": args.size, "batch": args.batch, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "config": config.to_dict(),
            "cpu": platform.processor() or platform.machine(), "loadavg_end": loadavg(), "cache_bytes": cache_bytes,
            "capture_s": capture_s, **device_meta(device)}  # fmt: skip
    args.json = args.json or Path(f"benchmarks/results/dit_edit_{args.model}_{args.size}_{args.dtype}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
