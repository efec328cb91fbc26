"""Train "scene-ddpm": a pixel-space UNet2DModel (epsilon prediction) on 64×64 procedural scenes.

    python training/train_ddpm.py                       # trains, or resumes training/runs/scene-ddpm
    python training/train_ddpm.py --minutes 90 --threads 1
    python training/train_ddpm.py --install             # also write the EMA weights into the package

Every `--save-every` steps the run directory gets `checkpoint.pt` (model, EMA, optimizer, step: resume by running
the same command again), `scene-ddpm.safetensors` (the EMA weights in the shipped format) and `loss.csv`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import Run, batch_from, run_parser, scene_pool

from sparsedit import pretrained


NAME = "scene-ddpm"


def main(argv=None):
    def model_args(p):
        p.add_argument("--lr", type=float, default=3e-4)
        p.add_argument("--warmup", type=int, default=50)
        p.add_argument("--ema", type=float, default=0.999)

    args = run_parser(__doc__, NAME, model_args, argv)

    arch = pretrained.ARCHITECTURES[NAME]
    size = arch["unet"]["sample_size"]
    pool = scene_pool(args.pool, size)
    dev = torch.device(args.device)
    model = pretrained.build(NAME).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = pretrained.scheduler(NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = Run(args.run, ["loss", "lr"])
    alphas = sched.alphas_cumprod.to(dev)

    def train_step(step: int) -> dict[str, float]:
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
        return {"loss": loss.item(), "lr": lr}

    run.train(NAME, args, {"model": model, "ema": ema, "opt": opt}, export=ema, train_step=train_step)


if __name__ == "__main__":
    main()
