"""Backend selection for the block-sparse ops (the xformers pattern).

Each backend declares the devices and dtypes it supports and can explain why it cannot take a request. The dispatcher
tries them in priority order; if none fits, one error lists every backend's reasons.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


__all__ = [
    "Backend",
    "NoBackendError",
    "backend_enabled",
    "backends",
    "register_backend",
    "select_backend",
    "set_backend_enabled",
]


class NoBackendError(RuntimeError):
    pass


class Backend:
    """A set of implementations of the sparsedit ops for some devices and dtypes.

    Subclasses set `name`, `priority` (higher is tried first), `devices` and `dtypes`, implement the ops as methods
    named like the ops (`gather`, `scatter`, `gather_tokens`, `scatter_tokens`), and may override `unavailable_reason`
    (missing compiler, library, hardware) and `not_supported_reasons` (input-specific limits).
    """

    name: str = "base"
    priority: int = 0
    # Whether `not_supported_reasons` looks at more than the tensors' devices and dtypes (shapes, strides): then the
    # choice is made again for every call; otherwise it is remembered per op, devices and dtypes.
    input_specific: bool = False
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()

    def unavailable_reason(self) -> str | None:
        return None

    def not_supported_reasons(self, op: str, tensors: list[torch.Tensor]) -> list[str]:
        reasons = []
        if self.name in _DISABLED:
            reasons.append("turned off by set_backend_enabled")
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if not hasattr(self, op):
            reasons.append(f"does not implement {op}")
        for t in tensors:
            if t.device.type not in self.devices:
                reasons.append(f"device {t.device.type} not in {self.devices}")
            if t.is_floating_point() and t.dtype not in self.dtypes:
                reasons.append(f"dtype {t.dtype} not in {[str(d) for d in self.dtypes]}")
        return sorted(set(reasons))


_BACKENDS: list[Backend] = []
_DISABLED: set[str] = set()
_CHOSEN: dict[tuple, Callable] = {}  # (op, devices and dtypes) -> the implementation chosen for them


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS.append(cls())
    _BACKENDS.sort(key=lambda b: -b.priority)
    _CHOSEN.clear()
    return cls


def set_backend_enabled(name: str, enabled: bool) -> None:
    """Turn a backend off (or on again) for this process: the ops then choose among the others (A/B benchmarks,
    debugging a backend against the reference)."""
    if name not in {b.name for b in _BACKENDS}:
        raise ValueError(f"no backend named {name!r}; there are {[b.name for b in _BACKENDS]}")
    if enabled:
        _DISABLED.discard(name)
    else:
        _DISABLED.add(name)
    _CHOSEN.clear()


def backend_enabled(name: str) -> bool:
    """Whether `set_backend_enabled` left this backend on."""
    return name not in _DISABLED


def backends() -> list[Backend]:
    return list(_BACKENDS)


def select_backend(op: str, tensors: list[torch.Tensor]) -> Callable:
    """The implementation of `op` from the first backend that supports these tensors (remembered per op, devices and
    dtypes: a sparse run makes about a thousand of these calls)."""
    key = (op, *((t.device, t.dtype) for t in tensors))
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    failures = []
    for backend in _BACKENDS:
        reasons = backend.not_supported_reasons(op, tensors)
        if not reasons:
            chosen = getattr(backend, op)
            if not any(b.input_specific for b in _BACKENDS):
                _CHOSEN[key] = chosen
            return chosen
        failures.append(f"  {backend.name}: {'; '.join(reasons)}")
    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in tensors)
    raise NoBackendError(
        f"No sparsedit backend can run {op} on ({shapes}):\n" + "\n".join(failures) + "\n"
        "Run `sparsedit info` to see which backends this installation has."
    )
