"""Train "scene-ddpm": a pixel-space UNet2DModel (epsilon prediction) on 64×64 procedural scenes.

    python training/train_ddpm.py                       # trains, or resumes training/runs/scene-ddpm
    python training/train_ddpm.py --minutes 90 --threads 1
    python training/train_ddpm.py --install             # also write the EMA weights into the package

Every `--save-every` steps the run directory gets `checkpoint.pt` (model, EMA, optimizer, step: resume by running
the same command again), `scene-ddpm.safetensors` (the EMA weights in the shipped format) and `loss.csv`.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time

import torch
import torch.nn.functional as F
from common import RUNS, Run, batch_from, scene_pool

from sparsedit import pretrained


NAME = "scene-ddpm"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(RUNS / NAME), help="run directory (resumed if it has a checkpoint)")
    p.add_argument("--steps", type=int, default=100_000, help="stop at this many optimizer steps in total")
    p.add_argument("--minutes", type=float, default=120.0, help="stop after this long (this invocation)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--pool", type=int, default=20_000, help="scenes rendered once for training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--install", action="store_true", help="copy the EMA weights into the package when done")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    arch = pretrained.ARCHITECTURES[NAME]
    size = arch["unet"]["sample_size"]
    pool = scene_pool(args.pool, size)
    dev = torch.device(args.device)
    model = pretrained.build(NAME).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = pretrained.scheduler(NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = Run(args.run, ["loss", "lr"])
    step, elapsed = 0, 0.0
    state = run.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["seconds"]
        print(f"resumed {args.run} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)

    def checkpoint():
        run.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                  "seconds": elapsed, "args": vars(args)})  # fmt: skip
        pretrained.save(NAME, ema.cpu(), run.dir / f"{NAME}.safetensors", step=step, minutes=f"{elapsed / 60:.1f}")
        ema.to(dev)

    alphas = sched.alphas_cumprod.to(dev)
    started = time.perf_counter()
    t_last, losses = time.perf_counter(), []
    while step < args.steps and time.perf_counter() - started < args.minutes * 60:
        x0, _ = batch_from(pool, step, args.batch, base_seed=1)
        g = torch.Generator().manual_seed(10_000_000 + step)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g).to(dev)
        x0 = x0.to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        losses.append(loss.item())
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % args.log_every == 0:
            run.record(step, elapsed, loss=sum(losses) / len(losses), lr=lr)
            print(f"step {step}  loss {sum(losses) / len(losses):.4f}  {elapsed / 60:.1f} min", flush=True)
            losses = []
        if step % args.save_every == 0:
            checkpoint()
    checkpoint()
    print(f"stopped at step {step} ({elapsed / 60:.1f} min trained); weights in {run.dir / (NAME + '.safetensors')}")
    if args.install:
        shutil.copy(run.dir / f"{NAME}.safetensors", pretrained.weights_file(NAME))
        print(f"installed {pretrained.weights_file(NAME)}")


if __name__ == "__main__":
    main()
