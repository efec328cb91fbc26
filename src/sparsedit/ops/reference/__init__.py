"""The plain-PyTorch reference backend: vectorised (no Python loop over tiles), every device and float dtype.

This is the oracle that every faster backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import Backend, register_backend


_ACTIVATIONS = {
    "identity": lambda x, slope: x,
    "silu": lambda x, slope: F.silu(x),
    "relu": lambda x, slope: F.relu(x),
    "gelu": lambda x, slope: F.gelu(x),
    "tanh": lambda x, slope: torch.tanh(x),
    "sigmoid": lambda x, slope: torch.sigmoid(x),
    "leaky_relu": lambda x, slope: F.leaky_relu(x, slope),
}

ACTIVATIONS = tuple(_ACTIVATIONS)


def apply_activation(x: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    return _ACTIVATIONS[activation](x, slope)


def _tile_grid(origins: torch.Tensor, th: int, tw: int):
    """Row and column indices `[N, th]`, `[N, tw]` of every tile pixel."""
    dev = origins.device
    rows = origins[:, 1:2] + torch.arange(th, device=dev)
    cols = origins[:, 2:3] + torch.arange(tw, device=dev)
    return rows, cols


def _pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """`[B*H*W, C]` rows of a `[B, C, H, W]` tensor (a view when it is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@register_backend
class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def gather(self, x, origins, th, tw, scale, shift, activation, slope, poison):
        b, c, h, w = x.shape
        n = origins.shape[0]
        rows, cols = _tile_grid(origins, th, tw)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        bidx = origins[:, 0]
        # Pixels as rows of C channels: free for channels-last tensors (the cache keeps them so), one copy otherwise.
        flat = _pixel_rows(x)
        lin = (bidx[:, None, None] * h + rows.clamp(0, h - 1)[:, :, None]) * w + cols.clamp(0, w - 1)[:, None, :]
        vals = flat.index_select(0, lin.reshape(-1)).view(n, th, tw, c)
        if scale is not None:
            vals = vals * scale[bidx][:, None, None, :].to(vals.dtype)
        if shift is not None:
            vals = vals + shift[bidx][:, None, None, :].to(vals.dtype)
        vals = apply_activation(vals, activation, slope)
        if poison:
            # Write the image pixels, then the zero padding: any pixel neither step wrote stays NaN.
            out = x.new_full((n, th, tw, c), float("nan"))
            out[inside] = vals[inside]
            out[~inside] = 0
            vals = out
        elif not bool(inside.all()):  # only tiles that reach past the border need their padding zeroed
            vals = vals.masked_fill(~inside[..., None], 0)
        return vals.permute(0, 3, 1, 2)  # [N, C, th, tw], channels-last in memory

    def scatter(self, out, tiles, origins, residual):
        b, c, h, w = out.shape
        n, _, th, tw = tiles.shape
        rows, cols = _tile_grid(origins, th, tw)
        lin = ((origins[:, 0][:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]).reshape(-1)
        vals = tiles.permute(0, 2, 3, 1).reshape(-1, c)
        if residual is not None:
            vals = vals + _pixel_rows(residual).index_select(0, lin)
        vals = vals.to(out.dtype)
        rows_view = out.permute(0, 2, 3, 1)
        if rows_view.is_contiguous():
            rows_view.view(-1, c).index_copy_(0, lin, vals)
        else:
            bi = origins[:, 0][:, None, None]
            out[bi, :, rows[:, :, None], cols[:, None, :]] = vals.view(n, th, tw, c)

    def gather_tokens(self, x, index, poison):
        vals = x.reshape(-1, x.shape[-1])[index]
        if not poison:
            return vals
        out = torch.full_like(vals, float("nan"))
        out.copy_(vals)
        return out

    def scatter_tokens(self, out, tokens, index, residual):
        flat = out.view(-1, out.shape[-1])
        vals = tokens if residual is None else tokens + residual.reshape(-1, residual.shape[-1])[index]
        flat[index] = vals.to(out.dtype)
