"""What keeps the editors from going wrong silently: one caller at a time, finite inputs and results, and a
checksum of the weights that in-place writes (`param.data.add_()`) and permutations cannot slip past."""

from __future__ import annotations

import functools
import threading

import torch

from .fingerprints import changed_tensors, tensor_checksum, weights_checksum


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
