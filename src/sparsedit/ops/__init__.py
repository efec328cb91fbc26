"""Block-sparse primitives: gather tiles with a halo, scatter tiles back, and their token (B, L, C) forms.

Equivalent PyTorch code for `gather` (one tile; the backends do all tiles at once)::

    b, y, x0 = origin
    tile = zero_padded(x)[b, :, y : y + th, x0 : x0 + tw]         # zero outside the image
    tile = act(tile * scale[b, :, None, None] + shift[b, :, None, None])  # inside the image only

With `padding_mode` "reflect", "replicate" or "circular", pixels outside the image read the pixel `F.pad` would put
there (reflected, edge-replicated or wrapped around), scaled and activated like any other.

and for `scatter`::

    out[b, :, y : y + th, x0 : x0 + tw] = tile (+ residual[b, :, y : y + th, x0 : x0 + tw])
"""

from __future__ import annotations

import torch

from . import (
    cpu,  # noqa: F401  (registers the compiled CPU backend, tried first where it is built)
    reference,  # noqa: F401  (registers the reference backend)
    schemas,
)
from .dispatch import Backend, NoBackendError, backends, register_backend, select_backend, set_backend_enabled
from .reference import ACTIVATIONS, PADDING_MODES


__all__ = [
    "ACTIVATIONS",
    "PADDING_MODES",
    "Backend",
    "NoBackendError",
    "backends",
    "gather",
    "gather_tokens",
    "register_backend",
    "scatter",
    "scatter_tokens",
    "select_backend",
    "set_backend_enabled",
    "write_pixels",
]


def _eager() -> bool:
    """Outside `torch.compile` the ops call their backend directly: the `torch.library` wrapper (what a compiled graph
    traces) costs about 14 us per call, a few ms per UNet step."""
    return not torch.compiler.is_compiling()


def _check_origins(origins: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if origins.dtype != torch.int64 or origins.dim() != 2 or origins.shape[1] != 3:
        raise ValueError(f"{name}: origins must be an int64 tensor of shape [N, 3] (batch, y, x).")
    if origins.device != x.device:
        raise ValueError(f"{name}: origins on {origins.device} but the tensor is on {x.device}.")


def gather(
    x: torch.Tensor,
    origins: torch.Tensor,
    tile: tuple[int, int],
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.01,
    poison: bool = False,
    *,
    params: tuple[float, ...] = (),
    weight: torch.Tensor | None = None,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Gather tiles of `x` (`[B, C, H, W]`) with top-left corners `origins` (`[N, 3]`: batch, y, x; may be negative).

    Args:
        x: the feature map.
        origins: int64 `[N, 3]` tile corners, on `x`'s device.
        tile: `(th, tw)`.
        scale, shift: optional `[B, C]` per-sample, per-channel factors, applied before the activation.
        activation: one of `ops.ACTIVATIONS`.
        negative_slope: leaky_relu's slope (and PReLU's when `weight` is `None`).
        poison: fill the result with NaN first, so a pixel nothing writes shows.
        params: the activation's float parameters, in torch's order: elu/celu `(alpha,)`, hardtanh
            `(min_val, max_val)`, softplus `(beta, threshold)`; torch's defaults when absent.
        weight: PReLU's slope, `[C]` per channel or `[1]` shared.
        padding_mode: what pixels outside the image read: `"zeros"` (zero, after the activation, as a zero-padded
            convolution sees them), or the pixel `F.pad` puts there with `"reflect"`, `"replicate"`, `"circular"`.

    Returns:
        `[N, C, th, tw]` tiles: a new tensor (never a view of `x`), which callers may modify in place.
    """
    _check_origins(origins, x, "gather")
    if x.dim() != 4:
        raise ValueError(f"gather takes a [B, C, H, W] tensor, got shape {tuple(x.shape)}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"gather: unknown activation {activation!r}; supported: {ACTIVATIONS}.")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"gather: unknown padding_mode {padding_mode!r}; supported: {PADDING_MODES}.")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"gather: {name} must have shape [B, C] = {tuple(x.shape[:2])}, got {tuple(t.shape)}.")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] not in (1, x.shape[1])):
        raise ValueError(
            f"gather: weight (PReLU's slope) must have shape [{x.shape[1]}] or [1], got {tuple(weight.shape)}."
        )
    th, tw = tile
    if _eager():
        return select_backend("gather", [x])(
            x, origins, th, tw, scale, shift, activation, float(negative_slope), poison, tuple(params), weight,
            padding_mode,
        )  # fmt: skip
    return schemas.gather(
        x, origins, th, tw, scale, shift, activation, float(negative_slope), poison,
        [float(p) for p in params], weight, padding_mode,
    )  # fmt: skip


def scatter(
    out: torch.Tensor, tiles: torch.Tensor, origins: torch.Tensor, residual: torch.Tensor | None = None
) -> None:
    """Write `tiles` (`[N, C, th, tw]`) into `out` (`[B, C, H, W]`) at `origins`, in place; tiles must lie inside.

    With `residual` (shaped like `out`), writes `tiles + residual` at those positions (a fused residual add).
    Overlapping tiles must carry equal values where they overlap.
    """
    _check_origins(origins, out, "scatter")
    if tiles.dim() != 4 or tiles.shape[0] != origins.shape[0] or tiles.shape[1] != out.shape[1]:
        raise ValueError(
            f"scatter: tiles of shape {tuple(tiles.shape)} do not match {origins.shape[0]} origins and "
            f"{out.shape[1]} channels."
        )
    if residual is not None and residual.shape != out.shape:
        raise ValueError(f"scatter: residual must be shaped like out {tuple(out.shape)}, got {tuple(residual.shape)}.")
    if _eager():
        return select_backend("scatter", [out, tiles])(out, tiles, origins, residual)
    schemas.scatter(out, tiles, origins, residual)


def write_pixels(
    rows: torch.Tensor,
    tiles: torch.Tensor,
    at: torch.Tensor,
    lin: torch.Tensor,
    residual: torch.Tensor | None = None,
    keep_old: bool = False,
) -> torch.Tensor | None:
    """Write chosen pixels of `tiles` (`[N, C, th, tw]`) into pixel rows `rows` (`[..., P, C]`, contiguous), in place:
    `rows[lin[k]] = tiles_pixel[at[k]] (+ residual[lin[k]])`, where pixel `m` of the tiles is `(m // (th*tw),
    m % (th*tw) // tw, m % tw)` in `[N, th, tw]` order; `residual` (optional) is shaped like `rows`.

    With `keep_old`, returns the rows' previous values at `lin` (`[K, C]`, read before anything is written: write them
    back with `scatter_tokens` to undo); otherwise `None`. Exact mode's write of the tile pixels inside the region."""
    if at.dtype != torch.int64 or lin.dtype != torch.int64 or at.shape != lin.shape or at.dim() != 1:
        raise ValueError("write_pixels: at and lin must be int64 indices [K] of equal length.")
    if tiles.dim() != 4 or not rows.is_contiguous() or tiles.shape[1] != rows.shape[-1]:
        raise ValueError(
            f"write_pixels takes tiles [N, C, th, tw] and contiguous rows [..., P, C] with the same C; got "
            f"{tuple(tiles.shape)} and {tuple(rows.shape)}."
        )
    if residual is not None and residual.shape != rows.shape:
        raise ValueError(f"write_pixels: residual must be shaped like rows {tuple(rows.shape)}.")
    if _eager():
        return select_backend("write_pixels", [rows, tiles])(rows, tiles, at, lin, residual, keep_old)
    old = schemas.write_pixels(rows, tiles, at, lin, residual, keep_old)
    return old if keep_old else None


def gather_tokens(x: torch.Tensor, index: torch.Tensor, poison: bool = False) -> torch.Tensor:
    """Rows of `x` (`[B, L, C]`) at flat token indices `index` (`b * L + l`, int64 `[N]`). Returns `[N, C]`."""
    if x.dim() != 3 or index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError("gather_tokens takes x of shape [B, L, C] and an int64 index of shape [N].")
    if _eager():
        return select_backend("gather_tokens", [x])(x, index, poison)
    return schemas.gather_tokens(x, index, poison)


def scatter_tokens(
    out: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor, residual: torch.Tensor | None = None
) -> None:
    """Write `tokens` (`[N, C]`) into `out` (`[B, L, C]`, contiguous) at flat indices `index`, in place."""
    if out.dim() != 3 or not out.is_contiguous() or tokens.shape != (index.shape[0], out.shape[-1]):
        raise ValueError("scatter_tokens takes a contiguous out [B, L, C], tokens [N, C] and an index [N].")
    if _eager():
        return select_backend("scatter_tokens", [out, tokens])(out, tokens, index, residual)
    schemas.scatter_tokens(out, tokens, index, residual)
