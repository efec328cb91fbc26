"""The procedural scene dataset and the image metrics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedit.data import scenes
from sparsedit.metrics import psnr, ssim


def test_sample_shapes_ranges_and_classes():
    d = scenes.sample(48, 32, seed=3)
    img, lab = d["image"], d["labels"]
    assert img.shape == (48, 3, 32, 32) and img.dtype == torch.float32
    assert lab.shape == (48, 32, 32) and lab.dtype == torch.long
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.2
    assert set(lab.unique().tolist()) == set(range(scenes.NUM_CLASSES))  # every class shows up somewhere
    layouts = {scenes.describe(3, i)["layout"] for i in range(48)}
    assert len(layouts) >= 4  # varied layouts
    # Images follow their labels: each class's pixels have a colour of their own (sky bluer than grass, ...).
    mean = {c: img.permute(1, 0, 2, 3)[:, lab == c].mean(1) for c in (scenes.SKY, scenes.GRASS, scenes.WATER)}
    assert mean[scenes.SKY][2] > mean[scenes.GRASS][2] and mean[scenes.GRASS][1] > mean[scenes.GRASS][2]
    assert mean[scenes.WATER][2] > mean[scenes.WATER][0]


def test_deterministic_by_seed_and_index():
    a = scenes.sample(3, (24, 40), seed=11)
    b = scenes.sample(5, (24, 40), seed=11)
    assert torch.equal(a["image"], b["image"][:3]) and torch.equal(a["labels"], b["labels"][:3])
    c = scenes.sample(3, (24, 40), seed=12)
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 3, 24, 40)


def test_same_scene_at_any_resolution():
    """One seed describes one scene: the 128 px label map, sampled at the 64 px pixel centres, agrees with 64 px."""
    lo = scenes.sample(8, 64, seed=5)["labels"]
    hi = scenes.sample(8, 128, seed=5)["labels"]
    agree = (hi[:, 1::2, 1::2] == lo).float().mean()  # pixel centres differ by a quarter pixel: edges may flip
    assert agree > 0.93


def test_bad_sizes_and_helpers():
    with pytest.raises(ValueError, match="at least 8x8"):
        scenes.sample(2, 4)
    grid = scenes.grid(scenes.sample(3, 16)["image"], nrow=2, pad=1)
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3) and grid.dtype == torch.uint8
    rgb = scenes.to_rgb(torch.tensor([[0, 6]]))
    assert rgb.tolist() == [[scenes.PALETTE[0].tolist(), scenes.PALETTE[6].tolist()]]


@settings(max_examples=15, deadline=None)
@given(h=st.integers(11, 40), w=st.integers(11, 40), noise=st.floats(0.01, 0.5), seed=st.integers(0, 99))
def test_ssim_matches_scikit_image(h, w, noise, seed):
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    got = ssim(a, b)
    for i in range(2):
        want = metrics.structural_similarity(a[i].permute(1, 2, 0).numpy(), b[i].permute(1, 2, 0).numpy(),
                                             channel_axis=2, data_range=2, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False)  # fmt: skip
        assert abs(float(got[i]) - float(want)) < 1e-4
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    assert torch.allclose(psnr(a, b).double(), 10 * torch.log10(4 / mse), atol=1e-4)
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        psnr(a, b[:, :, 1:])
