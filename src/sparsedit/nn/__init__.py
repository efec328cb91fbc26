"""Sparse-aware building blocks: each supported layer runs densely (capture) or on active tiles (sparse)."""

from . import layers  # noqa: F401  (registers the handlers of torch's own layers)
from .base import Prologue, SparseHandler, UnsupportedLayerError, handler_for, register_handler
from .blocks import Add, Concat, ResBlock
from .state import LayerRecord, Mode, SparseState


__all__ = [
    "Add",
    "Concat",
    "LayerRecord",
    "Mode",
    "Prologue",
    "ResBlock",
    "SparseHandler",
    "SparseState",
    "UnsupportedLayerError",
    "handler_for",
    "register_handler",
]
