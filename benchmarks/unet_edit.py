"""One UNet forward, dense vs sparse, on real diffusion architectures with random weights.

(a) Stable Diffusion 1.5 UNet architecture (`--model sd15`: block_out_channels 320/640/1280/1280, cross-attention 768),
512 px images = 64x64 latents, batch 2 (classifier-free guidance), random text context of 77 tokens.
(b) DDPM church-256 (`UNet2DModel`, block_out_channels 128/128/256/256/512/512, attention at 16x16), batch 1.
(d) The SDXL base UNet architecture (`--model sdxl`), 1024 px = 128x128 latents, batch 2 (guidance), context of 77
tokens x 2048 and the `text_time` conditioning.
(c) The SD VAE decoder (`--model sd-vae-decoder`: `AutoencoderKL` decoder, 128/256/512/512, mid-block attention),
64x64 latents to a 512 px image, batch 1.
Regions of ~1%, ~5% and ~20% of the image. Dense and sparse runs alternate in one process; medians; MACs ratio and the error
against the dense edited result beside each latency ratio.

    python benchmarks/unet_edit.py --model ddpm-church
    python benchmarks/unet_edit.py --model sd15 --fractions 0.01 0.05 0.2
    python benchmarks/unet_edit.py --model sd-vae-decoder
    python benchmarks/unet_edit.py --model sdxl --fractions 0.01 0.05 --repeats 2 --cache-dtype bfloat16
    python benchmarks/unet_edit.py --model sd15 --fractions 0.012 --dtype float16 --device cuda

On CUDA (`--device cuda`) every timed region is synchronized before the clock is read and the GPU's name is recorded;
weights and inputs are drawn on the CPU as before (the same values on every device) and then moved.
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

import sparsedit
from sparsedit import SparseConfig


def ddpm_church():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=256,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    )


def sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sdxl():
    """The Stable Diffusion XL base UNet architecture (320/640/1280, 1/2/10 transformer layers, context 2048,
    `text_time` conditioning): 2.6 B parameters."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sd_vae():
    """The Stable Diffusion VAE architecture (`AutoencoderKL`, 128/256/512/512, two layers per block)."""
    from sparsedit.testing import sd_style_vae

    return sd_style_vae((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)


def sd_vae_decoder():
    return sd_vae().decoder


# name: (builder, input size, batch, input channels, text context (tokens, width) or None, default input dilation)
MODELS = {
    "ddpm-church": (ddpm_church, 256, 1, 3, None, 5),
    "sd15": (sd15, 64, 2, 4, (77, 768), 2),  # 512 px image = 64x64 latents; batch 2 = classifier-free guidance
    "sd-vae-decoder": (sd_vae_decoder, 64, 1, 4, None, 1),  # the latent region dilated once more, as SparseEditor
    "sdxl": (sdxl, 128, 2, 4, (77, 2048), 2),  # 1024 px image = 128x128 latents, guidance batch 2
}


def forward(model, x, t, extra):
    if t is None:
        return model(x)
    return model(x, t, **extra).sample


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that a host clock read next times it (CUDA runs asynchronously);
    nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_meta(device: torch.device) -> dict:
    """What a result records of an accelerator (nothing for the CPU, whose results stay as they were)."""
    if device.type != "cuda":
        return {}
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}


def device_label(device: torch.device) -> str:
    """`, <GPU name>` for a header line on CUDA; empty on the CPU."""
    return f", {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda" else ""


def build_case(name: str, dtype: torch.dtype, device: torch.device = torch.device("cpu")):
    """One benchmark case: the model (channels-last, eval), its input, timestep, extra keyword inputs, and the
    generator that drew them (edits draw from it next). Everything is drawn on the CPU, then moved to `device`."""
    build, size, batch, channels, context, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval().to(dtype).to(memory_format=torch.channels_last).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    t = None if name == "sd-vae-decoder" else torch.full((batch,), 500).to(device)
    extra = {} if context is None else {"encoder_hidden_states": torch.randn(batch, *context, generator=g).to(dtype)}
    if name == "sdxl":  # the pooled text embedding and the size/crop ids of a 1024 px image
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, dtype=dtype)
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g).to(dtype), "time_ids": ids}
    extra = {k: to_device(v, device) for k, v in extra.items()}
    return model, x, t, extra, g


def to_device(v, device: torch.device):
    """A tensor, or a dict of them, on `device`."""
    return {k: to_device(u, device) for k, u in v.items()} if isinstance(v, dict) else v.to(device)


def edited_input(x: torch.Tensor, region: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`x` with fresh noise inside `region` (channels-last, like the input); the noise is drawn on the CPU."""
    x_edit = torch.where(region[:, None], torch.randn(x.shape, generator=g).to(x.dtype).to(x.device), x)
    return x_edit.contiguous(memory_format=torch.channels_last)


def stroke_region(size: int, fraction: float, batch: int) -> torch.Tensor:
    """A diagonal brush stroke whose width is chosen (by bisection) to cover `fraction` of the image."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    p0, p1 = torch.tensor([0.3, 0.25]) * size, torch.tensor([0.6, 0.55]) * size
    seg = p1 - p0
    rel = torch.stack([yy - p0[0], xx - p0[1]], -1)
    along = ((rel @ seg) / seg.dot(seg)).clamp(0, 1)
    dist = (rel - along[..., None] * seg).norm(dim=-1)
    lo, hi = 0.0, float(size)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (dist <= mid).float().mean() < fraction else (lo, mid)
    return (dist <= hi)[None].expand(batch, -1, -1).contiguous()


def alternate(run_dense, run_sparse, repeats: int, warmup: int = 0):
    """Dense and sparse runs alternating, `warmup` untimed pairs first; returns their times and last outputs."""
    dense_t, sparse_t, dense, sparse = [], [], None, None
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        dense = run_dense()
        t1 = time.perf_counter()
        sparse = run_sparse()
        t2 = time.perf_counter()
        print(f"  pair {i}: dense {t1 - t0:.1f} s, sparse {t2 - t1:.1f} s, load {loadavg()}", flush=True)
        if i >= warmup:
            dense_t.append(t1 - t0)
            sparse_t.append(t2 - t1)
    return dense_t, sparse_t, dense, sparse


def pipeline_row(stats, dense_t, sparse_t, dense, sparse, **extra) -> dict:
    """An end-to-end row: medians, MACs from the edit's `stats`, speed-up, MACs ratio, efficiency, and the error of
    the sparse result against the dense one (images in [0, 1]); prints it."""
    err = (sparse.float() - dense.float()).abs()
    mse = float(err.square().mean())
    row = {
        "region_fraction": stats["region_fraction"],
        "dense_s": statistics.median(dense_t),
        "sparse_s": statistics.median(sparse_t),
        "dense_runs": dense_t,
        "sparse_runs": sparse_t,
        "macs_dense": stats["macs_dense"],
        "macs_sparse": stats["macs_sparse"],
        "max_abs_error": float(err.max()),
        "psnr_db": 10 * math.log10(1.0 / mse) if mse else float("inf"),
        **extra,
    }
    row["speedup"] = row["dense_s"] / row["sparse_s"]
    row["macs_ratio"] = row["macs_dense"] / max(1, row["macs_sparse"])
    row["efficiency"] = row["speedup"] / row["macs_ratio"]
    print(f"{100 * row['region_fraction']:>6.1f}% {row['dense_s']:>8.1f} {row['sparse_s']:>8.1f} "
          f"{row['speedup']:>7.2f}x {row['macs_ratio']:>9.1f}x {row['efficiency']:>6.2f} "
          f"{row['max_abs_error']:>8.3f} {row['psnr_db']:>6.1f}")  # fmt: skip
    return row


PIPELINE_HEADER = (f"{'region':>7} {'dense s':>8} {'sparse s':>8} {'speed-up':>8} {'MACs ratio':>10} {'effic.':>6} "
                   f"{'max err':>8} {'PSNR':>6}")  # fmt: skip


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="ddpm-church")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.20])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    device_args(ap)
    ap.add_argument(
        "--tile", default="auto", help="auto (SparseConfig's default), an int, or per map height like 64:8,16:1,0:8"
    )
    ap.add_argument(
        "--input-dilation", type=int, default=None, help="default: 5 px for DDPM (SIGE), 2 latents px for SD"
    )
    ap.add_argument("--max-region-fraction", type=float, default=SparseConfig().max_region_fraction)
    ap.add_argument("--cache-dtype", default=None, help="SparseConfig.cache_dtype (default: the model's dtype)")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/unet_edit_<model>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    _, size, batch, _, _, dilation = MODELS[args.model]
    args.input_dilation = dilation if args.input_dilation is None else args.input_dilation
    unet, x, t, extra, g = build_case(args.model, dtype, device)
    tile = (
        None
        if args.tile == "auto"
        else {int(k): int(v) for k, v in (p.split(":") for p in args.tile.split(","))}
        if ":" in args.tile
        else int(args.tile)
    )
    config = SparseConfig(
        tile_size=tile, input_dilation=args.input_dilation, max_region_fraction=args.max_region_fraction,
        cache_dtype=args.cache_dtype, **({"measured_fallback": False} if args.no_measured_fallback else {}),
    )  # fmt: skip
    sparsedit.sparsify_(unet, config)
    with sparsedit.capturing(unet, calibrate=False):
        captured = forward(unet, x, t, extra)
    cache_bytes = sparsedit.last_stats(unet)["cache_bytes"]
    sync(device)
    t0 = time.perf_counter()
    cal = sparsedit.calibrate(unet)  # once per process: what a capture pays for "never slower than dense"
    sync(device)
    calibrate_s = time.perf_counter() - t0
    print(f"{args.model}, {args.dtype}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{platform.machine()}{device_label(device)}, load {loadavg()}, cache {cache_bytes / 2**20:.0f} MiB")  # fmt: skip
    if cal is None:
        print("no calibration (measured_fallback=False): every edit runs sparse up to max_region_fraction")
    else:
        probes = ", ".join(f"{100 * f:.1f}%: {s:.2f} s" for f, s in cal.probes)
        print(f"calibration {calibrate_s:.1f} s (dense {cal.dense_seconds:.2f} s, sparse {probes}); sparse up to "
              f"{100 * cal.break_even:.1f}% of the input")  # fmt: skip
    print(
        f"{'region':>7} {'dense s':>8} {'sparse s':>8} {'speed-up':>8} {'MACs ratio':>10} {'max err':>8} {'PSNR':>6}"
    )
    rows = []
    for frac in args.fractions:
        region = stroke_region(size, frac, batch).to(device)
        x_edit = edited_input(x, region, g)
        dense_t, sparse_t = [], []
        with torch.no_grad():
            for i in range(args.repeats + 1):  # the first pair warms up
                sync(device)
                t0 = time.perf_counter()
                dense = forward(unet, x_edit, t, extra)
                sync(device)
                t1 = time.perf_counter()
                with sparsedit.editing(unet, region=region):
                    sync(device)
                    t2 = time.perf_counter()
                    sparse = forward(unet, x_edit, t, extra)
                    sync(device)
                    t3 = time.perf_counter()
                    stats = sparsedit.last_stats(unet)
                if i:
                    dense_t.append(t1 - t0)
                    sparse_t.append(t3 - t2)
        err = (sparse.float() - dense.float()).abs()
        mse = float(err.square().mean())
        peak = float(dense.float().amax() - dense.float().amin())
        row = {
            "region_fraction": float(region.float().mean()),
            "dense_s": statistics.median(dense_t),
            "sparse_s": statistics.median(sparse_t),
            "macs_dense": stats["macs_dense"],
            "macs_sparse": stats["macs_sparse"],
            "max_abs_error": float(err.max()),
            "edit_effect_max": float((dense.float() - captured.float()).abs().max()),
            "psnr_db": 10 * math.log10(peak**2 / mse) if mse else float("inf"),
            "dense_layers": stats["dense_layers"],
        }
        row["speedup"] = row["dense_s"] / row["sparse_s"]
        row["macs_ratio"] = row["macs_dense"] / max(1, row["macs_sparse"])
        rows.append(row)
        p = 4 if device.type == "cuda" else 2  # seconds: a GPU forward takes milliseconds
        print(
            f"{100 * row['region_fraction']:>6.1f}% {row['dense_s']:>8.{p}f} {row['sparse_s']:>8.{p}f} "
            f"{row['speedup']:>7.2f}x {row['macs_ratio']:>9.1f}x {row['max_abs_error']:>8.3f} {row['psnr_db']:>6.1f}"
        )
    meta = {"model": args.model, "dtype": args.dtype, "cache_dtype": args.cache_dtype, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "config": config.to_dict(), "loadavg_end": loadavg(), "cache_bytes": cache_bytes,
            "calibration": None if cal is None else cal.to_dict(), "calibrate_s": calibrate_s,
            **device_meta(device)}  # fmt: skip
    args.json = args.json or Path(f"benchmarks/results/unet_edit_{args.model}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
