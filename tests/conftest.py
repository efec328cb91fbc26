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
    """Unit tests check what the engine computes, which must not depend on how fast this machine ran it: each test
    starts with an empty calibration table, and unless it asks for real measurements with `@pytest.mark.timing`,
    a capture's calibration is not measured but one that always runs sparse (`max_region_fraction` still decides).
    Tests of the calibrated choice measure, or set the calibration themselves."""
    import sparsedit.calibration
    import sparsedit.spatial.contexts

    monkeypatch.setattr(sparsedit.calibration, "_TABLE", {})
    if request.node.get_closest_marker("timing") is None:

        def always_sparse(model, att, args, kwargs, scope_key, key, about):
            return sparsedit.calibration.Calibration.fit(key, about, 1.0, [(0.0, 0.0), (1.0, 0.0)])

        monkeypatch.setattr(sparsedit.spatial.contexts, "_measure", always_sparse)
