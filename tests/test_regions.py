import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparsedit.regions import (
    Geometry,
    as_region,
    block_index,
    difference_mask,
    dilate,
    downsample_region,
    mask_pyramid,
    propagate,
)

from .strategies import regions


def test_difference_mask_any_channel_and_batch():
    a = torch.zeros(2, 3, 5, 6)
    b = a.clone()
    b[1, 2, 4, 5] = 0.5
    b[0, 0, 0, 0] = 1e-9
    m = difference_mask(a, b, eps=1e-6)
    assert m.shape == (2, 5, 6) and m.sum() == 1 and m[1, 4, 5]
    assert difference_mask(a[0], b[0], eps=0).sum() == 1  # unbatched
    assert difference_mask(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 4, dtype=torch.uint8)).all()
    with pytest.raises(ValueError, match="one shape"):
        difference_mask(a, b[:1])


@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.bool]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_bit_level_difference_mask_matches_elementwise_inequality(dtype, channels_last, seed):
    # eps=0 compares raw words (XOR); the reference is plain elementwise `!=` on the same values, which differs
    # only at NaN (never generated here) and at -0.0 against 0.0, which the bit path calls a change.
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(2, 5, 6, 7, generator=g) * 3).to(dtype)
    b = a.clone()
    flat = b.view(-1)
    picks = torch.randint(0, flat.numel(), (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)
    for i in picks.tolist():
        flat[i] = (~flat[i]) if dtype == torch.bool else (-flat[i] if i % 2 else flat[i] + 1)
    if channels_last:
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    expected = (a != b).any(dim=1)
    if dtype.is_floating_point:
        expected |= ((a == 0) & (b == 0) & (torch.signbit(a) != torch.signbit(b))).any(dim=1)
    assert torch.equal(difference_mask(a, b, eps=0), expected)
    if dtype.is_floating_point:
        assert difference_mask(torch.tensor([0.0]).view(1, 1, 1), torch.tensor([-0.0]).view(1, 1, 1), eps=0).all()


def test_dilate_square():
    r = torch.zeros(1, 7, 7, dtype=torch.bool)
    r[0, 0, 6] = True
    d = dilate(r, 2)
    assert d.sum() == 9 and d[0, :3, 4:].all()
    assert torch.equal(dilate(r, 0), r)


@given(data=st.data())
def test_propagate_is_the_receptive_reach(data):
    """A conv with all-ones weights on the region indicator is nonzero exactly where the region reaches."""
    h, w = data.draw(st.integers(3, 15)), data.draw(st.integers(3, 15))
    k = data.draw(st.sampled_from([1, 2, 3, 5]))
    geo = Geometry.of(k, data.draw(st.sampled_from([1, 2, 3])), data.draw(st.integers(0, 3)),
                      data.draw(st.sampled_from([1, 2])))  # fmt: skip
    if min(geo.output_size(h, w)) < 1:
        return
    r = data.draw(regions(2, h, w))
    want = F.conv2d(r[:, None].float(), torch.ones(1, 1, k, k), stride=geo.stride, padding=geo.padding,
                    dilation=geo.dilation)[:, 0] > 0  # fmt: skip
    assert torch.equal(propagate(r, geo), want)


@given(data=st.data())
def test_block_index_covers_region_exactly_with_tiles(data):
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    r = data.draw(regions(b, h, w))
    t = data.draw(st.integers(1, 9))
    bi = block_index(r, Geometry(), t)
    covered = torch.zeros_like(r)
    th, tw = bi.tile
    for bb, y, x in bi.origins.tolist():
        assert 0 <= y <= h - th and 0 <= x <= w - tw  # tiles lie inside the map
        covered[bb, y : y + th, x : x + tw] = True
    assert not (r & ~covered).any()  # every region pixel is covered
    assert bi.num_blocks <= -(-h // th) * -(-w // tw) * b
    if not r.any():
        assert bi.num_blocks == 0


@given(data=st.data())
def test_block_index_covered_and_reads_match_a_per_tile_loop(data):
    """`covered()` is every pixel a tile computes; `reads(in_hw)` every input pixel a tile's window reads (padding
    excluded), for strided, padded and dilated geometries."""
    b, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    r = data.draw(regions(b, h, w))
    k, s, p, d = (data.draw(st.integers(lo, hi)) for lo, hi in ((1, 3), (1, 2), (0, 2), (1, 2)))
    geometry = Geometry.of(k, s, p, d)
    bi = block_index(r, geometry, data.draw(st.integers(1, 5)))
    in_hw = (
        (h - 1) * s + d * (k - 1) + 1 - 2 * p + data.draw(st.integers(0, s - 1)),
        (w - 1) * s + d * (k - 1) + 1 - 2 * p,
    )
    if min(in_hw) < 1:
        return
    covered = torch.zeros_like(r)
    reads = torch.zeros(b, *in_hw, dtype=torch.bool)
    th, tw = bi.tile
    ih, iw = bi.input_tile
    for (bb, y, x), (_, iy, ix) in zip(bi.origins.tolist(), bi.input_origins().tolist()):
        covered[bb, y : y + th, x : x + tw] = True
        reads[bb, max(iy, 0) : max(iy + ih, 0), max(ix, 0) : max(ix + iw, 0)] = True
    assert torch.equal(bi.covered(), covered)
    assert torch.equal(bi.reads(in_hw), reads)


def test_block_index_input_origins_include_halo():
    r = torch.zeros(1, 8, 8, dtype=torch.bool)
    r[0, 0, 0] = True
    bi = block_index(r, Geometry.of(3, 2, 1), 4)
    assert bi.origins.tolist() == [[0, 0, 0]]
    assert bi.input_origins().tolist() == [[0, -1, -1]]
    assert bi.input_tile == (9, 9)


def test_pyramid_never_loses_a_small_edit():
    r = torch.zeros(1, 64, 64, dtype=torch.bool)
    r[0, 10, 10] = True
    pyr = mask_pyramid(r, [(64, 64), (32, 32), (8, 8)], threshold=0.3, dilation=1)
    for size, m in pyr.items():
        assert m.shape[-2:] == size and m.any()
    assert not downsample_region(torch.zeros(1, 16, 16, dtype=torch.bool), (4, 4)).any()


def test_as_region_errors_say_what_to_do():
    with pytest.raises(TypeError, match="dtype torch.bool"):
        as_region(torch.zeros(4, 4), 1, 4, 4)
    with pytest.raises(ValueError, match=r"needs \[4, 4\]"):
        as_region(torch.zeros(5, 4, dtype=torch.bool), 1, 4, 4)
    assert as_region(torch.zeros(4, 4, dtype=torch.bool), 3, 4, 4).shape == (3, 4, 4)


def test_mask_tiles_reads_the_region_at_each_tile():
    r = torch.zeros(2, 9, 7, dtype=torch.bool)
    r[1, 8, 6] = True
    r[0, 0, 0] = True
    bi = block_index(r, Geometry(), 4)
    tiles = bi.mask_tiles(r)
    for (b, y, x), t in zip(bi.origins.tolist(), tiles):
        assert torch.equal(t[0], r[b, y : y + 4, x : x + 4])
