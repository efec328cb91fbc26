"""A captured model's state for saved sessions: `export_capture` and its inverse `restore_capture`."""

from __future__ import annotations

import torch.nn as nn

from .. import calibration as calibrations
from ..calibration import Calibration
from ..fingerprints import adapter_state, run_fingerprint
from .attachment import INPUT_KEY, attachment_of
from .hooks import global_reach, weights_content


def export_capture(model: nn.Module) -> dict:
    """What a saved session needs of a captured model besides the weights: its cache (`ActivationCache.export`),
    the captured non-image inputs per scope, the capture's layer records, the output layout and the calibration
    its sparse-or-dense choices read (so a loaded session chooses as this one does). The last uncommitted edit is
    rolled back first."""
    att = attachment_of(model)
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
    att = attachment_of(model)
    st = att.state
    st.rollback()
    st.cache.clear()
    st.cache.storage_dtype = storage_dtype
    att.aux.clear()
    x = None
    for key, fields in entries:
        st.cache.restore(key, fields)
        if key[: len(INPUT_KEY)] == INPUT_KEY:
            x = fields["x"][0]
    att.aux.update(aux)
    att.spatial_inputs = frozenset(spatial_inputs)
    st.records = list(records)
    att.capture_records = list(capture_records)
    att.global_reach = global_reach(att.capture_records)
    att.output_format = output_format
    # The session's own calibration, so the loaded editor chooses as the saved one did; this process adopts it for
    # later captures of the same model unless it has measured its own.
    att.calibration = None if calibration is None else Calibration.from_dict(calibration)
    if att.calibration is not None:
        calibrations.install(att.calibration)
    if x is not None:
        st.cache.fingerprint = run_fingerprint(model, x, st.config.to_json())
        att.weights, att.adapters = weights_content(model), adapter_state(model)  # the loader checked them
