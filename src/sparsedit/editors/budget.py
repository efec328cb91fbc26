"""What a `SparseEditor` holds and may hold: its cache bytes by part, the peak memory of a call, and a capture fitted
to `SparseConfig(cache_budget=...)` before it runs (issue 17)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from ..cache import CacheBudgetError, CacheBytes, gib
from ..spatial import capturing, sparse_state


__all__ = ["cache_parts", "fit_budget", "peak_memory"]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# -- what an editor holds ---------------------------------------------------------------------------------------------
def cache_parts(editor) -> CacheBytes:
    parts, offloaded = {}, 0
    for part, model in editor.loop.models().items():
        cache = sparse_state(model).cache
        parts[part] = cache.nbytes
        offloaded += cache.disk_bytes
    cap = editor.current
    text = latents = 0
    if cap is not None:
        latents = sum(_nbytes(t) for t in cap.trajectory) + _nbytes(cap.decoded)
        latents += sum(_nbytes(t) for t in cap.latents.values()) + _nbytes(cap.image) + _nbytes(cap.mask)
        latents += sum(_nbytes(t) for t in cap.inputs.values())
        text = _nbytes(cap.embeds) + sum(_nbytes(t) for t in (cap.attention or {}).get("probs", {}).values())
        text += sum(_nbytes(t) for t in (cap.attention or {}).get("maps", {}).values())
    if editor.latent:
        parts["text"] = text
    parts["latents"] = latents
    return CacheBytes(parts, offloaded)


# -- peak memory ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measure the peak memory of the block: `{"peak_bytes": ...}` filled on exit. CUDA: the allocator's peak. CPU:
    the process's peak resident set (VmHWM, reset at entry where Linux allows; otherwise the process's peak)."""
    out = {"peak_bytes": None, "peak_kind": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    try:
        yield out
    finally:
        if device.type == "cuda":
            out["peak_bytes"], out["peak_kind"] = torch.cuda.max_memory_allocated(device), "cuda allocated"
        else:
            out["peak_bytes"], out["peak_kind"] = _vm_hwm(), "process peak RSS"


def _vm_hwm() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- a capture that fits the budget ------------------------------------------------------------------------------------
def fit_budget(editor, x0, call, embeds, timesteps, copies: int) -> dict:
    """Measure what the capture would hold (each model once in a dry capture that stores nothing), then choose the
    most faithful storage that fits `editor.config.cache_budget`: as configured; the UNet's cache in bfloat16; the
    VAE's too; both in int8; the UNet's per-step cache on disk. Raises `CacheBudgetError` (before capturing) when
    none fits. Exact mode never gets int8 (it reads the cached context bit for bit).
    Returns the estimate and the choice, for `last_stats["budget"]`."""
    tallies, size = _dry_captures(editor, x0, call, embeds, timesteps, copies)
    return _choose(editor, tallies, _other_bytes(editor, embeds, len(timesteps), *size))


def _tally(model, run, spatial_inputs=()) -> dict:
    """What `model`'s capture of `run()` would store (`ActivationCache.dry_run`), storing nothing."""
    with capturing(model, spatial_inputs=spatial_inputs, calibrate=False), sparse_state(model).cache.dry_run() as t:
        run()
    return dict(t)


def _dry_captures(editor, x0, call, embeds, timesteps, copies: int) -> tuple[dict, tuple]:
    """Each model's tally for the whole capture (per step times the steps), and `(batch, height, width, factor)`."""
    unet, n, tallies = editor.unet, len(timesteps), {}
    a = editor.adapter  # device and dtypes read once per capture (`PipelineAdapter.pinned`)
    vae_dtype = a.placement(editor.pipe.vae, "dtype") if editor.latent else None
    f = editor.pipe.vae_scale_factor if editor.latent else 1
    b, h, w = x0 if not editor.adapter.takes_image else (x0.shape[0], *x0.shape[-2:])  # text-to-image: (b, h, w)
    with torch.no_grad():
        if editor.adapter.encodes_image:
            enc = editor.pipe.vae.encoder
            encodes = 2 if editor.adapter.takes_mask else 1  # the image and the masked image
            tally = _tally(enc, lambda: enc(x0.to(vae_dtype)))
            tallies["vae_encoder"] = {k: v * encodes for k, v in tally.items()}
        zl = torch.zeros(editor.adapter.input_shape(b, h, w), dtype=a.dtype, device=a.device)
        z = torch.cat([zl] * copies)
        if embeds is None:
            run = lambda: unet(z, timesteps[0])  # noqa: E731
        else:
            extra = editor.adapter.unet_kwargs(zl, copies)
            run = lambda: editor.adapter.denoise(unet, z, timesteps[0], embeds, extra)  # noqa: E731
        # A transformer's keys and values (its only feature maps) are kept for one step in `dit_kv_share`.
        share = sparse_state(unet).config.dit_kv_share if editor.adapter.token_sparse else 1
        kv_steps = -(-n // share)
        tallies["unet"] = {k: v * (kv_steps if k.startswith("maps") else n) for k, v in _tally(unet, run).items()}
        cn = editor.controlnet
        if cn is not None:  # the ControlNet's per-step cache, its conditioning embedding read as in the loop
            n_c = editor.adapter.control_copies(copies, call)
            control = torch.zeros(b * n_c, 3, h, w, dtype=a.placement(cn, "dtype"), device=a.device)
            prep = {"control_embed": cn.controlnet_cond_embedding(control), "control_region": None}
            zc = torch.zeros(b * n_c, cn.config.in_channels, h // f, w // f, dtype=control.dtype, device=a.device)
            ctx = embeds if n_c == copies else embeds.chunk(2)[1]
            with editor.adapter.embedding(prep):
                tally = _tally(cn, lambda: cn(zc, timesteps[0], encoder_hidden_states=ctx, controlnet_cond=control,
                                              return_dict=False), spatial_inputs=("controlnet_cond",))  # fmt: skip
            tallies["controlnet"] = {k: v * n for k, v in tally.items()}
        if editor.latent:
            dec = editor.pipe.vae.decoder
            lat = torch.zeros(b, editor.pipe.vae.config.latent_channels, h // f, w // f, dtype=vae_dtype,
                              device=a.device)  # fmt: skip
            tallies["vae_decoder"] = _tally(dec, lambda: dec(lat))
    return tallies, (b, h, w, f)


def _other_bytes(editor, embeds, n: int, b: int, h: int, w: int, f: int) -> int:
    """What a capture holds beside the models' caches: the trajectory, images, embeddings and attention maps."""
    latent_bytes = b * 4 * (h // f) * (w // f) * (n + 4) * editor.adapter.dtype.itemsize
    other = latent_bytes + b * 3 * h * w * 8 + _nbytes(embeds)  # trajectory, image and decoded, embeddings
    if editor.loop.attention is not None and editor.adapter.text_editable and embeds is not None:
        # the cross-attention maps a capture records for prompt edits: one [rows, h, w, tokens] float32 map per step
        from .. import textedit

        mh, mw = textedit.map_resolution(editor.unet, (h // f, w // f), editor.text_config.attention_downscale)
        other += n * embeds.shape[0] * mh * mw * embeds.shape[1] * 4  # both guidance halves
        if editor.text_config.inject_steps(n):
            raise NotImplementedError(
                "cache_budget does not yet estimate the attention probabilities that inject_attention stores; "
                "use it with TextEditConfig(inject_attention=0), or without a budget."
            )
    return other


def _size(tallies: dict, part: str, dtype) -> int:
    """Bytes of `part`'s cache with its maps stored in `dtype` (`None`: as configured)."""
    t = tallies.get(part)
    if t is None:
        return 0
    return (t["maps"] if dtype is None else t["maps_numel"] * dtype.itemsize) + t["other"]


def _choose(editor, tallies: dict, other: int) -> dict:
    """The first storage option that fits the budget, applied to the caches; `CacheBudgetError` when none does."""
    budget = editor.config.budget_bytes
    caches = {part: sparse_state(m).cache for part, m in editor.loop.models().items()}
    now = {part: c.storage_dtype for part, c in caches.items()}
    bf16, int8 = torch.bfloat16, torch.int8
    options = [
        ("as configured", now, False),
        ("UNet cache in bfloat16", {**now, "unet": bf16}, False),
        ("UNet and VAE caches in bfloat16", dict.fromkeys(now, bf16), False),
        # A budget asks to fit: int8 (the opt-in precision, measured within 0.15 dB of bf16) before disk.
        ("UNet and VAE caches in int8", dict.fromkeys(now, int8), False),
        (
            # A denoiser whose cache is int8 already (diffusion transformers' keys and values) streams int8.
            "UNet per-step cache on disk (bfloat16, or int8 where configured), VAE caches in int8",
            {**dict.fromkeys(now, int8), "unet": int8 if now["unet"] == int8 else bf16},
            True,
        ),
    ]
    if editor.config.exact:
        options = [o for o in options if int8 not in o[1].values()]
    needs, sizes = [], {}
    for name, dtypes, disk in options:
        resident = other + sum(_size(tallies, p, d) for p, d in dtypes.items() if not (disk and p == "unet"))
        if disk:
            resident += tallies["unet"]["other"]  # the model's inputs stay in memory
        needs.append(f"{name}: {gib(resident)}")
        sizes[name] = resident
        if resident <= budget:
            for part, cache in caches.items():
                cache.storage_dtype = dtypes[part]
                cache.budget = None
            if disk:
                caches["unet"].set_device("disk")
            # The hard limit, in case the estimate was low: the UNet's share of the budget.
            caches["unet"].budget = None if disk else budget - (resident - _size(tallies, "unet", dtypes["unet"]))
            return {"budget": budget, "estimate": resident, "choice": name, "options": sizes}
    raise CacheBudgetError(
        f"this capture does not fit cache_budget={gib(budget)}: "
        + "; ".join(needs)
        + ". Raise the budget, or capture fewer steps (num_inference_steps, strength) or a smaller image (this "
        "editor stays attached: call `editor.remove()` before making another on this pipeline).",
        sizes,
    )
