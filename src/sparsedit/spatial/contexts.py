"""The modes a sparsified model runs in: `capturing`, `editing`, `profiling`, `scope`, `transaction`, `prefetch`, and
`calibrate`, which replays the last captured call at probe regions to measure the calibration (calibration.py)."""

from __future__ import annotations

import contextlib
import threading
import time

import torch
import torch.nn as nn

from .. import attachments
from .. import calibration as calibrations
from ..calibration import PROBE_FRACTIONS, Calibration
from ..config import SparseConfig
from ..nn.state import Mode
from ..regions import check_region_type
from . import hooks
from .attachment import Attachment, attachment_of
from .hooks import reach_fraction
from .inputs import first_image
from .stats import time_breakdown


@contextlib.contextmanager
def _mode(att: Attachment, mode: Mode):
    st = att.state
    if st.mode is not None:
        if att.owner != threading.get_ident():
            raise RuntimeError(
                f"another thread is running this model in a {st.mode.value} context. One model serves one caller at "
                "a time: serialize the calls (a SparseEditor or GANEditor does: its calls wait for each other), or "
                "give each thread its own copy of the model."
            )
        raise RuntimeError(f"already inside a {st.mode.value} context; contexts of one model do not nest.")
    st.mode = mode
    att.owner = threading.get_ident()
    try:
        with torch.no_grad():
            yield
    finally:
        st.mode = None
        att.owner = None


@contextlib.contextmanager
def transaction(*models: nn.Module):
    """Commit several runs as one: inside, committed runs (`editing(commit=True)`, captures) update the caches as
    usual, and if anything raises before the context exits (any exception, `KeyboardInterrupt` included) every
    model's cache, captured inputs and fingerprint are put back exactly as they were when it began. A diffusion edit
    commits one run per denoising step, and must not leave some steps edited and the rest not.

    The journal keeps what committed writes replaced: the changed values of each written entry (a sparse run changes
    only its region) and, for a capture, the previous cache by reference until it completes. Nested transactions
    join the outermost one."""
    atts = [attachment_of(m) for m in dict.fromkeys(models)]
    started = [att for att in atts if att.txn_depth == 0]
    for att in atts:
        att.txn_depth += 1
    for att in started:
        att.state.cache.begin()
        att.state.txn_undo = []
        att.txn_aux = {"__all__": (dict(att.aux), att.spatial_inputs, att.weights, att.adapters)}
    ok = False
    try:
        yield
        ok = True
    finally:
        for att in atts:
            att.txn_depth -= 1
        for att in started:
            st = att.state
            undo, st.txn_undo = st.txn_undo, None
            saved, att.txn_aux = att.txn_aux, None
            if ok:
                st.cache.end()
                continue
            att.stop_tracking()
            st.rollback()  # the failed run's own writes
            st.cache.flush(commit=False)
            st.cache.rollback()
            for restore in reversed(undo):  # the committed runs' in-place writes
                restore()
            aux, att.spatial_inputs, att.weights, att.adapters = saved.pop("__all__")
            att.aux.clear()
            att.aux.update(aux)
            for scope_key, values in saved.items():
                att.aux[scope_key] = values


@contextlib.contextmanager
def capturing(model: nn.Module, spatial_inputs: tuple = (), calibrate: bool = True):
    """Run `model` densely and store what sparse runs need. Replaces any earlier capture.

    Args:
        spatial_inputs: keyword inputs that are feature maps whose changes the caller tracks, e.g. a ControlNet's
            `down_block_additional_residuals` for the UNet: they are not stored or compared with later runs, and
            each edit gives their changed regions (`editing(input_regions=...)`; without, changed everywhere).
        calibrate: when the context exits, give the model the calibration its sparse-or-dense choices read
            (`sparsedit.calibrate`): measured on the last captured call the first time this process sees the model
            at this input shape, dtype and config, looked up afterwards. `False`: the caller calls `calibrate` itself
            (when other hooks on the model must be gone first).
    """
    att = attachment_of(model)
    att.state.rollback()
    att.state.cache.clear()
    att.aux = {}  # a new dict: a transaction keeps the old one
    att.spatial_inputs = frozenset(spatial_inputs)
    att.last_call = None
    att.weights = None
    try:
        with _mode(att, Mode.CAPTURE):
            yield
    except BaseException:
        att.state.cache.clear()  # a half-filled cache must never be edited against
        att.last_call = None
        raise
    if calibrate:
        _calibrate(model)


def calibration_of(model: nn.Module) -> Calibration | None:
    """The calibration a sparsified model's sparse-or-dense choices read (`None`: only `max_region_fraction`)."""
    return attachment_of(model).calibration


def calibrate(model: nn.Module, force: bool = False) -> Calibration | None:
    """Give a captured model the calibration of "never slower than dense" (calibration.py): the one this process
    has for the same model, input shapes and config (measured earlier, or pinned with `sparsedit.calibration.load`);
    else the one the model has (a restored session's); else measure it now on the last captured call (one
    plain dense forward and sparse forwards at `PROBE_FRACTIONS`, the cache left as captured) and keep it for
    every later capture in this process. `force`: measure again and replace the process's calibration.

    Returns `None`, measuring nothing, with `SparseConfig(measured_fallback=False)` or on a model with temporal reuse
    (its hooks keep per-step state a replayed call would disturb): then only `max_region_fraction` decides.
    """
    return _calibrate(model, force)


def _calibrate(model: nn.Module, force: bool = False) -> Calibration | None:
    att = attachment_of(model)
    call, att.last_call = att.last_call, None
    if call is None:
        if att.state.cache.fingerprint is None:
            raise RuntimeError("Nothing has been captured for this model: capture it before calibrating.")
        return att.calibration  # nothing to replay: a restored session keeps its own
    if not att.state.config.measured_fallback or attachments.has(model, attachments.TEMPORAL):
        att.calibration = None
        return None
    args, kwargs, scope_key = call
    x = first_image(args, kwargs)
    key, about = calibrations.model_key(model, x, args, kwargs, att.state.config.to_json())
    found = None if force else calibrations.lookup(key)  # this process's, or a pinned one
    if found is None and not force and att.calibration is not None and att.calibration.key == key:
        found = calibrations.install(att.calibration)  # a restored session's own
    if found is None:
        found = calibrations.install(_measure(model, att, args, kwargs, scope_key, key, about), replace=force)
    att.calibration = found
    return found


def _probe_region(x: torch.Tensor, fraction: float, config: SparseConfig) -> torch.Tensor:
    """A centred square whose reach (after `input_dilation`) covers about `fraction` of the input."""
    h, w = x.shape[-2:]
    grow = 0 if config.exact else 2 * config.input_dilation
    side_h = max(1, min(h, round((fraction * h * w) ** 0.5 * h / max(h, w))) - grow)
    side_w = max(1, min(w, round((fraction * h * w) ** 0.5 * w / max(h, w))) - grow)
    region = torch.zeros(x.shape[0], h, w, dtype=torch.bool, device=x.device)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    region[:, top : top + side_h, left : left + side_w] = True
    return region


# A calibration spends about `_CALIBRATION_BUDGET` seconds per forward kind on models faster than `_SLOW_FORWARD`
# (between 2 and `_MAX_RUNS` runs each); slower models get one run of each, as a capture of SD 1.5 at 512 px
# cannot afford more.
_CALIBRATION_BUDGET = 0.25
_SLOW_FORWARD = 0.5
_MAX_RUNS = 5


def _budget_runs(dense_seconds: float) -> int:
    if dense_seconds >= _SLOW_FORWARD:
        return 1
    return max(2, min(_MAX_RUNS, int(_CALIBRATION_BUDGET / max(dense_seconds, 1e-6))))


def _measure(model: nn.Module, att: Attachment, args, kwargs, scope_key, key: str, about: str) -> Calibration:
    """Time one plain dense forward and uncommitted sparse forwards at the probe regions on the captured call; the
    cache, the records and the statistics are left as the capture left them."""
    st = att.state
    x = first_image(args, kwargs)
    saved = (st.records, att.output_regions, att.last_dense_run, att.seconds, st.scope)
    unchanged = {}  # spatial inputs (a ControlNet's residuals) count as unchanged: the UNet's own cost is probed
    for name in att.spatial_inputs:
        value = kwargs.get(name)
        maps = [value] if isinstance(value, torch.Tensor) else list(value or [])
        regions = [torch.zeros(t.shape[0], *t.shape[-2:], dtype=torch.bool, device=t.device) for t in maps]
        unchanged[name] = regions[0] if isinstance(value, torch.Tensor) else regions
    st.scope = scope_key
    att.probing = True
    try:
        # Mode None: the plain forward, without autograd as the sparse runs are (with it, SD 1.5's UNet at 512 px
        # measured 1.4-2.2x slower, which made sparse look cheaper than it is). Each time is the best of several runs:
        # this machine's noise only ever adds time, and the best run is what the model costs. A model under
        # `_SLOW_FORWARD` seconds gets `_budget_runs` runs of each (dense before and after the probes, a warm-up run
        # in each probe's context first: its first run meets new tile counts, which later edits of the same plan do
        # not), so a calibration of a 25 ms model is not decided by one slow sample.
        def dense_run() -> float:
            hooks.synchronize(x)
            started = time.perf_counter()
            with torch.no_grad():
                model(*args, **kwargs)
            hooks.synchronize(x)  # on CUDA, the kernels and not only their launches (the probes sync the same way)
            return time.perf_counter() - started

        dense = dense_run()
        repeats = _budget_runs(dense)
        for _ in range(repeats - 1):
            dense = min(dense, dense_run())
        probes = []
        for fraction in PROBE_FRACTIONS:
            region = _probe_region(x, fraction, st.config)
            best = None
            with editing(model, region=region, check_weights=False, input_regions=unchanged or None):
                for i in range(repeats + (repeats > 1)):
                    model(*args, **kwargs)
                    # The plan is built once per edit, for all its steps: the run itself is what compares with dense.
                    run = att.seconds - time_breakdown(st.records, att.seconds)["plan"]
                    if i or repeats == 1:  # the first of several is the warm-up
                        best = run if best is None else min(best, run)
            probes.append((reach_fraction(region, st.config), best))
        for _ in range(repeats - 1):
            dense = min(dense, dense_run())
    finally:
        att.probing = False
        st.records, att.output_regions, att.last_dense_run, att.seconds, st.scope = saved
    return Calibration.fit(key, about, dense, probes)


@contextlib.contextmanager
def editing(
    model: nn.Module,
    region: torch.Tensor | None = None,
    commit: bool = False,
    changeable: tuple = (),
    input_regions: dict | None = None,
    check_weights: bool = True,
    region_checked: bool = False,
):
    """Run `model` sparsely against the capture: only `region` (and what it reaches) is recomputed.

    Args:
        model: a sparsified, captured model.
        region: bool `[H, W]` or `[B, H, W]` at input resolution. `None` detects it as every pixel where the input
            differs from the captured input.
        commit: keep the result in the cache, so the next edit is incremental against this one. Without it, the cache
            is restored to the capture when the context exits.
        changeable: names (keyword) or positions of non-image inputs that may differ from the capture's, e.g.
            `("encoder_hidden_states",)` for a prompt edit: the region is then computed with the new input and the
            rest of the map keeps the captured values (FISEdit's approximation). Any other differing input raises
            `StaleCacheError`. A committed run records the new value.
        input_regions: for the `spatial_inputs` of the capture, where each differs from the captured run: a
            `[B, H, W]` bool region at that input's resolution (a list of them for a list of maps), e.g.
            `output_regions(controlnet)` after a sparse ControlNet run. Sparse layers downstream compute there. The
            caller vouches for these regions: they are not checked against stored values (none are kept).
        check_weights: compare the model's weights, input shape and config with the capture's before each forward
            (`StaleCacheError` when they differ). `False` skips that check (about 1 ms for a 300-module UNet): for a
            caller that has checked them already, as `SparseEditor` does once per edit and then for its first step.
        region_checked: the caller derived `region` from the very input it will run and vouches that the input equals
            the captured one outside it (as `GANEditor` does from its label maps): the forward does not compare the
            input with the captured input again (`SparseConfig.check_region`'s full pass over the input).
    """
    att = attachment_of(model)
    st = att.state
    if st.cache.fingerprint is None:
        raise RuntimeError(
            "Nothing has been captured for this model: run it once inside `with sparsedit.capturing(model):` "
            "before editing."
        )
    if region is not None:
        check_region_type(region, st.cache.fingerprint["device"])
    att.pending_region = region
    att.check_weights = bool(check_weights)
    att.region_checked = bool(region_checked) and region is not None
    att.changeable = frozenset(changeable)
    unknown = set(input_regions or {}) - att.spatial_inputs
    if unknown:
        raise ValueError(
            f"input_regions names {sorted(unknown)}, which the capture did not declare as spatial inputs; "
            "capture with `capturing(model, spatial_inputs=(...))`."
        )
    att.input_regions = dict(input_regions or {})
    st.commit = commit
    try:
        # A committed edit is one transaction: a failure in any forward inside puts the cache back as it was.
        with transaction(model) if commit else contextlib.nullcontext(), _mode(att, Mode.SPARSE):
            yield
    finally:
        att.stop_tracking()  # a forward that never reached its post hook
        if not commit:
            st.rollback()
        att.pending_region = None
        att.region_checked = False
        att.check_weights = True
        att.changeable = frozenset()
        att.input_regions = {}
        st.commit = False


@contextlib.contextmanager
def scope(model: nn.Module, *key):
    """Key the cache entries of the calls inside by `key` (e.g. the denoising step and the guidance branch).

    A diffusion loop captures every step inside `scope(model, step)`; an edit then runs each step against that step's
    capture. Scopes nest by concatenation.
    """
    st = attachment_of(model).state
    previous = st.scope
    st.scope = previous + tuple(key)
    try:
        yield
    finally:
        st.scope = previous


def prefetch(model: nn.Module, *key) -> int:
    """Start copying the cache entries of scope `key` (e.g. the next denoising step) into working form in the
    background, so the run that uses them does not wait: for a cache stored in another dtype, on another device
    (`cache_device="cpu"` for a model on a GPU) or on disk. Returns the number of entries queued (0 when the cache
    is used in place). A diffusion transformer's step that reads another step's keys and values
    (`SparseConfig.dit_kv_share`) queues that step's entry too."""
    att = attachment_of(model)
    st = att.state
    keys = st.cache.scope_keys(st.scope + tuple(key))
    shared = {h.name: h.kv_key for h in att.handlers if hasattr(h, "kv_key")}
    keys += [shared[k[0]](k) for k in keys if k[0] in shared and shared[k[0]](k) != k]
    return st.cache.prefetch(keys)


@contextlib.contextmanager
def profiling(model: nn.Module):
    """Run `model` densely and record per-layer MACs (see `last_stats`) without touching the cache."""
    with _mode(attachment_of(model), Mode.PROFILE):
        yield
