import os

import pytest
import torch
from hypothesis import HealthCheck, settings


torch.set_num_threads(min(2, os.cpu_count() or 1))
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _no_timing_decisions(request, monkeypatch):
    """Unit tests check what the engine computes, which must not depend on how fast this machine ran it: the
    measured sparse-or-dense choice (`SparseConfig.measured_fallback`) is off unless a test asks for it with
    `@pytest.mark.timing`; tests of that choice set the measurements themselves."""
    if request.node.get_closest_marker("timing") is None:
        import sparsedit.spatial

        monkeypatch.setattr(sparsedit.spatial, "_measured_slower", lambda att, plan: None)
