"""Edit regions: difference masks, dilation, per-resolution pyramids and block reduction.

A region is a boolean tensor of shape ``[B, H, W]`` at one resolution: ``True`` where the values may differ from the
captured run. A layer with geometry (kernel, stride, padding, dilation) maps an input region to the output positions
whose receptive field touches it (:func:`propagate`); :func:`block_index` reduces an output region to the origins of
the fixed-size tiles that cover it (SIGE's block gather, Li et al., NeurIPS 2022).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


__all__ = [
    "BlockIndex",
    "Geometry",
    "as_region",
    "check_region_type",
    "block_index",
    "change_mask",
    "difference_mask",
    "dilate",
    "to_latents",
    "to_pixels",
    "downsample_region",
    "mask_pyramid",
    "pyramid_level",
    "propagate",
    "repeat_region",
]


@dataclass(frozen=True)
class Geometry:
    """The spatial geometry of a sliding-window layer (square kernels; rectangular ones as (h, w) tuples)."""

    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, kernel=1, stride=1, padding=0, dilation=1) -> Geometry:
        pair = lambda v: (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # noqa: E731
        return cls(pair(kernel), pair(stride), pair(padding), pair(dilation))

    @property
    def reach(self) -> tuple[int, int]:
        """Extent of one output position's receptive field in input pixels, per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(
            (n + 2 * p - r) // s + 1 for n, p, r, s in zip((height, width), self.padding, self.reach, self.stride)
        )

    def input_tile(self, tile: tuple[int, int]) -> tuple[int, int]:
        """Input tile size (with halo) that an output tile of size `tile` reads."""
        return tuple((t - 1) * s + r for t, s, r in zip(tile, self.stride, self.reach))


def check_region_type(region, device=None) -> None:
    """Raise a descriptive error unless `region` is a bool tensor (on `device`, when given)."""
    if not isinstance(region, torch.Tensor):
        raise TypeError(f"region must be a torch.Tensor of dtype torch.bool, got {type(region).__name__}.")
    if region.dtype != torch.bool:
        raise TypeError(
            f"region must have dtype torch.bool, got {region.dtype}; pass e.g. `mask > 0.5` or "
            "`sparsedit.regions.difference_mask(original, edited)`."
        )
    if device is not None and region.device != torch.device(device):
        raise ValueError(
            f"region is on {region.device} but the model runs on {device}; move it with `region.to(...)`."
        )


def as_region(region: torch.Tensor, batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """Validate a user region and return it as a `[B, H, W]` bool tensor.

    Accepts `[H, W]` (broadcast over the batch) or `[B, H, W]`, boolean, on the same device as the input.
    """
    check_region_type(region, device)
    if region.dim() == 2:
        region = region.unsqueeze(0).expand(batch, -1, -1)
    if region.dim() != 3 or tuple(region.shape[1:]) != (height, width) or region.shape[0] not in (1, batch):
        raise ValueError(
            f"region has shape {tuple(region.shape)} but the input needs [{height}, {width}] or "
            f"[{batch}, {height}, {width}] (the input's own height and width)."
        )
    if region.shape[0] != batch:
        region = region.expand(batch, -1, -1)
    return region.contiguous()


def difference_mask(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Where two images or feature maps differ: `|a - b| > eps` in any channel.

    Args:
        a, b: tensors of shape `[B, C, H, W]`, `[C, H, W]` or `[H, W]`, any numeric dtype.
        eps: tolerance; `0` marks every bit-level change (`-0.0` against `0.0` included; a NaN against the same NaN
            is no change).

    Returns:
        A `[B, H, W]` bool tensor (`B = 1` for unbatched inputs).
    """
    if a.shape != b.shape:
        raise ValueError(f"difference_mask needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.dim() == 2:
        a, b = a[None, None], b[None, None]
    elif a.dim() == 3:
        a, b = a[None], b[None]
    elif a.dim() != 4:
        raise ValueError(f"difference_mask takes [B, C, H, W], [C, H, W] or [H, W] tensors, got {a.dim()} dims.")
    if eps == 0 and a.dtype == b.dtype and DIFF_KERNEL is not None:
        mask = DIFF_KERNEL(a, b)  # one compiled pass (ops.cpu), the same mask
        if mask is not None:
            return mask
    if eps == 0 and a.dtype == b.dtype and a.element_size() in _BITS:
        # Bit-level: one XOR of the raw words and two reductions over channels, about 5x faster than the arithmetic
        # below on a full feature map (this runs on every sparse forward's input). A word differs when its XOR is
        # nonzero: the max or the min over channels is then nonzero (a sign-bit-only change is negative).
        bits = _BITS[a.element_size()]
        x = a.view(bits) ^ b.view(bits)
        return (x.amax(dim=1) != 0) | (x.amin(dim=1) != 0)
    if not a.is_floating_point():
        a, b = a.float(), b.float()
    return ((a - b).abs() > eps).any(dim=1)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# `difference_mask(a, b, eps=0)` of 4-D maps in one compiled pass (`ops.cpu` registers it when built): `[B, H, W]` bool,
# or `None` where it cannot run (then the XOR and reductions above, the same mask).
DIFF_KERNEL = None


_LUMA = (0.299, 0.587, 0.114)


def change_mask(new: torch.Tensor, old: torch.Tensor, threshold: float, unit: float = 255.0, block: int = 8,
                differs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Where an image changed beyond re-encoding noise: `[B, H, W]` bool, for `[B, C, H, W]` images.

    A JPEG re-save or a float16 round trip moves single pixels by up to 30-80 (8-bit units) at edges, mostly in
    colour, but its errors average out over JPEG's 8x8 blocks; a stroke's do not. So an area counts as changed where
    the mean signed difference over a `block`x`block` window exceeds `threshold` in any channel, or where the
    luminance of a single pixel moved by more than `4 * threshold` (thin strokes); the change is every pixel within
    `block // 2` pixels of such an area that moved by more than `threshold`. `unit`: one 8-bit step in the images' scale
    (255 for [0, 1], 127.5 for [-1, 1]). `threshold=0`: every pixel that differs. `differs`: the caller's
    `difference_mask(new, old, eps=0)`, when it has it already.
    """
    if differs is None:
        differs = difference_mask(new, old, eps=0.0)
    if threshold <= 0 or not bool(differs.any()):
        return differs
    d = (new.float() - old.float()) * unit
    k = block
    mean = F.avg_pool2d(F.pad(d, (k // 2, k - 1 - k // 2, k // 2, k - 1 - k // 2), mode="replicate"), k, stride=1)
    area = mean.abs().amax(dim=1) > threshold
    if d.shape[1] == 3:
        luma = (d * torch.tensor(_LUMA, dtype=d.dtype, device=d.device).view(1, 3, 1, 1)).sum(dim=1)
        area |= luma.abs() > 4 * threshold
    else:
        area |= d.abs().amax(dim=1) > 4 * threshold
    return dilate(area, k // 2) & (d.abs().amax(dim=1) > threshold)


def to_latents(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A `[B, H, W]` region at image resolution on a coarser grid (latents, patches): a cell is in the region when any
    of its pixels is (max pooling), so the coarse region covers the fine one."""
    return F.adaptive_max_pool2d(region[:, None].float(), tuple(size))[:, 0] > 0


def to_pixels(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A `[B, h, w]` region on a coarse grid at image resolution: every pixel of a cell in the region (nearest)."""
    return F.interpolate(region[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0


def dilate(region: torch.Tensor, radius: int | tuple[int, int]) -> torch.Tensor:
    """Square (or rectangular) dilation of a `[B, H, W]` (or `[H, W]`) bool region by `radius` pixels."""
    ry, rx = (radius, radius) if isinstance(radius, int) else radius
    if ry == 0 and rx == 0:
        return region
    squeeze = region.dim() == 2
    r = region[None] if squeeze else region
    out = F.max_pool2d(r[:, None].to(torch.float32), (2 * ry + 1, 2 * rx + 1), stride=1, padding=(ry, rx))
    out = out[:, 0] > 0
    return out[0] if squeeze else out


def propagate(region: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Output positions of a sliding-window layer whose receptive field touches `region` (exact propagation)."""
    if geometry.kernel == (1, 1) and geometry.stride == (1, 1) and geometry.padding == (0, 0):
        return region
    b, h, w = region.shape
    oh, ow = geometry.output_size(h, w)
    out = region.new_zeros((b, oh, ow))
    rows, cols = region.any(dim=(0, 2)).nonzero(), region.any(dim=(0, 1)).nonzero()
    if rows.numel() == 0:
        return out
    # Work on the region's bounding box only: output rows [o0, o1) can see input rows [y0, y1].
    (sy, sx), (py, px), (ry, rx) = geometry.stride, geometry.padding, geometry.reach
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    o_y0, o_y1 = max(0, -(-(y0 + py - ry + 1) // sy)), min(oh, (y1 + py) // sy + 1)
    o_x0, o_x1 = max(0, -(-(x0 + px - rx + 1) // sx)), min(ow, (x1 + px) // sx + 1)
    if o_y0 >= o_y1 or o_x0 >= o_x1:  # the region falls between the strided windows
        return out
    # The input window those outputs read, clipped to the map; the part outside is zero padding (unchanged).
    i_y0, i_x0 = o_y0 * sy - py, o_x0 * sx - px
    i_y1, i_x1 = (o_y1 - 1) * sy - py + ry, (o_x1 - 1) * sx - px + rx
    crop = region[:, max(0, i_y0) : min(h, i_y1), max(0, i_x0) : min(w, i_x1)][:, None].to(torch.float32)
    crop = F.pad(crop, (max(0, -i_x0), max(0, i_x1 - w), max(0, -i_y0), max(0, i_y1 - h)))
    pooled = F.max_pool2d(crop, geometry.kernel, stride=geometry.stride, dilation=geometry.dilation)
    out[:, o_y0:o_y1, o_x0:o_x1] = pooled[:, 0] > 0
    return out


def repeat_region(region: torch.Tensor, sy: int, sx: int | None = None) -> torch.Tensor:
    """A `[B, H, W]` region after nearest upsampling by integer factors (each pixel becomes an `sy` x `sx` block)."""
    return region.repeat_interleave(sy, 1).repeat_interleave(sy if sx is None else sx, 2)


def downsample_region(region: torch.Tensor, size: tuple[int, int], threshold: float = 0.3) -> torch.Tensor:
    """Resample a `[B, H, W]` region to `size`: a pixel is active when its (antialiased) coverage exceeds `threshold`."""
    if tuple(region.shape[-2:]) == tuple(size):
        return region
    r = region[:, None].to(torch.float32)
    down = size[0] < region.shape[-2] or size[1] < region.shape[-1]
    out = F.interpolate(r, size=size, mode="bilinear", align_corners=False, antialias=down)
    if not down:
        return (out > 0)[:, 0]
    active = (out > threshold)[:, 0]
    # A small edit must not vanish at low resolution: a sample whose region thresholds away keeps every block the
    # region touches instead.
    lost = ~active.flatten(1).any(1) & region.flatten(1).any(1)
    if lost.any():
        touched = F.adaptive_max_pool2d(r, size)[:, 0] > 0
        active = torch.where(lost[:, None, None], touched, active)
    return active


def mask_pyramid(
    region: torch.Tensor,
    sizes: list[tuple[int, int]],
    threshold: float = 0.3,
    dilation: int = 1,
    input_dilation: int = 0,
) -> dict[tuple[int, int], torch.Tensor]:
    """One region per resolution, SIGE style: dilate at input resolution, resample, threshold, dilate again."""
    base = dilate(region, input_dilation)
    return {tuple(size): pyramid_level(base, size, threshold, dilation) for size in sizes}


def pyramid_level(base: torch.Tensor, size: tuple[int, int], threshold: float = 0.3, dilation: int = 1):
    """One level of `mask_pyramid` from the region already dilated at input resolution."""
    return dilate(downsample_region(base, size, threshold), dilation)


@dataclass(frozen=True)
class BlockIndex:
    """Active output tiles of one layer geometry.

    Attributes:
        origins: `[N, 3]` int64 tensor of (batch, y, x) top-left corners of the active output tiles. Tiles lie inside
            the output; the last tile of a row or column is shifted inwards (it may overlap its neighbour), so every
            tile has the full size `tile`.
        tile: output tile size (th, tw).
        out_shape: (B, H, W) of the output.
        geometry: the layer geometry the tiles are computed for.
    """

    origins: torch.Tensor
    tile: tuple[int, int]
    out_shape: tuple[int, int, int]
    geometry: Geometry

    @functools.cached_property
    def num_blocks(self) -> int:
        return int(self.origins.shape[0])

    @property
    def input_tile(self) -> tuple[int, int]:
        return self.geometry.input_tile(self.tile)

    @functools.cached_property
    def _input_origins(self) -> torch.Tensor:
        o = self.origins.clone()
        for axis in (0, 1):
            o[:, 1 + axis] = o[:, 1 + axis] * self.geometry.stride[axis] - self.geometry.padding[axis]
        return o

    def input_origins(self) -> torch.Tensor:
        """(batch, y, x) of each tile's input window, in input coordinates; negative where it reaches padding.
        Computed once per index (plans reuse indices across runs); do not modify it in place."""
        return self._input_origins

    @functools.cached_property
    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch `[N, 1, 1]`, row `[N, th, 1]` and column `[N, 1, tw]` indices of every tile pixel."""
        th, tw = self.tile
        rows = self.origins[:, 1:2] + torch.arange(th, device=self.origins.device)
        cols = self.origins[:, 2:3] + torch.arange(tw, device=self.origins.device)
        return self.origins[:, 0][:, None, None], rows[:, :, None], cols[:, None, :]

    def mask_tiles(self, region: torch.Tensor) -> torch.Tensor:
        """The output-resolution `region` (`[B, H, W]` bool) at each tile: `[N, 1, th, tw]`, reading only the tiles."""
        return region[self._grid][:, None]

    def inside_pixels(self, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tile pixels inside `region`: their flat index in the `[B, H, W]` map, and their position among the
        tiles' `N * th * tw` pixels (in `[N, th, tw]` order)."""
        _, h, w = region.shape
        b, rows, cols = self._grid
        at = self.mask_tiles(region).reshape(-1).nonzero().squeeze(1)
        return ((b * h + rows) * w + cols).reshape(-1).index_select(0, at), at

    def covered(self) -> torch.Tensor:
        """The output pixels the tiles compute, as a `[B, H, W]` bool map."""
        mask = torch.zeros(self.out_shape, dtype=torch.bool, device=self.origins.device)
        b, rows, cols = self._grid
        mask[b, rows, cols] = True
        return mask

    def reads(self, in_hw: tuple[int, int]) -> torch.Tensor:
        """The input pixels the tiles' input windows read (padding excluded), as a `[B, H_in, W_in]` bool map."""
        ih, iw = in_hw
        th, tw = self.input_tile
        o = self.input_origins()
        pad = th + tw + max(self.geometry.padding)  # windows start at -padding and end within padding of the border
        ar = lambda n: torch.arange(n, device=o.device)  # noqa: E731
        rows = (o[:, 1:2] + pad + ar(th))[:, :, None]
        cols = (o[:, 2:3] + pad + ar(tw))[:, None, :]
        mask = torch.zeros((self.out_shape[0], ih + 2 * pad, iw + 2 * pad), dtype=torch.bool, device=o.device)
        mask[o[:, 0][:, None, None], rows, cols] = True
        return mask[:, pad : pad + ih, pad : pad + iw].contiguous()

    @functools.cached_property
    def covered_fraction(self) -> float:
        """Fraction of output positions the tiles compute (counting overlaps once per tile: an upper bound)."""
        b, h, w = self.out_shape
        total = b * h * w
        return min(1.0, self.num_blocks * self.tile[0] * self.tile[1] / total) if total else 0.0


def block_index(
    region: torch.Tensor, geometry: Geometry, tile: int | tuple[int, int], clamp: bool = True
) -> BlockIndex:
    """Reduce an output-resolution region `[B, H, W]` to the tiles of size `tile` that cover it.

    With `clamp=False` the tiles form an exact partition of the grid and the last row/column of tiles may hang over
    the border (gathers read zeros there); with `clamp=True` they are shifted inwards to lie inside the map.
    """
    b, h, w = region.shape
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    th, tw = min(th, h), min(tw, w)
    ny, nx = -(-h // th), -(-w // tw)
    padded = F.pad(region, (0, nx * tw - w, 0, ny * th - h)) if (ny * th, nx * tw) != (h, w) else region
    active = padded.reshape(b, ny, th, nx, tw).any(dim=4).any(dim=2)
    idx = active.nonzero()
    origins = torch.empty_like(idx)
    origins[:, 0] = idx[:, 0]
    origins[:, 1] = idx[:, 1] * th
    origins[:, 2] = idx[:, 2] * tw
    if clamp:
        origins[:, 1].clamp_(max=h - th)
        origins[:, 2].clamp_(max=w - tw)
    return BlockIndex(origins, (th, tw), (b, h, w), geometry)
