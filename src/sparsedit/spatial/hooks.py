"""The forward hooks of a sparsified model: what a capture stores, the checks before a sparse run, the run-level
sparse-or-dense choice (`max_region_fraction` and the calibration), and what a sparse run hands back."""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..cache import StaleCacheError
from ..config import SparseConfig
from ..fingerprints import WEIGHTS, adapter_state, changed_tensors, run_fingerprint, weights_checksum, weights_identity
from ..nn.state import Mode, SparseState
from ..nn.tracking import RegionTracking
from ..regions import as_region, difference_mask, dilate
from .attachment import INPUT_KEY, Attachment
from .inputs import aux_inputs, check_aux, clone_input, first_image, remember_changed_aux, tag_inputs


def reach_fraction(region: torch.Tensor, config: SparseConfig) -> float:
    """Fraction of the input the edit reaches before any layer (after `input_dilation` in approximate mode)."""
    reach = dilate(region, config.input_dilation) if not config.exact else region
    return float(reach.float().mean())


def _calibrated_dense(att: Attachment, fraction: float) -> str | None:
    """Why an edit that reaches `fraction` of the input should run densely, from the model's calibration (measured
    once, never from the run in progress), or `None`: run sparse. Without a calibration (none measured: temporal
    reuse on the model, `calibrate=False`), only `max_region_fraction` decides."""
    if att.probing or not att.state.config.measured_fallback or att.calibration is None:
        return None
    return att.calibration.decide(fraction)


# Exact mode: when the layers after the first one whose output changes everywhere (`LayerRecord.covers_map`) hold at
# least this share of the model's MACs, a sparse run could save at most the rest, and its per-layer overheads on the
# whole-map layers cost more than that: the edit runs as one plain dense forward instead.
GLOBAL_REACH_SHARE = 0.75


def global_reach(records) -> tuple[str, float] | None:
    """The first layer of a capture's `records` whose exact reach covers the map, and the share of the model's dense
    MACs from it on (that layer included); `None` when no layer covers the map."""
    first = next((i for i, r in enumerate(records) if r.covers_map), None)
    if first is None:
        return None
    total = sum(r.macs_dense for r in records)
    return records[first].name, sum(r.macs_dense for r in records[first:]) / max(1, total)


def _globally_dense(att: Attachment, fraction: float) -> str | None:
    if att.probing or not att.state.config.exact or fraction == 0:
        return None
    reach = att.global_reach
    if reach is None or reach[1] < GLOBAL_REACH_SHARE:
        return None
    return (
        f"exact mode: any change reaches the whole map at {reach[0]} (its statistics or attention span the map), "
        f"and the layers from there on hold {100 * reach[1]:.0f}% of the model's MACs; approximate mode "
        "(SparseConfig(exact=False)) keeps them sparse"
    )


def _too_large(att: Attachment, fraction: float, x: torch.Tensor) -> str | None:
    cfg = att.state.config
    if att.probing or fraction <= cfg.max_region_fraction:
        return None
    dilation = "" if cfg.exact else f" after input_dilation={cfg.input_dilation}"
    return (
        f"the region reaches {100 * fraction:.1f}% of the model's {x.shape[-2]}x{x.shape[-1]} input{dilation} "
        f"> max_region_fraction={cfg.max_region_fraction}"
    )


def synchronize(x) -> None:
    """Wait for the work queued on `x`'s device before a clock is read (CUDA runs asynchronously: without it a timed
    forward measures its kernel launches); nothing on CPU."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def make_pre_hook(model: nn.Module, att: Attachment):
    def pre_hook(module, args, kwargs):
        st = att.state
        if st.mode is None:
            return None
        x = first_image(args, kwargs)
        if att.probing:  # the calibration compares this run's time with dense: its kernels must be in it
            synchronize(x)
        att.started = time.perf_counter()
        if st.mode is Mode.SPARSE:
            st.rollback()  # the previous uncommitted edit leaves the cache as captured
            st.cache.flush(commit=False)
            st.cache.retain = st.commit  # an uncommitted run's working copies die with their last reader
            if att.check_weights:  # the input's shape, dtype and device, the config, the mode: before any cache read
                now = run_fingerprint(model, x, st.config.to_json(), weights=False)
                st.cache.check(now)
            st.begin_run()
            key = INPUT_KEY + st.scope
            if key not in st.cache:
                raise StaleCacheError(
                    f"nothing was captured in scope {st.scope!r}; capture this step (or branch) first, inside "
                    "`sparsedit.scope(model, ...)` with the same key."
                )
            entry = st.cache.get(key)
            st.changed_inputs = check_aux(att.aux.get(st.scope, {}), aux_inputs(args, kwargs, x, att.spatial_inputs),
                                          att.changeable)  # fmt: skip
            reference = entry["x"]
            region = att.pending_region
            if region is None:
                region = difference_mask(x, reference, eps=0.0)
            else:
                region = as_region(region, x.shape[0], x.shape[-2], x.shape[-1], x.device)
                if st.config.check_region and not att.region_checked:
                    missed = difference_mask(x, reference, eps=0.0) & ~region
                    if bool(missed.any()):
                        raise ValueError(
                            f"the input differs from the captured input at {int(missed.sum())} pixels outside "
                            "`region`, which would silently keep stale values there. Enlarge the region, or pass "
                            "region=None to detect the changed pixels automatically."
                        )
            st.use_region(region)
            region = st.input_region
            fraction = st.memo(("input reach",), (), lambda: reach_fraction(region, st.config))
            dense = _globally_dense(att, fraction) or _too_large(att, fraction, x) or _calibrated_dense(att, fraction)
            if att.check_weights and (not dense or st.commit):
                # The weights' identity (a walk over every parameter): an uncommitted plain forward reads no cached
                # activation, so only a sparse run or a committing one (which refreshes the cache) needs it.
                now = _check_weights(model, att, now)
            if dense:
                # Too large to pay, or calibrated not to pay: one plain dense forward (a committing edit refreshes
                # the cache with it).
                att.dense_run = dense
                # Uncommitted: the plain forward (no handler does anything), so it costs what dense costs.
                st.mode = Mode.CAPTURE if st.commit else None
                if st.commit:  # (the fingerprint just checked, when the weights were)
                    st.cache.fingerprint = now if att.check_weights else run_fingerprint(model, x, st.config.to_json())
                return None
            st.set_region(x, region)
            tag_inputs(st, att, kwargs)
            # Region tracking watches the tensor arithmetic between layers during this forward only.
            att.tracking = RegionTracking(st)
            att.tracking.__enter__()
        else:
            st.begin_run()
            if st.mode is Mode.CAPTURE:
                st.cache.fingerprint = run_fingerprint(model, x, st.config.to_json())
                if att.weights is None:  # once per capture: what a changed identity is compared with
                    att.weights, att.adapters = weights_content(model), adapter_state(model)
                st.cache.put_exact(INPUT_KEY + st.scope, x=x)
                att.last_call = (args, kwargs, st.scope)
                aux = aux_inputs(args, kwargs, x, att.spatial_inputs)
                att.aux[st.scope] = {k: clone_input(v) for k, v in aux.items()}
        return None

    return pre_hook


def weights_content(model: nn.Module) -> dict[str, int]:
    return weights_checksum({type(model).__name__: model})[type(model).__name__]


def _check_weights(model: nn.Module, att: Attachment, now: dict) -> dict:
    """Refuse a run whose weights differ from the capture's (`now`: the rest of this run's fingerprint, already
    checked); return the whole fingerprint. The weights are compared by identity (storage address and version
    counter: no reads); when that differs, by content, so weights restored to the captured bits (e.g.
    `load_state_dict` of the same values) are accepted again and the new identity adopted."""
    st = att.state
    now = {**now, WEIGHTS: weights_identity(model)}
    captured = st.cache.fingerprint
    if captured is not None and captured.get(WEIGHTS) != now[WEIGHTS] and att.weights is not None:
        name = type(model).__name__
        changed = changed_tensors({name: att.weights}, {name: weights_content(model)})
        if changed is None and adapter_state(model) != att.adapters:
            changed = f"{name} (its LoRA adapters: loaded, removed, fused, unfused or re-weighted)"
        if changed is not None:
            raise StaleCacheError(
                f"the weights of {changed} changed since the capture, so the cache holds another model's "
                "activations; restore them, or capture again with `sparsedit.capturing(model)`."
            )
        captured[WEIGHTS] = now[WEIGHTS]  # the captured bits are back: edits may use the cache again
    st.cache.check({WEIGHTS: now[WEIGHTS]})
    return now


def _region_tree(st: SparseState, output):
    """The changed region of each 4D tensor of a sparse run's output (the same structure; `None` elsewhere)."""
    if isinstance(output, torch.Tensor):
        return st.region_of(output) if output.dim() == 4 else None
    if isinstance(output, (list, tuple)):
        return type(output)(_region_tree(st, o) for o in output) if not hasattr(output, "_fields") else None
    if isinstance(output, dict):
        return {k: _region_tree(st, v) for k, v in output.items()}
    return None


def _memory_format(output) -> torch.memory_format:
    """The layout of a model's (first) feature-map output: some models return channels-last maps."""
    for t in output if isinstance(output, (tuple, list)) else [getattr(output, "sample", output)]:
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
            break
    return torch.contiguous_format


def make_post_hook(att: Attachment):
    def post_hook(module, args, kwargs, output):
        st = att.state
        att.stop_tracking()
        if st.mode is None and not att.dense_run:
            return None
        if att.probing:
            synchronize(first_image(args, kwargs))
        att.seconds = time.perf_counter() - att.started
        att.output_regions = _region_tree(st, output) if st.mode is Mode.SPARSE and not att.dense_run else None
        st.end_run()
        att.last_dense_run = att.dense_run
        if st.mode is Mode.CAPTURE:
            att.capture_records = list(st.records)
            att.global_reach = global_reach(att.capture_records)
        if att.dense_run:
            if st.mode is None:  # the plain forward recorded nothing: the capture's layers, all dense
                made = att.dense_records  # (made once per capture: a 30 ms model spent 1.5 ms copying 150 records)
                if made is None or made[0] is not att.capture_records:
                    made = (att.capture_records, [dataclasses.replace(r, time={}, seconds=0.0)
                                                  for r in att.capture_records])  # fmt: skip
                    att.dense_records = made
                st.records = list(made[1])
            st.mode = Mode.SPARSE
            for r in st.records:
                r.dense_reason = att.dense_run
            att.dense_run = None
            if st.commit:
                st.cache.put_exact(INPUT_KEY + st.scope, x=first_image(args, kwargs))
                remember_changed_aux(att, args, kwargs)
            return None
        if st.mode is Mode.CAPTURE:
            att.output_format = _memory_format(output)
        if st.mode is Mode.SPARSE:
            # The result may be a cached buffer; hand the user their own copy, in the layout the dense model returns
            # (downstream layout-sensitive kernels then round exactly as after a dense run).
            fmt = att.output_format
            output = tree_map(
                lambda t: (
                    t.clone(memory_format=fmt if t.dim() == 4 else torch.contiguous_format)
                    if isinstance(t, torch.Tensor)
                    else t
                ),
                output,
            )
            if st.commit:
                st.forget_undo()
                st.cache.flush(commit=True)
                st.cache.put_exact(INPUT_KEY + st.scope, x=first_image(args, kwargs))
                remember_changed_aux(att, args, kwargs)
            elif st.cache.converts:
                st.cache.flush(commit=False)  # the stored cache was never touched: nothing to roll back
                st.forget_undo()
            return output
        return None

    return post_hook
