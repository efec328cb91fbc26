"""`Mode` and `SparseState`: everything a run needs, in one explicit object per model (no module-level globals)."""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..config import SparseConfig
from ..regions import mask_pyramid


__all__ = ["LayerRecord", "Mode", "SparseState"]


class Mode(Enum):
    """What a sparsified model does when called."""

    CAPTURE = "capture"  # dense forward that fills the cache
    SPARSE = "sparse"  # computes only the active region, reads the rest from the cache
    PROFILE = "profile"  # dense forward that only records per-layer shapes and MACs


@dataclass
class LayerRecord:
    """What one layer call did in the last run (for `last_stats`)."""

    name: str
    kind: str
    resolution: tuple[int, int]
    macs_dense: int
    macs_sparse: int
    active_fraction: float  # fraction of output positions computed
    dense_reason: str | None = None


@dataclass
class SparseState:
    """The state a sparsified model's layers share.

    Attributes:
        config: the `SparseConfig` the model was sparsified with.
        cache: the `ActivationCache` holding the capture.
        mode: what the current run does; `None` outside any `capturing`/`editing` context (plain dense forward).
        input_region: the edit region at input resolution, `[B, H, W]` bool, during a sparse run.
        scope: extra key parts (e.g. denoising step, guidance branch) that later techniques set between calls.
    """

    config: SparseConfig
    cache: object
    mode: Mode | None = None
    input_region: torch.Tensor | None = None
    scope: tuple = ()
    commit: bool = False
    no_store: bool = False  # capture: the current call's output is fused away and need not be stored
    run_id: int = 0
    records: list[LayerRecord] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    _calls: Counter = field(default_factory=Counter)
    _regions: dict[int, tuple[weakref.ref, torch.Tensor]] = field(default_factory=dict)
    _tainted: dict[int, weakref.ref] = field(default_factory=dict)
    _pyramid: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    # -- runs ---------------------------------------------------------------------------------------------------
    def begin_run(self) -> None:
        self.run_id += 1
        self.records = []
        self._calls.clear()
        self._regions.clear()
        self._tainted.clear()
        self._pyramid.clear()

    def end_run(self) -> None:
        self._regions.clear()
        self._tainted.clear()

    def key(self, name: str) -> tuple:
        """Cache key of the next call of layer `name` in this run (a layer called twice gets two entries)."""
        idx = self._calls[name]
        self._calls[name] += 1
        return (name, idx, *self.scope)

    # -- undo log: sparse runs write into cached buffers in place; uncommitted runs are rolled back -----------------
    def remember(self, restore: Callable[[], None]) -> None:
        self.undo.append(restore)

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()

    def forget_undo(self) -> None:
        self.undo.clear()

    # -- regions travel with tensors --------------------------------------------------------------------------------
    def set_region(self, t: torch.Tensor, region: torch.Tensor) -> None:
        self._regions[id(t)] = (weakref.ref(t), region)

    def has_region(self, t: torch.Tensor) -> bool:
        hit = self._regions.get(id(t))
        return hit is not None and hit[0]() is t

    def taint(self, t: torch.Tensor) -> None:
        """Mark a non-spatial tensor computed from changed data: whatever it touches is changed everywhere."""
        self._tainted[id(t)] = weakref.ref(t)

    def is_tainted(self, t: torch.Tensor) -> bool:
        hit = self._tainted.get(id(t))
        return hit is not None and hit() is t

    def region_of(self, t: torch.Tensor) -> torch.Tensor:
        """The changed region of `t` (`[B, H, W]` bool). A tensor no sparse layer produced in this run (made by an
        operation the engine does not track) is conservatively treated as changed everywhere."""
        hit = self._regions.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        b, _, h, w = t.shape
        return torch.ones(b, h, w, dtype=torch.bool, device=t.device)

    def pyramid(self, size: tuple[int, int]) -> torch.Tensor:
        """Approximate mode: the fixed region at one resolution (SIGE's per-resolution masks)."""
        size = tuple(size)
        if size not in self._pyramid:
            cfg = self.config
            self._pyramid.update(
                mask_pyramid(self.input_region, [size], cfg.pyramid_threshold, cfg.dilation, cfg.input_dilation)
            )
            if size[0] <= cfg.dense_below and bool(self._pyramid[size].any()):  # coarse maps: the whole map
                self._pyramid[size] = torch.ones_like(self._pyramid[size])
        return self._pyramid[size]

    def record(self, rec: LayerRecord) -> None:
        self.records.append(rec)
