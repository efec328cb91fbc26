"""Shared pieces of the training scripts: the scene pool, resumable checkpoints, the loss log, loss-curve SVGs."""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from sparsedit.data import scenes


ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
HELD_OUT_SEED = 1_000_000  # training pools use seeds below this; evaluations use this seed and above


def scene_pool(n: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`n` scenes rendered once and cached under `training/runs/` (uint8 images, uint8 labels)."""
    path = RUNS / f"pool-{size}px-{n}-seed{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    started = time.perf_counter()
    chunks = []
    for k in range(0, n, 500):
        d = scenes.sample(min(500, n - k), size, seed=seed * 1000 + k // 500)
        chunks.append(
            {
                "image": ((d["image"] + 1) * 127.5).round().to(torch.uint8),
                "labels": d["labels"].to(torch.uint8),
            }
        )
        print(f"pool: {k + len(chunks[-1]['image'])}/{n} scenes, {time.perf_counter() - started:.0f} s", flush=True)
    pool = {key: torch.cat([c[key] for c in chunks]) for key in ("image", "labels")}
    _atomic_save(pool, path)
    return pool


def batch_from(pool: dict, step: int, batch: int, base_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step`: a deterministic draw from the pool with random horizontal flips, so a resumed
    run sees the same batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(base_seed * 7919 + step)
    idx = torch.randint(len(pool["image"]), (batch,), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    img = pool["image"][idx].float() / 127.5 - 1
    lab = pool["labels"][idx].long()
    img[flip] = img[flip].flip(-1)
    lab[flip] = lab[flip].flip(-1)
    return img, lab


def _atomic_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """A resumable run directory: `checkpoint.pt` (the state of the modules and optimizers, the step, the time),
    `loss.csv`, and the exported weights."""

    def __init__(self, directory: Path, fields: list[str]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / "checkpoint.pt"
        self.log = self.dir / "loss.csv"
        self.fields = ["step", "seconds", *fields]
        self.fresh: list[str] = []
        if not self.log.exists():
            with open(self.log, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def restore(self, objects: dict) -> tuple[int, float]:
        """Load the checkpoint (if any) into `objects` (modules, optimizers by key); returns `(step, seconds)`."""
        if not self.ckpt.exists():
            return 0, 0.0
        state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        self.fresh = []  # objects the checkpoint has no state for (a compact kept checkpoint drops the optimizer's)
        for key, obj in objects.items():
            if state.get(key) is None:
                self.fresh.append(key)
                print(f"{key}: no state in the checkpoint, starts fresh", flush=True)
                continue
            obj.load_state_dict(state[key])
        print(f"resumed {self.dir} at step {state['step']} ({state['seconds'] / 60:.1f} min trained)", flush=True)
        return state["step"], state["seconds"]

    def checkpoint(self, objects: dict, step: int, seconds: float, args):
        _atomic_save({**{k: o.state_dict() for k, o in objects.items()}, "step": step, "seconds": seconds,
                      "args": vars(args)}, self.ckpt)  # fmt: skip

    def train(self, name: str, args, objects: dict, export: torch.nn.Module | None, train_step):
        """The loop both trainers share. Resume from the checkpoint, then call `train_step(step)` (one optimizer step;
        returns its losses as floats by the log's field names) until `--steps` in total or `--minutes` of this
        invocation. Every `--log-every` steps the mean losses go to loss.csv. Every `--save-every` steps and at the end
        the checkpoint is saved and `export` written as `<name>.safetensors` in the run directory. `--install` then
        copies that file into the package. `export=None`: checkpoints only (a model exported by other means)."""
        from sparsedit import pretrained

        step, elapsed = self.restore(objects)
        weights = self.dir / f"{name}.safetensors"

        def save():
            self.checkpoint(objects, step, elapsed, args)
            if export is None:
                return
            device = next(export.parameters()).device
            pretrained.save(name, export.cpu(), weights, step=step, minutes=f"{elapsed / 60:.1f}")
            export.to(device)

        started = t_last = time.perf_counter()
        logs = []
        while step < args.steps and time.perf_counter() - started < args.minutes * 60:
            logs.append(train_step(step))
            step += 1
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            if step % args.log_every == 0:
                mean = {k: sum(log[k] for log in logs) / len(logs) for k in self.fields[2:]}
                self.record(step, elapsed, **mean)
                shown = "  ".join(f"{k} {v:.4g}" for k, v in mean.items())
                print(f"step {step}  {shown}  {elapsed / 60:.1f} min", flush=True)
                logs = []
            if step % args.save_every == 0:
                save()
        save()
        print(
            f"stopped at step {step} ({elapsed / 60:.1f} min trained)" + (f"; weights in {weights}" if export else "")
        )
        if args.install and export is not None:
            install(name, self.dir)

    def record(self, step: int, seconds: float, **values):
        with open(self.log, "a", newline="") as f:
            csv.writer(f).writerow([step, f"{seconds:.1f}", *(f"{values[k]:.6g}" for k in self.fields[2:])])

    def history(self) -> dict[str, list[float]]:
        with open(self.log) as f:
            rows = list(csv.DictReader(f))
        steps = {}
        for r in rows:  # a resumed run may log a step twice: keep the last
            steps[int(r["step"])] = r
        rows = [steps[k] for k in sorted(steps)]
        return {k: [float(r[k]) for r in rows] for k in self.fields}


def loss_curve_svg(steps, series: dict[str, list[float]], title: str, path: Path, smooth: int = 25, log_y=True):
    """A small line chart (moving average over `smooth` logged points) as a standalone SVG file."""
    import math

    w, h, m = 640, 320, 50
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]

    def avg(v):
        out = []
        for i in range(len(v)):
            window = v[max(0, i - smooth + 1) : i + 1]
            out.append(sum(window) / len(window))
        return out

    series = {k: avg(v) for k, v in series.items()}
    ys = [y for v in series.values() for y in v if y > 0 or not log_y]
    f = (lambda y: math.log10(max(y, 1e-12))) if log_y else (lambda y: y)
    lo, hi = f(min(ys)), f(max(ys))
    hi = hi if hi > lo else lo + 1
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def px(x, y):
        return m + (x - x0) / (x1 - x0) * (w - 1.5 * m), h - m - (f(y) - lo) / (hi - lo) * (h - 1.7 * m)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m / 2}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{h - m}" x2="{m}" y2="{0.7 * m}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">step (last: {int(x1)})</text>',
    ]
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        _, y = px(x0, 10**v if log_y else v)
        label = f"{10**v:.3g}" if log_y else f"{v:.3g}"
        parts.append(f'<text x="{m - 4}" y="{y + 4}" text-anchor="end">{label}</text>')
    for i, (name, v) in enumerate(series.items()):
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in zip(steps, v)))
        c = colours[i % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{w - m * 2.5}" y="{40 + 16 * i}" fill="{c}">{name}</text>')
    parts.append("</svg>")
    Path(path).write_text("\n".join(parts))


def run_parser(doc: str, name: str, model_args, argv=None) -> argparse.Namespace:
    """The options both trainers share (run directory, budget, threads, device, logging, install), plus the model's
    own (`model_args(parser)`), parsed; sets the thread count and the seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(RUNS / name), help="run directory (resumed if it has a checkpoint)")
    p.add_argument("--steps", type=int, default=100_000, help="stop at this many steps in total")
    p.add_argument("--minutes", type=float, default=120.0, help="stop after this long (this invocation)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pool", type=int, default=20_000, help="scenes rendered once for training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--install", action="store_true", help="copy the exported weights into the package when done")
    model_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def install(name: str, run_dir: Path):
    """Copy a run's exported weights into the package (what `--install` does)."""
    import shutil

    from sparsedit import pretrained

    shutil.copy(Path(run_dir) / f"{name}.safetensors", pretrained.weights_file(name))
    print(f"installed {pretrained.weights_file(name)}")
