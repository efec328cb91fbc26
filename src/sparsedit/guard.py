"""What keeps the editors from going wrong silently: one caller at a time, finite inputs and results, and a
checksum of the weights that in-place writes (`param.data.add_()`) cannot slip past."""

from __future__ import annotations

import functools
import threading

import torch


__all__ = ["EditorBusyError", "check_finite", "serialized", "weights_checksum"]


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


def weights_checksum(modules: dict) -> dict:
    """A content checksum of each module's parameters and buffers: every tensor's bits summed as integers, mixed with
    its position. Unlike the version counters in the fingerprint, it sees in-place writes made through `.data`.
    Costs one read of the weights (measured in BENCHMARKS.md)."""
    out = {}
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue
        total = 0
        with torch.no_grad():
            for i, t in enumerate([*module.parameters(), *module.buffers()]):
                total += (i + 1) * _bits_sum(t.detach())
        out[name] = total
    return out


def _bits_sum(t: torch.Tensor) -> int:
    """The tensor's bytes read as 64-bit integers and summed modulo 2**64 (any single-bit change shows). Reads the
    memory once at the speed of a float sum: 0.1 ms per million float32 weights on 2 cores."""
    if t.numel() == 0:
        return 0
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0:
        return int(flat.view(torch.int64).sum())
    if nbytes % 4 == 0:
        return int(flat.view(torch.int32).sum(dtype=torch.int32))
    return int(flat.view(torch.uint8).sum(dtype=torch.int64))
