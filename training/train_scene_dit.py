"""Train "scene-dit" (issue 38): a text-to-image flow-matching transformer of the procedural scenes at 256 px, Stable
Diffusion 3's architecture in miniature, assembled as a diffusers `StableDiffusion3Pipeline`.

    python training/train_scene_dit.py --part vae --minutes 40                     # the VAE (256 px -> 32x32x16)
    python training/train_scene_dit.py --part denoiser --pool 10000 --minutes 150  # the transformer and both CLIPs
    python training/train_scene_dit.py --part denoiser --pool 10000 --decay-start 4300 --decay-end 4800  # LR cosine to --lr-min
    python training/train_scene_dit.py --part export --install                     # weights file and pipeline
    python training/train_scene_dit.py --part keep     # the denoiser's checkpoint, compact, into training/checkpoints

Both parts resume from `training/runs/scene-dit-<part>/checkpoint.pt` when run again, and log to `loss.csv` there.

The VAE trains on random `--crop` px crops of 256 px renders (it is convolutional, no attention) with scene-sd's loss
(L1 + 1/2 MSE + 1e-3 KL per pixel; `--edge` adds an L1 on the images' finite differences). 64 px crops: on the 2-core
CPU a step of 16 128 px crops costs six times one of 64 px crops, not four. The denoiser first renders
its `--pool` scenes at 256 px, encodes them with the VAE (the posterior mean) and captions them, 500 at a time, into
`latents/` in its run directory (resumable; the VAE it used is kept there too, so a VAE trained further later does not
change it), then trains on the cached latents: rectified flow as SD3, `x_t = (1 - s) x0 + s noise`, the transformer
predicts `noise - x0`, `s` logit-normal and shifted as the scheduler shifts it, the timestep `1000 s` as
`FlowMatchEulerDiscreteScheduler` feeds it. 10% of captions are dropped for classifier-free guidance. The latents are
centred per channel and scaled to unit variance; export folds the centring into the VAE's 1x1 quant convolutions, so
the shipped VAE's latents have mean 0 and `shift_factor` is 0 (SD3's inpainting pipeline decodes without it).

The context. Without T5 the SD3 pipeline appends `max_sequence_length` (default 256) zero tokens to the 32 CLIP tokens.
Zero tokens stay identical through the transformer (the context has no positions), so n of them attend exactly as
one token whose attention logit is raised by log n: the denoiser trains with one such token and a random n (256, the
pipeline's default, half of the time; 0 a quarter; 1..512 the rest), at the cost of 33 context tokens: it serves the
pipeline's default, and should draw nearly the same with `max_sequence_length=0` (32 tokens of context, faster).

`--part export` writes `training/runs/scene-dit/scene-dit.safetensors` (what `sparsedit.pretrained.load("scene-dit")`
reads; `--install` copies it into the package) and `training/runs/scene-dit/pipeline`, a diffusers directory that
`StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)` loads offline.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RUNS, Run, _atomic_save, batch_from, install, run_parser, scene_pool

from sparsedit import pretrained
from sparsedit.data import captions, scenes


NAME = "scene-dit"
ARCH = pretrained.ARCHITECTURES[NAME]
SIZE = ARCH["vae"]["sample_size"]  # 256
SHIFT = ARCH["scheduler"]["shift"]
T = ARCH["scheduler"]["num_train_timesteps"]
CHUNK = 500  # scenes per latent-cache file, as `common.scene_pool` renders them
RESUME_WARMUP = 200  # steps of learning-rate warm-up after resuming without the optimizer's state
VAE_FIELDS = ["loss", "l1", "kl", "edge"]


def build_vae():
    return pretrained.build(NAME)["vae"]


def build_denoiser():
    """The transformer and both text encoders (the checkpoint's `model`); the tokenizer is `pretrained.tokenizer()`."""
    model = pretrained.build(NAME)
    del model["vae"]
    return model


# -- the VAE ----------------------------------------------------------------------------------------------------------
def random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random `size`-px crop of each image (positions on the VAE's 8-px grid)."""
    if size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 8 + 1
    pos = torch.randint(cells, (len(x), 2), generator=g) * 8
    return torch.stack([img[:, i : i + size, j : j + size] for img, (i, j) in zip(x, pos.tolist())])


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical finite differences."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def train_vae(args):
    pool = scene_pool(args.vae_pool, SIZE)
    dev = torch.device(args.device)
    vae = build_vae().to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    run = Run(Path(args.run), VAE_FIELDS)

    def step_fn(step):
        x, _ = batch_from(pool, step, args.batch, base_seed=13)
        x = random_crops(x, args.crop, torch.Generator().manual_seed(30_000_000 + step)).to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        edge = edge_l1(rec, x)
        loss = l1 + 0.5 * F.mse_loss(rec, x) + 1e-3 * kl + args.edge * edge
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "edge": edge.item()}

    run.train(f"{NAME}-vae", args, {"vae": vae, "opt": opt}, export=None, train_step=step_fn)


# -- the latent cache -------------------------------------------------------------------------------------------------
def latent_cache(run_dir: Path, vae, n: int, dev, seed: int = 0) -> dict:
    """The pool's `n` scenes (`common.scene_pool`'s, rendered at 256 px) as VAE latents (posterior means, float16
    `[n, 16, 32, 32]`) and captions, built `CHUNK` scenes at a time into `run_dir/latents/` (a stopped build resumes at
    the next chunk), then loaded."""
    directory = run_dir / "latents"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = []
    for k in range(0, n, CHUNK):
        path = directory / f"seed{seed}-{k:06d}.pt"
        count = min(CHUNK, n - k)
        part = torch.load(path, weights_only=True) if path.exists() else None
        if part is None or len(part["latents"]) < count:
            d = scenes.sample(count, SIZE, seed=seed * 1000 + k // CHUNK)
            with torch.no_grad():
                lat = [vae.encode(x.to(dev)).latent_dist.mean.half().cpu() for x in d["image"].split(4)]
            part = {"latents": torch.cat(lat), "captions": [captions.caption(lab) for lab in d["labels"]]}
            _atomic_save(part, path)
            print(f"latents: {k + count}/{n} scenes, {time.perf_counter() - started:.0f} s", flush=True)
        parts.append({"latents": part["latents"][:count], "captions": part["captions"][:count]})
    return {"latents": torch.cat([p["latents"] for p in parts]), "captions": [c for p in parts for c in p["captions"]]}


def latent_stats(latents: torch.Tensor) -> dict:
    """Per-channel means and one scale that gives the centred latents unit variance (float64, the whole cache)."""
    z = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)
    mean = z.mean(1)
    return {"mean": mean.tolist(), "scaling_factor": float(1.0 / (z - mean[:, None]).std())}


# -- the denoiser -----------------------------------------------------------------------------------------------------
class PadTokensAttnProcessor:
    """Diffusers' `JointAttnProcessor2_0` with an additive key bias (`attention_mask`, `[B, 1, 1, keys]`): the last
    context token then stands for n identical zero tokens when its logit is raised by log n (or, n = 0, masked)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        out = F.scaled_dot_product_attention(
            torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1]).to(q.dtype)
        image, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


class EmaClock:
    """When the EMA of the weights started, kept in the checkpoint: its decay warms up from there as
    `min(decay, (1 + k) / (10 + k))` after k steps. (A fixed 0.999 from step 0 kept 0.999^1200 = 30% of the random
    initial weights in the EMA at step 1,200: its flow-matching error was 2-4 times the model's, and its samples
    noise; the runs before this clock restart their EMA from the model's weights when they resume.)"""

    def __init__(self):
        self.start = 0

    def decay(self, step: int, cap: float) -> float:
        k = step - self.start
        return min(cap, (1 + k) / (10 + k))

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["start"]


def pad_counts(g: torch.Generator, batch: int) -> torch.Tensor:
    """How many zero tokens each sample's context stands for: 256 (the pipeline's default `max_sequence_length`) half
    of the time, 0 a quarter, uniform in 1..512 the rest."""
    r = torch.rand(batch, generator=g)
    other = torch.randint(1, 513, (batch,), generator=g)
    return torch.where(r < 0.5, 256, torch.where(r < 0.75, 0, other))


def pad_bias(counts: torch.Tensor, image_tokens: int, context_tokens: int) -> torch.Tensor:
    """The attention bias over `[image tokens, context tokens, the pad token]`: log n on the pad token's column."""
    bias = torch.zeros(len(counts), 1, 1, image_tokens + context_tokens + 1)
    bias[:, 0, 0, -1] = torch.where(counts > 0, counts.clamp(min=1).double().log(), -math.inf).float()
    return bias


def shifted_sigmas(u: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler`'s time shift of sigmas in (0, 1)."""
    return shift * u / (1 + (shift - 1) * u)


def lr_at(args, step: int, fresh_from: int) -> float:
    """The learning rate at `step`: linear warm-up (again for `RESUME_WARMUP` steps after a resume whose optimizer state
    was dropped), constant `--lr`, then a cosine from `--lr` down to `--lr-min` between `--decay-start` and
    `--decay-end` (a function of the step alone, so a run stopped mid-decay resumes on the same curve)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup, (step - fresh_from + 1) / RESUME_WARMUP)
    if args.decay_end is not None and step >= args.decay_start:
        t = min(1.0, (step - args.decay_start) / max(1, args.decay_end - args.decay_start))
        lr = min(lr, args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr


def train_denoiser(args):
    dev = torch.device(args.device)
    run_dir = Path(args.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    vae = build_vae()
    kept = run_dir / "vae.pt"  # the VAE this run's latents come from
    if kept.exists():
        vae.load_state_dict(torch.load(kept, weights_only=True))
    else:
        seed_from_tracked(Path(args.vae_run), "vae")  # a fresh checkout: the VAE kept in git
        vae_step = Run(Path(args.vae_run), VAE_FIELDS).restore({"vae": vae})[0]
        if not vae_step:
            raise SystemExit("train the VAE first: python training/train_scene_dit.py --part vae")
        _atomic_save(vae.state_dict(), kept)
        (run_dir / "vae_step.txt").write_text(f"{vae_step}\n")
    vae = vae.to(dev).eval().requires_grad_(False)
    data = latent_cache(run_dir, vae, args.pool, dev)
    stats_file = run_dir / "latent_stats.json"
    if not stats_file.exists():
        stats_file.write_text(json.dumps(latent_stats(data["latents"]), indent=1) + "\n")
    stats = json.loads(stats_file.read_text())
    mean = torch.tensor(stats["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    scale = stats["scaling_factor"]
    print(f"{len(data['captions'])} scenes; latents centred per channel, scaled by {scale:.4f}", flush=True)

    model = build_denoiser().to(dev).train()
    model["transformer"].set_attn_processor(PadTokensAttnProcessor())
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    clock = EmaClock()
    pipe = pretrained.dit_pipeline(torch.nn.ModuleDict({"vae": vae, **model}), scale, 0.0)  # its encode_prompt
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    run = Run(run_dir, ["loss"])
    params = list(model.parameters())
    ema_params = list(ema.parameters()) if ema is not None else []
    image_tokens = (SIZE // 8 // ARCH["transformer"]["patch_size"]) ** 2

    warm = {}  # the step the optimizer started fresh at (a compact kept checkpoint has no optimizer state)

    def step_fn(step):
        if not warm:  # the first step of this invocation, after `run.train` restored the checkpoint
            warm["from"] = step if "opt" in run.fresh else -RESUME_WARMUP
            if ema is not None and "ema_clock" in run.fresh:  # a checkpoint from before the EMA's clock: restart it
                with torch.no_grad():
                    torch._foreach_copy_(ema_params, params)
                clock.start = step
                print(f"EMA restarted from the weights at step {step}", flush=True)
        g = torch.Generator().manual_seed(40_000_000 + step)
        idx = torch.randint(len(data["captions"]), (args.batch,), generator=g)
        z0 = ((data["latents"][idx].float() - mean) * scale).to(dev)
        drop = torch.rand(args.batch, generator=g) < 0.1  # classifier-free guidance: some captions empty
        texts = ["" if d else data["captions"][i] for d, i in zip(drop.tolist(), idx.tolist())]
        noise = torch.randn(z0.shape, generator=g).to(dev)
        sigma = shifted_sigmas(torch.sigmoid(torch.randn(args.batch, generator=g))).to(dev)  # logit-normal, shifted
        counts = pad_counts(g, args.batch)
        s = sigma.view(-1, 1, 1, 1)
        zt = (1 - s) * z0 + s * noise
        ctx, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=dev,
                                               do_classifier_free_guidance=False, max_sequence_length=0)  # fmt: skip
        ctx = torch.cat([ctx, ctx.new_zeros(len(ctx), 1, ctx.shape[-1])], 1)
        bias = pad_bias(counts, image_tokens, ctx.shape[1] - 1).to(dev)
        pred = model["transformer"](
            hidden_states=zt,
            timestep=sigma * T,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            joint_attention_kwargs={"attention_mask": bias},
        )
        loss = F.mse_loss(pred.sample, noise - z0)
        for group in opt.param_groups:  # (warmed up again after a resume whose optimizer state was dropped)
            group["lr"] = lr_at(args, step, warm["from"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - clock.decay(step, args.ema))
        return {"loss": loss.item()}

    objects = {"model": model, "opt": opt, **({"ema": ema, "ema_clock": clock} if ema is not None else {})}
    run.train(f"{NAME}-denoiser", args, objects, export=None, train_step=step_fn)


# -- export ---------------------------------------------------------------------------------------------------------
def fold_latent_mean(vae, mean: torch.Tensor):
    """Make `vae`'s latents centred: subtract `mean` (per channel) from the posterior mean at the encoder's 1x1
    `quant_conv` and add it back at the decoder's 1x1 `post_quant_conv` (exact: no padding at 1x1)."""
    c = len(mean)
    with torch.no_grad():
        vae.quant_conv.bias[:c] -= mean
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean


def export(args):
    """The package's `scene-dit.safetensors` (float16; the latents' scaling factor in its header, shift factor 0) and a
    diffusers pipeline directory, from the denoiser run (its VAE, its EMA weights if it kept them)."""
    den_dir = Path(args.denoiser_run)
    if not (den_dir / "vae.pt").exists():
        raise SystemExit("train the denoiser first: python training/train_scene_dit.py --part denoiser")
    vae = build_vae()
    vae.load_state_dict(torch.load(den_dir / "vae.pt", weights_only=True))
    vae_step = (den_dir / "vae_step.txt").read_text().strip()
    model, ema = build_denoiser(), build_denoiser()
    state = torch.load(den_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    use_ema = "ema" in state
    (ema if use_ema else model).load_state_dict(state["ema" if use_ema else "model"])
    trained = ema if use_ema else model
    stats = json.loads((den_dir / "latent_stats.json").read_text())
    fold_latent_mean(vae, torch.tensor(stats["mean"], dtype=torch.float32))
    full = torch.nn.ModuleDict({"vae": vae, **trained})
    out = Path(args.run)
    weights = pretrained.save(NAME, full, out / f"{NAME}.safetensors", scaling_factor=stats["scaling_factor"],
                              shift_factor=0.0, latent_mean_folded=json.dumps([round(m, 5) for m in stats["mean"]]),
                              vae_step=vae_step, denoiser_step=state["step"], ema=use_ema,
                              minutes=f"{state['seconds'] / 60:.1f}")  # fmt: skip
    pretrained.load(NAME, path=weights).save_pretrained(str(out / "pipeline"))
    print(f"wrote {weights} ({weights.stat().st_size / 2**20:.1f} MiB) and {out / 'pipeline'}")
    if args.install:
        install(NAME, out)


TRACKED = Path(__file__).parent / "checkpoints"  # runs kept in git between sessions (training/runs/ is not)


def seed_from_tracked(run_dir: Path, part: str) -> None:
    """A run directory without a checkpoint starts from the one kept in `training/checkpoints/scene-dit-<part>/`
    (checkpoint and loss log), so a fresh checkout resumes where the last session's run stopped. The denoiser's is
    kept compact (`keep`): float16 weights and EMA, no optimizer state (re-warmed for `RESUME_WARMUP` steps)."""
    kept = TRACKED / f"{NAME}-{part}"
    if part in ("export", "keep") or (run_dir / "checkpoint.pt").exists():
        return
    import shutil

    if (kept / "checkpoint.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(kept / "checkpoint.pt", run_dir / "checkpoint.pt")
    elif (kept / "model.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = json.loads((kept / "meta.json").read_text())
        state = {"opt": None, "step": meta["step"], "seconds": meta["seconds"], "args": meta.get("args", {})}
        if "ema_start" in meta:
            state["ema_clock"] = {"start": meta["ema_start"]}
        for key in ("model", "ema"):
            if (kept / f"{key}.pt").exists():
                state[key] = {k: v.float() for k, v in torch.load(kept / f"{key}.pt", weights_only=True).items()}
        _atomic_save(state, run_dir / "checkpoint.pt")
    else:
        return
    if (kept / "loss.csv").exists():
        shutil.copy(kept / "loss.csv", run_dir / "loss.csv")
    print(f"started from the tracked checkpoint in {kept}", flush=True)


def keep(args) -> None:
    """Copy the denoiser run's checkpoint into `training/checkpoints/scene-dit-denoiser/` for git, compactly: the
    weights and their EMA in float16 (two files under 50 MB), the step, the time and the loss log; the optimizer's
    state (twice the weights again) is dropped. Run at the end of a session."""
    den_dir = Path(args.denoiser_run)
    state = torch.load(den_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    out = TRACKED / f"{NAME}-denoiser"
    out.mkdir(parents=True, exist_ok=True)
    for key in ("model", "ema"):
        if key in state and state[key] is not None:
            _atomic_save(
                {k: v.half() if v.is_floating_point() else v for k, v in state[key].items()}, out / f"{key}.pt"
            )
    meta = {"step": state["step"], "seconds": state["seconds"], "args": state.get("args", {})}
    if state.get("ema_clock") is not None:
        meta["ema_start"] = state["ema_clock"]["start"]
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    lines = (den_dir / "loss.csv").read_text().splitlines()  # the rows up to the kept step (later ones train again)
    kept = [lines[0], *(r for r in lines[1:] if int(r.split(",")[0]) <= state["step"])]
    (out / "loss.csv").write_text("\n".join(kept) + "\n")
    print(f"kept step {state['step']} in {out}")


def main(argv=None):
    def model_args(p):
        p.add_argument("--part", choices=["vae", "denoiser", "export", "keep"], required=True)
        p.add_argument("--lr", type=float, default=None, help="default: 2e-4 (VAE), 3e-4 (denoiser)")
        p.add_argument("--crop", type=int, default=64, help="VAE: training crop size (px, a multiple of 8)")
        p.add_argument("--edge", type=float, default=0.0, help="VAE: weight of the finite-difference L1")
        p.add_argument("--vae-pool", type=int, default=2000, help="VAE: scenes rendered at 256 px to crop from")
        p.add_argument("--vae-run", default=str(RUNS / f"{NAME}-vae"), help="denoiser: the VAE's run directory")
        p.add_argument("--denoiser-run", default=str(RUNS / f"{NAME}-denoiser"), help="export: the denoiser's run")
        p.add_argument("--ema", type=float, default=0.999, help="denoiser: EMA decay of the exported weights (0: off)")
        p.add_argument("--warmup", type=int, default=500, help="denoiser: steps of linear learning-rate warm-up")
        p.add_argument("--decay-start", type=int, default=0, help="denoiser: step the LR cosine decay starts")
        p.add_argument("--decay-end", type=int, default=None, help="denoiser: step it reaches --lr-min (default: off)")
        p.add_argument("--lr-min", type=float, default=3e-5, help="denoiser: the learning rate after the decay")

    args = run_parser(__doc__, NAME, model_args, argv)
    if args.lr is None:
        args.lr = 2e-4 if args.part == "vae" else 3e-4
    if args.run == str(RUNS / NAME) and args.part not in ("export", "keep"):
        args.run = str(RUNS / f"{NAME}-{args.part}")
    seed_from_tracked(Path(args.run), args.part)
    {"vae": train_vae, "denoiser": train_denoiser, "export": export, "keep": keep}[args.part](args)


if __name__ == "__main__":
    main()
