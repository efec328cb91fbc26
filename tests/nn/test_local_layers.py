"""Local layers an image-to-image model holds, sparse against dense: activations, pixel (un)shuffle, bilinear and
bicubic resampling, transposed convolutions, and convolutions with reflect/replicate/circular padding.

Exact mode must reproduce the dense output to float tolerance and keep every output the edit cannot reach
bit-identical to the capture; scratch is poisoned with NaN so a read of memory nothing wrote shows. Approximate mode
must run, stay free of NaN, and give every output either its new value or its captured one.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sparsedit
from sparsedit import SparseConfig

from ..strategies import regions
from ..test_spatial import edit_input, influence


EXAMPLES = settings(max_examples=30)


def _tolerance(dtype, scale):
    if dtype == torch.float64:
        return 1e-10, 1e-10 * (1 + scale)
    if dtype == torch.float16:  # (CUDA runs: tests/test_cuda.py)
        return 2e-2, 2e-2 * (1 + scale)
    if dtype == torch.bfloat16:
        return 0.0, 6 * 2**-8 * (1 + scale)  # two bf16 ulps of the output scale per layer of depth, three layers
    return 1e-5, 1e-5 * (1 + scale)


def check_exact(model, x, region, tile=4, dense_threshold=0.6):
    """Sparse (exact, poisoned scratch) against dense; returns `last_stats` of the edit."""
    model = model.to(x.dtype).eval()
    with torch.no_grad():
        dense_orig = model(x)
    x_edit = edit_input(x, region, seed=1)
    with torch.no_grad():
        dense_edit = model(x_edit)
    reach = influence(model, x, region)
    cfg = SparseConfig(
        exact=True, tile_size=tile, poison_scratch=True, dense_threshold=dense_threshold, max_region_fraction=1.0
    )
    sparsedit.sparsify_(model, cfg)
    try:
        with sparsedit.capturing(model):
            captured = model(x)
        assert torch.equal(captured, dense_orig)
        with sparsedit.editing(model, region=region):
            out = model(x_edit)
        stats = sparsedit.last_stats(model)
    finally:
        sparsedit.unsparsify_(model)
    assert not torch.isnan(out).any()
    rtol, atol = _tolerance(x.dtype, dense_edit.abs().max().item())
    torch.testing.assert_close(out, dense_edit, rtol=rtol, atol=atol)
    outside = ~reach[:, None].expand_as(out)
    assert torch.equal(out[outside], captured[outside]), "outputs the edit cannot reach must be the capture's"
    if dense_threshold < 1:  # (always-sparse overlapping tiles may compute more than the dense map)
        assert stats["macs_sparse"] <= stats["macs_dense"]
    if not region.any():
        assert all(r["active_fraction"] == 0 for r in stats["layers"])
    return stats


def check_approximate(model, x, region, tile=4):
    """Approximate mode: runs, no NaN from poisoned scratch, every output the edit cannot reach keeps its captured
    value, and an edit of everything (or nothing) gives the dense result (or the capture)."""
    model = model.to(x.dtype).eval()
    x_edit = edit_input(x, region, seed=2)
    with torch.no_grad():
        dense_edit = model(x_edit)
    reach = influence(model, x, region)
    sparsedit.sparsify_(model, SparseConfig(tile_size=tile, poison_scratch=True, max_region_fraction=1.0))
    try:
        with sparsedit.capturing(model):
            captured = model(x)
        with sparsedit.editing(model, region=region):
            out = model(x_edit)
    finally:
        sparsedit.unsparsify_(model)
    assert not torch.isnan(out).any()
    rtol, atol = _tolerance(x.dtype, dense_edit.abs().max().item())
    far = ~reach[:, None].expand_as(out)
    torch.testing.assert_close(out[far], captured[far], rtol=rtol, atol=atol)
    if not region.any():
        assert torch.equal(out, captured)
    if region.all():
        torch.testing.assert_close(out, dense_edit, rtol=rtol, atol=atol)


# -- activations ------------------------------------------------------------------------------------------------------


@st.composite
def activations(draw, channels: int):
    kind = draw(
        st.sampled_from(
            ["prelu", "prelu1", "elu", "selu", "celu", "hardswish", "hardsigmoid", "hardtanh", "relu6", "mish"]
            + ["softplus", "gelu_tanh", "leaky_relu"]
        )
    )
    u = lambda lo, hi: draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))  # noqa: E731
    if kind in ("prelu", "prelu1"):
        m = nn.PReLU(channels if kind == "prelu" else 1)
        m.weight.data.uniform_(-1.5, 1.5)
        return m
    return {
        "elu": lambda: nn.ELU(u(0.2, 2.0)),
        "selu": nn.SELU,
        "celu": lambda: nn.CELU(u(0.2, 2.0)),
        "hardswish": nn.Hardswish,
        "hardsigmoid": nn.Hardsigmoid,
        "hardtanh": lambda: nn.Hardtanh(-u(0.1, 1.0), u(0.1, 1.0)),
        "relu6": nn.ReLU6,
        "mish": nn.Mish,
        "softplus": lambda: nn.Softplus(u(0.5, 3.0), u(0.5, 5.0)),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "leaky_relu": lambda: nn.LeakyReLU(u(0.01, 0.5)),
    }[kind]()


@EXAMPLES
@given(data=st.data())
def test_activations_exact(data):
    """Each activation folded into the next conv's gather, and alone after the last conv (its own sparse path)."""
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(4, 14)), data.draw(st.integers(4, 14))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        data.draw(activations(4), label="folded"),
        nn.Conv2d(4, 3, 3, padding=1),
        data.draw(activations(3), label="alone"),
    )
    region = data.draw(regions(b, h, w), label="region")
    stats = check_exact(model, 2 * torch.randn(b, 2, h, w, dtype=dtype), region, data.draw(st.sampled_from([2, 4])))
    kinds = [r["kind"] for r in stats["layers"]]
    assert kinds.count("activation") == 1, "the first activation folds into the second conv's gather"


@EXAMPLES
@given(data=st.data())
def test_activations_approximate(data):
    b, h, w = 1, data.draw(st.integers(6, 14)), data.draw(st.integers(6, 14))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), data.draw(activations(4)), nn.Conv2d(4, 3, 1), data.draw(activations(3))
    )
    check_approximate(model, 2 * torch.randn(b, 2, h, w), data.draw(regions(b, h, w)))


def test_activations_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 8, 3, padding=1), nn.Mish())
    model.append(nn.Conv2d(8, 3, 3, padding=1))
    region = torch.zeros(2, 16, 12, dtype=torch.bool)
    region[0, 3:6, 2:5] = True
    region[1, -2:, -3:] = True
    check_exact(model, torch.randn(2, 3, 16, 12, dtype=torch.bfloat16), region)


class FunctionalActs(nn.Module):
    """Activations called as functions between convs: `RegionTracking` must know them as pointwise."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 2, 3, padding=1)
        self.slope = nn.Parameter(torch.full((4,), 0.3))

    def forward(self, x):
        h = F.prelu(self.a(x), self.slope)
        h = F.elu(h, 0.7) + F.hardswish(h) + F.hardsigmoid(h) - F.selu(h) + F.celu(h, 1.3)
        h = F.softplus(F.mish(h), beta=2.0) + F.relu6(h) + F.hardtanh(h, -0.5, 0.5)
        h = self.b(h)
        return self.c(F.gelu(h, approximate="tanh"))


def test_functional_activations_are_tracked():
    torch.manual_seed(0)
    region = torch.zeros(1, 24, 24, dtype=torch.bool)
    region[0, 10:12, 4:6] = True
    stats = check_exact(FunctionalActs(), torch.randn(1, 2, 24, 24), region)
    assert stats["macs_sparse"] < 0.5 * stats["macs_dense"], "a functional activation lost the region"


# -- pixel shuffle ----------------------------------------------------------------------------------------------------


@settings(max_examples=20)
@given(data=st.data())
def test_pixel_shuffle_exact(data):
    """Sub-pixel upsampling and space-to-depth, with a BatchNorm+PReLU prologue fused into the shuffle's gather."""
    r = data.draw(st.sampled_from([2, 3]), label="factor")
    b, h, w = data.draw(st.integers(1, 2)), r * data.draw(st.integers(1, 6)), r * data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    bn = nn.BatchNorm2d(2 * r * r)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1),
        nn.PixelUnshuffle(r),
        nn.Conv2d(2 * r * r, 2 * r * r, 3, padding=1),
        bn,
        nn.PReLU(2 * r * r),
        nn.PixelShuffle(r),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.PixelUnshuffle(r),
    )
    region = data.draw(regions(b, h, w), label="region")
    check_exact(
        model,
        torch.randn(b, 3, h, w, dtype=dtype),
        region,
        tile=data.draw(st.sampled_from([r, 2 * r, 4])),
        dense_threshold=data.draw(st.sampled_from([0.6, 1.0])),
    )


@settings(max_examples=15)
@given(data=st.data())
def test_pixel_shuffle_approximate(data):
    r = 2
    h, w = r * data.draw(st.integers(3, 7)), r * data.draw(st.integers(3, 7))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = nn.Sequential(nn.Conv2d(3, 4 * r * r, 3, padding=1), nn.PixelShuffle(r), nn.Conv2d(4, 3, 3, padding=1))
    model.append(nn.PixelUnshuffle(r))
    check_approximate(model, torch.randn(1, 3, h, w), data.draw(regions(1, h, w)))


class FunctionalShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        return F.pixel_unshuffle(self.b(F.pixel_shuffle(self.a(x), 2)), 2)


def test_functional_pixel_shuffle_is_tracked():
    torch.manual_seed(0)
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, 3, 12] = True
    stats = check_exact(FunctionalShuffle(), torch.randn(1, 2, 16, 16), region)
    assert stats["layers"][-1]["active_fraction"] < 0.25


# -- bilinear, bicubic and other separable resampling -----------------------------------------------------------------


@st.composite
def resamplers(draw):
    mode = draw(st.sampled_from(["bilinear", "bilinear", "bicubic", "bicubic", "nearest", "nearest-exact", "area"]))
    kwargs = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs["align_corners"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["scale_factor"] = draw(st.sampled_from([2, 3, 1.5, 0.5, (2, 1.25), (0.75, 2)]))
    else:
        kwargs["size"] = (draw(st.integers(3, 20)), draw(st.integers(3, 20)))
    return kwargs


@EXAMPLES
@given(data=st.data())
def test_resampling_exact(data):
    """nn.Upsample in every separable mode (up or down, integer or not): exact region, tiles with torch's weights."""
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(3, 12)), data.draw(st.integers(3, 12))
    kwargs = data.draw(resamplers(), label="upsample")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.SiLU(), nn.Upsample(**kwargs), nn.Conv2d(3, 2, 3, padding=1)
    ).to(dtype)
    x = torch.randn(b, 2, h, w, dtype=dtype)
    with torch.no_grad():
        out_hw = model[:3](x).shape[-2:]
    assume(min(out_hw) > 0)
    region = data.draw(regions(b, h, w), label="region")
    check_exact(
        model,
        x,
        region,
        tile=data.draw(st.sampled_from([2, 3, 4, 8])),
        dense_threshold=data.draw(st.sampled_from([0.6, 1.0])),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_factor": 2, "mode": "nearest"},  # the integer copy path
        {"scale_factor": 2, "mode": "bilinear", "align_corners": False},
        {"scale_factor": 2, "mode": "bilinear", "align_corners": True},
        {"scale_factor": 3, "mode": "bicubic", "align_corners": False},
        {"size": (17, 9), "mode": "bicubic", "align_corners": True},
        {"scale_factor": 1.5, "mode": "nearest"},
    ],
)
def test_resampling_cases(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Upsample(**kwargs), nn.Conv2d(3, 2, 3, padding=1)
    )
    region = torch.zeros(2, 11, 10, dtype=torch.bool)
    region[0, 0, 4] = True
    region[1, 6:8, -2:] = True
    for threshold in (0.6, 1.0):
        stats = check_exact(model, torch.randn(2, 2, 11, 10), region, tile=4, dense_threshold=threshold)
        assert stats["macs_sparse"] < stats["macs_dense"]


@settings(max_examples=20)
@given(data=st.data())
def test_resampling_approximate(data):
    h, w = data.draw(st.integers(6, 12)), data.draw(st.integers(6, 12))
    kwargs = data.draw(resamplers())
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Upsample(**kwargs), nn.Conv2d(3, 2, 3, padding=1))
    x = torch.randn(1, 2, h, w)
    with torch.no_grad():
        assume(min(model[:2](x).shape[-2:]) > 0)
    check_approximate(model, x, data.draw(regions(1, h, w)))


def test_upsampling_bilinear2d_and_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.UpsamplingBilinear2d(scale_factor=2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Upsample(scale_factor=1.5, mode="bicubic"),
        nn.Conv2d(8, 3, 3, padding=1),
    )
    region = torch.zeros(2, 12, 10, dtype=torch.bool)
    region[0, 4:6, 2:5] = True
    region[1, -1, 0] = True
    stats = check_exact(model, torch.randn(2, 3, 12, 10, dtype=torch.bfloat16), region)
    assert stats["macs_sparse"] < 0.7 * stats["macs_dense"]


class FunctionalResample(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(F.interpolate(self.a(x), **self.kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_factor": 2, "mode": "bilinear", "align_corners": False},
        {"scale_factor": 1.7, "mode": "bicubic", "align_corners": True},
        {"size": (9, 13), "mode": "bicubic", "align_corners": False},
        {"size": (13, 12), "mode": "bilinear", "antialias": True},  # downsampling with antialiasing: wide taps
        {"scale_factor": 0.5, "mode": "area"},
    ],
)
def test_functional_interpolate_is_tracked(kwargs):
    torch.manual_seed(0)
    region = torch.zeros(1, 32, 32, dtype=torch.bool)
    region[0, 2:4, 25:27] = True
    stats = check_exact(FunctionalResample(**kwargs), torch.randn(1, 2, 32, 32), region)
    assert stats["layers"][-1]["active_fraction"] < 0.5, "F.interpolate lost the region"


# -- convolutions: padding modes, groups, dilation; transposed convolutions ------------------------------------------


@EXAMPLES
@given(data=st.data())
def test_conv_padding_modes_exact(data):
    """Reflect, replicate and circular padding: the halo reads mapped pixels and the region reaches through the
    padding (circular: from one edge to the opposite one)."""
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(3, 12)), data.draw(st.integers(3, 12))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    mode = data.draw(st.sampled_from(["reflect", "replicate", "circular"]), label="mode")
    k = data.draw(st.sampled_from([1, 3, 5]))
    dil = data.draw(st.sampled_from([1, 1, 2]))
    groups = data.draw(st.sampled_from([1, 2]))
    pad = data.draw(st.integers(1 if k > 1 else 0, min(dil * (k // 2) + 1, min(h, w) - 1)))
    stride = data.draw(st.sampled_from([1, 1, 2]))
    model = nn.Sequential(
        nn.Conv2d(2, 2 * groups, k, stride, pad, dil, groups, padding_mode=mode),
        nn.Tanh(),
        nn.Conv2d(2 * groups, 2, 3, 1, 1, padding_mode=data.draw(st.sampled_from(["reflect", "circular", "zeros"]))),
    ).to(dtype)
    x = torch.randn(b, 2, h, w, dtype=dtype)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        assume(False)  # the first conv shrinks this map below the second one's reflection padding
    region = data.draw(regions(b, h, w), label="region")
    tile = data.draw(st.sampled_from([1, 2, 4]))
    check_exact(model, x, region, tile, dense_threshold=data.draw(st.sampled_from([0.6, 1.0])))


def test_circular_padding_wraps_the_region():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[0, 8, 0] = True  # the left edge: its wrapped copy feeds the rightmost column
    check_exact(model, torch.randn(1, 2, 16, 16), region, tile=2)
    sparsedit.sparsify_(model, SparseConfig(exact=True))
    handler = sparsedit.nn.base.handler_of(model[0])
    out_region = handler.output_region(region, handler.geometry, (16, 16))
    sparsedit.unsparsify_(model)
    assert out_region[0, 7:10, 15].all() and out_region[0, 7:10, :2].all() and out_region.sum() == 9


@settings(max_examples=20)
@given(data=st.data())
def test_conv_padding_modes_approximate(data):
    h, w = data.draw(st.integers(6, 12)), data.draw(st.integers(6, 12))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    mode = data.draw(st.sampled_from(["reflect", "replicate", "circular"]))
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.ELU(), nn.Conv2d(3, 2, 5, 2, 2))
    check_approximate(model, torch.randn(1, 2, h, w), data.draw(regions(1, h, w)))


@EXAMPLES
@given(data=st.data())
def test_conv_transpose_exact(data):
    """Transposed convolutions with output_padding, groups and dilation, between grouped and dilated convs."""
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 9)), data.draw(st.integers(2, 9))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    k = data.draw(st.sampled_from([1, 2, 3, 4]))
    dil = data.draw(st.sampled_from([1, 1, 2]))
    stride = data.draw(st.integers(1, min(3, dil * (k - 1) + 1)))
    pad = data.draw(st.integers(0, dil * (k - 1)))
    out_pad = data.draw(st.integers(0, max(stride, dil) - 1))
    groups = data.draw(st.sampled_from([1, 2]))
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2),
        nn.ConvTranspose2d(4, 2 * groups, k, stride, pad, out_pad, groups, data.draw(st.booleans()), dil),
        nn.Hardswish(),
        nn.Conv2d(2 * groups, 2, 3, padding=1, groups=2),
    ).to(dtype)
    x = torch.randn(b, 2, h, w, dtype=dtype)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError:
        assume(False)
    region = data.draw(regions(b, h, w), label="region")
    check_exact(
        model,
        x,
        region,
        tile=data.draw(st.sampled_from([1, 2, 3, 4])),
        dense_threshold=data.draw(st.sampled_from([0.6, 1.0])),
    )


# -- everything together ----------------------------------------------------------------------------------------------


def _mixed_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
        nn.PReLU(8),
        nn.PixelUnshuffle(2),
        nn.Conv2d(32, 16, 3, padding=1, groups=4, padding_mode="circular"),
        nn.ELU(0.5),
        nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),
        nn.Hardswish(),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="replicate"),
        nn.Softplus(2.0, 3.0),
        nn.Upsample(size=(12, 14), mode="bicubic", align_corners=True),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.Mish(),
        nn.PixelShuffle(2),
        nn.Conv2d(3, 3, 1),
        nn.Hardtanh(-0.5, 0.5),
    )


@settings(max_examples=15)
@given(data=st.data())
def test_mixed_model_exact(data):
    b, h, w = data.draw(st.integers(1, 2)), 2 * data.draw(st.integers(3, 8)), 2 * data.draw(st.integers(3, 8))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    region = data.draw(regions(b, h, w), label="region")
    check_exact(
        _mixed_model(),
        torch.randn(b, 3, h, w),
        region,
        tile=data.draw(st.sampled_from([2, 4, 8])),
        dense_threshold=data.draw(st.sampled_from([0.6, 1.0])),
    )


@settings(max_examples=10)
@given(data=st.data())
def test_mixed_model_approximate(data):
    h, w = 2 * data.draw(st.integers(4, 8)), 2 * data.draw(st.integers(4, 8))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    check_approximate(_mixed_model(), torch.randn(1, 3, h, w), data.draw(regions(1, h, w)))


class FunctionalPad(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.b(F.pad(self.a(x), (1, 1, 1, 1), mode=self.mode))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_functional_pad_is_tracked(mode):
    torch.manual_seed(0)
    region = torch.zeros(1, 24, 24, dtype=torch.bool)
    region[0, 12, 0] = True  # at the left edge: circular padding carries it to the right edge
    stats = check_exact(FunctionalPad(mode), torch.randn(1, 2, 24, 24), region, tile=2)
    assert stats["layers"][-1]["active_fraction"] < 0.1
