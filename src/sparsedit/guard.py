"""What keeps the editors from going wrong silently: one caller at a time, finite inputs and results, and a
checksum of the weights that in-place writes (`param.data.add_()`) and permutations cannot slip past."""

from __future__ import annotations

import functools
import hashlib
import threading

import torch


__all__ = [
    "EditorBusyError",
    "changed_tensors",
    "check_commit",
    "check_finite",
    "serialized",
    "tensor_checksum",
    "weights_checksum",
]


class EditorBusyError(RuntimeError):
    """An editor made with `blocking=False` was called while another thread was inside one of its calls."""


def make_lock() -> threading.RLock:
    return threading.RLock()


def serialized(method):
    """Run an editor method holding the editor's lock (`self._lock`): concurrent calls from other threads wait, or,
    for an editor made with `blocking=False`, raise `EditorBusyError`. A method that calls another of the same
    editor re-enters the lock. Calls on a removed editor are refused."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        if not self._lock.acquire(blocking=self.blocking):
            raise EditorBusyError(
                f"this {type(self).__name__} is running another call (capture, edit, save) in another thread. Wait for "
                "it (make the editor with blocking=True, the default, and calls queue), or give each thread its own "
                "pipeline and editor."
            )
        try:
            if self._removed and method.__name__ != "remove":
                raise RuntimeError(
                    f"this {type(self).__name__} was removed (`editor.remove()`): its caches are gone. Make a new "
                    f"editor on the pipeline to edit again."
                )
            return method(self, *args, **kwargs)
        finally:
            self._lock.release()

    return locked


def check_commit(value) -> bool:
    """`commit` as the editors take it: a bool, never a truthy string or `None`."""
    if not isinstance(value, bool):
        raise TypeError(f"commit must be True (keep the result) or False (a preview), got {value!r}.")
    return value


def check_finite(name: str, t: torch.Tensor | None) -> None:
    """Refuse an input with NaN or Inf values, saying how many and where the first one is."""
    if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    where = [int(i) for i in bad.nonzero()[0]]
    at = f"(batch {where[0]}, y={where[-2]}, x={where[-1]})" if t.dim() == 4 else f"at index {tuple(where)}"
    raise ValueError(
        f"{name} has {n_nan} NaN and {n_inf} infinite values, the first {at}; they would spread through the model "
        "and be kept in the cache. Clean the input first (e.g. `torch.nan_to_num(x).clamp(0, 1)`)."
    )


def weights_checksum(modules: dict) -> dict[str, dict[str, int]]:
    """A content checksum of each module's parameters and buffers, by tensor name (`tensor_checksum`). Unlike the
    version counters in the fingerprint, it sees in-place writes made through `.data`, and unlike a plain sum it sees
    permutations (`w.data.copy_(w.data.flip(0))`). Costs two reads of the weights (measured in BENCHMARKS.md)."""
    out = {}
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue
        with torch.no_grad():
            out[name] = {n: tensor_checksum(t.detach()) for n, t in _named_tensors(module)}
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
    t = t.detach()
    if t.numel() == 0:
        return _mixed(tuple(t.shape), t.dtype, 0, 0)
    words = _words(t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1))
    k = 1024
    rows, tail = divmod(words.numel(), k)
    total, weighted = 0, 0
    if rows:
        grid = words[: rows * k].view(rows, k)
        row_sums = grid.sum(1, dtype=torch.int64)
        col_sums = grid.sum(0, dtype=torch.int64)
        total = int(row_sums.sum())
        weighted = int((row_sums * torch.arange(1, rows + 1, dtype=torch.int64, device=t.device)).sum())
        weighted += _MIX * int((col_sums * torch.arange(1, k + 1, dtype=torch.int64, device=t.device)).sum())
    if tail:
        rest = words[rows * k :].to(torch.int64)
        total += int(rest.sum())
        weighted += (rows + 1) * int((rest * torch.arange(1, tail + 1, dtype=torch.int64, device=t.device)).sum())
    return _mixed(tuple(t.shape), t.dtype, total % 2**64, weighted % 2**64)


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
