"""What `sparsify_` attaches to a model (`Attachment`: its engine state, handlers, hooks, captured inputs and
calibration), and how the other modules of the technique find it."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import attachments
from ..calibration import Calibration
from ..nn.base import SparseHandler
from ..nn.state import SparseState
from ..nn.tracking import RegionTracking


INPUT_KEY = ("__input__",)


class Attachment:
    """Everything `sparsify_` added to a model, so `unsparsify_` can take exactly that away."""

    def __init__(self, state: SparseState, handlers: list[SparseHandler], hooks: list):
        self.state = state
        self.handlers = handlers
        self.hooks = hooks
        self.pending_region: torch.Tensor | None = None
        self.region_checked = False  # the caller compared this edit's input with the capture's itself (`editing`)
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
        self.dense_records: tuple | None = None  # (capture_records, their all-dense copies), for plain dense runs
        # Exact mode: the first layer whose output changes everywhere, and the MACs share from it on (hooks).
        self.global_reach: tuple[str, float] | None = None
        self.tracking: RegionTracking | None = None  # entered for each sparse forward only
        self.txn_depth = 0  # nesting of `transaction` contexts
        self.owner: int | None = None  # the thread inside a capturing/editing context
        self.txn_aux: dict | None = None  # the captured inputs as the transaction found them

    def stop_tracking(self) -> None:
        if self.tracking is not None:
            self.tracking.__exit__(None, None, None)
            self.tracking = None


def attachment_of(model: nn.Module) -> Attachment:
    att = attachments.get(model, attachments.SPATIAL)
    if att is None:
        raise RuntimeError(
            f"{type(model).__name__} is not sparsified; call `sparsedit.sparsify_(model, SparseConfig())` first."
        )
    return att


def sparse_state(model: nn.Module) -> SparseState | None:
    """The engine's `SparseState` of a sparsified model (its mode, regions, cache), or `None`."""
    return attachments.engine_state(model)


def is_sparsified(model: nn.Module) -> bool:
    return attachments.has(model, attachments.SPATIAL)
