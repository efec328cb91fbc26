"""`sparsedit serve`: the web editor and a JSON API over editing sessions (FastAPI + uvicorn).

```python
from sparsedit.serve import create_app
app = create_app()  # the shipped scene models; ModelRegistry(dirs) adds local diffusers pipelines
```

Imported only by the server and its CLI: `import sparsedit` needs none of FastAPI.
"""

from __future__ import annotations

from .app import create_app
from .models import ModelRegistry


__all__ = ["LOOPBACK_NAMES", "ModelRegistry", "create_app", "is_loopback", "run"]


def run(host: str = "127.0.0.1", port: int = 8000, model_dirs=(), workers: int = 2, memory_budget=None,
        max_pixels: int = 1024 * 1024, max_sessions: int = 64, log_level: str = "info",
        reproducible: bool = False, calibration=None) -> None:  # fmt: skip
    """Serve the app with uvicorn until interrupted. `calibration`: a file written by `sparsedit.calibration.save`,
    pinned so that this server chooses sparse or dense as the machine that wrote it did."""
    import uvicorn

    from .. import calibration as calibrations
    from ..config import parse_bytes

    if calibration is not None:
        calibrations.load(calibration)

    app = create_app(ModelRegistry(model_dirs), workers=workers, memory_budget=parse_bytes(memory_budget),
                     max_pixels=max_pixels, max_sessions=max_sessions, reproducible=reproducible,
                     allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level)


LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]  # the Host headers a loopback server answers


def is_loopback(host: str) -> bool:
    """Whether `host` is an address of this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
