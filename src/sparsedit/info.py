"""`sparsedit info`: versions, and which backends can run here (and why the others cannot)."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from . import ops


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


_OPS = ("gather", "scatter", "write_pixels", "gather_tokens", "scatter_tokens")


def _choices(probe: list[torch.Tensor]) -> list[str]:
    """Which backend runs each op for each device and floating dtype here, and why the ones tried before it do not
    (the dispatcher's own choice and reasons)."""
    lines = ["which backend runs each op (and why the ones before it do not):"]
    for device in probe:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.empty(1, 1, 1, 1, dtype=dtype, device=device.device)
            for op in _OPS:
                declined = []
                for backend in ops.backends():
                    reasons = backend.not_supported_reasons(op, [t, t])
                    if not reasons:
                        why = f" ({'; '.join(declined)})" if declined else ""
                        lines.append(f"  {op:<15}{device.device.type:<5}{str(dtype).replace('torch.', ''):<9}"
                                     f"{backend.name}{why}")  # fmt: skip
                        break
                    declined.append(f"{backend.name}: {', '.join(reasons)}")
    compiled = next((b for b in ops.backends() if b.name == "cpu-compiled"), None)
    if compiled is not None and compiled.unavailable_reason() is None:
        from .ops.cpu import ACTIVATION_CODES

        lines.append(
            "  cpu-compiled computes the gather's prologue for the activations "
            f"{', '.join(ACTIVATION_CODES)}; others go to the reference backend inside the same call"
        )
    return lines


def info_text() -> str:
    from . import __version__

    lines = [
        f"sparsedit      {__version__}",
        f"python         {platform.python_version()} ({platform.machine()})",
        f"torch          {torch.__version__} (threads: {torch.get_num_threads()})",
    ]
    for dist in ("numpy", "diffusers", "transformers", "safetensors"):
        lines.append(f"{dist:<14} {_version(dist)}")
    cuda = torch.cuda.is_available()
    lines.append(f"cuda           {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    lines.append("")
    lines.append("backends (tried in this order):")
    probe = [torch.empty(1, 1, 1, 1)]
    if cuda:
        probe.append(torch.empty(1, 1, 1, 1, device="cuda"))
    for backend in ops.backends():
        why = backend.unavailable_reason()
        if why:
            lines.append(f"  {backend.name:<12} unavailable: {why}")
            continue
        devices = [t.device.type for t in probe if not backend.not_supported_reasons("gather", [t])]
        dtypes = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        lines.append(f"  {backend.name:<12} ready on {', '.join(devices) or 'no device here'} ({dtypes})")
    lines.append("")
    lines.extend(_choices(probe))
    from .adapters.pipelines import supported_pipelines

    lines.append("")
    lines.append("pipelines SparseEditor supports (and their subclasses):")
    lines.extend(f"  {name}" for name in supported_pipelines())
    return "\n".join(lines)
