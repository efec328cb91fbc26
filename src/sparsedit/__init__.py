"""sparsedit: image editing with diffusion models and conditional GANs that recomputes only what changed."""

from . import calibration, data, metrics, models, pretrained, temporal, textedit
from .cache import ActivationCache, CacheBudgetError, CacheBytes, StaleCacheError
from .config import (
    AttentionMode,
    Injection,
    NormStats,
    OnStale,
    RegionMethod,
    SparseConfig,
    TemporalConfig,
    TextEditConfig,
)
from .editors import CorruptSessionError, GANEditor, SparseEditor
from .guard import EditorBusyError
from .nn import Mode, UnsupportedLayerError
from .regions import difference_mask
from .spatial import (
    calibrate,
    calibration_of,
    capturing,
    editing,
    is_sparsified,
    last_stats,
    output_regions,
    prefetch,
    profiling,
    scope,
    sparsify_,
    transaction,
    unsparsify_,
)
from .stats import EditStats


__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "AttentionMode",
    "Injection",
    "NormStats",
    "OnStale",
    "RegionMethod",
    "CacheBudgetError",
    "CacheBytes",
    "CorruptSessionError",
    "EditStats",
    "EditorBusyError",
    "GANEditor",
    "Mode",
    "SparseConfig",
    "SparseEditor",
    "TextEditConfig",
    "StaleCacheError",
    "TemporalConfig",
    "UnsupportedLayerError",
    "calibrate",
    "calibration",
    "calibration_of",
    "capturing",
    "difference_mask",
    "editing",
    "is_sparsified",
    "last_stats",
    "data",
    "metrics",
    "models",
    "output_regions",
    "prefetch",
    "pretrained",
    "profiling",
    "scope",
    "sparsify_",
    "temporal",
    "textedit",
    "transaction",
    "unsparsify_",
]
