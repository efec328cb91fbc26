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

One job per module: `attachment` (what a model carries), `verbs` (`sparsify_`, `unsparsify_`), `hooks` (what a
forward does in each mode, and the run-level sparse-or-dense choice), `inputs` (non-image inputs and their
staleness), `contexts` (the modes, and the calibration's probes), `stats` (`last_stats`), `export` (for sessions).
"""

from ..config import SparseConfig
from .attachment import attachment_of, is_sparsified, sparse_state
from .contexts import calibrate, calibration_of, capturing, editing, prefetch, profiling, scope, transaction
from .export import export_capture, restore_capture
from .stats import last_stats, output_regions, time_breakdown
from .verbs import sparsify_, unsparsify_


__all__ = [
    "SparseConfig",
    "attachment_of",
    "calibrate",
    "calibration_of",
    "capturing",
    "editing",
    "export_capture",
    "is_sparsified",
    "last_stats",
    "output_regions",
    "prefetch",
    "profiling",
    "restore_capture",
    "scope",
    "sparse_state",
    "sparsify_",
    "time_breakdown",
    "transaction",
    "unsparsify_",
]
