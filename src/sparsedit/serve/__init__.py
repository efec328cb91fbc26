"""`sparsedit serve`: the web editor and a JSON API over editing sessions (FastAPI + uvicorn).

```python
from sparsedit.serve import create_app
app = create_app()  # the shipped scene models; ModelRegistry(dirs) adds local diffusers pipelines
```

Imported only by the server and its CLI: `import sparsedit` needs none of FastAPI.
"""

from __future__ import annotations

import os

from .app import create_app
from .models import ModelRegistry


__all__ = ["LOOPBACK_NAMES", "ModelRegistry", "create_app", "is_loopback", "run"]


def run(host: str = "127.0.0.1", port: int = 8000, model_dirs=(), workers: int = 2, memory_budget=None,
        max_pixels: int = 1024 * 1024, max_sessions: int = 64, log_level: str = "info",
        reproducible: bool = False, calibration=None, state_dir=None, idle_expiry: float | None = None,
        token: str | None = None, max_steps: int = 100, max_per_client: int | None = 16,
        max_request_seconds: float | None = 600.0, measure_dense: bool = False) -> None:  # fmt: skip
    """Serve the app with uvicorn until interrupted. `calibration`: a file written by `sparsedit.calibration.save`,
    pinned so that this server chooses sparse or dense as the machine that wrote it did. `state_dir`: the sessions'
    journal (recovered at start; `None`: nothing survives the process)."""
    import uvicorn

    from .. import calibration as calibrations
    from ..config import parse_bytes

    if calibration is not None:
        calibrations.load(calibration)

    budget = parse_bytes(memory_budget) if memory_budget is not None else default_memory_budget()
    app = create_app(ModelRegistry(model_dirs), workers=workers, memory_budget=budget,
                     max_pixels=max_pixels, max_sessions=max_sessions, reproducible=reproducible,
                     allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None, state_dir=state_dir,
                     idle_expiry=idle_expiry, token=token, max_steps=max_steps,
                     max_per_client=max_per_client, session_limit=budget,
                     max_request_seconds=max_request_seconds, measure_dense=measure_dense)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def default_memory_budget() -> int | None:
    """Half of this machine's physical memory: what the live sessions' caches may hold before idle ones are parked,
    and the most one session's capture may need (refused with 413 before it runs otherwise)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


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
