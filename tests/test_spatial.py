"""The model-level contract: exact sparse editing of conv stacks, against the dense model as oracle."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

import sparsedit
from sparsedit import SparseConfig

from .strategies import conv_stacks, regions


def influence(model: nn.Module, x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Output positions the region can reach, found without the engine: NaN in, see where NaN comes out."""
    probe = x.clone()
    probe.masked_fill_(region[:, None].expand_as(x), float("nan"))
    with torch.no_grad():
        return torch.isnan(model(probe)).any(dim=1)


def edit_input(x: torch.Tensor, region: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
    return torch.where(region[:, None], x + noise, x)


@given(data=st.data())
def test_exact_mode_equals_dense(data):
    b = data.draw(st.integers(1, 2), label="batch")
    c = data.draw(st.integers(1, 4), label="channels")
    h, w = data.draw(st.integers(5, 23), label="h"), data.draw(st.integers(5, 23), label="w")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = data.draw(conv_stacks(c), label="model")
    x = torch.randn(b, c, h, w)
    try:
        with torch.no_grad():
            dense_orig = model(x)
    except RuntimeError:
        assume(False)  # the drawn stack shrinks this input below one pixel
    region = data.draw(regions(b, h, w), label="region")
    tile = data.draw(st.sampled_from([1, 2, 3, 4, 8]), label="tile")
    x_edit = edit_input(x, region, seed=1)
    with torch.no_grad():
        dense_edit = model(x_edit)
    reach = influence(model, x, region)

    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=tile, poison_scratch=True))
    with sparsedit.capturing(model):
        captured = model(x)
    assert torch.equal(captured, dense_orig)
    with sparsedit.editing(model, region=region):
        out = model(x_edit)
    stats = sparsedit.last_stats(model)

    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, dense_edit, rtol=1e-5, atol=1e-5 * (1 + dense_edit.abs().max().item()))
    outside = ~reach[:, None].expand_as(out)
    assert torch.equal(out[outside], captured[outside]), "values outside the propagated region must be the capture's"
    assert stats["macs_sparse"] <= stats["macs_dense"]
    if not region.any():
        assert stats["macs_sparse"] == 0

    sparsedit.unsparsify_(model)
    with torch.no_grad():
        assert torch.equal(model(x), dense_orig)


@pytest.mark.parametrize("tile", [2, 4])
def test_exact_mode_bf16(tile):
    """bf16: sparse tiles and the dense map are summed in different orders; we allow 2 bf16 ulps of the output scale
    (2 * 2**-8 relative) per layer of depth."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(4, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(16, 3, 3, padding=1),
        )
        .eval()
        .to(torch.bfloat16)
    )
    x = torch.randn(2, 4, 24, 20, dtype=torch.bfloat16)
    region = torch.zeros(2, 24, 20, dtype=torch.bool)
    region[0, 3:7, 5:9] = True
    region[1, 20:, 15:] = True
    x_edit = edit_input(x, region, seed=2)
    with torch.no_grad():
        dense_edit = model(x_edit)
    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=tile))
    with sparsedit.capturing(model):
        model(x)
    with sparsedit.editing(model, region=region):
        out = model(x_edit)
    assert out.dtype == torch.bfloat16
    scale = dense_edit.float().abs().max().item()
    err = (out.float() - dense_edit.float()).abs().max().item()
    assert err <= 3 * 2 * 2**-8 * scale, err


class TinyUNet(nn.Module):
    """A module composed from sparsedit.nn blocks with skip connections (concat and residual)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.ReLU()
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.LeakyReLU(0.2))
        self.res_add = sparsedit.nn.Add()
        self.up = nn.Upsample(scale_factor=2)
        self.cat = sparsedit.nn.Concat()
        self.conv_out = nn.Conv2d(3 * c, 3, 3, padding=1)

    def forward(self, x):
        h0 = self.act(self.conv_in(x))
        h1 = self.down(h0)
        h1 = self.res_add(h1, self.mid(h1))
        return self.conv_out(self.cat(self.up(h1), h0))


@given(data=st.data())
def test_skip_connections_exact(data):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    model = TinyUNet().eval()
    h, w = 2 * data.draw(st.integers(3, 12)), 2 * data.draw(st.integers(3, 12))
    x = torch.randn(2, 3, h, w)
    region = data.draw(regions(2, h, w))
    x_edit = edit_input(x, region, seed=3)
    with torch.no_grad():
        dense_edit = model(x_edit)
    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=data.draw(st.sampled_from([2, 4, 8]))))
    with sparsedit.capturing(model):
        captured = model(x)
    with sparsedit.editing(model, region=region):
        out = model(x_edit)
    torch.testing.assert_close(out, dense_edit, rtol=1e-5, atol=1e-5)
    outside = ~influence(model, x, region)[:, None].expand_as(out)
    assert torch.equal(out[outside], captured[outside])


def _resnet(c=32, groups=8):
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        sparsedit.nn.ResBlock(c, c, groups=groups),
        sparsedit.nn.ResBlock(c, 2 * c, groups=groups),
        nn.GroupNorm(groups, 2 * c),
        nn.SiLU(),
        nn.Conv2d(2 * c, 3, 3, padding=1),
    ).eval()


def square_edit(model, size, box, config, seed):
    """Dense result, captured result and sparse result of one square edit of a fresh random input."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    region = torch.zeros(1, size, size, dtype=torch.bool)
    region[0, box[0] : box[1], box[0] : box[1]] = True
    x_edit = edit_input(x, region, seed=seed)
    with torch.no_grad():
        dense_edit = model(x_edit)
    sparsedit.sparsify_(model, config)
    with sparsedit.capturing(model):
        captured = model(x)
    with sparsedit.editing(model, region=region):
        out = model(x_edit)
    return dense_edit, captured, out, region


def test_groupnorm_exact_mode_goes_dense_and_stays_exact():
    model = _resnet()
    dense_edit, _, out, _ = square_edit(model, 32, (10, 14), SparseConfig(exact=True), seed=4)
    torch.testing.assert_close(out, dense_edit, rtol=1e-5, atol=1e-5)
    # The first GroupNorm comes before nearly all the MACs: the whole edit runs as one plain dense forward.
    assert "whole map at 1.norm1" in sparsedit.last_stats(model)["dense_run"]
    model = _resnet()  # the per-layer path (a norm late in a model): sparse up to the norm, dense after it
    with mock.patch.object(sparsedit.spatial.hooks, "GLOBAL_REACH_SHARE", 1.01):
        dense_edit, _, out, _ = square_edit(model, 32, (10, 14), SparseConfig(exact=True), seed=4)
    torch.testing.assert_close(out, dense_edit, rtol=1e-5, atol=1e-5)
    assert "exact GroupNorm" in sparsedit.last_stats(model)["dense_layers"].values()


@pytest.mark.parametrize("norm_stats", ["frozen", "recompute"])
def test_groupnorm_approximate_error_is_local_and_small(norm_stats):
    """Approximate mode (SIGE): frozen or recomputed statistics; the error is bounded, the far background exact."""
    model = _resnet()
    config = SparseConfig(exact=False, norm_stats=norm_stats, dilation=2, tile_size=4)
    dense_edit, captured, out, region = square_edit(model, 48, (20, 24), config, seed=5)
    stats = sparsedit.last_stats(model)
    assert stats["macs_sparse"] < 0.3 * stats["macs_dense"]
    inside = dense_edit != captured
    err = (out - dense_edit).abs()
    # Most of the change is reproduced: the residual error is a small fraction of the edit's own effect.
    assert err.max() < 0.25 * (dense_edit - captured).abs().max()
    far = torch.ones_like(region)
    far[0, 8:40, 8:40] = False
    assert torch.equal(out[:, :, far[0]], captured[:, :, far[0]])
    assert inside.any()


def test_recomputed_groupnorm_statistics_are_exact():
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 16)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), gn, nn.SiLU(), nn.Conv2d(16, 3, 1)).eval()
    x = torch.randn(2, 3, 21, 19)
    region = torch.zeros(2, 21, 19, dtype=torch.bool)
    region[1, 15:, 2:9] = True
    x_edit = edit_input(x, region, seed=6)
    sparsedit.sparsify_(model, SparseConfig(norm_stats="recompute", tile_size=4))
    with sparsedit.capturing(model):
        model(x)
    handler = gn._sparsedit_handler
    captured_mean = sparsedit.spatial.attachment_of(model).state.cache.get(("1", 0))["mean"].clone()
    seen = {}
    original = handler._recompute

    def spy(x_, entry):
        seen["stats"] = original(x_, entry)
        seen["x"] = x_.clone()
        return seen["stats"]

    handler._recompute = spy
    with sparsedit.editing(model, region=region):
        model(x_edit)
    var, mean = torch.var_mean(seen["x"].reshape(2, 4, -1).double(), dim=-1, unbiased=False)
    torch.testing.assert_close(seen["stats"][0], mean.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["stats"][1], torch.rsqrt(var + gn.eps).float(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(seen["stats"][0], captured_mean)


def test_sequential_commits_are_incremental():
    torch.manual_seed(0)
    model = _resnet(16, 4)
    cfg = SparseConfig(exact=True)
    x0 = torch.randn(1, 3, 32, 32)
    r1 = torch.zeros(1, 32, 32, dtype=torch.bool)
    r1[0, 2:6, 2:6] = True
    r2 = torch.zeros(1, 32, 32, dtype=torch.bool)
    r2[0, 20:25, 18:22] = True
    x1 = edit_input(x0, r1, 7)
    x2 = edit_input(x1, r2, 8)
    fresh = copy.deepcopy(model)
    sparsedit.sparsify_(model, cfg)
    with sparsedit.capturing(model):
        model(x0)
    with sparsedit.editing(model, region=r1, commit=True):
        model(x1)
    with sparsedit.editing(model, region=r2):  # relative to the committed x1
        out = model(x2)
    with torch.no_grad():
        torch.testing.assert_close(out, fresh(x2), rtol=1e-5, atol=1e-5)
    # Uncommitted edits leave the cache as it was: the same edit again gives the same answer.
    with sparsedit.editing(model, region=r2):
        again = model(x2)
    assert torch.equal(out, again)


@pytest.mark.parametrize("tile", [None, 1, 4])
def test_uncommitted_edit_is_undone_before_the_next_one(tile):
    """An uncommitted exact edit writes its tiles into the stored buffers (no working copies in exact mode) and
    undoes them at the next run: an edit elsewhere then equals dense on the captured input plus its own change only."""
    torch.manual_seed(0)
    model = _resnet(16, 4)
    x0 = torch.randn(1, 3, 32, 32)
    r1 = torch.zeros(1, 32, 32, dtype=torch.bool)
    r1[0, 2:6, 2:6] = True
    r2 = torch.zeros(1, 32, 32, dtype=torch.bool)
    r2[0, 20:25, 18:22] = True
    fresh = copy.deepcopy(model)
    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=tile, dense_threshold=1.0))
    with sparsedit.capturing(model):
        model(x0)
    with sparsedit.editing(model, region=r1):
        model(edit_input(x0, r1, 7))
    assert any(r["macs_sparse"] > 0 for r in sparsedit.last_stats(model)["layers"])  # tiles were written
    x2 = edit_input(x0, r2, 8)
    with sparsedit.editing(model, region=r2):
        out = model(x2)
    with torch.no_grad():
        torch.testing.assert_close(out, fresh(x2), rtol=1e-5, atol=1e-5)


def test_outputs_are_the_users_own():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    sparsedit.sparsify_(model)
    x = torch.randn(1, 3, 16, 16)
    with sparsedit.capturing(model):
        y0 = model(x)
    keep = y0.clone()
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, 4:8, 4:8] = True
    with sparsedit.editing(model, region=region):
        y1 = model(edit_input(x, region, 9))
        keep1 = y1.clone()
    with sparsedit.editing(model, region=region):
        model(edit_input(x, region, 10))
    assert torch.equal(y0, keep) and torch.equal(y1, keep1)


def test_cost_model_runs_large_regions_densely():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    sparsedit.sparsify_(model, SparseConfig(exact=True, dense_threshold=0.5, max_region_fraction=1.0))
    with sparsedit.capturing(model):
        model(x)
    region = torch.ones(1, 32, 32, dtype=torch.bool)
    x_edit = edit_input(x, region, 11)
    with sparsedit.editing(model, region=region):
        out = model(x_edit)
    stats = sparsedit.last_stats(model)
    assert set(stats["dense_layers"].values()) == {"cost model"}
    with torch.no_grad():
        sparsedit.unsparsify_(model)
        torch.testing.assert_close(out, model(x_edit), rtol=1e-5, atol=1e-6)


def test_profile_counts_dense_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)).eval()
    sparsedit.sparsify_(model)
    with sparsedit.profiling(model):
        model(torch.randn(2, 3, 10, 10))
    stats = sparsedit.last_stats(model)
    conv = 2 * 10 * 10 * 8 * 3 * 9
    norm = 2 * 10 * 10 * 2 * 8
    assert stats["macs_dense"] == conv + norm
    assert stats["cache_bytes"] == 0


def test_conv_macs_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, (1, 5), stride=2, groups=4), nn.Conv2d(8, 2, 1)
    ).eval()
    x = torch.randn(2, 3, 17, 15)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    sparsedit.sparsify_(model)
    with sparsedit.profiling(model):
        model(x)
    assert sparsedit.last_stats(model)["macs_dense"] == counter.get_total_flops() // 2


def test_custom_module_arithmetic_stays_correct():
    """Operations the engine does not track run densely on correct full maps: correct result, less saving."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x) * 0.5 + 1)

    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(1, 3, 20, 20)
    region = torch.zeros(1, 20, 20, dtype=torch.bool)
    region[0, 2:4, 2:4] = True
    x_edit = edit_input(x, region, 12)
    with torch.no_grad():
        want = model(x_edit)
    sparsedit.sparsify_(model, SparseConfig(exact=True))
    with sparsedit.capturing(model):
        model(x)
    with sparsedit.editing(model, region=region):
        out = model(x_edit)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("commit", [False, True])
def test_large_edits_run_as_one_dense_forward(commit):
    torch.manual_seed(0)
    model = _resnet(16, 4)
    x = torch.randn(1, 3, 16, 16)
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, :12] = True  # 75% of the image
    x_edit = edit_input(x, region, 13)
    with torch.no_grad():
        want = model(x_edit)
    sparsedit.sparsify_(model, SparseConfig(max_region_fraction=0.5))
    with sparsedit.capturing(model):
        model(x)
    with sparsedit.editing(model, region=region, commit=commit):
        out = model(x_edit)
    stats = sparsedit.last_stats(model)
    assert torch.equal(out, want)  # the plain dense forward: the best possible answer
    assert stats["macs_sparse"] == stats["macs_dense"] > 0
    assert all("max_region_fraction" in why for why in stats["dense_layers"].values())
    small = torch.zeros_like(region)
    small[0, 14, 14] = True
    x_next = edit_input(x_edit if commit else x, small, 14)
    with sparsedit.editing(model, region=small):
        again = model(x_next)
    with torch.no_grad():
        sparsedit.unsparsify_(model)
        reference = model(x_edit if commit else x)
    far = torch.ones(16, 16, dtype=torch.bool)
    far[8:, 8:] = False  # outside the 8x8 tile the small edit rewrites: the reference input's cached output
    torch.testing.assert_close(again[..., far], reference[..., far], rtol=1e-5, atol=1e-6)


def _storage_run(cfg, model, x0, x1, x2, r1, r2):
    """Capture, a committed edit, then the same uncommitted edit twice; returns the outputs and the cache size."""
    sparsedit.sparsify_(model, cfg)
    with sparsedit.capturing(model):
        model(x0)
    nbytes = sparsedit.last_stats(model)["cache_bytes"]
    with sparsedit.editing(model, region=r1, commit=True):
        a = model(x1)
    with sparsedit.editing(model, region=r2):
        b = model(x2)
    with sparsedit.editing(model, region=r2):
        c = model(x2)
    sparsedit.unsparsify_(model)
    return a, b, c, nbytes


def _storage_inputs():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 32, 32)
    r1 = torch.zeros(2, 32, 32, dtype=torch.bool)
    r1[0, 2:6, 2:6] = True
    r2 = torch.zeros(2, 32, 32, dtype=torch.bool)
    r2[1, 20:25, 18:22] = True
    x1 = edit_input(x0, r1, 7)
    return x0, x1, edit_input(x1, r2, 8), r1, r2


@pytest.mark.parametrize("norm_stats", ["frozen", "recompute"])
def test_cache_on_another_device_computes_the_same(norm_stats):
    """`cache_device`: entries are stored apart and copied in per run (CPU to CPU here: the same code path as a GPU
    model with a host-memory cache). Commits write back; uncommitted runs leave the store untouched."""
    model = _resnet(16, 4)
    x0, x1, x2, r1, r2 = _storage_inputs()
    base = SparseConfig(tile_size=4, norm_stats=norm_stats)
    want = _storage_run(base, model, x0, x1, x2, r1, r2)
    got = _storage_run(SparseConfig(tile_size=4, norm_stats=norm_stats, cache_device="cpu"), model, x0, x1, x2, r1, r2)
    for w, g in zip(want[:3], got[:3]):
        assert torch.equal(w, g)
    assert got[3] == want[3]


def test_low_precision_cache_halves_memory_within_rounding():
    model = _resnet(16, 4)
    x0, x1, x2, r1, r2 = _storage_inputs()
    want = _storage_run(SparseConfig(tile_size=4), model, x0, x1, x2, r1, r2)
    got = _storage_run(SparseConfig(tile_size=4, cache_dtype="bfloat16"), model, x0, x1, x2, r1, r2)
    assert got[3] < 0.6 * want[3]
    for w, g in zip(want[:3], got[:3]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2**-7, atol=2**-7 * w.abs().max().item())
        assert not torch.equal(g, w)  # the rounding is real: the option is an approximation
    assert torch.equal(got[1], got[2])  # an uncommitted edit leaves the stored cache as it was
    with pytest.raises(ValueError, match="cache_dtype"):
        SparseConfig(cache_dtype="int4")


class _SideInput(nn.Module):
    """A conv stack with a second spatial input added between its layers (as a ControlNet's residuals enter the
    UNet)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, side=None):
        h = torch.relu(self.conv1(x))
        if side is not None:
            h = h + side
        return self.conv3(torch.relu(self.conv2(h)))


@given(data=st.data())
def test_spatial_inputs_with_their_regions_stay_sparse_and_exact(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    h, w = data.draw(st.integers(12, 24), label="h"), data.draw(st.integers(12, 24), label="w")
    model = _SideInput().eval()
    x, side = torch.randn(1, 3, h, w), torch.randn(1, 6, h, w)
    a = data.draw(regions(1, h, w), label="image region")
    b = data.draw(regions(1, h, w), label="side region")
    x1 = edit_input(x, a, 1)
    side1 = torch.where(b[:, None], side + 1, side)
    with torch.no_grad():
        want = model(x1, side=side1)
    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=2, measured_fallback=False))
    try:
        with sparsedit.capturing(model, spatial_inputs=("side",)), torch.no_grad():
            model(x, side=side)
        with pytest.raises(ValueError, match="spatial inputs"):
            with sparsedit.editing(model, input_regions={"other": b}):
                pass
        with sparsedit.editing(model, region=a, input_regions={"side": b}), torch.no_grad():
            got = model(x1, side=side1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tagged = sparsedit.last_stats(model)["macs_sparse"]
        # Without its region the side input counts as changed everywhere: still exact, and no cheaper.
        with sparsedit.editing(model, region=a), torch.no_grad():
            got = model(x1, side=side1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert tagged <= sparsedit.last_stats(model)["macs_sparse"]
    finally:
        sparsedit.unsparsify_(model)


def test_output_regions_name_where_a_sparse_run_changed_its_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=2, measured_fallback=False))
    x = torch.randn(1, 3, 16, 16)
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[:, 5:7, 5:7] = True
    with sparsedit.capturing(model), torch.no_grad():
        y0 = model(x)
    with sparsedit.editing(model, region=region), torch.no_grad():
        y1 = model(edit_input(x, region, 0))
    changed = sparsedit.output_regions(model)
    assert changed.shape == (1, 16, 16) and changed.sum() == 36  # 2x2 grown by two 3x3 convolutions: 6x6
    assert not (y1 != y0).any(dim=1)[~changed].any()
    sparsedit.unsparsify_(model)
