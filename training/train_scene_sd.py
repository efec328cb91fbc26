"""Train "scene-sd" (issue 21): a small latent text-to-image model of the procedural scenes, captioned
from their layouts (`sparsedit.data.captions`), assembled as a diffusers `StableDiffusionPipeline`.

    python training/train_scene_sd.py --part vae --minutes 15        # the AutoencoderKL (64 px -> 16x16x4 latents)
    python training/train_scene_sd.py --part denoiser --minutes 85   # the UNet and the CLIP text encoder, jointly
    python training/train_scene_sd.py --part export                  # the pipeline directory from the two runs

Both parts resume from `training/runs/scene-sd-<part>/checkpoint.pt` when run again, and log to `loss.csv` there.
`--part export` writes `training/runs/scene-sd/scene-sd.safetensors` (what `sparsedit.pretrained.load("scene-sd")`
reads; `--install` copies it into the package) and `training/runs/scene-sd/pipeline`, a diffusers directory that
`StableDiffusionPipeline.from_pretrained` (and `sparsedit serve --model`) loads offline. See docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from common import RUNS, Run, batch_from, install, run_parser, scene_pool

from sparsedit import pretrained
from sparsedit.data import captions


NAME = "scene-sd"
ARCH = pretrained.ARCHITECTURES[NAME]
TEXT = ARCH["text"]
SCHEDULER = ARCH["scheduler"]


def build_vae():
    return pretrained.build(NAME)["vae"]


def build_denoiser():
    """The UNet and the text encoder (the checkpoint's `model`); the tokenizer is `pretrained.tokenizer()`."""
    model = pretrained.build(NAME)
    del model["vae"]
    return model


def train_vae(args):
    pool = scene_pool(args.pool, 64)
    dev = torch.device(args.device)
    vae = build_vae().to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    run = Run(Path(args.run), ["loss", "l1", "kl"])

    def step_fn(step):
        x, _ = batch_from(pool, step, args.batch, base_seed=3)
        x = x.to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + 0.5 * F.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()}

    run.train("scene-sd-vae", args, {"vae": vae, "opt": opt}, export=None, train_step=step_fn)


def train_denoiser(args):
    from diffusers import DDPMScheduler

    pool = scene_pool(args.pool, 64)
    dev = torch.device(args.device)
    vae_run = Run(RUNS / "scene-sd-vae", ["loss", "l1", "kl"])
    vae = build_vae()
    if not vae_run.restore({"vae": vae})[0]:
        raise SystemExit("train the VAE first: python training/train_scene_sd.py --part vae")
    vae = vae.to(dev).eval().requires_grad_(False)
    tok = pretrained.tokenizer()
    model = build_denoiser().to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = DDPMScheduler(**SCHEDULER)
    alphas = sched.alphas_cumprod.to(dev)
    run = Run(Path(args.run), ["loss"])
    scale = torch.tensor(1.0)

    def step_fn(step):
        x, labels = batch_from(pool, step, args.batch, base_seed=4)
        g = torch.Generator().manual_seed(20_000_000 + step)
        drop = torch.rand(len(labels), generator=g) < 0.1  # classifier-free guidance: some captions empty
        texts = ["" if d else captions.caption(lab) for d, lab in zip(drop, labels)]
        ids = tok(texts, padding="max_length", max_length=TEXT["max_position_embeddings"], truncation=True,
                  return_tensors="pt").input_ids.to(dev)  # fmt: skip
        with torch.no_grad():
            z = vae.encode(x.to(dev)).latent_dist.sample() * scale
        noise = torch.randn(z.shape, generator=g).to(dev)
        t = torch.randint(0, SCHEDULER["num_train_timesteps"], (len(z),), generator=g).to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        ctx = model["text"](ids).last_hidden_state
        loss = F.mse_loss(model["unet"](zt, t, encoder_hidden_states=ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    with torch.no_grad():  # the latents' scaling factor, as Stable Diffusion's: unit variance
        x, _ = batch_from(pool, 0, 64, base_seed=5)
        scale = 1.0 / vae.encode(x.to(dev)).latent_dist.sample().std().cpu()
    (Path(args.run) / "scaling_factor.txt").write_text(f"{float(scale):.6f}\n")
    run.train("scene-sd-denoiser", args, {"model": model, "opt": opt}, export=None, train_step=step_fn)


def export(args):
    """The package's `scene-sd.safetensors` (float16, the latents' scaling factor in its header) and a diffusers
    pipeline directory, from the two runs."""
    vae = build_vae()
    vae_step = Run(RUNS / "scene-sd-vae", ["loss", "l1", "kl"]).restore({"vae": vae})[1]
    run_dir = RUNS / "scene-sd-denoiser"
    model = build_denoiser()
    step = Run(run_dir, ["loss"]).restore({"model": model})[1]
    scale = float((run_dir / "scaling_factor.txt").read_text())
    full = torch.nn.ModuleDict({"vae": vae, "unet": model["unet"], "text": model["text"]})
    out = RUNS / NAME
    weights = pretrained.save(NAME, full, out / f"{NAME}.safetensors", scaling_factor=scale, vae_step=vae_step,
                              denoiser_step=step)  # fmt: skip
    pretrained.load(NAME, path=weights).save_pretrained(str(out / "pipeline"))
    print(f"wrote {weights} and {out / 'pipeline'}")
    if args.install:
        install(NAME, out)


def main(argv=None):
    def model_args(p):
        p.add_argument("--part", choices=["vae", "denoiser", "export"], required=True)
        p.add_argument("--lr", type=float, default=2e-4)

    args = run_parser(__doc__, "scene-sd", model_args, argv)
    if args.run == str(RUNS / "scene-sd"):
        args.run = str(RUNS / f"scene-sd-{args.part}")
    {"vae": train_vae, "denoiser": train_denoiser, "export": export}[args.part](args)


if __name__ == "__main__":
    main()
