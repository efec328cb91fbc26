"""`ActivationCache`: what a capture run stores for the sparse runs that follow.

Entries are keyed by `(layer name, call index, *scope)`; the scope lets later techniques keep one entry per denoising
step and classifier-free-guidance branch. The cache carries a fingerprint of everything the capture depended on, and
refuses to be used by a run whose fingerprint differs (a stale cache is never used silently).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch


__all__ = ["ActivationCache", "StaleCacheError", "weights_fingerprint"]


class StaleCacheError(RuntimeError):
    """The cache was captured under different conditions than the run that wants to use it."""


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple:
    """Identity of a set of weights: storage address and in-place version counter of each tensor.

    `load_state_dict`, optimizer steps and any in-place update bump `_version`; replacing a parameter changes the
    address. Costs one Python loop over the parameters, no reads of their data.
    """
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


class ActivationCache:
    """Keyed tensor storage with memory accounting and a fingerprint. Entries live on the device that produced them."""

    def __init__(self):
        self._entries: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.fingerprint: dict | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self):
        return self._entries.keys()

    def put(self, key: Hashable, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store copies of `tensors` under `key` (merging with what the key already holds)."""
        entry = self._entries.setdefault(key, {})
        for name, t in tensors.items():
            t = t.detach()
            # Feature maps are kept channels-last: a pixel's channels are contiguous, so tile gathers and scatters
            # move whole rows of memory.
            fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
            entry[name] = torch.empty_like(t, memory_format=fmt).copy_(t)
        return entry

    def get(self, key: Hashable) -> dict[str, torch.Tensor]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(
                f"nothing was captured for {key!r}: the model took a different path than during capture. "
                "Capture again with `sparsedit.capturing(model)`."
            ) from None

    def clear(self) -> None:
        self._entries.clear()
        self.fingerprint = None

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in e.values())

    def check(self, fingerprint: dict) -> None:
        """Raise `StaleCacheError` naming every field that differs from the capture's fingerprint."""
        if self.fingerprint is None:
            raise StaleCacheError("the cache is empty: run the model once inside `sparsedit.capturing(model)` first.")
        diffs = [
            f"{k}: captured {self.fingerprint.get(k)!r:.80}, now {v!r:.80}"
            for k, v in fingerprint.items()
            if self.fingerprint.get(k) != v
        ]
        if diffs:
            raise StaleCacheError(
                "the cache does not match this run (" + "; ".join(diffs) + "). "
                "Capture again with `sparsedit.capturing(model)` on the new input or weights."
            )
