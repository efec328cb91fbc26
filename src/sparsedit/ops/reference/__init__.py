"""The plain-PyTorch reference backend: vectorised (no Python loop over tiles), every device and float dtype.

This is the oracle that every faster backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..dispatch import Backend, register_backend


def _param(params: tuple[float, ...], i: int, default: float) -> float:
    return params[i] if len(params) > i else default


def _prelu(x, slope, params, weight):
    if weight is None:  # a single slope given as a float
        return F.leaky_relu(x, slope)
    return F.prelu(x, weight.to(x.dtype))


# Every activation takes `(x, slope, params, weight)`: x is `[N, C, H, W]` (any memory layout), `slope` the float of
# leaky_relu, `params` the activation's float parameters (torch's defaults when absent), `weight` a per-channel `[C]`
# (or single `[1]`) tensor for PReLU.
_ACTIVATIONS = {
    "identity": lambda x, slope, params, weight: x,
    "silu": lambda x, slope, params, weight: F.silu(x),
    "relu": lambda x, slope, params, weight: F.relu(x),
    "gelu": lambda x, slope, params, weight: F.gelu(x),
    "gelu_tanh": lambda x, slope, params, weight: F.gelu(x, approximate="tanh"),
    "tanh": lambda x, slope, params, weight: torch.tanh(x),
    "sigmoid": lambda x, slope, params, weight: torch.sigmoid(x),
    "leaky_relu": lambda x, slope, params, weight: F.leaky_relu(x, slope),
    "prelu": _prelu,
    "elu": lambda x, slope, params, weight: F.elu(x, _param(params, 0, 1.0)),
    "selu": lambda x, slope, params, weight: F.selu(x),
    "celu": lambda x, slope, params, weight: F.celu(x, _param(params, 0, 1.0)),
    "hardswish": lambda x, slope, params, weight: F.hardswish(x),
    "hardsigmoid": lambda x, slope, params, weight: F.hardsigmoid(x),
    "hardtanh": lambda x, slope, params, weight: F.hardtanh(x, _param(params, 0, -1.0), _param(params, 1, 1.0)),
    "mish": lambda x, slope, params, weight: F.mish(x),
    "softplus": lambda x, slope, params, weight: F.softplus(x, _param(params, 0, 1.0), _param(params, 1, 20.0)),
}

# The same activations computed in place, for a tensor the caller owns (the gather's fresh tiles): the same bits, and
# no new tensor per step (allocating and first touching one costs more than the arithmetic on large gathers: a
# 40 MB gather with scale, shift and SiLU measured 90 ms out of place and 28 ms in place on 2 cores).
_INPLACE = {
    "identity": lambda x, slope, params, weight: x,
    "silu": lambda x, slope, params, weight: F.silu(x, inplace=True),
    "relu": lambda x, slope, params, weight: x.relu_(),
    "tanh": lambda x, slope, params, weight: x.tanh_(),
    "sigmoid": lambda x, slope, params, weight: x.sigmoid_(),
    "leaky_relu": lambda x, slope, params, weight: F.leaky_relu(x, slope, inplace=True),
    "elu": lambda x, slope, params, weight: F.elu(x, _param(params, 0, 1.0), inplace=True),
    "selu": lambda x, slope, params, weight: F.selu(x, inplace=True),
    "celu": lambda x, slope, params, weight: F.celu(x, _param(params, 0, 1.0), inplace=True),
    "hardswish": lambda x, slope, params, weight: F.hardswish(x, inplace=True),
    "hardsigmoid": lambda x, slope, params, weight: F.hardsigmoid(x, inplace=True),
    "hardtanh": lambda x, slope, params, weight: F.hardtanh(x, _param(params, 0, -1.0), _param(params, 1, 1.0), True),
    "mish": lambda x, slope, params, weight: F.mish(x, inplace=True),
}

ACTIVATIONS = tuple(_ACTIVATIONS)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def apply_activation(
    x: torch.Tensor,
    activation: str,
    slope: float = 0.01,
    params: tuple[float, ...] = (),
    weight: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Apply a named activation to a `[N, C, H, W]` tensor (`params` and `weight` as in `ops.gather`); with
    `inplace`, into `x` itself where torch has an in-place form (the result is returned either way)."""
    table = _INPLACE if inplace and activation in _INPLACE else _ACTIVATIONS
    return table[activation](x, slope, tuple(params), weight)


def map_index(i: torch.Tensor, n: int, padding_mode: str) -> torch.Tensor:
    """Map indices along an axis of length `n` (possibly outside `[0, n)`) to the pixel that padding mode reads.

    `"zeros"` clamps (the caller masks the outside to zero); `"reflect"` mirrors without repeating the edge pixel,
    `"replicate"` repeats the edge pixel and `"circular"` wraps around, as `F.pad` does.
    """
    if padding_mode == "reflect" and n > 1:
        period = 2 * (n - 1)
        i = i.abs().remainder(period)
        return torch.where(i >= n, period - i, i)
    if padding_mode == "circular":
        return i.remainder(n)
    return i.clamp(0, n - 1)


def _tile_grid(origins: torch.Tensor, th: int, tw: int):
    """Row and column indices `[N, th]`, `[N, tw]` of every tile pixel."""
    dev = origins.device
    rows = origins[:, 1:2] + torch.arange(th, device=dev)
    cols = origins[:, 2:3] + torch.arange(tw, device=dev)
    return rows, cols


_INDEX_MEMO: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _memo(origins: torch.Tensor, key: tuple, build):
    """A value derived from `origins` alone (and `key`), kept while `origins` lives and is unmodified: a plan holds
    its tile origins for a whole edit, so every step and layer reuses the indices."""
    entry = _INDEX_MEMO.get(origins)
    if entry is None or entry[0] != origins._version:
        entry = (origins._version, {})
        _INDEX_MEMO[origins] = entry
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


def _tile_index(origins, b, h, w, th, tw, padding_mode):
    """Flat pixel index `[N, th, tw]` of every tile pixel, and the mask of those inside the image (`None` when every
    tile pixel reads an image pixel: all inside, or a padding mode that maps the outside to image pixels)."""

    def build():
        rows, cols = _tile_grid(origins, th, tw)
        if padding_mode == "zeros":
            inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
            if bool(inside.all()):
                inside = None
        else:  # every tile pixel reads an image pixel (reflected, replicated or wrapped)
            inside = None
        rows, cols = map_index(rows, h, padding_mode), map_index(cols, w, padding_mode)
        lin = (origins[:, 0][:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]
        return lin, inside

    return _memo(origins, ("tiles", b, h, w, th, tw, padding_mode), build)


def _unique_index(origins, b, h, w, th, tw, padding_mode):
    """The distinct pixels the tiles read (sorted flat indices), each tile pixel's position among them (zero padding
    points one past the end), and where each sample's pixels start; `None` when the tiles overlap too little for
    the second indexing pass to pay (halo'd tiles of 8 px read each pixel about once)."""

    def build():
        lin, inside = _tile_index(origins, b, h, w, th, tw, padding_mode)
        uniq, inverse = torch.unique(lin.reshape(-1), sorted=True, return_inverse=True)
        if 2 * uniq.numel() > lin.numel():
            return None
        if inside is not None:
            inverse = inverse.masked_fill(~inside.reshape(-1), uniq.numel())
        bounds = torch.searchsorted(uniq, torch.arange(b + 1, device=uniq.device) * (h * w)).tolist()
        return uniq, inverse, bounds

    return _memo(origins, ("unique", b, h, w, th, tw, padding_mode), build)


def _pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """`[B*H*W, C]` rows of a `[B, C, H, W]` tensor (a view when it is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@register_backend
class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def gather(self, x, origins, th, tw, scale, shift, activation, slope, poison, params, weight, padding_mode):
        b, c, h, w = x.shape
        n = origins.shape[0]
        prologue = scale is not None or shift is not None or activation != "identity"
        if prologue and not poison and th * tw > 1 and n:
            uniq = _unique_index(origins, b, h, w, th, tw, padding_mode)
            if uniq is not None:
                return self._gather_unique(x, uniq, n, th, tw, scale, shift, activation, slope, params, weight)
        lin, inside = _tile_index(origins, b, h, w, th, tw, padding_mode)
        bidx = origins[:, 0]
        # Pixels as rows of C channels: free for channels-last tensors (the cache keeps them so), one copy otherwise.
        flat = _pixel_rows(x)
        vals = flat.index_select(0, lin.reshape(-1)).view(n, th, tw, c)  # fresh: the prologue works in place
        if scale is not None:
            vals.mul_(scale[bidx][:, None, None, :].to(vals.dtype))
        if shift is not None:
            vals.add_(shift[bidx][:, None, None, :].to(vals.dtype))
        # Activations see [N, C, th, tw] (a free permuted view; elementwise results keep its channels-last layout).
        vals = apply_activation(vals.permute(0, 3, 1, 2), activation, slope, params, weight, inplace=True)
        vals = vals.permute(0, 2, 3, 1)
        if poison:
            # Write the image pixels, then the zero padding: any pixel neither step wrote stays NaN.
            out = x.new_full((n, th, tw, c), float("nan"))
            if inside is None:
                out.copy_(vals)
            else:
                out[inside] = vals[inside]
                out[~inside] = 0
            vals = out
        elif inside is not None:  # tiles reaching past the border: zero their padding
            vals.masked_fill_(~inside[..., None], 0)
        return vals.permute(0, 3, 1, 2)  # [N, C, th, tw], channels-last in memory

    def _gather_unique(self, x, uniq, n, th, tw, scale, shift, activation, slope, params, weight):
        """`gather` with a prologue on tiles that overlap (pixel tiles read 3x3 windows around neighbouring pixels):
        the prologue runs once per distinct pixel read, then the tiles index the result. The same arithmetic per
        value as the direct path (an activation's vectorised and scalar loops may differ in the last bit); the index
        is built once per `origins` tensor (a plan holds it)."""
        b, c = x.shape[:2]
        uniq, inverse, bounds = uniq
        rows = _pixel_rows(x).index_select(0, uniq)
        parts = []
        for s in range(b):  # the distinct pixels are sorted by batch: one slice per sample
            part = rows[bounds[s] : bounds[s + 1]]
            if part.shape[0] == 0:
                continue
            if scale is not None:  # (rows is fresh from index_select: in place)
                part.mul_(scale[s].to(part.dtype))
            if shift is not None:
                part.add_(shift[s].to(part.dtype))
            parts.append(part)
        vals = torch.cat(parts) if len(parts) > 1 else parts[0]
        vals = apply_activation(vals.T[None, :, :, None], activation, slope, params, weight, inplace=True)[
            0, :, :, 0
        ].T
        vals = torch.cat([vals, vals.new_zeros(1, c)])  # the zero padding's row (index len(uniq))
        return vals.index_select(0, inverse).view(n, th, tw, c).permute(0, 3, 1, 2)

    def scatter(self, out, tiles, origins, residual):
        b, c, h, w = out.shape
        n, _, th, tw = tiles.shape

        lin = _tile_index(origins, b, h, w, th, tw, "zeros")[0].reshape(-1)  # tiles lie inside: nothing clamps
        vals = tiles.permute(0, 2, 3, 1).reshape(-1, c)
        if residual is not None:
            vals = vals + _pixel_rows(residual).index_select(0, lin)
        vals = vals.to(out.dtype)
        rows_view = out.permute(0, 2, 3, 1)
        if rows_view.is_contiguous():
            rows_view.view(-1, c).index_copy_(0, lin, vals)
        else:
            rows, cols = _tile_grid(origins, th, tw)
            bi = origins[:, 0][:, None, None]
            out[bi, :, rows[:, :, None], cols[:, None, :]] = vals.view(n, th, tw, c)

    def write_pixels(self, rows, tiles, at, lin, residual, keep_old):
        c = rows.shape[-1]
        flat = rows.view(-1, c)
        vals = tiles.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, at)
        if residual is not None:
            vals = vals + residual.reshape(-1, c).index_select(0, lin)
        old = flat.index_select(0, lin) if keep_old else None
        flat.index_copy_(0, lin, vals.to(rows.dtype))
        return old

    def gather_tokens(self, x, index, poison):
        vals = x.reshape(-1, x.shape[-1]).index_select(0, index)
        if not poison:
            return vals
        out = torch.full_like(vals, float("nan"))
        out.copy_(vals)
        return out

    def scatter_tokens(self, out, tokens, index, residual):
        flat = out.view(-1, out.shape[-1])
        vals = tokens if residual is None else tokens + residual.reshape(-1, residual.shape[-1]).index_select(0, index)
        flat.index_copy_(0, index, vals.to(out.dtype))
