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
        # Advanced indexing with the channel slice in the middle yields [N, th, tw, C].
        vals = x[bidx[:, None, None], :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
        vals = vals.permute(0, 3, 1, 2)
        if scale is not None:
            vals = vals * scale[bidx][:, :, None, None].to(vals.dtype)
        if shift is not None:
            vals = vals + shift[bidx][:, :, None, None].to(vals.dtype)
        vals = apply_activation(vals, activation, slope)
        out = x.new_full((n, c, th, tw), float("nan")) if poison else x.new_empty((n, c, th, tw))
        # Write the image pixels, then the zero padding: with poisoning, any pixel neither step wrote stays NaN.
        inside4 = inside[:, None].expand(n, c, th, tw)
        out[inside4] = vals[inside4]
        out[~inside4] = 0
        return out

    def scatter(self, out, tiles, origins, residual):
        n, c, th, tw = tiles.shape
        rows, cols = _tile_grid(origins, th, tw)
        index = (origins[:, 0][:, None, None], slice(None), rows[:, :, None], cols[:, None, :])
        vals = tiles.permute(0, 2, 3, 1)
        if residual is not None:
            vals = vals + residual[index]
        out[index] = vals.to(out.dtype)

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
