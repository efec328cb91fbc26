"""Which techniques a model carries, and their state: the one place techniques attach to a model, so that each can
ask about another (spatial sparsity must sit inside temporal reuse; temporal reuse tags the features it replays while
a sparse edit runs) without importing it. A bottom-layer module: it imports nothing of sparsedit."""

from __future__ import annotations

import torch.nn as nn


__all__ = ["SPATIAL", "TEMPORAL", "attach", "detach", "engine_state", "get", "has"]

SPATIAL = "_sparsedit"  # spatial.py: an `_Attachment` (its `.state` is the engine's `SparseState`)
TEMPORAL = "_sparsedit_temporal"  # temporal.py: the encoder-propagation state


def get(model: nn.Module, technique: str):
    """The state `technique` keeps on `model`, or `None`."""
    return model.__dict__.get(technique)


def has(model: nn.Module, technique: str) -> bool:
    return technique in model.__dict__


def attach(model: nn.Module, technique: str, state) -> None:
    model.__dict__[technique] = state


def detach(model: nn.Module, technique: str) -> None:
    del model.__dict__[technique]


def engine_state(model: nn.Module):
    """The sparse engine's `SparseState` of a sparsified model (its mode, regions, cache), or `None`."""
    att = get(model, SPATIAL)
    return None if att is None else att.state
