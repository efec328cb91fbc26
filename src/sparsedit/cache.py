"""`ActivationCache`: what a capture run stores for the sparse runs that follow.

Entries are keyed by `(layer name, call index, *scope)`; the scope lets later techniques keep one entry per denoising
step and classifier-free-guidance branch. The cache carries a fingerprint of everything the capture depended on, and
refuses to be used by a run whose fingerprint differs (a stale cache is never used silently).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Hashable

import torch

from .fingerprints import adapter_state, module_fingerprint, weights_fingerprint


__all__ = [
    "ActivationCache",
    "CacheBudgetError",
    "CacheBytes",
    "StaleCacheError",
    "adapter_state",
    "module_fingerprint",
    "weights_fingerprint",
]


class StaleCacheError(RuntimeError):
    """The cache was captured under different conditions than the run that wants to use it."""


class CacheBudgetError(MemoryError):
    """A capture would hold more than `SparseConfig(cache_budget=...)` allows. `needs` maps each storage option that
    was tried to the bytes it would hold in memory (empty when the hard limit tripped during a capture)."""

    def __init__(self, message: str, needs: dict[str, int] | None = None):
        super().__init__(message)
        self.needs = dict(needs or {})


def gib(n: int) -> str:
    """A byte count for people: GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class CacheBytes(int):
    """A byte count (an `int`) that also says what it is made of: `parts` maps each part (`"unet"`, `"vae_encoder"`,
    `"vae_decoder"`, `"text"`, `"latents"`) to its bytes, and `cache_bytes["unet"]` reads one."""

    parts: dict[str, int]

    def __new__(cls, parts: dict[str, int], offloaded: int = 0):
        obj = super().__new__(cls, sum(parts.values()))
        obj.parts = dict(parts)
        obj.offloaded = offloaded  # of the total, bytes kept on disk rather than in memory
        return obj

    def __getitem__(self, part: str) -> int:
        return self.parts[part]

    def keys(self):
        return self.parts.keys()

    def items(self):
        return self.parts.items()

    def __repr__(self) -> str:
        return f"CacheBytes({int(self)}, {self.parts})"


def is_feature_map(t: torch.Tensor) -> bool:
    """Entries a lower storage precision applies to: float maps and token tensors (not sums kept in float64)."""
    return t.is_floating_point() and t.dim() >= 3 and t.dtype != torch.float64


class ActivationCache:
    """Keyed tensor storage with memory accounting and a fingerprint.

    Args:
        storage_dtype: store feature maps (float tensors of 3 or more dimensions, except float64 sums) in this dtype.
        storage_device: store entries on this device.

    By default entries live on the device that produced them, in its dtype, and runs update them in place. With a
    storage dtype or device, `get` hands out a working copy in the producer's dtype and device, kept until the run
    ends: `flush(commit=True)` writes the copies back (an accepted edit), `flush(commit=False)` drops them.
    """

    def __init__(
        self,
        storage_dtype: torch.dtype | None = None,
        storage_device: str | torch.device | None = None,
        budget: int | None = None,
    ):
        self._entries: dict[Hashable, dict[str, torch.Tensor]] = {}
        self._home: dict[Hashable, dict[str, tuple[torch.dtype, torch.device]]] = {}
        self._working: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.storage_dtype = storage_dtype
        self.budget = budget
        self._dir: str | None = None  # "disk" storage: the temporary directory of the memory-mapped files
        self._files = itertools.count()
        self.counting: dict | None = None  # a dry run's tally (see `dry_run`)
        self._resident = 0  # bytes of the entries held in memory (kept up to date by `_put` and `clear`)
        self._scales: dict[Hashable, dict[str, torch.Tensor]] = {}  # int8 storage: per-channel scales
        self._prefetched: dict[Hashable, object] = {}  # key -> Future of its working copies (see `prefetch`)
        # An uncommitted run drops its working copies at the end, so the cache holds them weakly: each is freed as
        # soon as the run's last reader lets go (the VAE decoder's whole float32 working set is never alive at once).
        self.retain = True
        self._weak: dict[Hashable, dict[str, weakref.ref]] = {}
        self._copies: dict[int, weakref.ref] = {}  # working tensors that are copies, not the stored ones (by id)
        self._pool = None
        self.fingerprint: dict | None = None
        # A transaction's journal: what committed writes replaced, to put back if the transaction fails (`begin`).
        self._journal: dict | None = None
        self.set_device(storage_device)

    def set_device(self, storage_device) -> None:
        """Where entries stored from now on live: a device, `"disk"` (memory-mapped temporary files) or `None`."""
        self.disk = storage_device == "disk"
        self.storage_device = None if storage_device is None or self.disk else torch.device(storage_device)

    @property
    def converts(self) -> bool:
        return self.storage_dtype is not None or self.storage_device is not None or self.disk

    def _stored_form(self, t: torch.Tensor) -> tuple[torch.dtype, torch.device]:
        dtype = t.dtype
        if self.storage_dtype is not None and is_feature_map(t):
            dtype = self.storage_dtype
            if dtype == torch.int8 and t.dim() not in (3, 4):
                dtype = torch.bfloat16  # int8 is for maps [B, C, H, W] and tokens [B, L, C]
        if self.disk:
            return dtype, torch.device("cpu")
        return dtype, (t.device if self.storage_device is None else self.storage_device)

    def _allocate(self, shape, dtype, device) -> torch.Tensor:
        """Storage for one entry; channels-last for 4D maps. On disk: a shared memory map of a temporary file."""
        if not self.disk:
            t = torch.empty(shape, dtype=dtype, device=device)
            return t.to(memory_format=torch.channels_last) if len(shape) == 4 else t
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="sparsedit-cache-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        path = os.path.join(self._dir, f"{next(self._files)}.bin")
        numel = math.prod(shape)
        flat = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)[:numel]
        if len(shape) == 4:
            b, c, h, w = shape
            return flat.view(b, h, w, c).permute(0, 3, 1, 2)
        return flat.view(shape)

    @contextlib.contextmanager
    def dry_run(self):
        """Count what puts would store, storing nothing: yields the tally `{"maps": bytes of feature maps in their
        own dtype, "maps_numel": their elements, "other": bytes of the rest}`."""
        prev, self.counting = self.counting, {"maps": 0, "maps_numel": 0, "other": 0}
        try:
            yield self.counting
        finally:
            self.counting = prev

    def resident_bytes(self) -> int:
        """Bytes held in memory (not on disk)."""
        return self._resident

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
        if self.counting is not None:
            for t in tensors.values():
                if is_feature_map(t) and not exact:
                    self.counting["maps"] += t.numel() * t.element_size()
                    self.counting["maps_numel"] += t.numel()
                else:
                    self.counting["other"] += t.numel() * t.element_size()
            return
        if self.budget is not None:
            held = self._entries.get(key, {})
            old = sum(_resident(held[n]) for n in tensors if n in held)
            new = 0
            for t in tensors.values():
                dtype = t.dtype if exact else self._stored_form(t)[0]
                new += 0 if (self.disk and not exact) else t.numel() * dtype.itemsize
            total = self._resident - old + new
            if total > self.budget:
                raise CacheBudgetError(
                    f"the cache would hold {gib(total)} (entry {key!r}), more than cache_budget={gib(self.budget)}. "
                    "Raise the budget, store in a smaller dtype (cache_dtype='bfloat16'), offload "
                    "(cache_device='disk'), or capture fewer steps or a smaller image."
                )
        if self._journal is not None:
            for name in tensors:
                self._journal_ref(key, name)
        entry = self._entries.setdefault(key, {})
        home = self._home.setdefault(key, {})
        self._working.pop(key, None)
        self._drop_prefetched(key)
        for name, t in tensors.items():
            t = t.detach()
            dtype, device = self._stored_form(t)
            if exact:
                dtype = t.dtype
            # Feature maps are kept channels-last: a pixel's channels are contiguous, so tile gathers and scatters
            # move whole rows of memory. The model's input (`exact`) stays in memory, in its own dtype.
            if exact and self.disk:
                stored = torch.empty(t.shape, dtype=dtype, device=t.device)
                stored = stored.to(memory_format=torch.channels_last) if t.dim() == 4 else stored
            else:
                stored = self._allocate(tuple(t.shape), dtype, device)
            if name in entry:
                self._resident -= _resident(entry[name])
            home[name] = (t.dtype, t.device)
            if dtype == torch.int8 and t.is_floating_point():
                q, scale = quantize(t)
                self._scales.setdefault(key, {})[name] = scale.to(stored.device)
                t = q
            entry[name] = stored.copy_(t)
            self._resident += _resident(stored)

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
        if working is None and key in self._weak:
            working = {name: ref() for name, ref in self._weak[key].items()}
            if any(t is None for t in working.values()):
                raise RuntimeError(
                    f"sparsedit internal error: the working copy of cache entry {key!r} was requested again after "
                    "its run released it; please report this (SparseConfig(cache_dtype=None) avoids it)."
                )
            return working
        if working is None:
            working = self._prefetched.pop(key).result() if key in self._prefetched else self._working_copy(key)
            for name, t in working.items():
                if t is not entry[name]:
                    self._copies[id(t)] = weakref.ref(t)
            if self.retain:
                self._working[key] = working
            else:
                self._weak[key] = {name: weakref.ref(t) for name, t in working.items()}
        return working

    def is_copy(self, t: torch.Tensor) -> bool:
        """Whether `t` is a working copy handed out by `get` (writes to it never reach the stored entry unless a
        committed run flushes it), rather than the stored tensor itself."""
        ref = self._copies.get(id(t))
        return ref is not None and ref() is t

    def _working_copy(self, key: Hashable, background: bool = False) -> dict[str, torch.Tensor]:
        """The entry converted to its producer's dtype and device. In the background (a prefetch), copies to a GPU
        go on a side stream, finished before the copy is handed out."""
        entry, home = self._entries[key], self._home[key]
        cuda = next((d for _, d in home.values() if d.type == "cuda"), None)
        stream = torch.cuda.Stream(device=cuda) if background and cuda is not None else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            working = {}
            scales = self._scales.get(key, {})
            for name, t in entry.items():
                dtype, device = home[name]
                fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
                if name in scales:  # int8: value = q * per-channel scale, multiplied in float32 and rounded once
                    w = t.to(device=device, dtype=torch.float32, memory_format=fmt) * scales[name].to(device)
                    working[name] = w.to(dtype).contiguous(memory_format=fmt)
                    continue
                # From disk, always a copy in memory: runs write into it, and only a commit writes the file.
                working[name] = t.to(device=device, dtype=dtype, memory_format=fmt, non_blocking=True,
                                     copy=_on_disk(t))  # fmt: skip
        if stream is not None:
            stream.synchronize()
        return working

    def scope_keys(self, scope: tuple) -> list:
        """The keys captured in `scope` (keys end with their scope)."""
        n = len(scope)
        return [k for k in self._entries if isinstance(k, tuple) and len(k) >= 2 + n and k[len(k) - n :] == scope]

    def prefetch(self, keys) -> int:
        """Start making the working copies of `keys` in the background (one worker thread; on CUDA, a side stream),
        while the current run computes; a later `get` takes them. Only for a cache that converts (another dtype,
        device, or disk). Returns how many entries were queued."""
        if not self.converts:
            return 0
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsedit-prefetch")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        queued = 0
        for key in keys:
            if key in self._entries and key not in self._working and key not in self._prefetched:
                self._prefetched[key] = self._pool.submit(self._working_copy, key, True)
                queued += 1
        return queued

    def flush(self, commit: bool) -> None:
        """End of a run on a converting cache: write the working copies back (`commit`) or drop them."""
        if commit:
            for key, working in self._working.items():
                # A copy prefetched for a later run (a shared entry: `dit_kv_share`) predates this write-back.
                self._drop_prefetched(key)
                entry = self._entries[key]
                scales = self._scales.get(key, {})
                for name, t in working.items():
                    if name in scales:
                        q, scale = requantize(t, scales[name])
                        if self._journal is not None:
                            self._journal_diff(key, name, q, scales[name])
                        scales[name] = scale.to(entry[name].device)
                        t = q
                    elif self._journal is not None:
                        self._journal_diff(key, name, t, None)
                    entry[name].copy_(t)
        self._working.clear()
        self._weak.clear()
        self._copies.clear()

    def export(self):
        """Every entry as stored: yields `(key, {field: (tensor, home dtype, home device, int8 scale or None)})`.
        Call after the run's working copies are flushed."""
        for key, entry in self._entries.items():
            scales = self._scales.get(key, {})
            yield key, {f: (t, *self._home[key][f], scales.get(f)) for f, t in entry.items()}

    def restore(self, key: Hashable, fields: dict) -> None:
        """Put back one exported entry (`fields` as `export` gives them), as stored: no conversion, no copy."""
        entry, home = self._entries.setdefault(key, {}), self._home.setdefault(key, {})
        self._drop_prefetched(key)
        for name, (t, home_dtype, home_device, scale) in fields.items():
            if name in entry:
                self._resident -= _resident(entry[name])
            entry[name], home[name] = t, (home_dtype, home_device)
            self._resident += _resident(t)
            if scale is not None:
                self._scales.setdefault(key, {})[name] = scale

    def _drop_prefetched(self, key) -> None:
        future = self._prefetched.pop(key, None)
        if future is not None:
            future.cancel() or future.result()  # never let a stale copy finish writing after the entry changed

    def clear(self) -> None:
        for key in list(self._prefetched):
            self._drop_prefetched(key)
        if self._journal is not None and "cleared" not in self._journal:
            # A capture inside a transaction: keep the whole previous cache (by reference) until it commits.
            self._journal["cleared"] = (self._entries, self._home, self._scales, self._resident, self.fingerprint,
                                        self._dir, self._journal["records"])  # fmt: skip
            self._journal["records"] = []
            self._entries, self._home, self._scales = {}, {}, {}
            self._dir = None
        self._entries.clear()
        self._home.clear()
        self._working.clear()
        self.fingerprint = None
        self._resident = 0
        self._scales.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- transactions: a failed multi-run commit puts back exactly what it replaced -----------------------------------
    def begin(self) -> None:
        """Start journaling committed writes (a transaction over several runs, `spatial.transaction`)."""
        self._journal = {"records": [], "seen": set(), "fingerprint": self.fingerprint,
                         "form": (self.storage_dtype, self.budget, self.storage_device, self.disk)}  # fmt: skip

    def _journal_ref(self, key, name) -> None:
        """Before `key`'s `name` is replaced by a new tensor: keep the old one (a reference, no copy)."""
        j = self._journal
        if ("ref", key, name) in j["seen"]:
            return
        j["seen"].add(("ref", key, name))
        entry = self._entries.get(key, {})
        if name in entry:
            scale = self._scales.get(key, {}).get(name)
            j["records"].append(("ref", key, name, entry[name], self._home[key][name], scale))
        else:
            j["records"].append(("new", key, name))

    def _journal_diff(self, key, name, new: torch.Tensor, scale) -> None:
        """Before a working copy is written back into `key`'s `name`: keep the stored values it changes (a sparse
        run changes only its region, so this is small)."""
        j = self._journal
        stored = self._entries[key][name]
        if ("diff", id(stored)) in j["seen"]:
            return
        j["seen"].add(("diff", id(stored)))
        flat = _flat(stored)
        differs = flat != _flat(new.to(stored.dtype) if new.dtype != stored.dtype else new)
        old_scale = None if scale is None else scale.clone()
        index = torch.int32 if flat.numel() < 2**31 else torch.int64
        if int(differs.sum()) * (index.itemsize + flat.element_size()) > flat.numel() * flat.element_size():
            j["records"].append(("diff", key, name, stored, None, flat.clone(), old_scale))  # cheaper whole
            return
        changed = differs.nonzero().flatten().to(index)
        j["records"].append(("diff", key, name, stored, changed, flat[changed].clone(), old_scale))

    def rollback(self) -> None:
        """Put back everything committed since `begin`, and stop journaling."""
        journal, self._journal = self._journal, None
        if journal is None:
            return
        self._working.clear()
        self._weak.clear()
        self._copies.clear()
        for key in list(self._prefetched):
            self._drop_prefetched(key)
        records = journal["records"]
        if "cleared" in journal:
            new_dir = self._dir
            (self._entries, self._home, self._scales, self._resident, _, self._dir,
             records) = journal["cleared"]  # fmt: skip
            if new_dir is not None and new_dir != self._dir:
                shutil.rmtree(new_dir, ignore_errors=True)
        for record in reversed(records):
            kind, key, name = record[:3]
            entry = self._entries.setdefault(key, {})
            if kind == "new":
                if name in entry:
                    self._resident -= _resident(entry.pop(name))
                    self._home[key].pop(name, None)
                if not entry:
                    self._entries.pop(key)
                    self._home.pop(key, None)
            elif kind == "ref":
                _, _, _, old, home, scale = record
                if name in entry:
                    self._resident -= _resident(entry[name])
                entry[name] = old
                self._home.setdefault(key, {})[name] = home
                self._resident += _resident(old)
                if scale is not None:
                    self._scales.setdefault(key, {})[name] = scale
            else:
                _, _, _, stored, where, values, scale = record
                if where is None:
                    _flat(stored).copy_(values)
                else:
                    _flat(stored)[where] = values
                if scale is not None:
                    self._scales[key][name] = scale
        self.fingerprint = journal["fingerprint"]
        self.storage_dtype, self.budget, self.storage_device, self.disk = journal["form"]

    def end(self) -> None:
        """Keep everything committed since `begin` (the transaction succeeded)."""
        journal, self._journal = self._journal, None
        if journal is not None and "cleared" in journal:
            old_dir = journal["cleared"][5]
            if old_dir is not None and old_dir != self._dir:
                shutil.rmtree(old_dir, ignore_errors=True)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries (in memory or on disk)."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in e.values())

    @property
    def disk_bytes(self) -> int:
        """Bytes of the entries kept on disk."""
        return self.nbytes - self.resident_bytes() if self.disk else 0

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


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a stored tensor in its memory order (channels-last maps are contiguous as NHWC)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.view(-1)


def _on_disk(t: torch.Tensor) -> bool:
    """Whether `t` is backed by a memory-mapped file (`torch.from_file`), i.e. not plain allocated memory."""
    storage = t.untyped_storage()
    return t.device.type == "cpu" and getattr(storage, "filename", None) is not None


def _resident(t: torch.Tensor) -> int:
    return 0 if _on_disk(t) else t.numel() * t.element_size()


def requantize(t: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 of a committed working copy `t`, keeping each channel's stored `scale` where it still covers the channel's
    values (so the entries a sparse run did not write keep their stored bits: a commit changes only its region, and a
    transaction journals only that) and a new scale where the new values exceed it."""
    channel = 1 if t.dim() == 4 else t.dim() - 1
    dims = [d for d in range(t.dim()) if d != channel]
    amax = t.detach().abs().amax(dim=dims, keepdim=True).float()
    scale = torch.where(amax > 127.0 * scale, amax / 127.0, scale).clamp_min(1e-12)
    q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per channel (dim 1 of a `[B, C, H, W]` map, the last dim of `[B, L, C]`
    tokens such as attention keys and values): `t ≈ q * scale`."""
    channel = 1 if t.dim() == 4 else t.dim() - 1
    dims = [d for d in range(t.dim()) if d != channel]
    scale = (t.detach().abs().amax(dim=dims, keepdim=True).float() / 127.0).clamp_min(1e-12)
    q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale
