"""`EditStats`: what an editor's last capture, edit or region search computed, as one dataclass that still reads
like the dict it used to be (`editor.last_stats["macs_sparse"]`, `"budget" in editor.last_stats`, `dict(...)`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, MutableMapping
from typing import Any


__all__ = ["EditStats"]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()  # a field the run did not report (absent from the mapping; `None` is a value)


@dataclasses.dataclass(repr=False)
class EditStats(MutableMapping):
    """Statistics of an editor's last call. Every field is optional: a capture reports the cost of the dense run and
    the cache; an edit adds what it recomputed; `find_region` reports its search. Read as attributes or as a mapping
    of the fields that were set; keys outside the fields are kept in `extra`.

    Fields:
        macs_dense, macs_sparse: the dense run's multiply-accumulates and what this call computed.
        active_fraction: per output resolution `"HxW"`, the mean fraction of positions computed.
        region_fraction: the edited (or regenerated) fraction of the image.
        seconds: wall time of the call; detect_seconds: of a prompt edit's region search; calibrate_seconds: of a
            capture's calibration of the sparse-or-dense choice (zero once this process has one for the model).
        cache_bytes: a `CacheBytes` (an int with `.parts`); peak_bytes, peak_kind: peak memory of the call.
        budget: how `cache_budget` was met (the estimate and the storage chosen).
        background: what the pixels outside the region are, by design.
        unet_time: the UNet's seconds by part (`spatial.time_breakdown`), summed over the steps.
        dense_steps: UNet steps the cost model ran as plain dense forwards; dense_run (GAN): why the run was dense.
        dense_layers, time (GAN): the generator's layers run densely, and the run's time by part.
        region_method, detect_steps, macs_detect: a prompt edit's region search.
        recaptured_seconds: a stale capture was captured again first (`on_stale="recapture"`).
        check_seconds: the staleness check of an edit (the weights checksum included).
        ran_dense: why the edit ran as plain dense forwards (every UNet step, or how many); `None`: sparse.
        calibration: what that choice read: the UNet's calibrated break-even (the largest fraction of its input an
            edit may reach and run sparse), its dense time and what it was measured for; `None`: not calibrated.
        ignored_pixels: input pixels that differed by no more than `change_threshold`, or outside an explicit region
            with `check_region=False`, and kept their current values.
        refresh_seconds: the dense refresh that followed this edit (`refresh_every`).
        unchanged: why an edit whose input did differ changed nothing (every difference under `change_threshold`).
        exact (GAN): whether the edit is exact by construction.
    """

    macs_dense: int = UNSET
    macs_sparse: int = UNSET
    active_fraction: dict = UNSET
    region_fraction: float = UNSET
    seconds: float = UNSET
    cache_bytes: int = UNSET
    peak_bytes: int | None = UNSET
    peak_kind: str | None = UNSET
    budget: dict = UNSET
    background: str = UNSET
    detect_seconds: float = UNSET
    calibrate_seconds: float = UNSET
    unet_time: dict = UNSET
    dense_steps: int = UNSET
    dense_run: str | None = UNSET
    dense_layers: dict = UNSET
    time: dict = UNSET
    region_method: str = UNSET
    detect_steps: int = UNSET
    macs_detect: int = UNSET
    recaptured_seconds: float = UNSET
    check_seconds: float = UNSET
    ran_dense: str | None = UNSET
    calibration: dict | None = UNSET
    ignored_pixels: int = UNSET
    refresh_seconds: float = UNSET
    unchanged: str = UNSET
    exact: bool = UNSET
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, values: dict) -> EditStats:
        """Build from a dict: known keys become fields, others go to `extra`."""
        out = cls()
        out.update(values)
        return out

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    def __getitem__(self, key: str):
        if key in self._fields():
            value = getattr(self, key)
            if value is UNSET:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __setitem__(self, key: str, value) -> None:
        if key in self._fields():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._fields():
            if getattr(self, key) is UNSET:
                raise KeyError(key)
            setattr(self, key, UNSET)
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self._fields() if getattr(self, k) is not UNSET)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __eq__(self, other) -> bool:
        return isinstance(other, (dict, EditStats)) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"EditStats({dict(self)!r})"
