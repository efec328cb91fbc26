"""Fingerprints, in one place: what says that a cache still belongs to the model, inputs and files it came from.

Three strengths, each where its cost fits:
- **identity per run** (`module_fingerprint`, `run_fingerprint`): storage addresses and version counters, no reads of
  tensor data; compared before every sparse run.
- **checksum per edit** (`weights_checksum`): every weight's bits, order-dependent, by tensor; sees writes through
  `.data` and permutations; compared once per edit, and by the engine when an identity changed.
- **digest per save** (`content_fingerprint`, `file_digest`, `manifest_digest`): what outlives the process.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch


__all__ = [
    "adapter_state",
    "changed_tensors",
    "content_fingerprint",
    "file_digest",
    "manifest_digest",
    "module_fingerprint",
    "pipeline_fingerprint",
    "WEIGHTS",
    "run_fingerprint",
    "scheduler_fingerprint",
    "tensor_checksum",
    "tensor_checksums",
    "tensor_digest",
    "text_fingerprint",
    "weights_checksum",
    "weights_fingerprint",
]

COMPONENTS = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "controlnet",
)  # a pipeline's models, as diffusers names them


# -- identity per run ---------------------------------------------------------------------------------------------------
def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple:
    """Identity of a set of weights: storage address and in-place version counter of each tensor.

    `load_state_dict`, optimizer steps and any in-place update bump `_version`; replacing a parameter changes the
    address. Costs one Python loop over the parameters, no reads of their data.
    """
    return tuple((t.data_ptr(), t._version, t.shape, t.dtype) for t in tensors)


def module_fingerprint(model: torch.nn.Module) -> tuple:
    """Identity of a module's weights and LoRA adapters in one pass over its submodules: `weights_fingerprint` of
    each one's own parameters and buffers, and `adapter_state` of the PEFT tuner layers among them. Runs before every
    sparse run, so it reads no tensor data."""
    out = []
    for m in model.modules():  # (one flat pass reading the modules' dicts: it runs before every sparse run)
        d = m.__dict__
        params, buffers = d["_parameters"], d["_buffers"]
        if params or buffers:
            out.append(tuple((t.data_ptr(), t._version, t.shape, t.dtype)
                             for t in (*params.values(), *buffers.values()) if t is not None))  # fmt: skip
        # PEFT's tuner layers keep `scaling` as a plain attribute: reading `__dict__` spares every other module a
        # failed `nn.Module.__getattr__`.
        if isinstance(d.get("scaling"), dict) and hasattr(m, "merged_adapters"):
            out.append(_tuner_state("", m))
    return tuple(out)


def _tuner_state(name: str, m: torch.nn.Module) -> tuple:
    return (
        name,
        tuple(getattr(m, "active_adapters", ()) or ()),
        tuple(m.merged_adapters),
        bool(getattr(m, "disable_adapters", False)),
        tuple(sorted((k, float(v)) for k, v in m.scaling.items())),
    )


def adapter_state(model: torch.nn.Module) -> tuple:
    """The state of the LoRA (PEFT) adapters inside `model` that changes its output without changing a parameter
    tensor: which adapters are active, merged (fused into the base weights) or disabled, and their scaling
    (`set_adapters` weights). Duck-typed on PEFT's tuner layers, so PEFT need not be importable. Loading or
    deleting adapters adds or removes parameters, which `weights_fingerprint` sees."""
    return tuple(
        _tuner_state(name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and hasattr(m, "merged_adapters")
    )


WEIGHTS = "weights and LoRA adapters"  # the identity's field in `run_fingerprint`


class _Identity(tuple):
    """`module_fingerprint` (storage addresses and version counters), shown in errors by what it is."""

    def __repr__(self) -> str:
        return f"<the identity of {len(self)} modules' weights>"


def run_fingerprint(model: torch.nn.Module, x: torch.Tensor, config_json: str, weights: bool = True) -> dict:
    """What a sparsified model's cache depends on, per run: its input's shape, dtype and device, the identity of its
    weights and LoRA adapters (left out with `weights=False`: the rest is what must match before the cached input
    can even be compared with `x`), its config and its train/eval mode."""
    out = {
        "input shape": tuple(x.shape),
        "input dtype": x.dtype,
        "device": x.device,
        "config": config_json,
        "training": model.training,
    }
    if weights:
        out[WEIGHTS] = weights_identity(model)
    return out


def weights_identity(model: torch.nn.Module) -> _Identity:
    """The `WEIGHTS` field of `run_fingerprint`: `module_fingerprint`, shown in errors by what it is."""
    return _Identity(module_fingerprint(model))


def scheduler_fingerprint(scheduler) -> tuple:
    """A scheduler's class and config: what its timesteps and steps derive from."""
    return type(scheduler).__name__, json.dumps(dict(scheduler.config), sort_keys=True, default=str)


def text_fingerprint(pipe) -> tuple:
    """Identity of a pipeline's text encoders' weights and LoRA adapters: a capture's prompt embeddings are reused."""
    out = []
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            out.append((name, module_fingerprint(module)))
    return tuple(out)


# -- checksum per edit --------------------------------------------------------------------------------------------------
def weights_checksum(modules: dict) -> dict[str, dict[str, int]]:
    """A content checksum of each module's parameters and buffers, by tensor name (`tensor_checksum`). Unlike the
    version counters in the fingerprint, it sees in-place writes made through `.data`, and unlike a plain sum it sees
    permutations (`w.data.copy_(w.data.flip(0))`). Costs two reads of the weights (measured in BENCHMARKS.md)."""
    out = {}
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue
        named = list(_named_tensors(module))
        with torch.no_grad():
            out[name] = dict(zip((n for n, _ in named), tensor_checksums([t for _, t in named]), strict=True))
    return out


def changed_tensors(captured: dict, now: dict, limit: int = 3) -> str | None:
    """`None` when two `weights_checksum`s agree; else which components and tensors differ, for an error message
    (the first `limit` tensor names of each component, and how many more)."""
    parts = []
    for component in sorted(set(captured) | set(now)):
        a, b = captured.get(component, {}), now.get(component, {})
        names = [n for n in a if b.get(n) != a[n]] + [n for n in b if n not in a]
        if names:
            more = f" and {len(names) - limit} more tensors" if len(names) > limit else ""
            parts.append(f"{component} ({', '.join(names[:limit])}{more})")
    return "; ".join(parts) or None


def _named_tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


_MIX = 0x9E3779B97F4A7C15 - 2**64  # an odd 64-bit constant (as a signed int64): spreads the position sums


def tensor_checksum(t: torch.Tensor) -> int:
    """An order-dependent checksum of a tensor's bits: its memory read as integer words `w_i` laid out as rows of
    1024, `sum(w_i)` and the position-weighted `sum((r + 1) * rowsum_r)` and `sum((c + 1) * colsum_c)`, all modulo
    2**64 and mixed with the shape and dtype. Any single-bit change shows, and so does moving values around (a
    permutation changes the weighted sums unless the moved words are equal). Two reductions over the memory."""
    return tensor_checksums([t])[0]


# A kernel that sums many tensors' words at once (`ops.cpu` registers its compiled one when built; None: torch's
# reductions, which give the same bits). Given the non-empty tensors' words, it returns their `[n, 2]` sums, or `None`
# where it cannot run (turned off, a tensor off the CPU).
SUMS_KERNEL = None
_BATCHED_WORDS = 1 << 14  # tensors of at most this many words are checksummed together (`tensor_checksums`)
_ROW = 1024


def tensor_checksums(tensors: list[torch.Tensor]) -> list[int]:
    """`tensor_checksum` of each tensor, with one transfer of the sums to Python for all of them, and the small
    tensors (at most 16384 words) computed together: laid out as zero-padded grids of 1024-word rows, one batch per
    word type, device and row count bucket (1 row; 2 to 17), whose row and column sums give every tensor's two sums in
    a few operations. A model's hundreds of biases and norm weights then cost a few operations instead of a dozen
    each (scene-sd's 513 tensors, 2 threads: 34 -> 21 ms, the same values)."""
    sums: list[tuple[list[int], torch.Tensor]] = []  # (tensor indices, their [n, 2] int64 sums)
    words = {
        i: _words(t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().reshape(-1))
        for i, t in enumerate(tensors)
        if t.numel()
    }
    sums += [([i], torch.zeros(1, 2, dtype=torch.int64)) for i, t in enumerate(tensors) if not t.numel()]
    compiled = SUMS_KERNEL(list(words.values())) if words and SUMS_KERNEL is not None else None
    if compiled is not None:
        sums.append((list(words), compiled))
    else:
        groups: dict[tuple, list] = {}
        for i, w in words.items():
            if w.numel() > _BATCHED_WORDS:
                sums.append(([i], _sums(w)[None]))
            else:
                groups.setdefault((w.dtype, w.device, w.numel() > _ROW), []).append((i, w))
        for (_, device, _), items in groups.items():
            sums.append(([i for i, _ in items], _grid_sums([w for _, w in items], device)))
    values = torch.cat([v.cpu() for _, v in sums]).tolist() if sums else []
    out: list[int] = [0] * len(tensors)
    for i, (total, weighted) in zip((i for idx, _ in sums for i in idx), values, strict=True):
        out[i] = _mixed(tuple(tensors[i].shape), tensors[i].dtype, total % 2**64, weighted % 2**64)
    return out


def _sums(words: torch.Tensor) -> torch.Tensor:
    """`[total, weighted]` of one tensor's words (int64, wrapping as the sums modulo 2**64 do)."""
    rows, tail = divmod(words.numel(), _ROW)
    total = weighted = torch.zeros((), dtype=torch.int64, device=words.device)
    if rows:
        grid = words[: rows * _ROW].view(rows, _ROW)
        row_sums = grid.sum(1, dtype=torch.int64)
        total = row_sums.sum()
        weighted = (row_sums * _ramp(rows, words.device)).sum()
        weighted = weighted + _MIX * (grid.sum(0, dtype=torch.int64) * _ramp(_ROW, words.device)).sum()
    if tail:
        rest = words[rows * _ROW :].to(torch.int64)
        total = total + rest.sum()
        weighted = weighted + (rows + 1) * (rest * _ramp(tail, words.device)).sum()
    return torch.stack([total, weighted])


def _grid_sums(words: list[torch.Tensor], device) -> torch.Tensor:
    """`[n, 2]` sums of small tensors' words (one word type), each padded to `height` rows of 1024: the full rows
    weigh (row + 1) and (column + 1) as in `_sums`; the tail, row `rows`, (rows + 1) * (position + 1); padding is 0."""
    n = [w.numel() for w in words]
    height = max(n) // _ROW + 1
    dest = _grid_index(tuple(n), height, device)
    grid = torch.zeros(len(words) * height * _ROW, dtype=words[0].dtype, device=device)
    grid.index_copy_(0, dest, torch.cat(words))
    grid = grid.view(len(words), height, _ROW).to(torch.int64)
    rows = torch.tensor([m // _ROW for m in n], dtype=torch.int64, device=device)
    row_sums = grid.sum(2)  # [tensors, height]
    tail = grid[torch.arange(len(words), device=device), rows]  # [tensors, 1024]
    tail_sum = tail.sum(1)
    total = row_sums.sum(1)
    weighted = (row_sums * _ramp(height, device)).sum(1) - (rows + 1) * tail_sum  # the full rows' row weights
    weighted += _MIX * ((grid.sum(1) - tail) * _ramp(_ROW, device)).sum(1)  # the full rows' column weights
    weighted += (rows + 1) * (tail * _ramp(_ROW, device)).sum(1)  # the tail: (rows + 1) * (position + 1)
    return torch.stack([total, weighted], 1)


@functools.lru_cache(maxsize=64)
def _grid_index(n: tuple, height: int, device) -> torch.Tensor:
    """Where each word of tensors of `n` words goes in their zero-padded grid (kept: a model's layout recurs)."""
    counts = torch.tensor(n, dtype=torch.int64)
    starts = torch.arange(len(n), dtype=torch.int64) * (height * _ROW)
    offsets = torch.cumsum(counts, 0) - counts
    seg = torch.repeat_interleave(torch.arange(len(n)), counts)
    return (starts[seg] + torch.arange(int(counts.sum())) - offsets[seg]).to(device)


@functools.lru_cache(maxsize=256)
def _ramp(n: int, device) -> torch.Tensor:
    """1, 2, ..., n as int64 on `device` (kept: the same few lengths recur for every tensor of a model)."""
    return torch.arange(1, n + 1, dtype=torch.int64, device=device)


def _mixed(*parts) -> int:
    """One stable 64-bit integer of `parts` (Python's `hash` of strings changes between processes)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _words(flat: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as the widest integer words that tile it."""
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        if nbytes % dtype.itemsize == 0 and flat.element_size() <= dtype.itemsize:
            return flat.view(dtype)
    return flat.view(torch.uint8)


# -- digest per save ----------------------------------------------------------------------------------------------------
def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's values: float64 sum and sum of squares, and the bytes of up to 4096 evenly spaced
    elements. Reads every element once (about a second per few GB), so any in-place change shows."""
    t = t.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        flat = t.reshape(-1)
        if t.is_floating_point() or t.is_complex():
            f = flat.float() if t.dtype in (torch.float16, torch.bfloat16) else flat
            h.update(f"{float(f.sum(dtype=torch.float64))!r}{float(f.square().sum(dtype=torch.float64))!r}".encode())
        else:
            h.update(f"{int(flat.long().sum())}".encode())
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].contiguous().cpu()
        h.update(
            sample.view(torch.uint8).numpy().tobytes() if sample.dtype != torch.bool else sample.numpy().tobytes()
        )
    return h.hexdigest()


def content_fingerprint(module: torch.nn.Module | None) -> str | None:
    """One digest of every parameter and buffer of `module` (their names and values)."""
    if module is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def pipeline_fingerprint(pipe) -> dict:
    """What a saved session of `pipe` depends on, by content: its class, its scheduler and every model component's
    weights and LoRA adapters."""
    out = {"pipeline": type(pipe).__name__, "scheduler": list(scheduler_fingerprint(pipe.scheduler))}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            out[name] = content_fingerprint(module)
            adapters = adapter_state(module)
            if adapters:
                out[f"{name} LoRA adapters"] = [list(map(str, a)) for a in adapters]
    return out


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (about 1.5 GB/s here: measured in BENCHMARKS.md)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own `digest`: every value that determines the cache (the
    capture's arguments, the config, the fingerprints, the keys) is covered."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
