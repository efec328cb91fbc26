"""Spatially sparse inference (SIGE, Li et al., NeurIPS 2022): the model-level verbs.

```python
sparsedit.sparsify_(model, sparsedit.SparseConfig(exact=True))  # in place; returns None
with sparsedit.capturing(model):
    y0 = model(x)  # dense; fills the cache
with sparsedit.editing(model, region=mask):  # bool [H, W] or [B, H, W] at input resolution
    y1 = model(x_edited)  # sparse
sparsedit.last_stats(model)
sparsedit.unsparsify_(model)  # outputs bit-identical to before
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from . import attachments
from . import calibration as calibrations
from .cache import ActivationCache, StaleCacheError
from .calibration import PROBE_FRACTIONS, Calibration
from .config import SparseConfig
from .fingerprints import WEIGHTS, adapter_state, changed_tensors, run_fingerprint, weights_checksum
from .nn.base import SparseHandler, UnsupportedLayerError, handler_for, handler_of, is_dense_safe
from .nn.layers import PointwiseHandler, WindowedHandler
from .nn.state import Mode, SparseState
from .nn.tracking import RegionTracking
from .regions import as_region, check_region_type, difference_mask, dilate


__all__ = [
    "SparseConfig",
    "calibrate",
    "calibration_of",
    "capturing",
    "prefetch",
    "editing",
    "is_sparsified",
    "last_stats",
    "output_regions",
    "profiling",
    "scope",
    "sparsify_",
    "transaction",
    "unsparsify_",
]

_INPUT_KEY = ("__input__",)


class _Attachment:
    """Everything `sparsify_` added to a model, so `unsparsify_` can take exactly that away."""

    def __init__(self, state: SparseState, handlers: list[SparseHandler], hooks: list):
        self.state = state
        self.handlers = handlers
        self.hooks = hooks
        self.pending_region: torch.Tensor | None = None
        self.check_weights = True  # whether an edit's forward compares the weights' fingerprint with the capture's
        self.changeable: frozenset[str] = frozenset()  # non-image inputs an edit may change (e.g. the prompt)
        self.aux: dict[tuple, dict[str, object]] = {}  # non-image inputs of each captured scope
        # Spatial non-image inputs whose changes the caller tracks (a ControlNet's residuals): neither stored nor
        # compared; an edit gives their changed regions (`editing(input_regions=...)`).
        self.spatial_inputs: frozenset[str] = frozenset()
        self.input_regions: dict[str, object] = {}
        self.output_regions = None  # the regions of the last sparse run's outputs (`output_regions`)
        self.dense_run: str | None = None  # why the current edit runs densely, if it does
        self.last_dense_run: str | None = None  # the same, for the last finished run (`last_stats["dense_run"]`)
        self.strategy = None
        self.output_format = torch.contiguous_format
        self.started = 0.0
        self.seconds = 0.0
        # "Never slower than dense", deterministically: the calibration (measured once, calibration.py) the
        # sparse-or-dense choice reads, and the last captured call, which `calibrate` replays to measure one.
        self.calibration: Calibration | None = None
        self.last_call: tuple | None = None  # (args, kwargs, scope) of the last capture forward
        self.probing = False  # a calibration probe: run sparse whatever the region's size
        # The capture's weights by content (`guard.weights_checksum`) and LoRA state, compared when their identity
        # in the fingerprint changed (`_check_weights`).
        self.weights: dict[str, int] | None = None
        self.adapters: tuple = ()
        self.capture_records: list = []  # the last capture's per-layer records (a plain dense run reports them)
        self.tracking: RegionTracking | None = None  # entered for each sparse forward only
        self.txn_depth = 0  # nesting of `transaction` contexts
        self.owner: int | None = None  # the thread inside a capturing/editing context
        self.txn_aux: dict | None = None  # the captured inputs as the transaction found them

    def stop_tracking(self) -> None:
        if self.tracking is not None:
            self.tracking.__exit__(None, None, None)
            self.tracking = None


def _attachment(model: nn.Module) -> _Attachment:
    att = attachments.get(model, attachments.SPATIAL)
    if att is None:
        raise RuntimeError(
            f"{type(model).__name__} is not sparsified; call `sparsedit.sparsify_(model, SparseConfig())` first."
        )
    return att


def sparse_state(model: nn.Module) -> SparseState | None:
    """The engine's `SparseState` of a sparsified model (its mode, regions, cache), or `None`."""
    return attachments.engine_state(model)


def export_capture(model: nn.Module) -> dict:
    """What a saved session needs of a captured model besides the weights: its cache (`ActivationCache.export`),
    the captured non-image inputs per scope, the capture's layer records, the output layout and the calibration
    its sparse-or-dense choices read (so a loaded session chooses as this one does). The last uncommitted edit is
    rolled back first."""
    att = _attachment(model)
    st = att.state
    st.rollback()
    st.cache.flush(commit=False)
    return {
        "cache": st.cache,
        "aux": att.aux,
        "spatial_inputs": sorted(att.spatial_inputs),
        "records": list(st.records),
        "capture_records": list(att.capture_records),
        "output_format": att.output_format,
        "calibration": None if att.calibration is None else att.calibration.to_dict(),
    }


def restore_capture(model: nn.Module, entries, aux, records, capture_records, output_format, calibration,
                    storage_dtype, spatial_inputs=()) -> None:  # fmt: skip
    """The inverse of `export_capture` on a sparsified model of the same weights: the cache holds `entries` (from
    `ActivationCache.export`) and is fingerprinted for this model, so edits run against it."""
    att = _attachment(model)
    st = att.state
    st.rollback()
    st.cache.clear()
    st.cache.storage_dtype = storage_dtype
    att.aux.clear()
    x = None
    for key, fields in entries:
        st.cache.restore(key, fields)
        if key[: len(_INPUT_KEY)] == _INPUT_KEY:
            x = fields["x"][0]
    att.aux.update(aux)
    att.spatial_inputs = frozenset(spatial_inputs)
    st.records = list(records)
    att.capture_records = list(capture_records)
    att.output_format = output_format
    # The session's own calibration, so the loaded editor chooses as the saved one did; this process adopts it for
    # later captures of the same model unless it has measured its own.
    att.calibration = None if calibration is None else Calibration.from_dict(calibration)
    if att.calibration is not None:
        calibrations.install(att.calibration)
    if x is not None:
        st.cache.fingerprint = run_fingerprint(model, x, st.config.to_json())
        att.weights, att.adapters = _content(model), adapter_state(model)  # the loader checked them


def output_regions(model: nn.Module):
    """Where the outputs of the model's last sparse run differ from the capture: its output's structure with a
    `[B, H, W]` bool region for each feature map, or `None` when that run was dense (a fallback: changed
    everywhere). Feed them to a downstream model's `editing(input_regions=...)`."""
    return _attachment(model).output_regions


def is_sparsified(model: nn.Module) -> bool:
    return attachments.has(model, attachments.SPATIAL)


def sparsify_(model: nn.Module, config: SparseConfig | None = None) -> None:
    """Make `model` run spatially sparse, in place. Outside `capturing`/`editing` it computes exactly as before.

    Args:
        model: any `nn.Sequential` (nested allowed) of supported layers, or a module composed of `sparsedit.nn`
            blocks; a custom module's own arithmetic runs densely and stays correct.
        config: a `SparseConfig`.

    Raises:
        UnsupportedLayerError: the model holds a layer the engine cannot make sparse (and `config.strict`).
    """
    config = SparseConfig() if config is None else config
    if not isinstance(config, SparseConfig):
        raise TypeError(f"sparsify_ expects a SparseConfig, got {type(config).__name__}.")
    if is_sparsified(model):
        raise RuntimeError(
            "This model is already sparsified; call `sparsedit.unsparsify_(model)` before sparsifying it again."
        )
    if attachments.has(model, attachments.TEMPORAL):
        raise RuntimeError(
            "This model carries temporal reuse; its hooks must sit outside the sparse ones. Call "
            "`sparsedit.temporal.remove_encoder_propagation(model)`, sparsify, then apply temporal reuse again."
        )
    cache = ActivationCache(
        storage_dtype=None if config.storage_dtype is None else getattr(torch, config.storage_dtype),
        storage_device=config.cache_device,
        budget=config.budget_bytes,
    )
    state = SparseState(config, cache)
    handlers, problems = [], []
    attach = _attach_strategy(model)
    for name, module in model.named_modules():
        cls = handler_for(module)
        if cls is None:
            if not any(True for _ in module.children()) and not is_dense_safe(module):
                problems.append(f"  {name or '<root>'}: {type(module).__name__} has no sparse implementation")
            continue
        handler = cls(module, name or "root", state)
        try:
            handler.check_supported()
        except UnsupportedLayerError as e:
            problems.append(f"  {e}")
            continue
        handlers.append(handler)
    if problems and config.strict:
        raise UnsupportedLayerError(
            "These layers cannot run sparse:\n" + "\n".join(problems) + "\n"
            "Replace them, or pass SparseConfig(strict=False) to run them densely on every call (correct, slower)."
        )
    for h in handlers:
        attach.attach(h)
    for h in reversed(handlers):  # descendants first: a container's plan may read its children's
        h.prepare()
    if hasattr(attach, "prepare"):  # adapters that know their library's blocks (which output feeds what)
        attach.prepare(model)
    _defer_heads(model)
    att = _Attachment(state, handlers, [])
    att.strategy = attach
    att.hooks.append(model.register_forward_pre_hook(_make_pre_hook(model, att), with_kwargs=True))
    att.hooks.append(model.register_forward_hook(_make_post_hook(att), with_kwargs=True, always_call=True))
    attachments.attach(model, attachments.SPATIAL, att)


# An output head called one layer after another from a parent's `forward` (diffusers' UNets, VAE encoder and decoder).
_HEAD = ("conv_norm_out", "conv_act", "conv_out")


def _defer_heads(model: nn.Module) -> None:
    """Mark the pointwise layers of output heads as deferred: their outputs are not cached, and the windowed layer
    after them gathers from their input with them folded in (virtual.py). Correct whatever the parent's `forward`
    does with them (any other reader fills the lazy output densely); it only saves the two cached maps."""
    for module in model.modules():
        layers = [getattr(module, n, None) for n in _HEAD]
        if not all(isinstance(m, nn.Module) for m in layers):
            continue
        *pointwise, consumer = map(handler_of, layers)
        if not (isinstance(consumer, WindowedHandler) and all(isinstance(h, PointwiseHandler) for h in pointwise)):
            continue
        for h in reversed(pointwise):  # from the consumer back, while each one folds into the next
            if not h.pointwise:
                break
            h.defer = True


def unsparsify_(model: nn.Module) -> None:
    """Detach every handler and hook and drop the cache; the model computes bit-identically to before."""
    att = _attachment(model)
    att.state.rollback()
    for h in reversed(att.handlers):
        att.strategy.detach(h)
    for hook in att.hooks:
        hook.remove()
    att.state.cache.clear()
    attachments.detach(model, attachments.SPATIAL)


class _InstanceForward:
    """Default attachment: an instance-level `forward` (removal restores the class method exactly)."""

    @staticmethod
    def attach(handler: SparseHandler) -> None:
        handler.attach()

    @staticmethod
    def detach(handler: SparseHandler) -> None:
        handler.detach()


def _attach_strategy(model: nn.Module):
    """Models built with diffusers attach through `diffusers.hooks`, so sparsedit composes with diffusers' own hooks
    (caching, offloading); the import happens only for such models, keeping `import sparsedit` lean."""
    if any(type(m).__module__.startswith("diffusers.") for m in model.modules()):
        from .adapters import diffusers as diffusers_adapter

        return diffusers_adapter.HookAttach
    return _InstanceForward


def _first_image(args, kwargs) -> torch.Tensor:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            return v
    raise ValueError("a sparsified model's input must include a [B, C, H, W] tensor.")


def _aux_inputs(args, kwargs, image: torch.Tensor, skip=frozenset()) -> dict[str, object]:
    """Every input other than the image (timestep, prompt embeddings, flags), by name, for the staleness check;
    `skip`: keyword inputs whose changes the caller tracks (`capturing(spatial_inputs=...)`)."""
    named = {_aux_name(i): v for i, v in enumerate(args)}
    named.update({_aux_name(k): v for k, v in kwargs.items() if k not in skip})
    return {k: v for k, v in named.items() if v is not image}


def _aux_name(key) -> str:
    return f"argument {key!r}" if isinstance(key, str) else f"argument {key}"


def _same_input(a, b) -> bool:
    """Equal inputs: tensors by value (shape, dtype, every element), dicts, lists and tuples element by element."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_input(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_input(x, y) for x, y in zip(a, b))
    return a == b


def _clone_input(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone_input(x) for k, x in v.items()}
    return v


def _check_aux(captured: dict[str, object], now: dict[str, object], changeable=frozenset()) -> None:
    allowed = {_aux_name(k) for k in changeable}
    for name in sorted((set(captured) | set(now)) - allowed):
        if not _same_input(captured.get(name), now.get(name)):
            raise StaleCacheError(
                f"{name} differs from the captured run (e.g. another timestep, prompt or conditioning); the cache "
                "only holds activations for the captured inputs. Capture again, or select the matching step with "
                "`sparsedit.scope(model, ...)`."
            )


def _reach_fraction(region: torch.Tensor, config: SparseConfig) -> float:
    """Fraction of the input the edit reaches before any layer (after `input_dilation` in approximate mode)."""
    reach = dilate(region, config.input_dilation) if not config.exact else region
    return float(reach.float().mean())


def _calibrated_dense(att: _Attachment, fraction: float) -> str | None:
    """Why an edit that reaches `fraction` of the input should run densely, from the model's calibration (measured
    once, never from the run in progress), or `None`: run sparse. Without a calibration (none measured: temporal
    reuse on the model, `calibrate=False`), only `max_region_fraction` decides."""
    if att.probing or not att.state.config.measured_fallback or att.calibration is None:
        return None
    return att.calibration.decide(fraction)


def _too_large(att: _Attachment, fraction: float, x: torch.Tensor) -> str | None:
    cfg = att.state.config
    if att.probing or fraction <= cfg.max_region_fraction:
        return None
    dilation = "" if cfg.exact else f" after input_dilation={cfg.input_dilation}"
    return (
        f"the region reaches {100 * fraction:.1f}% of the model's {x.shape[-2]}x{x.shape[-1]} input{dilation} "
        f"> max_region_fraction={cfg.max_region_fraction}"
    )


def _make_pre_hook(model: nn.Module, att: _Attachment):
    def pre_hook(module, args, kwargs):
        st = att.state
        if st.mode is None:
            return None
        att.started = time.perf_counter()
        x = _first_image(args, kwargs)
        if st.mode is Mode.SPARSE:
            st.rollback()  # the previous uncommitted edit leaves the cache as captured
            st.cache.flush(commit=False)
            st.cache.retain = st.commit  # an uncommitted run's working copies die with their last reader
            if att.check_weights:
                _check_weights(model, att, x)
            st.begin_run()
            key = _INPUT_KEY + st.scope
            if key not in st.cache:
                raise StaleCacheError(
                    f"nothing was captured in scope {st.scope!r}; capture this step (or branch) first, inside "
                    "`sparsedit.scope(model, ...)` with the same key."
                )
            entry = st.cache.get(key)
            _check_aux(att.aux.get(st.scope, {}), _aux_inputs(args, kwargs, x, att.spatial_inputs), att.changeable)
            reference = entry["x"]
            changed = difference_mask(x, reference, eps=0.0)
            region = att.pending_region
            if region is None:
                region = changed
            else:
                region = as_region(region, x.shape[0], x.shape[-2], x.shape[-1], x.device)
                if st.config.check_region:
                    missed = changed & ~region
                    if bool(missed.any()):
                        raise ValueError(
                            f"the input differs from the captured input at {int(missed.sum())} pixels outside "
                            "`region`, which would silently keep stale values there. Enlarge the region, or pass "
                            "region=None to detect the changed pixels automatically."
                        )
            st.use_region(region)
            region = st.input_region
            fraction = st.memo(("input reach",), (), lambda: _reach_fraction(region, st.config))
            dense = _too_large(att, fraction, x) or _calibrated_dense(att, fraction)
            if dense:
                # Too large to pay, or calibrated not to pay: one plain dense forward (a committing edit refreshes
                # the cache with it).
                att.dense_run = dense
                # Uncommitted: the plain forward (no handler does anything), so it costs what dense costs.
                st.mode = Mode.CAPTURE if st.commit else None
                if st.commit:
                    st.cache.fingerprint = run_fingerprint(model, x, st.config.to_json())
                return None
            st.set_region(x, region)
            _tag_inputs(st, att, kwargs)
            # Region tracking watches the tensor arithmetic between layers during this forward only.
            att.tracking = RegionTracking(st)
            att.tracking.__enter__()
        else:
            st.begin_run()
            if st.mode is Mode.CAPTURE:
                st.cache.fingerprint = run_fingerprint(model, x, st.config.to_json())
                if att.weights is None:  # once per capture: what a changed identity is compared with
                    att.weights, att.adapters = _content(model), adapter_state(model)
                st.cache.put_exact(_INPUT_KEY + st.scope, x=x)
                att.last_call = (args, kwargs, st.scope)
                aux = _aux_inputs(args, kwargs, x, att.spatial_inputs)
                att.aux[st.scope] = {k: _clone_input(v) for k, v in aux.items()}
        return None

    return pre_hook


def _content(model: nn.Module) -> dict[str, int]:
    return weights_checksum({type(model).__name__: model})[type(model).__name__]


def _check_weights(model: nn.Module, att: _Attachment, x: torch.Tensor) -> None:
    """Refuse a sparse run whose model, input shape or config differ from the capture's. The weights are compared by
    identity (storage address and version counter: no reads); when that differs, by content, so weights restored to
    the captured bits (e.g. `load_state_dict` of the same values) are accepted again and the new identity adopted."""
    st = att.state
    now = run_fingerprint(model, x, st.config.to_json())
    captured = st.cache.fingerprint
    if captured is not None and captured.get(WEIGHTS) != now[WEIGHTS] and att.weights is not None:
        name = type(model).__name__
        changed = changed_tensors({name: att.weights}, {name: _content(model)})
        if changed is None and adapter_state(model) != att.adapters:
            changed = f"{name} (its LoRA adapters: loaded, removed, fused, unfused or re-weighted)"
        if changed is not None:
            raise StaleCacheError(
                f"the weights of {changed} changed since the capture, so the cache holds another model's "
                "activations; restore them, or capture again with `sparsedit.capturing(model)`."
            )
        captured[WEIGHTS] = now[WEIGHTS]  # the captured bits are back: edits may use the cache again
    st.cache.check(now)


def _tag_inputs(st: SparseState, att: _Attachment, kwargs) -> None:
    """Give the spatial inputs named in `editing(input_regions=...)` their changed regions for this run (a tensor,
    or one per tensor of a list or tuple input); any such input left without a region counts as changed everywhere."""
    for name, regions in att.input_regions.items():
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            value, regions = [value], [regions]
        if value is None or regions is None:
            continue
        if len(value) != len(regions):
            raise ValueError(f"input_regions[{name!r}] has {len(regions)} regions for {len(value)} tensors.")
        for t, r in zip(value, regions):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and r is not None:
                if tuple(r.shape) != (t.shape[0], *t.shape[-2:]):
                    raise ValueError(
                        f"input_regions[{name!r}]: a region of shape {tuple(r.shape)} for a map of shape "
                        f"{tuple(t.shape)}; give [B, H, W] at the map's resolution."
                    )
                st.set_region(t, r.to(device=t.device, dtype=torch.bool))


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


def _remember_changed_aux(att: _Attachment, args, kwargs) -> None:
    """A committed run with a changed (allowed) input, e.g. a new prompt: the cache now belongs to that input."""
    if not att.changeable:
        return
    if att.txn_aux is not None and att.state.scope not in att.txn_aux:
        att.txn_aux[att.state.scope] = dict(att.aux.get(att.state.scope, {}))
    now = _aux_inputs(args, kwargs, _first_image(args, kwargs), att.spatial_inputs)
    stored = att.aux.setdefault(att.state.scope, {})
    for name in {_aux_name(k) for k in att.changeable} & set(now):
        v = now[name]
        stored[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v


def _make_post_hook(att: _Attachment):
    def post_hook(module, args, kwargs, output):
        st = att.state
        att.stop_tracking()
        if st.mode is None and not att.dense_run:
            return None
        att.seconds = time.perf_counter() - att.started
        att.output_regions = _region_tree(st, output) if st.mode is Mode.SPARSE and not att.dense_run else None
        st.end_run()
        att.last_dense_run = att.dense_run
        if st.mode is Mode.CAPTURE:
            att.capture_records = list(st.records)
        if att.dense_run:
            if st.mode is None:  # the plain forward recorded nothing: the capture's layers, all dense
                st.records = [dataclasses.replace(r, time={}, seconds=0.0) for r in att.capture_records]
            st.mode = Mode.SPARSE
            for r in st.records:
                r.dense_reason = att.dense_run
            att.dense_run = None
            if st.commit:
                st.cache.put_exact(_INPUT_KEY + st.scope, x=_first_image(args, kwargs))
                _remember_changed_aux(att, args, kwargs)
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
                st.cache.put_exact(_INPUT_KEY + st.scope, x=_first_image(args, kwargs))
                _remember_changed_aux(att, args, kwargs)
            elif st.cache.converts:
                st.cache.flush(commit=False)  # the stored cache was never touched: nothing to roll back
                st.forget_undo()
            return output
        return None

    return post_hook


@contextlib.contextmanager
def _mode(att: _Attachment, mode: Mode):
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
    atts = [_attachment(m) for m in dict.fromkeys(models)]
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
    att = _attachment(model)
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
    return _attachment(model).calibration


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
    att = _attachment(model)
    call, att.last_call = att.last_call, None
    if call is None:
        if att.state.cache.fingerprint is None:
            raise RuntimeError("Nothing has been captured for this model: capture it before calibrating.")
        return att.calibration  # nothing to replay: a restored session keeps its own
    if not att.state.config.measured_fallback or attachments.has(model, attachments.TEMPORAL):
        att.calibration = None
        return None
    args, kwargs, scope_key = call
    x = _first_image(args, kwargs)
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


def _measure(model: nn.Module, att: _Attachment, args, kwargs, scope_key, key: str, about: str) -> Calibration:
    """Time one plain dense forward and uncommitted sparse forwards at the probe regions on the captured call; the
    cache, the records and the statistics are left as the capture left them."""
    st = att.state
    x = _first_image(args, kwargs)
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
        # measured 1.4-2.2x slower, which made sparse look cheaper than it is). A fast model is measured twice, the
        # best kept.
        dense = math.inf
        for _ in range(2):
            started = time.perf_counter()
            with torch.no_grad():
                model(*args, **kwargs)
            dense = min(dense, time.perf_counter() - started)
            if dense >= 0.5:
                break
        repeats = 2 if dense < 0.5 else 1
        probes = []
        for fraction in PROBE_FRACTIONS:
            region = _probe_region(x, fraction, st.config)
            best = None
            with editing(model, region=region, check_weights=False, input_regions=unchanged or None):
                for _ in range(repeats):
                    model(*args, **kwargs)
                    # The plan is built once per edit, for all its steps: the run itself is what compares with dense.
                    run = att.seconds - time_breakdown(st.records, att.seconds)["plan"]
                    best = run if best is None else min(best, run)
            probes.append((_reach_fraction(region, st.config), best))
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
    """
    att = _attachment(model)
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
    st = _attachment(model).state
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
    is used in place)."""
    st = _attachment(model).state
    return st.cache.prefetch(st.cache.scope_keys(st.scope + tuple(key)))


@contextlib.contextmanager
def profiling(model: nn.Module):
    """Run `model` densely and record per-layer MACs (see `last_stats`) without touching the cache."""
    with _mode(_attachment(model), Mode.PROFILE):
        yield


def time_breakdown(records, seconds: float) -> dict[str, float]:
    """Where a run's time went, summed over its layers: `plan` (tile indices; zero once the edit's plan is built),
    `gather`, `compute`, `scatter` (including undo logs), `dense` (layers computed whole), and `other`: everything
    outside the layers' sparse paths (region tracking, glue arithmetic between layers, hooks, Python)."""
    out = dict.fromkeys(("plan", "gather", "compute", "scatter", "dense"), 0.0)
    for r in records:
        for part, t in r.time.items():
            out[part] = out.get(part, 0.0) + t
    out["other"] = max(0.0, seconds - sum(out.values()))
    return out


def last_stats(model: nn.Module, *, detail: bool = True) -> dict:
    """What the last run inside `capturing`, `editing` or `profiling` computed.

    Returns:
        A dict with `macs_dense` (what a dense run costs), `macs_sparse` (what this run computed), `active_fraction`
        (per output resolution `"HxW"`: mean fraction of positions computed by its layers), `input_active_fraction`,
        `seconds`, `cache_bytes`, `dense_layers` (layers that ran densely, with the reason), `dense_run` (why the
        whole run was one plain dense forward: the region's size or a measurement; `None` otherwise), `time` (the run's seconds
        by part, see `time_breakdown`) and `layers` (per call, each with its `seconds` and `time` by part). With
        `detail=False`, `cache_bytes` and `layers` are left out (they cost a pass over every cache entry and
        record: a diffusion loop asks once per step).
    """
    att = _attachment(model)
    st = att.state
    by_res = defaultdict(list)
    for r in st.records:
        by_res[f"{r.resolution[0]}x{r.resolution[1]}"].append(r.active_fraction)
    region = st.input_region
    return {
        "macs_dense": sum(r.macs_dense for r in st.records),
        "macs_sparse": sum(r.macs_sparse for r in st.records),
        "active_fraction": {k: sum(v) / len(v) for k, v in by_res.items()},
        "input_active_fraction": float(region.float().mean()) if region is not None else 1.0,
        "seconds": att.seconds,
        **({"cache_bytes": st.cache.nbytes} if detail else {}),
        "dense_layers": {r.name: r.dense_reason for r in st.records if r.dense_reason},
        "dense_run": att.last_dense_run,
        "time": time_breakdown(st.records, att.seconds),
        **({"layers": [vars(r).copy() for r in st.records]} if detail else {}),
    }
