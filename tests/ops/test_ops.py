"""The reference backend against per-tile slicing, the dispatcher's errors, and the torch.library registration."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedit import ops
from sparsedit.ops.reference import _unique_index, apply_activation


def _slow_gather(x, origins, tile, scale, shift, act):
    """One tile at a time from an explicitly zero-padded tensor: the equivalent PyTorch code of `gather`."""
    th, tw = tile
    pad = max(th, tw) + 8
    y = x
    if scale is not None:
        y = y * scale[:, :, None, None] + shift[:, :, None, None]
    y = F.pad(apply_activation(y, act, 0.2), (pad, pad, pad, pad))
    tiles = [y[b, :, i + pad : i + pad + th, j + pad : j + pad + tw] for b, i, j in origins.tolist()]
    return torch.stack(tiles) if tiles else y.new_zeros(0, x.shape[1], th, tw)


@given(data=st.data())
def test_gather_matches_slicing(data):
    b, c = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    h, w = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    th, tw = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    n = data.draw(st.integers(0, 6))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    x = torch.randn(b, c, h, w).to(dtype)
    origins = torch.tensor(
        [[data.draw(st.integers(0, b - 1)), data.draw(st.integers(-th, h)), data.draw(st.integers(-tw, w))]
         for _ in range(n)],
        dtype=torch.int64,
    ).reshape(n, 3)  # fmt: skip
    fused = data.draw(st.booleans())
    scale = torch.randn(b, c).to(dtype) if fused else None
    shift = torch.randn(b, c).to(dtype) if fused else None
    act = data.draw(st.sampled_from(ops.ACTIVATIONS))
    got = ops.gather(x, origins, (th, tw), scale, shift, act, negative_slope=0.2, poison=True)
    want = _slow_gather(x.float(), origins, (th, tw), None if scale is None else scale.float(),
                        None if shift is None else shift.float(), act)  # fmt: skip
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert not torch.isnan(got).any()


@given(data=st.data())
@settings(deadline=None)
def test_gather_of_overlapping_tiles_applies_the_prologue_once_per_pixel_with_the_same_bits(data):
    """Pixel tiles (3x3 windows around neighbouring pixels) take the path that runs the prologue on the distinct
    pixels; it must match the direct path (`poison=True` forces it) to the dtype's rounding: vectorised and scalar
    loops of an activation may differ in the last bit. Reused indices included."""
    b, c = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    h, w = data.draw(st.integers(3, 10)), data.draw(st.integers(3, 10))
    k = data.draw(st.sampled_from([2, 3, 5]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    picked = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b * h * w, max_size=b * h * w))).view(b, h, w)
    full = data.draw(st.booleans())
    if full:  # every pixel: the windows overlap k*k-fold, so the distinct-pixel path must be the one taken
        picked[:] = True
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    bi, yi, xi = picked.nonzero().unbind(1)
    origins = torch.stack([bi, yi - k // 2, xi - k // 2], 1)
    x = (
        torch.randn(b, c, h, w)
        .to(dtype)
        .contiguous(memory_format=data.draw(st.sampled_from([torch.contiguous_format, torch.channels_last])))
    )
    scale = torch.randn(b, c).to(dtype) if data.draw(st.booleans()) else None
    shift = torch.randn(b, c).to(dtype) if scale is None or data.draw(st.booleans()) else None
    act = data.draw(st.sampled_from(ops.ACTIVATIONS))
    weight = torch.rand(c).to(dtype) if act == "prelu" else None
    mode = data.draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    kw = {"negative_slope": 0.2, "weight": weight, "padding_mode": mode}
    want = ops.gather(x, origins, (k, k), scale, shift, act, poison=True, **kw)
    assert not full or _unique_index(origins, b, h, w, k, k, mode) is not None
    for _ in range(2):  # the second call reads the indices built by the first
        got = ops.gather(x, origins, (k, k), scale, shift, act, **kw)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps)


@given(data=st.data())
def test_scatter_writes_tiles_with_residual(data):
    b, c, h, w = 2, 3, data.draw(st.integers(4, 12)), data.draw(st.integers(4, 12))
    t = data.draw(st.integers(1, 4))
    ys = data.draw(st.lists(st.integers(0, h - t), min_size=1, max_size=4))
    xs = data.draw(st.lists(st.integers(0, w - t), min_size=len(ys), max_size=len(ys)))
    origins = torch.tensor([[i % b, y, x] for i, (y, x) in enumerate(zip(ys, xs))], dtype=torch.int64)
    out = torch.randn(b, c, h, w)
    residual = torch.randn(b, c, h, w)
    tiles = torch.randn(len(ys), c, t, t)
    tiles = torch.stack([tiles[0]] * len(ys))  # overlapping tiles must agree where they overlap
    want = out.clone()
    for (bi, y, x), tile in zip(origins.tolist(), tiles):
        want[bi, :, y : y + t, x : x + t] = tile + residual[bi, :, y : y + t, x : x + t]
    ops.scatter(out, tiles, origins, residual)
    assert torch.equal(out, want)


def test_tokens_roundtrip():
    x = torch.randn(2, 10, 4)
    index = torch.tensor([0, 3, 19], dtype=torch.int64)
    tok = ops.gather_tokens(x, index, poison=True)
    assert torch.equal(tok, x.reshape(-1, 4)[index])
    out = torch.zeros_like(x)
    res = torch.ones_like(x)
    ops.scatter_tokens(out, tok, index, res)
    assert torch.equal(out.reshape(-1, 4)[index], tok + 1)
    assert out.reshape(-1, 4)[1].abs().sum() == 0


def test_ops_pass_torch_library_checks():
    x = torch.randn(2, 3, 6, 7)
    origins = torch.tensor([[0, -1, -1], [1, 3, 4]], dtype=torch.int64)
    torch.library.opcheck(torch.ops.sparsedit.gather.default, (x, origins, 4, 4, None, None, "silu", 0.01, False))
    tiles = torch.randn(2, 3, 2, 2)
    out_origins = torch.tensor([[0, 0, 0], [1, 4, 5]], dtype=torch.int64)
    torch.library.opcheck(torch.ops.sparsedit.scatter.default, (x.clone(), tiles, out_origins, None))


def test_gather_compiles():
    x = torch.randn(1, 2, 8, 8)
    origins = torch.tensor([[0, -1, 2]], dtype=torch.int64)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, o):
        return ops.gather(x, o, (3, 3), activation="relu") * 2

    assert torch.equal(f(x, origins), ops.gather(x, origins, (3, 3), activation="relu") * 2)


def test_no_backend_error_lists_every_reason():
    x = torch.randn(1, 2, 4, 4, device="meta")
    with pytest.raises(ops.NoBackendError, match=r"reference: device meta not in"):
        ops.select_backend("gather", [x])


def test_bad_arguments_are_named():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="origins must be an int64"):
        ops.gather(x, torch.zeros(1, 3, dtype=torch.int32), (2, 2))
    with pytest.raises(ValueError, match="unknown activation"):
        ops.gather(x, torch.zeros(1, 3, dtype=torch.int64), (2, 2), activation="swish")
    with pytest.raises(ValueError, match=r"scale must have shape \[B, C\]"):
        ops.gather(x, torch.zeros(1, 3, dtype=torch.int64), (2, 2), scale=torch.ones(2))


@settings(max_examples=40)
@given(data=st.data())
def test_gather_padding_modes_match_f_pad(data):
    """Reflect, replicate and circular gathers read the pixels `F.pad` puts outside the image, activated like any."""
    b, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    h, w = data.draw(st.integers(2, 9)), data.draw(st.integers(2, 9))
    mode = data.draw(st.sampled_from(["reflect", "replicate", "circular"]))
    p = data.draw(st.integers(0, min(h, w) - 1 if mode == "reflect" else min(h, w)))
    th, tw = data.draw(st.integers(1, h + 2 * p)), data.draw(st.integers(1, w + 2 * p))
    n = data.draw(st.integers(0, 5))
    origins = torch.tensor(
        [[data.draw(st.integers(0, b - 1)), data.draw(st.integers(-p, h + p - th)),
          data.draw(st.integers(-p, w + p - tw))] for _ in range(n)],
        dtype=torch.int64,
    ).reshape(n, 3)  # fmt: skip
    x = torch.randn(b, c, h, w)
    weight = torch.randn(c)
    got = ops.gather(x, origins, (th, tw), activation="prelu", poison=True, weight=weight, padding_mode=mode)
    y = F.pad(F.prelu(x, weight), (p, p, p, p), mode=mode)
    want = [y[i, :, r + p : r + p + th, q + p : q + p + tw] for i, r, q in origins.tolist()]
    want = torch.stack(want) if want else x.new_zeros(0, c, th, tw)
    assert torch.equal(got, want)


def test_gather_activation_parameters():
    x = torch.randn(2, 3, 5, 5)
    origins = torch.tensor([[0, -1, -1], [1, 2, 3]], dtype=torch.int64)
    for act, params, fn in [
        ("elu", (0.3,), lambda t: F.elu(t, 0.3)),
        ("celu", (1.7,), lambda t: F.celu(t, 1.7)),
        ("hardtanh", (-0.2, 0.4), lambda t: F.hardtanh(t, -0.2, 0.4)),
        ("softplus", (2.0, 1.5), lambda t: F.softplus(t, 2.0, 1.5)),
    ]:
        got = ops.gather(x, origins, (3, 3), activation=act, params=params)
        want = _slow_gather(x, origins, (3, 3), None, None, "identity")
        inside = _slow_gather(torch.ones_like(x), origins, (3, 3), None, None, "identity") > 0
        torch.testing.assert_close(got, torch.where(inside, fn(want), 0.0), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(
        torch.ops.sparsedit.gather.default,
        (x, origins, 4, 4, None, None, "prelu", 0.01, False, [], torch.randn(3), "reflect"),
    )
    with pytest.raises(ValueError, match="unknown padding_mode"):
        ops.gather(x, origins, (2, 2), padding_mode="mirror")
    with pytest.raises(ValueError, match="PReLU's slope"):
        ops.gather(x, origins, (2, 2), activation="prelu", weight=torch.ones(2))
