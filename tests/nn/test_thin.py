"""Thin models written the way users write them (issue 39): explicit padding modules read through by the next
convolution (no padded copy of the map), and exact edits of models whose normalisation spans the map running as one
plain dense forward."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedit
from sparsedit import SparseConfig
from sparsedit.nn.virtual import LazyPad
from sparsedit.testing import UserResnetGenerator, UserSRNet

from ..strategies import regions
from .test_local_layers import check_approximate, check_exact


PADS = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d, "zeros": nn.ZeroPad2d}


class PadInForward(nn.Module):
    """A pad called from Python, between a norm+activation and a padding-free conv (no Sequential)."""

    def __init__(self, pad_cls, p, k):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(3), nn.LeakyReLU(0.1)
        self.pad, self.conv = pad_cls(p), nn.Conv2d(3, 4, k)
        self.bn.running_mean.normal_(0, 0.3)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.conv(self.pad(self.act(self.bn(x))))


@contextlib.contextmanager
def counting_built(lazy_cls, made: list | None = None):
    """The shapes of the `lazy_cls` maps (`nn/virtual.py`) a sparse run builds in full; `made`, when given, collects
    the shape of every one it creates."""
    calls = []
    real, real_of = lazy_cls.materialize, lazy_cls.of

    def counted(self):
        if not self.filled:
            calls.append(tuple(self.shape))
        real(self)

    def counted_of(*args):
        out = real_of(*args)
        if made is not None:
            made.append(tuple(out.shape))
        return out

    with mock.patch.object(lazy_cls, "materialize", counted), mock.patch.object(lazy_cls, "of", counted_of):
        yield calls


def counting_padded_copies():
    """Counts the padded maps a sparse run materializes (none, when every pad folds into its convolution)."""
    return counting_built(LazyPad)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_pad_modules_fold_into_the_conv_exact(data):
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(4, 12)), data.draw(st.integers(4, 12))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    mode = data.draw(st.sampled_from(sorted(PADS)), label="mode")
    k = data.draw(st.sampled_from([3, 5, 7]))
    p = data.draw(st.integers(1, min(k // 2, min(h, w) - 1)))
    stride = data.draw(st.sampled_from([1, 1, 2]))
    sequential = data.draw(st.booleans(), label="sequential")
    if sequential:
        bn = nn.BatchNorm2d(3)
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.ReLU(True), PADS[mode](p),
                              nn.Conv2d(3, 4, k, stride), nn.Tanh(), PADS[mode](1), nn.Conv2d(4, 2, 3))  # fmt: skip
        x = torch.randn(b, 2, h, w, dtype=dtype)
    else:
        model = PadInForward(PADS[mode], p, k)
        x = torch.randn(b, 3, h, w, dtype=dtype)
    region = data.draw(regions(b, h, w), label="region")
    with counting_padded_copies() as copies:
        check_exact(model, x, region, data.draw(st.sampled_from([1, 2, 4])), data.draw(st.sampled_from([0.6, 1.0])))
    assert copies == [], "a pad before a padding-free conv must not build the padded map"


def test_pad_before_a_padded_conv_is_filled():
    """A conv with padding of its own cannot read through the pad: the padded map is built, and the result is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReflectionPad2d(2), nn.Conv2d(3, 2, 3, padding=1))
    region = torch.zeros(1, 10, 10, dtype=torch.bool)
    region[0, 2:4, 6:9] = True
    with counting_padded_copies() as copies:
        check_exact(model, torch.randn(1, 2, 10, 10), region, tile=2)
    assert copies == [(1, 3, 14, 14)]


def test_user_resnet_generator_approximate_keeps_unreached_outputs():
    torch.manual_seed(0)
    region = torch.zeros(1, 32, 32, dtype=torch.bool)
    region[0, 5:9, 20:26] = True
    check_approximate(UserResnetGenerator(8, 2), torch.randn(1, 3, 32, 32), region)


def test_user_sr_net_exact():
    torch.manual_seed(0)
    region = torch.zeros(1, 24, 24, dtype=torch.bool)
    region[0, 3:6, 10:15] = True
    check_exact(UserSRNet(8, 3), torch.randn(1, 3, 24, 24), region, tile=4)


def test_exact_edit_of_a_model_with_global_norms_runs_one_dense_forward():
    """Exact mode: the InstanceNorm after the first convolution changes every later layer everywhere, so the edit
    runs as the plain model (same bits as dense), says why, and a committed edit refreshes the cache."""
    torch.manual_seed(0)
    model = UserResnetGenerator(8, 2).eval()
    x = torch.randn(1, 3, 32, 32)
    x1, x2 = x.clone(), x.clone()
    x1[..., 4:8, 4:8] = 1.0
    x2[..., 20:24, 10:12] = -1.0
    x2[..., 4:8, 4:8] = 1.0
    with torch.no_grad():
        dense1, dense2 = model(x1), model(x2)
    sparsedit.sparsify_(model, SparseConfig(exact=True, measured_fallback=False))
    try:
        with torch.no_grad():
            with sparsedit.capturing(model):
                model(x)
            with sparsedit.editing(model):
                out = model(x1)
                stats = sparsedit.last_stats(model)
            assert torch.equal(out, dense1)
            assert "whole map at model.2" in stats["dense_run"] and "exact=False" in stats["dense_run"]
            with sparsedit.editing(model, commit=True):
                model(x1)
            with sparsedit.editing(model):  # from the committed state: only the second square changed
                out = model(x2)
            assert torch.equal(out, dense2)
            with sparsedit.editing(model):  # nothing changed: no dense forward, the cached output
                same = model(x1)
                assert sparsedit.last_stats(model)["dense_run"] is None
            assert torch.equal(same, dense1)
    finally:
        sparsedit.unsparsify_(model)


def test_exact_global_norm_late_in_the_model_stays_sparse():
    """A GroupNorm near the output holds a small share of the MACs: the layers before it still run sparse."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())],
                          nn.GroupNorm(2, 8), nn.Conv2d(8, 3, 1)).eval()  # fmt: skip
    model[0] = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 32, 32)
    region = torch.zeros(1, 32, 32, dtype=torch.bool)
    region[0, 10:12, 10:12] = True
    stats = check_exact(model, x, region, tile=4)
    assert stats["dense_run"] is None
    assert stats["macs_sparse"] < 0.5 * stats["macs_dense"]


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_packed_weight_conv_matches_conv2d(data):
    """The prepacked-weight convolution of a few tiles (fewer input values than weights) against `F.conv2d`."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    groups = data.draw(st.sampled_from([1, 1, 2, 4]))
    cin, cout = groups * data.draw(st.integers(4, 24)), groups * data.draw(st.integers(4, 24))
    k, stride, dil = (
        data.draw(st.sampled_from([1, 3, 5])),
        data.draw(st.sampled_from([1, 2])),
        data.draw(st.sampled_from([1, 2])),
    )
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(cin, cout, k, stride, 0, dil, groups, bias=data.draw(st.booleans())).to(dtype).eval()
    reach = dil * (k - 1) + 1
    n = data.draw(st.integers(1, 3))
    tiles = torch.randn(n, cin, reach + stride * data.draw(st.integers(0, 3)), reach + stride, dtype=dtype)
    tiles = tiles.contiguous(memory_format=torch.channels_last)
    sparsedit.sparsify_(conv, SparseConfig())
    try:
        handler = sparsedit.nn.base.handler_of(conv)
        with torch.no_grad():
            expected = torch.nn.functional.conv2d(tiles, conv.weight, conv.bias, stride, 0, dil, groups)
            packed = handler.packed_weight(tiles)
            got = handler.apply(tiles)
            if conv.weight.numel() >= tiles.numel() and dtype == torch.float32:
                assert packed is not None  # (bfloat16 packing needs CPU features torch may not find: then plain)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol * (1 + expected.abs().max().item()))
            conv.weight.mul_(-1)  # a changed weight (same storage, new version) is packed again
            torch.testing.assert_close(handler.apply(tiles), -expected + (0 if conv.bias is None else 2 * conv.bias.view(1, -1, 1, 1)),
                                       rtol=tol, atol=tol * (1 + expected.abs().max().item()))  # fmt: skip
    finally:
        sparsedit.unsparsify_(conv)


@pytest.mark.timing
def test_the_calibration_waits_for_the_device_around_every_timed_forward():
    """On CUDA a forward returns when its kernels are queued: the calibration's clocks must be read after a
    synchronize, around the dense forward and around every probe (CPU-visible: the calls, on the input)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    sparsedit.sparsify_(model, SparseConfig())
    calls = []
    try:
        with mock.patch.object(sparsedit.spatial.hooks, "synchronize", side_effect=lambda t: calls.append(t.shape)):
            with torch.no_grad(), sparsedit.capturing(model):
                model(x)
        cal = sparsedit.calibration_of(model)
    finally:
        sparsedit.unsparsify_(model)
    assert cal is not None
    # Each dense forward (one or two) and each probe run: a synchronize before its clock starts and after it stops.
    assert len(calls) >= 2 * (1 + len(sparsedit.calibration.PROBE_FRACTIONS)) and len(calls) % 2 == 0
    assert all(shape == x.shape for shape in calls)


def _bn_resnet(ngf=8, blocks=2):
    model = UserResnetGenerator(ngf, blocks, norm=nn.BatchNorm2d).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_python_residual_add_is_fused_into_the_body(data):
    """`x + self.conv_block(x)` in a user's block: found, handled, the add written with the body's last layer (no
    full-size add between layers), exact, and the same in approximate mode where nothing is reached."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = _bn_resnet()
    sparsedit.sparsify_(model, SparseConfig())
    kinds = [h.kind for h in model._sparsedit.handlers]
    sparsedit.unsparsify_(model)
    assert kinds.count("residual") == 2
    size = 24
    region = data.draw(regions(1, size, size), label="region")
    full_adds = []
    real = sparsedit.nn.tracking.RegionTracking._pointwise

    def spy(self, out, inputs):
        full_adds.append(tuple(out.shape))
        return real(self, out, inputs)

    with mock.patch.object(sparsedit.nn.tracking.RegionTracking, "_pointwise", spy):
        check_exact(model, torch.randn(1, 3, size, size), region, tile=data.draw(st.sampled_from([1, 2, 4])))
        check_approximate(model, torch.randn(1, 3, size, size), region)
    assert (1, 32, size // 4, size // 4) not in full_adds, "the residual adds ran on the whole map"


def test_modules_that_are_not_a_plain_residual_are_left_alone():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + 0.5 * self.body(x)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.body(x) if x.shape[-1] > 2 else x

    from sparsedit.nn.blocks import residual_child

    class Named(nn.Module):  # pix2pix's own spelling
        def __init__(self):
            super().__init__()
            self.conv_block = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            """The block."""
            out = x + self.conv_block(x)  # add skip connections
            return out

    class Other(nn.Module):  # the sum of two children: not this pattern
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    assert residual_child(Scaled()) is None and residual_child(Branchy()) is None and residual_child(Other()) is None
    assert residual_child(sparsedit.testing.UserResnetBlock(4)) == "conv_block"
    assert residual_child(Named()) == "conv_block"
    torch.manual_seed(0)
    region = torch.zeros(1, 12, 12, dtype=torch.bool)
    region[0, 3:5, 6:9] = True
    check_exact(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Scaled(), nn.Conv2d(4, 3, 1)), torch.randn(1, 3, 12, 12), region
    )


def test_a_residual_whose_body_cannot_take_the_add_runs_its_own_forward():
    class AroundResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = sparsedit.nn.ResBlock(4, 4, groups=2)

        def forward(self, x):
            return x + self.body(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), AroundResBlock(), nn.Conv2d(4, 3, 1))
    sparsedit.sparsify_(model, SparseConfig())
    residual = sparsedit.nn.base.handler_of(model[1])
    assert residual is not None and not residual.fused
    sparsedit.unsparsify_(model)
    region = torch.zeros(1, 12, 12, dtype=torch.bool)
    region[0, 3:5, 6:9] = True
    check_approximate(model, torch.randn(1, 3, 12, 12), region)


def test_profiling_a_model_with_a_python_residual_counts_its_layers():
    torch.manual_seed(0)
    model = _bn_resnet()
    sparsedit.sparsify_(model, SparseConfig())
    try:
        with torch.no_grad(), sparsedit.profiling(model):
            out = model(torch.randn(1, 3, 24, 24))
        stats = sparsedit.last_stats(model)
    finally:
        sparsedit.unsparsify_(model)
    assert out.shape == (1, 3, 24, 24) and stats["macs_dense"] > 0
