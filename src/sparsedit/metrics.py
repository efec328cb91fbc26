"""Image fidelity metrics in plain PyTorch: PSNR and SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}.")
    if a.dim() != 4:
        raise ValueError(f"expected [B, C, H, W] images, got {a.dim()} dims.")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image `[B]`; `data_range` 2 for images in [-1, 1]. Identical images
    give `inf`."""
    _check(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean structural similarity per image `[B]` over channels, with a Gaussian window, on the valid region (no
    padding), as `skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)`."""
    _check(a, b)
    window = min(window, (min(a.shape[-2:]) - 1) // 2 * 2 + 1)  # small images: the largest odd window that fits
    a, b = a.double(), b.double()
    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    c = a.shape[1]
    kh = g.view(1, 1, -1, 1).expand(c, 1, window, 1)
    kw = g.view(1, 1, 1, -1).expand(c, 1, 1, window)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()
