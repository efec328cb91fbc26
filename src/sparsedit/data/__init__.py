"""Data the library makes itself, offline: procedural scenes with label maps (`sparsedit.data.scenes`)."""

from . import scenes


__all__ = ["scenes"]
