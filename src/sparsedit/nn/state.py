"""`Mode` and `SparseState`: everything a run needs, in one explicit object per model (no module-level globals)."""

from __future__ import annotations

import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..config import SparseConfig
from ..regions import BlockIndex, Geometry, block_index, dilate, propagate, pyramid_level, repeat_region


__all__ = ["LayerRecord", "Mode", "Plan", "SparseState"]


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
    seconds: float = 0.0  # wall time of the layer's sparse path (CPU clock; on CUDA, launch time unless synchronised)
    time: dict[str, float] = field(default_factory=dict)  # that time by part: plan, gather, compute, scatter, dense
    # Captures only: in exact mode this layer's output changes everywhere whenever anything changed (statistics or
    # attention over the whole map), so every layer after it runs on the whole map (`spatial.hooks.global_reach`).
    covers_map: bool = False


class Plan:
    """Everything derived from one edit's input region, built once and reused by every run with that region.

    A diffusion edit calls the model once per denoising step (and per guidance branch) with the same region, so the
    per-resolution masks, region propagations and unions, tile indices and sparse-or-dense choices are computed on
    the first run and looked up afterwards. Entries are keyed by the identity of the region tensors they derive from;
    each entry holds those tensors, so an identity can never be reused by another tensor while the plan lives.
    Every region a sparse run sees comes from the plan (or from a memoised operation on plan regions), so after the
    first run the lookups hit.
    """

    MAX_ENTRIES = 20000  # a model that keeps making fresh regions (untracked arithmetic) must not grow it forever

    def __init__(self, region: torch.Tensor | None):
        self.region = region
        self.memo: dict[tuple, tuple[tuple, object]] = {}
        self.runs = 0
        self.hits = 0
        self.misses = 0

    def matches(self, region: torch.Tensor) -> bool:
        r = self.region
        return (
            r is not None
            and r.shape == region.shape
            and r.device == region.device
            and (r is region or torch.equal(r, region))
        )

    def get(self, key: tuple, pins: tuple, build: Callable[[], object]):
        hit = self.memo.get(key)
        if hit is not None:
            self.hits += 1
            return hit[1]
        self.misses += 1
        value = build()
        if len(self.memo) >= self.MAX_ENTRIES:
            self.memo.clear()
        self.memo[key] = (pins, value)
        return value


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
    # Inside a transaction (`spatial.transaction`), the undo logs of committed runs, to roll back if it fails.
    txn_undo: list[Callable[[], None]] | None = None
    _calls: Counter = field(default_factory=Counter)
    _regions: dict[int, tuple[weakref.ref, torch.Tensor]] = field(default_factory=dict)
    _tainted: dict[int, weakref.ref] = field(default_factory=dict)
    plan: Plan = field(default_factory=lambda: Plan(None))
    lazy: list[weakref.ref] = field(default_factory=list)  # lazy maps made in this run (`add_lazy`)
    _scratch: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # scratch maps made in this run
    # Maps valid only in part, and how to compute the rest on demand (`partial` / `complete`).
    _partial: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    # Capture: outputs whose store waits for their reader, which may take them over (`defer_store`).
    _pending: dict[int, tuple[tuple, torch.Tensor]] = field(default_factory=dict)
    laps: dict[str, float] | None = None
    _lap_t: float = 0.0
    # The inputs `editing(changeable=...)` allows to differ that differ in this run (a prompt edit's context).
    changed_inputs: frozenset = frozenset()

    # -- runs ---------------------------------------------------------------------------------------------------
    def begin_run(self) -> None:
        self.run_id += 1
        self.records = []
        self.changed_inputs = frozenset()
        self._calls.clear()
        self._regions.clear()
        self._tainted.clear()
        self._pending.clear()
        self.plan.runs += 1

    def add_lazy(self, t: torch.Tensor) -> torch.Tensor:
        """Register a lazy map (`nn/virtual.py`) made in this run: `end_run` fills it if it is still alive unfilled."""
        self.lazy.append(weakref.ref(t))
        return t

    def end_run(self) -> None:
        self.flush_pending()
        # A lazy tensor still alive (kept by user code or another technique) must not escape the run unfilled.
        for ref in self.lazy:
            t = ref()
            if t is not None:
                t.materialize()
        self.lazy.clear()
        self._regions.clear()
        self._tainted.clear()
        self._scratch.clear()
        self._partial.clear()

    def key(self, name: str) -> tuple:
        """Cache key of the next call of layer `name` in this run (a layer called twice gets two entries)."""
        idx = self._calls[name]
        self._calls[name] += 1
        return (name, idx, *self.scope)

    # -- undo log: sparse runs write into cached buffers in place; uncommitted runs are rolled back -----------------
    def remember(self, restore: Callable[[], None]) -> None:
        """Log how to undo an in-place write into a cached buffer (callers ask `needs_undo` first)."""
        self.undo.append(restore)

    def needs_undo(self, target: torch.Tensor) -> bool:
        """Whether an in-place write into `target` (a cached buffer) must be undo-logged: not when it is a working
        copy (a converting cache's: another dtype, device, or disk). An uncommitted run drops it at its end; a
        committed run (always inside a transaction) writes it back at its end, and the cache's journal keeps what that
        write-back changes. Logging it would keep every step's working copy alive until the transaction ends: a
        20-step SD3 edit held its whole cache again in float32 (9.6 GB at 512 px) and was killed for memory."""
        if target in self._scratch:
            return False
        return not self.cache.is_copy(target)

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A map shaped like `like` that a layer writes its tiles into instead of a cached buffer (its readers read
        only what it wrote): never undo-logged, dropped after the run. NaN-filled under `poison_scratch`."""
        return self._scratch_of(torch.empty_like(like))

    def scratch_map(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """`scratch` for a map no tensor is shaped like yet: `[B, C, H, W]`, channels-last like the cache's maps."""
        return self._scratch_of(
            torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=torch.channels_last)
        )

    def _scratch_of(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.poison_scratch:
            t.fill_(float("nan"))
        self._scratch[t] = True
        return t

    def temporary(self, t: torch.Tensor) -> torch.Tensor:
        """Mark a tensor this run computed and drops (keys and values projected for one attention, say): writes into
        it are not undo-logged. Unlike `scratch`, its values are kept (never poisoned). Returns `t`."""
        self._scratch[t] = True
        return t

    def is_scratch(self, t) -> bool:
        return t in self._scratch

    # -- maps computed on demand: a producer's output is computed where its windowed consumer reads it ---------------
    def partial(
        self, t: torch.Tensor, valid: torch.Tensor, fill: Callable[[torch.Tensor, torch.Tensor | None], None]
    ) -> None:
        """Declare that the scratch map `t` holds its true values only at `valid` (`[B, H, W]`, a plan region), and
        that `fill(t, missing)` writes them at the `missing` pixels (`None`: everywhere; `t` is passed, not held).
        A windowed consumer calls `complete` before it reads, so its producer need not cache its output for the
        halo: the few pixels around the producer's tiles that the consumer reads are computed instead (a ResNet's
        conv1, issue 17)."""
        self._partial[t] = (valid, fill)

    def is_partial(self, t: torch.Tensor) -> bool:
        """Whether `t` is a `partial` scratch map (valid only where its consumers `complete` it)."""
        return self._partial.get(t) is not None

    def complete(self, t: torch.Tensor, bi: BlockIndex | None = None) -> None:
        """Make `t` valid wherever the tiles of `bi` read it (their input windows; `None`: everywhere). A no-op for
        maps that are not `partial`. The missing pixels are a plan region, so later runs of the edit find them."""
        hit = self._partial.get(t)
        if hit is None:
            return
        valid, fill = hit
        if bi is None:
            fill(t, None)
            del self._partial[t]
            return
        hw = tuple(t.shape[-2:])
        reads = self.memo(("reads", id(bi), hw), (bi,), lambda: bi.reads(hw))
        missing = self.memo(("missing", id(reads), id(valid)), (reads, valid), lambda: reads & ~valid)
        if self.any(missing):
            fill(t, missing)
            self._partial[t] = (self.union(valid, missing), fill)

    # -- capture: a store its reader may take over ------------------------------------------------------------------
    def defer_store(self, key: tuple, out: torch.Tensor) -> None:
        """Capture: store `out` under `key` unless its reader claims it first (`claim_store`): a reader that reads
        only what the sparse run recomputes (a transformer reads its input at the active pixels only) makes the cached
        copy dead weight. Stored at the latest when the run ends (`flush_pending`)."""
        self._pending[id(out)] = (key, out)

    def claim_store(self, x) -> None:
        """Take over `x`'s deferred store, which is then never made (the caller reads `x` only where sparse runs
        recompute it). Every other deferred store is made now: they belong to outputs this reader did not receive,
        so someone else may read them. (A pending store holds its tensor, so its id cannot be reused meanwhile.)"""
        self._pending.pop(id(x), None)
        self.flush_pending()

    def flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for key, out in pending.values():
            self.cache.put(key, out=out)

    def rollback(self) -> None:
        while self.undo:
            self.undo.pop()()

    def forget_undo(self) -> None:
        if self.txn_undo is not None and self.commit:
            self.txn_undo.extend(self.undo)
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
        return self.full((b, h, w), t.device)

    # -- the per-edit plan: everything that depends only on the region, memoised -------------------------------------
    def use_region(self, region: torch.Tensor) -> None:
        """Set the input region of the coming sparse run; the plan is kept when the region equals the last one."""
        if not self.plan.matches(region):
            self.plan = Plan(region.clone())
        self.input_region = self.plan.region

    def full(self, shape: tuple[int, int, int], device) -> torch.Tensor:
        """An all-changed region (one tensor per shape and plan)."""
        shape = tuple(shape)
        return self.plan.get(
            ("full", shape, str(device)), (), lambda: torch.ones(shape, dtype=torch.bool, device=device)
        )

    def empty(self, shape: tuple[int, int, int], device) -> torch.Tensor:
        shape = tuple(shape)
        return self.plan.get(
            ("empty", shape, str(device)), (), lambda: torch.zeros(shape, dtype=torch.bool, device=device)
        )

    def union(self, *regions: torch.Tensor) -> torch.Tensor:
        """`a | b | ...` of regions of one shape, memoised by identity (so unions of plan regions are plan regions)."""
        regions = tuple(dict.fromkeys(regions, None))  # drop repeats, keep order (tensors hash by identity)
        if len(regions) == 1:
            return regions[0]

        def build():
            out = regions[0]
            for r in regions[1:]:
                out = out | r
            return out

        return self.plan.get(("union", *map(id, regions)), regions, build)

    def any(self, region: torch.Tensor) -> bool:
        return self.plan.get(("any", id(region)), (region,), lambda: bool(region.any()))

    def all(self, region: torch.Tensor) -> bool:
        return self.plan.get(("all", id(region)), (region,), lambda: bool(region.all()))

    def propagate(self, region: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return self.plan.get(("propagate", id(region), geometry), (region,), lambda: propagate(region, geometry))

    def repeat(self, region: torch.Tensor, sy: int, sx: int | None = None) -> torch.Tensor:
        """`regions.repeat_region`, memoised (nearest upsampling, pixel shuffle)."""
        sx = sy if sx is None else sx
        return self.plan.get(("repeat", id(region), sy, sx), (region,), lambda: repeat_region(region, sy, sx))

    def block_index(self, region: torch.Tensor, geometry: Geometry, tile, clamp: bool = True) -> BlockIndex:
        tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        return self.plan.get(
            ("blocks", id(region), geometry, tile, clamp),
            (region,),
            lambda: block_index(region, geometry, tile, clamp),
        )

    def memo(self, key: tuple, pins: tuple, build: Callable[[], object]):
        """Memoise anything else that depends only on plan regions (`pins`: the tensors `key` names by identity)."""
        return self.plan.get(key, pins, build)

    def pyramid(self, size: tuple[int, int]) -> torch.Tensor:
        """Approximate mode: the fixed region at one resolution (SIGE's per-resolution masks)."""
        size = tuple(size)
        cfg = self.config

        def base():
            return dilate(self.input_region, cfg.input_dilation)

        def build():
            dilated = self.plan.get(("pyramid base",), (), base)
            r = pyramid_level(dilated, size, cfg.pyramid_threshold, cfg.dilation)
            if size[0] <= cfg.dense_below and bool(r.any()):  # coarse maps: the whole map
                r = torch.ones_like(r)
            return r

        return self.plan.get(("pyramid", size), (), build)

    # -- per-layer time ------------------------------------------------------------------------------------------------
    def start_laps(self) -> None:
        """Start timing one layer call; `lap(part)` charges the time since the last lap to `part`."""
        self.laps = {}
        self._lap_t = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        if self.laps is not None:
            self.laps[part] = self.laps.get(part, 0.0) + now - self._lap_t
        self._lap_t = now

    def record(self, rec: LayerRecord) -> None:
        if self.laps:
            rec.time = self.laps
            rec.seconds = sum(self.laps.values())
        self.laps = None
        self.records.append(rec)
