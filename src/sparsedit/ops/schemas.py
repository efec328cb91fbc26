"""Every sparsedit op schema and its fake (meta) implementation, in one place.

The ops are registered with `torch.library` so they trace under `torch.compile`; their real implementation asks the
dispatcher for the best backend that supports the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import select_backend


@torch.library.custom_op("sparsedit::gather", mutates_args=())
def gather(
    x: Tensor,
    origins: Tensor,
    th: int,
    tw: int,
    scale: Tensor | None,
    shift: Tensor | None,
    activation: str,
    slope: float,
    poison: bool,
    params: list[float] | None = None,
    weight: Tensor | None = None,
    padding_mode: str = "zeros",
) -> Tensor:
    return select_backend("gather", [x])(
        x, origins, th, tw, scale, shift, activation, slope, poison, tuple(params or ()), weight, padding_mode
    )


@gather.register_fake
def _(x, origins, th, tw, scale, shift, activation, slope, poison, params=None, weight=None, padding_mode="zeros"):
    # Backends return tiles channels-last (each pixel's channels contiguous), as convolution on CPU prefers.
    return x.new_empty((origins.shape[0], th, tw, x.shape[1])).permute(0, 3, 1, 2)


@torch.library.custom_op("sparsedit::scatter", mutates_args=("out",))
def scatter(out: Tensor, tiles: Tensor, origins: Tensor, residual: Tensor | None) -> None:
    select_backend("scatter", [out, tiles])(out, tiles, origins, residual)


@scatter.register_fake
def _(out, tiles, origins, residual):
    return None


@torch.library.custom_op("sparsedit::write_pixels", mutates_args=("rows",))
def write_pixels(
    rows: Tensor, tiles: Tensor, at: Tensor, lin: Tensor, residual: Tensor | None, keep_old: bool
) -> Tensor:
    old = select_backend("write_pixels", [rows, tiles])(rows, tiles, at, lin, residual, keep_old)
    return old if old is not None else rows.new_empty((0, rows.shape[-1]))


@write_pixels.register_fake
def _(rows, tiles, at, lin, residual, keep_old):
    return rows.new_empty((at.shape[0] if keep_old else 0, rows.shape[-1]))


@torch.library.custom_op("sparsedit::gather_tokens", mutates_args=())
def gather_tokens(x: Tensor, index: Tensor, poison: bool) -> Tensor:
    return select_backend("gather_tokens", [x])(x, index, poison)


@gather_tokens.register_fake
def _(x, index, poison):
    return x.new_empty((index.shape[0], x.shape[-1]))


@torch.library.custom_op("sparsedit::scatter_tokens", mutates_args=("out",))
def scatter_tokens(out: Tensor, tokens: Tensor, index: Tensor, residual: Tensor | None) -> None:
    select_backend("scatter_tokens", [out, tokens])(out, tokens, index, residual)


@scatter_tokens.register_fake
def _(out, tokens, index, residual):
    return None
