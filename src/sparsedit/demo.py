"""`sparsedit demo`: edits recomputed sparsely against the dense result of the same edit, as an HTML report.

The first sections use the trained scene models (`sparsedit.pretrained`): SDEdit of a brush stroke with the pixel
DDPM, and a label-map edit with the SPADE generator. The others run full-size architectures (Stable Diffusion img2img
and prompt edits, GauGAN Cityscapes, a UNet level, a BatchNorm trunk) with random weights: they show how much work an
edit saves and how close the sparse result is, not a pretty image.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nn as snn
from .config import SparseConfig
from .regions import difference_mask
from .spatial import capturing, editing, last_stats, sparsify_


def load_photo(size: int) -> tuple[torch.Tensor, str]:
    """`skimage.data.astronaut()` (ships with scikit-image, offline) as `[1, 3, size, size]` in [-1, 1]."""
    try:
        from skimage import data

        img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
        source = "skimage.data.astronaut()"
    except ImportError:  # a plain install without the dev extra: a smooth synthetic image instead
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 512), torch.linspace(-1, 1, 512), indexing="ij")
        img = torch.stack([xx, yy, (xx * yy).sin()])[None]
        source = "synthetic gradient (install scikit-image for the photo)"
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False), source


def paint_stroke(img: torch.Tensor) -> torch.Tensor:
    """A user's brush stroke: a short thick red line across the upper right of the image."""
    out = img.clone()
    _, _, h, w = img.shape
    t = torch.linspace(0, 1, 200)
    ys = (0.22 + 0.10 * t) * h
    xs = (0.62 + 0.16 * t) * w
    r = max(1, round(0.012 * h))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = torch.zeros(h, w, dtype=torch.bool)
    for y, x in zip(ys.tolist(), xs.tolist()):
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    color = torch.tensor([0.9, -0.8, -0.7])[:, None]
    out[0][:, mask] = color
    return out


class UNetLevel(nn.Module):
    """conv_in → ResBlocks at full and half resolution → upsample → skip concat → ResBlock → conv_out."""

    def __init__(self, c: int = 64, groups: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.res1 = snn.ResBlock(c, c, groups)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = nn.Sequential(snn.ResBlock(2 * c, 2 * c, groups), snn.ResBlock(2 * c, 2 * c, groups))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2 * c, c, 3, padding=1))
        self.cat = snn.Concat()
        self.res_out = snn.ResBlock(2 * c, c, groups)
        self.conv_out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x):
        h = self.res1(self.conv_in(x))
        u = self.up(self.mid(self.down(h)))
        return self.conv_out(self.res_out(self.cat(u, h)))


def bn_stack(c: int = 64) -> nn.Sequential:
    """A GAN-style generator trunk with eval BatchNorm: sparse editing is exact here."""
    layers = [nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.Conv2d(c, 3, 3, padding=1), nn.Tanh()]
    model = nn.Sequential(*layers).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def sdedit_pipeline(size: int):
    """A small pixel-space DDPM pipeline (UNet2DModel with attention at the lowest resolution), random weights."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    ).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def _row(name, dense, sparse, dense_seconds, stats, original) -> dict:
    err = (sparse - dense).abs()
    mse = float(err.square().mean())
    return {
        "name": name,
        "dense_seconds": dense_seconds,
        "sparse_seconds": stats["seconds"],
        "speedup": dense_seconds / stats["seconds"],
        "macs_dense": stats["macs_dense"],
        "macs_sparse": stats["macs_sparse"],
        "macs_ratio": stats["macs_dense"] / max(stats["macs_sparse"], 1),
        "max_abs_error": float(err.max()),
        "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf"),
        "cache_bytes": stats["cache_bytes"],
        "active_fraction": stats["active_fraction"],
        "dense_fallback": stats.get("dense_run")
        or (f"{stats['dense_steps']} steps" if stats.get("dense_steps") else None),
        "images": (original, dense, sparse, err),
    }


def _sparse_vs_dense(name, pipe, config, photo, edited, **capture_kwargs) -> dict:
    """Capture `photo`, edit it into `edited` sparsely (the second, warm edit is timed), and compare with the dense
    SDEdit of `edited` from the same noise (the pipeline's own call where it has one). Images come back in [0, 1]."""
    from .editors import SparseEditor

    kw = {"output_type": "pt", **capture_kwargs}
    seed = 7
    editor = SparseEditor(pipe, config)
    original = editor.capture(image=photo, generator=torch.Generator().manual_seed(seed), **kw).images
    for _ in range(2):
        sparse = editor.edit(image=edited, output_type="pt", commit=False).images
    stats = dict(editor.last_stats)
    editor.remove()
    if "image" in inspect.signature(pipe.__call__).parameters:  # the pipeline itself, as a user would run it
        started = time.perf_counter()
        dense = pipe(image=edited, generator=torch.Generator().manual_seed(seed), **kw).images
        dense_seconds = time.perf_counter() - started
    else:  # DDPMPipeline has no SDEdit entry: the editor's own dense loop (a capture) is the dense reference
        reference = SparseEditor(pipe, config)
        dense = reference.capture(image=edited, generator=torch.Generator().manual_seed(seed), **kw).images
        dense_seconds = reference.last_stats["seconds"]
        reference.remove()
    return _row(name, dense, sparse, dense_seconds, stats, original)


def run_sd_prompt_edit(workdir: Path, size: int = 512, steps: int = 10) -> dict:
    """A Stable Diffusion-architecture txt2img pipeline (random weights): a prompt edit on a given region (the
    detectors need trained weights to find a meaningful one), sparse vs regenerating densely."""

    from .editors import SparseEditor
    from .testing import tiny_sd

    pipe = tiny_sd(
        workdir / "tokenizer-txt2img", "txt2img", unet_channels=(64, 128, 128), vae_channels=(16, 32, 32, 32)
    )
    kw = {"num_inference_steps": steps, "height": size, "width": size, "output_type": "pt"}
    editor = SparseEditor(pipe, SparseConfig(input_dilation=2))
    original = editor.capture(prompt="a red house by a lake", generator=torch.Generator().manual_seed(7), **kw).images
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    region = ((xx - size * 0.45) / (size * 0.16)) ** 2 + ((yy - size * 0.55) / (size * 0.12)) ** 2 <= 1  # ~6%
    for _ in range(2):
        sparse = editor.edit(prompt="a blue house by a lake", region=region, commit=False, output_type="pt").images
    stats = dict(editor.last_stats)
    editor.remove()
    started = time.perf_counter()
    dense = pipe("a blue house by a lake", generator=torch.Generator().manual_seed(7), **kw).images
    dense_seconds = time.perf_counter() - started
    name = f"Prompt edit through SparseEditor (txt2img, {steps} steps, CFG 7.5, 'red' → 'blue' on a ~6% region)"
    return _row(name, dense, sparse, dense_seconds, stats, original)


def run_sd_img2img(photo, edited, workdir: Path, steps: int = 10, strength: float = 0.7) -> dict:
    """A Stable Diffusion-architecture img2img pipeline (random weights): stroke edit, sparse vs dense."""
    from .testing import tiny_sd_img2img

    pipe = tiny_sd_img2img(workdir / "tokenizer", unet_channels=(64, 128, 128), vae_channels=(16, 32, 32, 32))
    to01 = lambda x: (x + 1) / 2  # noqa: E731  (diffusers takes image tensors in [0, 1])
    return _sparse_vs_dense(
        f"Stable Diffusion img2img through SparseEditor ({steps} steps, strength {strength}, CFG 7.5)",
        pipe, SparseConfig(input_dilation=2),  # in latent pixels (16 image pixels)
        to01(photo), to01(edited), prompt="a red house", strength=strength, num_inference_steps=steps,
    )  # fmt: skip


def _gan_pair(model, labels, instance, new, new_instance, repeats: int):
    """Capture `labels`, then time the edit to `new`: `GANEditor` against the plain generator, alternating."""
    from .editors import GANEditor

    editor = GANEditor(model)
    original = editor.capture(labels, instance)
    dense_t, sparse_t = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pair warms up
            sparse = editor.edit(new, new_instance, commit=False)
            sparse_t.append(editor.last_stats["seconds"])
            started = time.perf_counter()
            dense = model(new, new_instance)
            dense_t.append(time.perf_counter() - started)
    stats = dict(editor.last_stats, seconds=statistics.median(sparse_t[1:]))
    editor.remove()
    return original, dense, sparse, statistics.median(dense_t[1:]), stats


def run_gan_edit(fraction: float = 0.012, repeats: int = 3, size: tuple[int, int] = (256, 512), ngf: int = 64) -> dict:
    """GauGAN's Cityscapes generator (random weights): a label edit (vegetation painted over ~1.2% of a street
    scene), `GANEditor` (exact) against the plain generator, alternating."""
    from .models import SPADEGenerator
    from .testing import paint_labels, randomize_batchnorm, street_scene

    torch.manual_seed(0)
    model = randomize_batchnorm(SPADEGenerator(label_nc=35, size=size, ngf=ngf, num_upsampling_layers="more"))
    labels, instance = street_scene(*size)
    new, new_instance = paint_labels(labels, instance, fraction)
    original, dense, sparse, dense_s, stats = _gan_pair(model, labels, instance, new, new_instance, repeats)
    row = _row(f"GauGAN label edit (SPADE, Cityscapes classes, {size[0]}x{size[1]}, ngf {ngf}, random weights, exact)",
               (dense + 1) / 2, (sparse + 1) / 2, dense_s, stats, (original + 1) / 2)  # fmt: skip
    row["region_fraction"] = stats["region_fraction"]
    return row


# -- the trained scene models (sparsedit.pretrained) ----------------------------------------------------------------
SCENE_SEED, SCENE_INDEX = 1_000_000, 6  # a held-out meadow scene (training used seeds below 1,000,000)


def lake_mask(size: int) -> torch.Tensor:
    """Where the demo's edits put a lake: an ellipse in the scene's foreground meadow, ~4% of the image."""
    yy, xx = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    return ((xx - 0.34) / 0.17) ** 2 + ((yy - 0.80) / 0.075) ** 2 <= 1


def paint_lake(image: torch.Tensor, lake: torch.Tensor) -> torch.Tensor:
    """A user's brush stroke: flat blue paint over `lake` ([H, W] bool) on `[B, 3, H, W]` images in [-1, 1]."""
    out = image.clone()
    out[..., lake.to(image.device)] = torch.tensor([-0.75, -0.35, 0.35], dtype=image.dtype, device=image.device)[
        :, None
    ]
    return out


def scene_inputs(size: int) -> dict:
    """The demo's scene at `size` px: its image and labels, a user's blue brush stroke (a lake) painted on the
    image, and the label map with the same lake painted in."""
    from .data import scenes

    scene = scenes.render(scenes.describe(SCENE_SEED, SCENE_INDEX), (size, size))
    image, labels = scene[0][None], scene[1][None]
    lake = lake_mask(size)
    stroke = paint_lake(image, lake)
    new_labels = labels.clone()
    new_labels[0][lake] = scenes.WATER
    return {"image": image, "stroke": stroke, "labels": labels, "new_labels": new_labels, "lake": lake}


def run_scene_sdedit(
    size: int = 64, steps: int = 50, strength: float = 0.5, config: SparseConfig | None = None
) -> dict:
    """SDEdit with the trained scene DDPM: a flat blue stroke becomes a lake. Sparse edit vs the dense SDEdit."""
    from . import pretrained

    torch.manual_seed(0)
    pipe = pretrained.load("scene-ddpm", size=size)
    config = config or SparseConfig(input_dilation=2)
    inputs = scene_inputs(size)
    row = _sparse_vs_dense(
        f"SDEdit with the trained scene-ddpm ({size}x{size} px, {steps} steps, strength {strength}): a blue stroke "
        "becomes a lake",
        pipe, config, inputs["image"], inputs["stroke"], strength=strength, num_inference_steps=steps,
    )  # fmt: skip
    row["inputs"] = [("scene (held out from training)", inputs["image"]), ("brush stroke", inputs["stroke"])]
    return row


def run_scene_gan_edit(size: int = 64, repeats: int = 3) -> dict:
    """A label edit with the trained scene SPADE generator: a lake painted into the meadow's label map."""
    from . import pretrained
    from .data import scenes

    model = pretrained.load("scene-spade", size=size)
    inputs = scene_inputs(size)
    original, dense, sparse, dense_s, stats = _gan_pair(model, inputs["labels"], None, inputs["new_labels"], None,
                                                        repeats)  # fmt: skip
    row = _row(f"GauGAN label edit with the trained scene-spade ({size}x{size} px, exact): water painted into the "
               "label map", (dense + 1) / 2, (sparse + 1) / 2, dense_s, stats, (original + 1) / 2)  # fmt: skip
    row["region_fraction"] = stats["region_fraction"]
    to_img = lambda lab: scenes.to_rgb(lab).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    row["inputs"] = [("label map", to_img(inputs["labels"])), ("edited label map", to_img(inputs["new_labels"]))]
    return row


def _png(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _rgb(x: torch.Tensor, lo=None, hi=None) -> np.ndarray:
    x = x[0].float()
    lo = x.amin(dim=(1, 2), keepdim=True) if lo is None else lo
    hi = x.amax(dim=(1, 2), keepdim=True) if hi is None else hi
    x = ((x - lo) / torch.as_tensor(hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _heat(x: torch.Tensor) -> np.ndarray:
    v = x.float().numpy()
    v = v / max(float(v.max()), 1e-12)
    return (np.stack([v, 0.15 * v, 0.35 * (1 - v)], -1) * 255).astype(np.uint8)


def _time_pair(model, x, x_edit, region, repeats: int):
    dense, sparse = [], []
    with torch.no_grad():
        for _ in range(repeats):  # alternate, so both see the same machine state
            t0 = time.perf_counter()
            dense_out = model(x_edit)
            dense.append(time.perf_counter() - t0)
            with editing(model, region=region):
                t0 = time.perf_counter()
                sparse_out = model(x_edit)
                sparse.append(time.perf_counter() - t0)
                stats = last_stats(model)
    return dense_out, sparse_out, statistics.median(dense), statistics.median(sparse), stats


def run_demo(
    out: Path,
    size: int = 256,
    repeats: int = 3,
    seed: int = 0,
    sd_size: int = 512,
    gan_size: tuple[int, int] = (256, 512),
    gan_ngf: int = 64,
    scene_size: int = 128,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    photo, source = load_photo(size)
    edited = paint_stroke(photo)
    region = difference_mask(photo, edited)
    setups = [
        ("UNet level, GroupNorm (approximate: frozen statistics)", UNetLevel().eval(), SparseConfig()),
        ("BatchNorm generator trunk (exact)", bn_stack(), SparseConfig(exact=True)),
    ]
    runs, figures = [], []
    for name, model, config in setups:
        sparsify_(model, config)
        with capturing(model):
            original = model(photo)
        dense_out, sparse_out, t_dense, t_sparse, stats = _time_pair(model, photo, edited, region, repeats)
        err = (sparse_out - dense_out).abs()
        mse = float(err.square().mean())
        peak = float(dense_out.amax() - dense_out.amin())
        runs.append(
            {
                "name": name,
                "config": config.to_dict(),
                "dense_seconds": t_dense,
                "sparse_seconds": t_sparse,
                "speedup": t_dense / t_sparse,
                "macs_dense": stats["macs_dense"],
                "macs_sparse": stats["macs_sparse"],
                "macs_ratio": stats["macs_dense"] / max(stats["macs_sparse"], 1),
                "max_abs_error": float(err.max()),
                "psnr_db": float(10 * np.log10(peak**2 / mse)) if mse > 0 else float("inf"),
                "active_fraction": stats["active_fraction"],
                "cache_bytes": stats["cache_bytes"],
                "dense_fallback": stats["dense_run"],
            }
        )
        lo = dense_out[0].amin(dim=(1, 2), keepdim=True)
        hi = dense_out[0].amax(dim=(1, 2), keepdim=True)
        figures.append(
            (
                name,
                [
                    ("captured output", _png(_rgb(original, lo, hi))),
                    ("dense result", _png(_rgb(dense_out, lo, hi))),
                    ("sparse result", _png(_rgb(sparse_out, lo, hi))),
                    (f"|sparse − dense|, scaled to its max {float(err.max()):.1e}", _png(_heat(err[0].amax(0)))),
                ],
            )
        )
    full, _ = load_photo(sd_size)
    full_edited = paint_stroke(full)
    random_note = (
        " Random weights: the images are noise; at these small widths, per-layer overheads eat much of the MACs "
        "saved. BENCHMARKS.md has the measurements on full-size architectures."
    )
    sections = [
        (run_scene_sdedit(scene_size), " Trained weights (sparsedit.pretrained)."),
        (run_scene_gan_edit(scene_size, repeats=repeats), " Trained weights (sparsedit.pretrained)."),
        (run_sd_img2img(full, full_edited, out), f" At {sd_size}×{sd_size} ({sd_size // 8}×{sd_size // 8} latents)."
         + random_note),
        (run_sd_prompt_edit(out, sd_size), f" At {sd_size}×{sd_size}." + random_note),
        (run_gan_edit(repeats=repeats, size=gan_size, ngf=gan_ngf), " ~1.2% of the label map repainted."
         + random_note),
    ]  # fmt: skip
    for i, (row, where) in enumerate(sections):
        original, dense_img, sparse_img, err = row.pop("images")
        inputs = [(cap, _png(_rgb(img, -1, 1))) for cap, img in row.pop("inputs", [])]
        runs.insert(i, row)
        figures.insert(
            i,
            (
                f"{row['name']}.{where} One warm run each: the dense result of the same edit vs the sparse edit.",
                inputs
                + [
                    ("capture (before the edit)", _png(_rgb(original * 2 - 1, -1, 1))),
                    ("dense result of the edit", _png(_rgb(dense_img * 2 - 1, -1, 1))),
                    ("sparse edit", _png(_rgb(sparse_img * 2 - 1, -1, 1))),
                    (f"|sparse − dense|, scaled to its max {float(err.max()):.1e}", _png(_heat(err[0].amax(0)))),
                ],
            ),
        )
    report = {
        "input": source,
        "size": size,
        "edit_fraction": float(region.float().mean()),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "loadavg": _loadavg(),
        "weights": {
            "scene-ddpm, scene-spade": "trained (sparsedit.pretrained, shipped with the package)",
            "the other sections": "random",
        },
        "runs": runs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(_html(report, photo, edited, region, figures))
    return report


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def _html(report, photo, edited, region, figures) -> str:
    def img_row(items):
        return "".join(
            f'<figure><img src="{src}" width="192"><figcaption>{html.escape(cap)}</figcaption></figure>'
            for cap, src in items
        )

    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['dense_seconds'] * 1e3:.1f}</td>"
        f"<td>{r['sparse_seconds'] * 1e3:.1f}</td><td>{r['speedup']:.2f}×</td>"
        f"<td>{r['macs_dense'] / 1e9:.2f}</td><td>{r['macs_sparse'] / 1e9:.3f}</td><td>{r['macs_ratio']:.1f}×</td>"
        f"<td>{r['max_abs_error']:.2e}</td><td>{r['psnr_db']:.1f}</td></tr>"
        for r in report["runs"]
    )
    inputs = [
        ("input photo", _png(_rgb(photo, -1, 1))),
        ("edited input (brush stroke)", _png(_rgb(edited, -1, 1))),
        ("edit region", _png((region[0].numpy() * 255).astype(np.uint8))),
    ]
    sections = "".join(f"<h2>{html.escape(n)}</h2><div class=row>{img_row(items)}</div>" for n, items in figures)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sparsedit demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}.row{{display:flex;gap:12px;flex-wrap:wrap}}
figure{{margin:0}}img{{image-rendering:pixelated;border:1px solid #ccc}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
.note{{background:#fff4d6;padding:8px 12px;border-left:4px solid #e0a800}}</style></head><body>
<h1>sparsedit demo: a brush stroke, recomputed sparsely</h1>
<p class=note>The first two sections use the small scene models trained by <code>training/</code> and shipped with
the package (<code>sparsedit.pretrained</code>): their pictures mean something. The other sections use full-size
architectures with <b>random weights</b>: their outputs are noise, and what they show is how much computation an
edit saves and how close the sparse result is to the dense one.</p>
<p>Photo sections: {html.escape(report["input"])}, {report["size"]}×{report["size"]} px; the stroke changes
{100 * report["edit_fraction"]:.2f}% of the pixels. {report["dtype"]}, {report["threads"]} threads,
load {html.escape(report["loadavg"])}; times are medians of alternating dense/sparse runs.</p>
<div class=row>{img_row(inputs)}</div>
<table><tr><th>network</th><th>dense ms</th><th>sparse ms</th><th>speed-up</th><th>dense GMACs</th>
<th>sparse GMACs</th><th>MACs saved</th><th>max |error|</th><th>PSNR dB</th></tr>{rows}</table>
{sections}</body></html>"""
