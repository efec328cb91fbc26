"""Local layers an image-to-image model holds, sparse against dense: activations, pixel (un)shuffle, bilinear and
bicubic resampling, transposed convolutions, and convolutions with reflect/replicate/circular padding.

Exact mode must reproduce the dense output to float tolerance and keep every output the edit cannot reach
bit-identical to the capture; scratch is poisoned with NaN so a read of memory nothing wrote shows. Approximate mode
must run, stay free of NaN, and give every output either its new value or its captured one.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedit
from sparsedit import SparseConfig

from ..strategies import regions
from ..test_spatial import edit_input, influence


EXAMPLES = settings(max_examples=30)


def _tolerance(dtype, scale):
    if dtype == torch.float64:
        return 1e-10, 1e-10 * (1 + scale)
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
    assert stats["macs_sparse"] <= stats["macs_dense"]
    if not region.any():
        assert all(r["active_fraction"] == 0 for r in stats["layers"])
    return stats


def check_approximate(model, x, region, tile=4):
    """Approximate mode: runs, no NaN from poisoned scratch, and every output is its new or its captured value."""
    model = model.to(x.dtype).eval()
    x_edit = edit_input(x, region, seed=2)
    with torch.no_grad():
        dense_edit = model(x_edit)
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
    new = torch.isclose(out, dense_edit, rtol=rtol, atol=atol)
    old = torch.isclose(out, captured, rtol=rtol, atol=atol)
    assert bool((new | old).all()), "an output is neither its new nor its captured value"
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
