"""Separable resampling (bilinear, bicubic, nearest, area) as per-axis taps: exact regions and sparse tiles.

`F.interpolate` in these modes computes every output row from a few input rows with fixed weights, and likewise for
columns. The taps are read from torch itself, once per shape: resampling a one-hot probe along one axis (the other
resampled from 2 pixels to 2, an identity) gives each output's weights exactly as the kernel computes them, and a NaN
probe gives the inputs each output reads (zero-weight taps included). So the region is the exact set of outputs whose
taps touch a changed input, on any device, without re-deriving torch's source-index arithmetic, and a tile of outputs
is computed from a window of the input that covers its taps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


__all__ = ["AxisTaps", "SEPARABLE_MODES", "axis_taps", "propagate_resample", "resample_tiles", "taps_for"]

SEPARABLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


@dataclass(frozen=True, eq=False)
class AxisTaps:
    """How one axis of a resampling reads its input.

    Attributes:
        reads: `[out, in]` float 0/1, which inputs each output reads.
        index: `[out, K]` int64, the inputs each output reads (the last one repeated, with weight 0, to fill K).
        weight: `[out, K]` weights, in the precision torch computes them (float64 for float64 maps, else float32).
    """

    reads: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    _windows: dict = field(default_factory=dict, repr=False)

    def window(self, t: int) -> tuple[torch.Tensor, int]:
        """For a tile of `t` outputs at each origin `o` in `[0, out - t]`: the first input it reads, and the length
        of an input window that covers the taps of any such tile."""
        if t not in self._windows:
            first, last = self.index[:, 0], self.index.max(dim=1).values
            start = first.unfold(0, t, 1).min(dim=1).values
            end = last.unfold(0, t, 1).max(dim=1).values
            self._windows[t] = (start, int((end - start).max()) + 1)
        return self._windows[t]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=128)
def axis_taps(
    n_in: int,
    n_out: int,
    mode: str,
    align_corners: bool | None,
    size: int | None,
    scale: float | None,
    recompute_scale_factor: bool | None,
    antialias: bool,
    device: str,
    dtype: torch.dtype,
) -> AxisTaps:
    """The taps of one axis of `F.interpolate(..., size or scale_factor, mode, align_corners, ...)` from `n_in` to
    `n_out` pixels (see the module docstring). `dtype` is the feature map's; weights come in its compute precision."""
    wdtype = _opmath(dtype)
    # The other axis has 2 pixels resampled to 2 (an identity in every mode; a size-1 axis trips the antialiased
    # kernels), and the probe is read at its first column.
    eye = torch.eye(n_in, dtype=wdtype, device=device).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2)
    kwargs = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs.update(align_corners=align_corners, antialias=antialias)
    if size is not None:
        kwargs["size"] = (size, 2)
    else:
        kwargs.update(scale_factor=(scale, 1.0), recompute_scale_factor=recompute_scale_factor)
    weights = F.interpolate(eye, **kwargs)[:, 0, :, 0].T  # [out, in]
    nan = F.interpolate(eye.masked_fill(eye > 0, float("nan")), **kwargs)[:, 0, :, 0].T
    if weights.shape[0] != n_out:
        raise ValueError(f"resampling {n_in} pixels gives {weights.shape[0]} along this axis, not {n_out}.")
    reads = torch.isnan(nan)
    count = reads.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError(f"interpolate(mode={mode!r}) has outputs that read no input; it cannot run sparse.")
    k = int(count.max())
    positions = torch.arange(n_in, device=device).expand(n_out, n_in)
    index = torch.where(reads, positions, n_in).sort(dim=1).values[:, :k]
    last = index.gather(1, (count - 1)[:, None])
    valid = index < n_in
    index = torch.where(valid, index, last)
    weight = torch.where(valid, weights.gather(1, index), 0)
    return AxisTaps(reads.to(torch.float32), index, weight)


def propagate_resample(region: torch.Tensor, ty: AxisTaps, tx: AxisTaps) -> torch.Tensor:
    """Outputs whose taps touch `region` (`[B, H, W]` bool): exact, as a 0/1 matmul along each axis."""
    r = region.to(torch.float32)
    return (ty.reads @ r @ tx.reads.T) > 0


def resample_tiles(x, origins, tile, ty: AxisTaps, tx: AxisTaps, gather) -> torch.Tensor:
    """Output tiles `[N, C, th, tw]` at `origins` (`[N, 3]`, inside the output) of the resampling of `x`.

    `gather(x, origins, tile)` reads input windows (with any fused prologue); each output tile reads one window that
    covers its taps, then applies the column weights and the row weights, in the weights' precision.
    """
    th, tw = tile
    sy, ly = ty.window(th)
    sx, lx = tx.window(tw)
    oy, ox = origins[:, 1], origins[:, 2]
    y0, x0 = sy[oy], sx[ox]
    window = gather(x, torch.stack([origins[:, 0], y0, x0], dim=1), (ly, lx))  # [N, C, ly, lx]
    dev = origins.device
    rows = oy[:, None] + torch.arange(th, device=dev)  # [N, th]
    cols = ox[:, None] + torch.arange(tw, device=dev)
    iy = ty.index[rows] - y0[:, None, None]  # [N, th, Ky], window-relative
    ix = tx.index[cols] - x0[:, None, None]  # [N, tw, Kx]
    n = torch.arange(origins.shape[0], device=dev)
    taps = window[n[:, None, None, None, None], :, iy[:, :, :, None, None], ix[:, None, None, :, :]]
    taps = taps.to(ty.weight.dtype)  # [N, th, Ky, tw, Kx, C]
    wy, wx = ty.weight[rows], tx.weight[cols]  # [N, th, Ky], [N, tw, Kx]
    along_x = (taps * wx[:, None, None, :, :, None]).sum(dim=4)  # [N, th, Ky, tw, C]
    out = (along_x * wy[:, :, :, None, None]).sum(dim=2)  # [N, th, tw, C]
    return out.permute(0, 3, 1, 2).to(x.dtype)


def _per_axis(v, axis: int):
    if v is None:
        return None
    return v[axis] if isinstance(v, (tuple, list)) else v


def taps_for(
    x: torch.Tensor,
    out_hw: tuple[int, int],
    mode: str,
    align_corners: bool | None = None,
    size=None,
    scale_factor=None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> tuple[AxisTaps, AxisTaps]:
    """Row and column taps of `F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor,
    antialias)` whose output is `out_hw` (cached per shape, mode, device and dtype)."""
    if mode not in SEPARABLE_MODES:
        raise ValueError(f"interpolate(mode={mode!r}) is not a separable 2D resampling; supported: {SEPARABLE_MODES}.")
    if mode in ("bilinear", "bicubic"):
        align_corners = bool(align_corners)
    else:
        align_corners, antialias = None, False
    dev, dt = str(x.device), x.dtype
    return tuple(
        axis_taps(
            int(x.shape[2 + a]),
            int(out_hw[a]),
            mode,
            align_corners,
            None if size is None else int(_per_axis(size, a)),
            None if scale_factor is None else float(_per_axis(scale_factor, a)),
            recompute_scale_factor,
            bool(antialias),
            dev,
            dt,
        )  # fmt: skip
        for a in (0, 1)
    )
