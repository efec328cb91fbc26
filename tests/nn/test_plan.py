"""The per-edit plan, lazy skip concatenations, pixel-GEMM convolutions, the per-layer time breakdown and the measured
"never slower than dense" choice."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedit
from sparsedit import SparseConfig
from sparsedit.nn.virtual import LazyConcat
from tests.strategies import regions


class SkipNet(nn.Module):
    """A U-Net-like skip: the concatenation is plain `torch.cat`, as in diffusers' up blocks."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Sequential(nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
        self.head = nn.Sequential(nn.BatchNorm2d(2 * c), nn.ReLU(), nn.Conv2d(2 * c, 3, 3, padding=1))
        self.shortcut = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x):
        h = self.a(x)
        cat = torch.cat([h, self.b(h)], dim=1)
        return self.head(cat) + self.shortcut(cat) + cat.mean() * 0  # `mean` reads the whole map: it must be filled


def _edit(x, region, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.where(region[:, None], x + torch.randn(x.shape, generator=g), x)


def _captured_stack(size: int, box: tuple[slice, slice], **config):
    """conv → ReLU → conv, sparsified (exact) and captured on a random input; a square region at `box`."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    sparsedit.sparsify_(model, SparseConfig(exact=True, **config))
    x = torch.randn(1, 3, size, size)
    with sparsedit.capturing(model):
        captured = model(x)
    region = torch.zeros(1, size, size, dtype=torch.bool)
    region[(0, *box)] = True
    return model, x, captured, region


@settings(max_examples=25)
@given(data=st.data())
def test_lazy_concat_and_pixel_tiles_are_exact(data):
    torch.manual_seed(data.draw(st.integers(0, 100)))
    h, w = data.draw(st.integers(4, 14)), data.draw(st.integers(4, 14))
    model = SkipNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, h, w)
    region = data.draw(regions(2, h, w))
    x_edit = _edit(x, region)
    with torch.no_grad():
        dense = model(x_edit)
    tile = data.draw(st.sampled_from([None, 1, 2, 4]))
    cfg = SparseConfig(exact=True, tile_size=tile, poison_scratch=True, dense_threshold=1.0)
    sparsedit.sparsify_(model, cfg)
    with sparsedit.capturing(model):
        model(x)
    for _ in range(2):  # the second run reuses the plan
        with sparsedit.editing(model, region=region):
            out = model(x_edit)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_lazy_concat_fills_itself_for_any_other_reader():
    a, b = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3)
    lazy = LazyConcat.of([a, b])
    assert lazy.shape == (1, 5, 3, 3) and not lazy.filled  # metadata leaves it lazy
    assert torch.equal(lazy * 1, torch.cat([a, b], 1))  # any other use fills it first
    assert lazy.filled


def test_plan_is_reused_across_runs_and_rebuilt_for_a_new_region():
    model, x, _, region = _captured_stack(16, (slice(4, 6), slice(4, 6)))
    state = model._sparsedit.state
    with sparsedit.editing(model, region=region):
        model(_edit(x, region))
    plan, misses = state.plan, state.plan.misses
    with sparsedit.editing(model, region=region.clone()):  # an equal region: the same plan, no new entries
        model(_edit(x, region))
    assert state.plan is plan and state.plan.misses == misses and state.plan.hits > 0
    other = torch.zeros_like(region)
    other[0, 10:12, 1:3] = True
    with sparsedit.editing(model, region=other):
        model(_edit(x, other))
    assert state.plan is not plan


def test_last_stats_breaks_the_time_down_by_part_and_layer():
    model, x, _, region = _captured_stack(32, (slice(3, 9), slice(20, 25)), dense_threshold=1.0)
    with sparsedit.editing(model, region=region):
        model(_edit(x, region))
    stats = sparsedit.last_stats(model)
    assert set(stats["time"]) == {"plan", "gather", "compute", "scatter", "dense", "other"}
    assert stats["time"]["gather"] > 0 and stats["time"]["compute"] > 0 and stats["time"]["scatter"] > 0
    assert sum(stats["time"].values()) == pytest.approx(stats["seconds"], rel=1e-6)
    convs = [r for r in stats["layers"] if r["kind"] == "conv"]
    assert convs and all(r["seconds"] > 0 and set(r["time"]) >= {"gather", "compute", "scatter"} for r in convs)


@pytest.mark.timing
def test_a_region_measured_slower_than_dense_runs_dense_and_says_so():
    model, x, captured, region = _captured_stack(24, (slice(2, 5), slice(2, 5)))
    x_edit = _edit(x, region)
    att = model._sparsedit
    with sparsedit.editing(model, region=region):
        sparse = model(x_edit)
    assert sparsedit.last_stats(model)["macs_sparse"] < sparsedit.last_stats(model)["macs_dense"]
    att.dense_seconds, att.pure_dense = 1e-9, True  # as if dense had been measured faster than any sparse run
    with sparsedit.editing(model, region=region):
        again = model(x_edit)
    stats = sparsedit.last_stats(model)
    assert stats["macs_sparse"] == stats["macs_dense"] > 0
    assert all(r.startswith("measured: sparse") for r in stats["dense_layers"].values())
    assert stats["dense_run"].startswith("measured: sparse")
    with torch.no_grad():
        sparsedit.unsparsify_(model)
        torch.testing.assert_close(again, model(x_edit))  # the dense result of the edit
        torch.testing.assert_close(sparse, again, rtol=1e-5, atol=1e-5)
    assert not torch.equal(again, captured)


@pytest.mark.timing
def test_a_capture_time_reference_is_refined_by_one_plain_dense_run():
    model, x, _, region = _captured_stack(24, (slice(2, 5), slice(2, 5)))
    att = model._sparsedit
    with sparsedit.editing(model, region=region):
        model(_edit(x, region))
    att.dense_seconds = att.state.plan.sparse_seconds[0] * 1.5  # sparse ran at 2/3 of the (capture) reference
    with sparsedit.editing(model, region=region):
        model(_edit(x, region))
    reasons = set(sparsedit.last_stats(model)["dense_layers"].values())
    assert len(reasons) == 1 and reasons.pop().startswith("measuring the plain dense forward")
    assert att.pure_dense
