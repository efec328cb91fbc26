"""Train "scene-sd" (issue 21, in progress): a small latent text-to-image model of the procedural scenes, captioned
from their layouts (`sparsedit.data.captions`), assembled as a diffusers `StableDiffusionPipeline`.

    python training/train_scene_sd.py --part vae --minutes 15        # the AutoencoderKL (64 px -> 16x16x4 latents)
    python training/train_scene_sd.py --part denoiser --minutes 85   # the UNet and the CLIP text encoder, jointly
    python training/train_scene_sd.py --part export                  # the pipeline directory from the two runs

Both parts resume from `training/runs/scene-sd-<part>/checkpoint.pt` when run again, and log to `loss.csv` there.
`--part export` writes `training/runs/scene-sd/pipeline`, a diffusers directory that `StableDiffusionPipeline
.from_pretrained` (and `sparsedit serve --model`) loads offline. Not trained or shipped yet: see docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from common import RUNS, Run, batch_from, run_parser, scene_pool

from sparsedit.data import captions


VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 64, "layers_per_block": 1,
    "block_out_channels": (32, 64, 64), "norm_num_groups": 16,
    "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
}  # fmt: skip
UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (64, 128, 128), "norm_num_groups": 16, "cross_attention_dim": 64, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}  # fmt: skip
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 32}  # fmt: skip
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
WORDS = sorted({w for c in ("a the lake sea meadow desert below snowy mountains trees rocks on left right across land "
                            "cloudy clear sky").split() for w in [c]})  # fmt: skip


def tokenizer(directory: Path):
    """The offline CLIP tokenizer with one token per caption word (byte-level merges that spell each word)."""
    import json

    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({ch + "</w>": len(chars) + i for i, ch in enumerate(chars)})
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=TEXT["max_position_embeddings"])


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE)


def build_denoiser(tok):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **TEXT))  # fmt: skip
    return torch.nn.ModuleDict({"unet": UNet2DConditionModel(**UNET), "text": text})


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
    tok = tokenizer(Path(args.run) / "tokenizer")
    model = build_denoiser(tok).to(dev).train()
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
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae = build_vae()
    Run(RUNS / "scene-sd-vae", ["loss", "l1", "kl"]).restore({"vae": vae})
    run_dir = RUNS / "scene-sd-denoiser"
    tok = tokenizer(run_dir / "tokenizer")
    model = build_denoiser(tok)
    Run(run_dir, ["loss"]).restore({"model": model})
    vae.register_to_config(scaling_factor=float((run_dir / "scaling_factor.txt").read_text()))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=model["text"].eval(), tokenizer=tok,
                                   unet=model["unet"].eval(), scheduler=DDIMScheduler(**SCHEDULER, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    out = RUNS / "scene-sd" / "pipeline"
    pipe.save_pretrained(str(out))
    print(f"wrote {out}")


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
