"""Evidence that the shipped models learned: held-out metrics against untrained copies, sample grids, loss curves.

    python training/evaluate.py                 # the shipped weights; writes docs/assets/ and training/results.json
    python training/evaluate.py --ddpm training/runs/scene-ddpm/scene-ddpm.safetensors --spade ...

Held-out scenes come from seeds the training pool never used (`common.HELD_OUT_SEED`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import HELD_OUT_SEED, ROOT, RUNS, Run, loss_curve_svg
from PIL import Image

from sparsedit import pretrained
from sparsedit.data import scenes
from sparsedit.metrics import psnr, ssim


def noise_mse(unet, sched, x0, timesteps, seed=0) -> dict[int, float]:
    """Mean squared error of the predicted noise at each timestep, on fixed noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=g)
            a = sched.alphas_cumprod[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(xt, torch.full((x0.shape[0],), t)).sample
            out[t] = float((pred - noise).square().mean())
    return out


def class_mean_baseline(labels, images):
    """Each pixel painted with its class's mean colour over the set: what a generator that ignores texture,
    shading and layout could reach at best."""
    out = torch.zeros_like(images)
    for c in range(scenes.NUM_CLASSES):
        m = labels == c
        if m.any():
            mean = images.permute(1, 0, 2, 3)[:, m].mean(1)
            out.permute(1, 0, 2, 3)[:, m] = mean[:, None]
    return out


def save_png(arr: torch.Tensor, path: Path, scale: int = 1):
    img = Image.fromarray(arr.numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ddpm", default=None, help="weights file (default: the shipped one)")
    p.add_argument("--spade", default=None, help="weights file (default: the shipped one)")
    p.add_argument("--assets", default=str(ROOT.parent / "docs" / "assets"))
    p.add_argument("--json", default=str(ROOT / "results.json"))
    p.add_argument("--n", type=int, default=64, help="held-out scenes")
    p.add_argument("--sample-steps", type=int, default=100, help="DDPM sampling steps for the sample grid")
    args = p.parse_args(argv)
    assets = Path(args.assets)
    assets.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "platform": platform.platform(), "threads": torch.get_num_threads()}

    held = scenes.sample(args.n, 64, seed=HELD_OUT_SEED)
    save_png(scenes.grid(held["image"][:32]), assets / "scenes-grid.png", 2)
    save_png(scenes.grid(scenes.to_rgb(held["labels"][:32])), assets / "scenes-labels.png", 2)

    # -- diffusion model ----------------------------------------------------------------------------------------
    pipe = pretrained.load("scene-ddpm", path=args.ddpm)
    torch.manual_seed(0)
    untrained = pretrained.build("scene-ddpm").eval()
    ts = [10, 50, 100, 250, 500, 750, 950]
    trained_mse = noise_mse(pipe.unet, pipe.scheduler, held["image"], ts)
    untrained_mse = noise_mse(untrained, pipe.scheduler, held["image"], ts)
    results["ddpm"] = {
        "held_out_scenes": args.n,
        "noise_mse_trained": trained_mse,
        "noise_mse_untrained": untrained_mse,
        "noise_mse_trained_mean": sum(trained_mse.values()) / len(ts),
        "noise_mse_untrained_mean": sum(untrained_mse.values()) / len(ts),
    }
    started = time.perf_counter()
    samples = pipe(batch_size=32, num_inference_steps=args.sample_steps, generator=torch.Generator().manual_seed(0),
                   output_type="np").images  # fmt: skip
    results["ddpm"]["sample_seconds"] = time.perf_counter() - started
    save_png(scenes.grid(torch.from_numpy((samples * 255).round().astype("uint8"))), assets / "ddpm-samples.png", 2)
    print(json.dumps(results["ddpm"], indent=1), flush=True)

    # -- GAN ----------------------------------------------------------------------------------------------------
    gen = pretrained.load("scene-spade", path=args.spade)
    torch.manual_seed(0)
    raw = pretrained.build("scene-spade").eval()
    with torch.no_grad():
        fake = gen(held["labels"])
        fake_untrained = raw(held["labels"])
    base = class_mean_baseline(held["labels"], held["image"])
    real = held["image"]
    results["spade"] = {
        "held_out_scenes": args.n,
        "psnr_db": float(psnr(fake, real).mean()),
        "ssim": float(ssim(fake, real).mean()),
        "psnr_db_untrained": float(psnr(fake_untrained, real).mean()),
        "ssim_untrained": float(ssim(fake_untrained, real).mean()),
        "psnr_db_class_mean_colours": float(psnr(base, real).mean()),
        "ssim_class_mean_colours": float(ssim(base, real).mean()),
    }
    k = 8
    rows = torch.cat([scenes.to_rgb(held["labels"][:k]),
                      *(((t[:k].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
                        for t in (real, fake))])  # fmt: skip
    save_png(scenes.grid(rows, nrow=k), assets / "spade-samples.png", 2)
    print(json.dumps(results["spade"], indent=1), flush=True)

    # -- loss curves --------------------------------------------------------------------------------------------
    for name, series, title in (
        ("scene-ddpm", ["loss"], "scene-ddpm: noise-prediction MSE (training batches)"),
        ("scene-spade", ["l1", "d_real", "d_fake"], "scene-spade: L1 to the scene, discriminator hinge losses"),
    ):
        log = RUNS / name / "loss.csv"
        if log.exists():
            h = Run(RUNS / name, series).history()
            loss_curve_svg(h["step"], {s: h[s] for s in series}, title, assets / f"{name}-loss.svg")
            results[name.split("-")[1]]["trained_steps"] = int(h["step"][-1])
            results[name.split("-")[1]]["trained_minutes"] = round(h["seconds"][-1] / 60, 1)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json} and {assets}")


if __name__ == "__main__":
    main()
