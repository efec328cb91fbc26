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
    from .adapters.pipelines import supported_pipelines

    lines.append("")
    lines.append("pipelines SparseEditor supports (and their subclasses):")
    lines.extend(f"  {name}" for name in supported_pipelines())
    return "\n".join(lines)
