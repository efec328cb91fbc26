"""Glue between sparse layers that is never computed at full size: nearest upsampling (diffusers' `Upsample2D`; the
next convolution's gather reads the source's tiles, `LazyUpsample`, `Prologue._gather_upsampled`) and `F.pad` from
Python (diffusers' `Downsample2D` pads right and bottom; a `LazyPad` the convolution reads through)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedit import ops
from sparsedit.nn.base import Prologue
from sparsedit.nn.virtual import LazyPad, LazyUpsample

from ..strategies import regions
from .test_local_layers import check_approximate, check_exact
from .test_thin import counting_built, counting_padded_copies


class UpConv(nn.Module):
    """conv -> BatchNorm -> SiLU -> nearest upsampling (as diffusers calls it) -> conv, all from Python."""

    def __init__(self, factor, by_size, k=3, stride=1, reflect=False, add=False, mode="nearest"):
        super().__init__()
        self.factor, self.by_size, self.add, self.mode = factor, by_size, add, mode
        self.conv_in = nn.Conv2d(2, 3, 3, padding=1)
        self.bn, self.act = nn.BatchNorm2d(3), nn.SiLU()
        self.conv = nn.Conv2d(3, 2, k, stride, padding=k // 2, padding_mode="reflect" if reflect else "zeros")
        self.bn.running_mean.normal_(0, 0.3)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.act(self.bn(self.conv_in(x)))
        if self.by_size:
            h = F.interpolate(h, size=(h.shape[-2] * self.factor, h.shape[-1] * self.factor), mode=self.mode)
        else:
            h = F.interpolate(h, scale_factor=float(self.factor), mode=self.mode)
        if self.add:
            h = h + 1  # a reader other than a gather: fills the map
        return self.conv(h)


def counting_upsampled_maps(made: list | None = None):
    """The upsampled maps a sparse run builds in full (and in `made`, every `LazyUpsample` it creates)."""
    return counting_built(LazyUpsample, made)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gather_through_an_upsampling_equals_gathering_the_upsampled_map(data):
    """The fast path against its reference: `ops.gather` of the map `F.interpolate` builds, with the same prologue,
    for tiles anywhere (also reaching past every border) and any alignment to the factor."""
    fy, fx = data.draw(st.sampled_from([(2, 2), (4, 4), (2, 4), (4, 2)]), label="factor")
    b, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    src = torch.randn(b, c, h, w, dtype=dtype)
    if data.draw(st.booleans(), label="channels_last"):
        src = src.contiguous(memory_format=torch.channels_last)
    th, tw = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    n = data.draw(st.integers(1, 6))
    ys = data.draw(st.lists(st.integers(-th, h * fy), min_size=n, max_size=n))
    xs = data.draw(st.lists(st.integers(-tw, w * fx), min_size=n, max_size=n))
    bs = data.draw(st.lists(st.integers(0, b - 1), min_size=n, max_size=n))
    origins = torch.tensor(list(zip(bs, ys, xs)), dtype=torch.int64)
    prologue = data.draw(st.sampled_from(["none", "affine+silu", "relu"]), label="prologue")
    if prologue == "none":
        p = Prologue()
    elif prologue == "relu":
        p = Prologue(activation="relu")
    else:
        p = Prologue(torch.rand(b, c) + 0.5, torch.randn(b, c), "silu")
    up = F.interpolate(src, scale_factor=(float(fy), float(fx)), mode="nearest")
    lazy = LazyUpsample.of(src, (fy, fx), {"scale_factor": (float(fy), float(fx)), "mode": "nearest"})
    got = p.gather(lazy, origins, (th, tw))
    assert not lazy.filled, "the upsampled map must not be built"
    want = ops.gather(up, origins, (th, tw), p.scale, p.shift, p.activation, p.slope)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    if p.activation == "identity":
        assert torch.equal(got, want)
    else:  # the same arithmetic per value; an activation's vector and scalar loops may differ in the last bit
        torch.testing.assert_close(got, want)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_an_upsampling_before_a_conv_is_read_through_exact(data):
    factor = data.draw(st.sampled_from([2, 4]))
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 6)), data.draw(st.integers(2, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    k, stride = data.draw(st.sampled_from([1, 3, 5])), data.draw(st.sampled_from([1, 1, 2]))
    model = UpConv(factor, data.draw(st.booleans(), label="by_size"), k, stride)
    x = torch.randn(b, 2, h, w, dtype=dtype)
    region = data.draw(regions(b, h, w), label="region")
    made = []
    with counting_upsampled_maps(made) as built:
        stats = check_exact(model, x, region, data.draw(st.sampled_from([1, 2, 4, 8])),
                            data.draw(st.sampled_from([0.6, 1.0])))  # fmt: skip
    if "conv" not in stats["dense_layers"]:  # (a conv that runs densely reads the whole map)
        assert built == [], "an upsampling read by a zero-padded conv must not be built"
    if region.any() and not stats.get("dense_run"):  # (an edit that changes nothing runs no layer)
        assert made == [(b, 3, h * factor, w * factor)]


def test_an_upsampling_read_otherwise_is_built_and_exact():
    """A reflect-padded conv, or any other torch function, reads the real upsampled map."""
    torch.manual_seed(0)
    region = torch.zeros(1, 6, 6, dtype=torch.bool)
    region[0, 1:3, 2:4] = True
    for model in (UpConv(2, False, reflect=True), UpConv(2, True, add=True)):
        with counting_upsampled_maps() as built:
            check_exact(model, torch.randn(1, 2, 6, 6), region, tile=2)
        assert built == [(1, 3, 12, 12)]


def test_other_factors_and_modes_run_as_called():
    """A factor that is not a power of two, or another mode, is not made lazy (and stays correct)."""
    torch.manual_seed(0)
    region = torch.zeros(1, 6, 6, dtype=torch.bool)
    region[0, 2, 3] = True
    made = []
    with counting_upsampled_maps(made):
        check_exact(UpConv(3, False), torch.randn(1, 2, 6, 6), region, tile=2)
        check_exact(UpConv(3, True), torch.randn(1, 2, 6, 6), region, tile=2)
        check_approximate(UpConv(2, True, mode="bilinear"), torch.randn(1, 2, 6, 6), region, tile=2)
    assert made == []


class PadConv(nn.Module):
    """conv -> BatchNorm -> SiLU -> `F.pad` from Python (as diffusers' `Downsample2D`) -> conv."""

    def __init__(self, pad, mode="constant", k=3, stride=2, padding=0):
        super().__init__()
        self.pad, self.mode = tuple(pad), mode
        self.conv_in = nn.Conv2d(2, 3, 3, padding=1)
        self.bn, self.act = nn.BatchNorm2d(3), nn.SiLU()
        self.conv = nn.Conv2d(3, 2, k, stride, padding=padding)
        self.bn.running_mean.normal_(0, 0.3)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.act(self.bn(self.conv_in(x)))
        h = F.pad(h, self.pad, mode=self.mode, value=0.0) if self.mode == "constant" else F.pad(h, self.pad, self.mode)
        return self.conv(h)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gather_through_a_zero_pad_equals_gathering_the_padded_map(data):
    """The read-through against its reference: `ops.gather` of `F.pad(prologue(source))`, any non-negative pads."""
    b, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    src = torch.randn(b, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    pad = tuple(data.draw(st.lists(st.integers(0, 3), min_size=4, max_size=4), label="pad"))
    inner = data.draw(st.sampled_from(["none", "affine+silu"]), label="pad's prologue")
    p = Prologue() if inner == "none" else Prologue(torch.rand(b, c) + 0.5, torch.randn(b, c), "silu")
    th, tw, n = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    hp, wp = h + pad[2] + pad[3], w + pad[0] + pad[1]
    ys = data.draw(st.lists(st.integers(-th, hp), min_size=n, max_size=n))
    xs = data.draw(st.lists(st.integers(-tw, wp), min_size=n, max_size=n))
    bs = data.draw(st.lists(st.integers(0, b - 1), min_size=n, max_size=n))
    origins = torch.tensor(list(zip(bs, ys, xs)), dtype=torch.int64)
    lazy = LazyPad.of(src, p, pad, "zeros")
    got = Prologue().gather(lazy, origins, (th, tw))
    assert not lazy.filled, "the padded map must not be built"
    want = ops.gather(F.pad(p.apply_dense(src), pad), origins, (th, tw))
    if p.activation == "identity":
        assert torch.equal(got, want)
    else:  # an activation's vector and scalar loops may differ in the last bit
        torch.testing.assert_close(got, want)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_python_pad_before_a_conv_is_read_through_exact(data):
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(3, 9)), data.draw(st.integers(3, 9))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    mode = data.draw(st.sampled_from(["constant", "reflect", "replicate"]), label="mode")
    if mode == "constant":
        pad = tuple(data.draw(st.lists(st.integers(0, 2), min_size=4, max_size=4), label="pad"))
        padding = data.draw(st.sampled_from([0, 1]), label="conv padding")
    else:  # symmetric, before a padding-free conv: folded into its gather (SIGE-style reflect)
        p = data.draw(st.integers(1, 2))
        pad, padding = (p, p, p, p), 0
    k, stride = data.draw(st.sampled_from([1, 3])), data.draw(st.sampled_from([1, 2]))
    model = PadConv(pad, mode, k, stride, padding)
    x = torch.randn(b, 2, h, w, dtype=dtype)
    region = data.draw(regions(b, h, w), label="region")
    with counting_padded_copies() as built:
        stats = check_exact(model, x, region, data.draw(st.sampled_from([1, 2, 4])),
                            data.draw(st.sampled_from([0.6, 1.0])))  # fmt: skip
    if "conv" not in stats["dense_layers"] and not stats.get("dense_run"):
        assert built == [], "a pad read by the conv after it must not be built"


def test_a_pad_read_otherwise_is_built_and_exact():
    """A reflect pad before a conv with padding of its own builds the padded map (and stays exact)."""
    torch.manual_seed(0)
    region = torch.zeros(1, 8, 8, dtype=torch.bool)
    region[0, 2:4, 3:5] = True
    with counting_padded_copies() as built:
        check_exact(PadConv((1, 1, 1, 1), "reflect", 3, 1, 1), torch.randn(1, 2, 8, 8), region, tile=2)
    assert built == [(1, 3, 10, 10)]
