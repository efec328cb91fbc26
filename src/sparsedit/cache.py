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
    """Keyed tensor storage with memory accounting and a fingerprint.

    Args:
        storage_dtype: store feature maps (float tensors of 3 or more dimensions, except float64 sums) in this dtype.
        storage_device: store entries on this device.

    By default entries live on the device that produced them, in its dtype, and runs update them in place. With a
    storage dtype or device, `get` hands out a working copy in the producer's dtype and device, kept until the run
    ends: `flush(commit=True)` writes the copies back (an accepted edit), `flush(commit=False)` drops them.
    """

    def __init__(self, storage_dtype: torch.dtype | None = None, storage_device: str | torch.device | None = None):
        self._entries: dict[Hashable, dict[str, torch.Tensor]] = {}
        self._home: dict[Hashable, dict[str, tuple[torch.dtype, torch.device]]] = {}
        self._working: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.storage_dtype = storage_dtype
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self.fingerprint: dict | None = None

    @property
    def converts(self) -> bool:
        return self.storage_dtype is not None or self.storage_device is not None

    def _stored_form(self, t: torch.Tensor) -> tuple[torch.dtype, torch.device]:
        dtype = t.dtype
        if self.storage_dtype is not None and t.is_floating_point() and t.dim() >= 3 and t.dtype != torch.float64:
            dtype = self.storage_dtype
        return dtype, (t.device if self.storage_device is None else self.storage_device)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self):
        return self._entries.keys()

    def put(self, key: Hashable, **tensors: torch.Tensor) -> None:
        """Store copies of `tensors` under `key` (merging with what the key already holds), in the storage form."""
        self._put(key, tensors, exact=False)

    def put_exact(self, key: Hashable, **tensors: torch.Tensor) -> None:
        """As `put`, but never in a lower-precision storage dtype (inputs that are compared bit for bit)."""
        self._put(key, tensors, exact=True)

    def _put(self, key, tensors, exact: bool) -> None:
        entry = self._entries.setdefault(key, {})
        home = self._home.setdefault(key, {})
        self._working.pop(key, None)
        for name, t in tensors.items():
            t = t.detach()
            dtype, device = self._stored_form(t)
            if exact:
                dtype = t.dtype
            # Feature maps are kept channels-last: a pixel's channels are contiguous, so tile gathers and scatters
            # move whole rows of memory.
            fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
            entry[name] = torch.empty(t.shape, dtype=dtype, device=device).to(memory_format=fmt).copy_(t)
            home[name] = (t.dtype, t.device)

    def get(self, key: Hashable) -> dict[str, torch.Tensor]:
        """The entry under `key`. Runs update it in place (a working copy when the cache converts; see `flush`)."""
        try:
            entry = self._entries[key]
        except KeyError:
            raise KeyError(
                f"nothing was captured for {key!r}: the model took a different path than during capture. "
                "Capture again with `sparsedit.capturing(model)`."
            ) from None
        if not self.converts:
            return entry
        working = self._working.get(key)
        if working is None:
            home = self._home[key]
            working = {}
            for name, t in entry.items():
                dtype, device = home[name]
                fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
                working[name] = t.to(device=device, dtype=dtype, memory_format=fmt, non_blocking=True)
            self._working[key] = working
        return working

    def flush(self, commit: bool) -> None:
        """End of a run on a converting cache: write the working copies back (`commit`) or drop them."""
        if commit:
            for key, working in self._working.items():
                entry = self._entries[key]
                for name, t in working.items():
                    entry[name].copy_(t)
        self._working.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._home.clear()
        self._working.clear()
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
