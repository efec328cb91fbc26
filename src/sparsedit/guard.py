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


_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _bits_sum(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    bits = t.view(_INT_OF[t.element_size()]) if t.element_size() in _INT_OF else t.to(torch.float64).view(torch.int64)
    return int(bits.sum(dtype=torch.int64))
