"""The handler contract: how a torch module runs in capture, sparse and profile modes.

`sparsify_` attaches one handler per supported module by replacing the module's `forward` on the instance (removal
deletes it, restoring the class's method exactly). Handlers are found through a registry keyed by module type (looked
up along the MRO), never through an `isinstance` ladder: a new layer type registers its handler with
`@register_handler(ModuleType)`.

Sparse runs write into the cached output buffers in place, only on active tiles, and log the overwritten tiles so an
uncommitted edit can be rolled back; nothing is copied at full size per layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import ops
from ..regions import BlockIndex, Geometry
from .state import LayerRecord, Mode, SparseState
from .tracking import untracked
from .virtual import LazyConcat, LazyPad, LazyPointwise, LazyUpsample


__all__ = [
    "Prologue",
    "SparseHandler",
    "UnsupportedLayerError",
    "handler_for",
    "handler_of",
    "is_dense_safe",
    "register_dense_safe",
    "register_handler",
]


class UnsupportedLayerError(NotImplementedError):
    pass


_HANDLERS: dict[type, type[SparseHandler]] = {}
_DENSE_SAFE: set[type] = {nn.Linear, nn.Embedding, nn.LayerNorm, nn.ModuleList, nn.ModuleDict, nn.ParameterDict}


def register_dense_safe(*module_types: type) -> None:
    """Layers that only ever see non-spatial tensors (embeddings): they run densely and never trip `strict`.

    If one is fed spatial data anyway, its output carries no region and counts as changed everywhere: correct, slower.
    """
    _DENSE_SAFE.update(module_types)


def is_dense_safe(module: nn.Module) -> bool:
    return any(t in _DENSE_SAFE for t in type(module).__mro__)


def register_handler(*module_types: type):
    """Class decorator: `handler_cls` makes modules of these types (and their subclasses) sparse."""

    def wrap(handler_cls):
        for t in module_types:
            _HANDLERS[t] = handler_cls
        return handler_cls

    return wrap


def handler_of(module: nn.Module) -> SparseHandler | None:
    """The handler attached to `module` by `sparsify_`, if any."""
    return module.__dict__.get("_sparsedit_handler")


def handler_for(module: nn.Module) -> type[SparseHandler] | None:
    for t in type(module).__mro__:
        if t in _HANDLERS:
            return _HANDLERS[t]
    return None


@dataclass(frozen=True)
class Prologue:
    """A per-channel affine then an activation, applied to input tiles inside the gather (fused GroupNorm+SiLU).

    Attributes:
        scale, shift: `[B, C]` per-sample, per-channel affine (or `None`).
        activation: a name from `sparsedit.ops.ACTIVATIONS`.
        slope: leaky_relu's negative slope.
        params: the activation's other float parameters (ELU's alpha, Hardtanh's bounds, Softplus' beta and
            threshold), in torch's argument order.
        weight: PReLU's learnable slope, `[C]` or `[1]`.
    """

    scale: torch.Tensor | None = None  # [B, C]
    shift: torch.Tensor | None = None  # [B, C]
    activation: str = "identity"
    slope: float = 0.01
    params: tuple[float, ...] = ()
    weight: torch.Tensor | None = None  # [C] or [1]

    def then_affine(self, scale, shift) -> Prologue | None:
        if self.activation != "identity":
            return None  # affine after a nonlinearity does not fold into one scale/shift
        s0 = self.scale
        t0 = self.shift
        new_scale = scale if s0 is None else (s0 * scale if scale is not None else s0)
        if t0 is None:
            new_shift = shift
        else:
            new_shift = t0 * scale if scale is not None else t0
            new_shift = new_shift + shift if shift is not None else new_shift
        return Prologue(new_scale, new_shift)

    def then_activation(
        self, activation: str, slope: float = 0.01, params: tuple[float, ...] = (), weight=None
    ) -> Prologue | None:
        if activation == "identity":
            return self
        if self.activation != "identity":
            return None
        return Prologue(self.scale, self.shift, activation, slope, tuple(params), weight)

    def then(self, other: Prologue) -> Prologue | None:
        """This prologue followed by `other`, as one (`None` when an affine would follow a nonlinearity)."""
        if other is IDENTITY:
            return self
        p = self
        if other.scale is not None or other.shift is not None:
            p = p.then_affine(other.scale, other.shift)
            if p is None:
                return None
        return p.then_activation(other.activation, other.slope, other.params, other.weight)

    @staticmethod
    def unwrap(x: torch.Tensor, prologue: Prologue) -> tuple[torch.Tensor, Prologue]:
        """A deferred pointwise input (`LazyPointwise`) as its source and the prologue that makes it, folded in
        front of `prologue`; other inputs as they are."""
        if isinstance(x, LazyPointwise) and not x.filled:
            folded = x.prologue.then(prologue)
            if folded is not None:
                return x.source, folded
        return x, prologue

    def apply_dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale[:, :, None, None].to(x.dtype)
        if self.shift is not None:
            x = x + self.shift[:, :, None, None].to(x.dtype)
        return ops.reference.apply_activation(x, self.activation, self.slope, self.params, self.weight)

    def gather(self, x, origins, tile, poison=False, padding_mode="zeros"):
        if isinstance(x, LazyConcat) and not x.filled:  # a skip concatenation: read each part's tiles
            tiles, c0 = [], 0
            for part in x.parts:
                c1 = c0 + part.shape[1]
                tiles.append(self.channels(c0, c1).gather(part, origins, tile, poison, padding_mode))
                c0 = c1
            return torch.cat(tiles, dim=1)
        if isinstance(x, LazyUpsample) and not x.filled and padding_mode == "zeros":
            return self._gather_upsampled(x, origins, tile, poison)
        if (
            isinstance(x, LazyPad)
            and not x.filled
            and x.mode == "zeros"
            and padding_mode == "zeros"
            and self.scale is None
            and self.shift is None
            and self.activation == "identity"
        ):
            # A zero pad read by a zero-padded window with nothing applied after it: the padded map's pixel (y, x) is
            # the source's (y - top, x - left), zero outside it either way. (A prologue here would act on the zeros.)
            left, _, top, _ = x.pad
            shift = torch.tensor([0, top, left], dtype=origins.dtype, device=origins.device)
            return (x.prologue or IDENTITY).gather(x.source, origins - shift, tile, poison, "zeros")
        return ops.gather(
            x, origins, tile, self.scale, self.shift, self.activation, self.slope, poison,
            params=self.params, weight=self.weight, padding_mode=padding_mode,
        )  # fmt: skip

    def _gather_upsampled(self, x, origins, tile, poison):
        """Tiles of a nearest upsampling (`LazyUpsample`) from its source: the source tiles under them, gathered with
        this prologue (it commutes with repeating pixels; outside the map both read zeros), each pixel repeated."""
        (fy, fx), (th, tw) = x.factor, tile
        oy, ox = origins[:, 1], origins[:, 2]
        sy, sx = torch.div(oy, fy, rounding_mode="floor"), torch.div(ox, fx, rounding_mode="floor")
        # The tile starts (oy - sy * fy) < fy pixels into its first source pixel: ceil((fy - 1 + th) / fy) cover it.
        small = self.gather(
            x.source, torch.stack((origins[:, 0], sy, sx), 1), (-(-(fy - 1 + th) // fy), -(-(fx - 1 + tw) // fx)),
            poison, "zeros",
        )  # fmt: skip
        ar_y = torch.arange(th, device=origins.device)
        ar_x = torch.arange(tw, device=origins.device)
        iy = torch.div((oy - sy * fy)[:, None] + ar_y, fy, rounding_mode="floor")  # [N, th] rows of `small`
        ix = torch.div((ox - sx * fx)[:, None] + ar_x, fx, rounding_mode="floor")
        n = torch.arange(small.shape[0], device=origins.device)[:, None, None]
        rows = small.permute(0, 2, 3, 1)[n, iy[:, :, None], ix[:, None, :]]  # [N, th, tw, C], a new tensor
        return rows.permute(0, 3, 1, 2)  # channels-last in memory, as ops.gather returns tiles

    def channels(self, start: int, stop: int) -> Prologue:
        """This prologue restricted to channels `[start, stop)`."""
        pick = lambda t: None if t is None else t[:, start:stop]  # noqa: E731
        return dataclasses.replace(self, scale=pick(self.scale), shift=pick(self.shift))


IDENTITY = Prologue()


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """A channels-last `[B, C, H, W]` map as pixel rows `[1, B*H*W, C]` (a view), or `None` for other layouts."""
    v = t.permute(0, 2, 3, 1)
    return v.reshape(1, -1, t.shape[1]) if v.is_contiguous() else None


class SparseHandler:
    """Runs one module in the mode its `SparseState` says. Subclasses implement `sparse` (and may extend capture)."""

    kind = "layer"
    # In exact mode, any change of the input changes the whole output (a norm's statistics, attention over the map).
    covers_map = False
    pointwise = False  # folds into a consumer's gather as a Prologue
    consumes_prologue = False  # accepts a Prologue (a windowed or pointwise tile op)
    # `sparse` tags its output's region itself and calls no module whose glue needs region tracking: it runs with
    # the tracking mode popped (a leaf layer's own index and cache work went through the mode, 5-10 us a call).
    sets_own_region = False

    def __init__(self, module: nn.Module, name: str, state: SparseState):
        self.module = module
        self.name = name or type(module).__name__
        self.state = state
        self._own_forward = module.__dict__.get("forward")
        self.original = self._own_forward or type(module).forward.__get__(module)

    # -- attach / detach --------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Route the module's calls through `self.forward`. Plain torch modules get an instance-level `forward`;
        adapters may override this (diffusers modules attach through `diffusers.hooks`)."""
        self.module.forward = self.forward
        self.module._sparsedit_handler = self

    def detach(self) -> None:
        if self._own_forward is not None:
            self.module.forward = self._own_forward
        else:
            self.module.__dict__.pop("forward", None)
        self.module.__dict__.pop("_sparsedit_handler", None)

    def check_supported(self) -> None:
        """Raise `UnsupportedLayerError` if this configuration of the module cannot run sparse."""

    def prepare(self) -> None:
        """Called once after every handler is attached; containers plan their fusions here."""

    # -- modes ------------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        mode = self.state.mode
        if mode is None:
            return self.original(*args, **kwargs)
        if not (args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4):
            # A non-spatial call (an activation applied to a time embedding, say): dense, and nothing to cache.
            # It still takes its call index, so indices match between capture and sparse runs.
            self.state.key(self.name)
            return self.original(*args, **kwargs)
        if mode is Mode.SPARSE:
            if self.sets_own_region:
                with untracked():
                    return self.sparse(*args, **kwargs)
            return self.sparse(*args, **kwargs)
        out = self.original(*args, **kwargs)
        key = self.state.key(self.name)
        if mode is Mode.CAPTURE:
            self.capture(key, out, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            macs = self.macs_dense(out, *args)
            covers = mode is Mode.CAPTURE and self.covers_map
            self.state.record(LayerRecord(self.name, self.kind, tuple(out.shape[-2:]), macs, macs, 1.0,
                                          covers_map=covers))  # fmt: skip
        return out

    def capture(self, key, out, *args, **kwargs) -> None:
        if not self.state.no_store:
            self.state.cache.put(key, out=out)

    def sparse(self, *args, **kwargs):
        raise NotImplementedError

    # -- cost -------------------------------------------------------------------------------------------------------
    def macs_per_position(self, out: torch.Tensor) -> int:
        """Multiply-accumulates per output position (all channels)."""
        return 0

    def macs_dense(self, out: torch.Tensor, *args) -> int:
        return self.macs_per_position(out) * out.shape[0] * out.shape[-2] * out.shape[-1]

    # -- shared sparse machinery ------------------------------------------------------------------------------------
    def buffer(self, key) -> torch.Tensor:
        return self.state.cache.get(key)["out"]

    def tile_for(self, height: int, channels: int | None = None) -> int:
        return self.state.config.tile_for(height, channels)

    def tiles(self, region: torch.Tensor, geometry: Geometry, buf: torch.Tensor) -> BlockIndex:
        """The tiles `run_tiles` computes `region` of the output `buf` with (the plan's index, built once)."""
        return self.state.block_index(region, geometry, self.tile_for(buf.shape[-2], buf.shape[1]))

    def write(
        self,
        buf: torch.Tensor,
        bi: BlockIndex,
        new: torch.Tensor,
        region: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> None:
        """Write computed tiles into a cached buffer in place, logging what they overwrite.

        Exact mode keeps every position outside `region` bit-identical to the capture (tiles are blended with the
        old values); approximate mode writes whole tiles, with the residual add fused into the scatter.
        """
        st = self.state
        origins = bi.origins
        undo = st.needs_undo(buf)
        rows = _rows(buf) if st.config.exact else None
        if rows is not None:
            self._write_inside(rows, bi, new, region, residual, undo)
            return
        old = ops.gather(buf, origins, bi.tile) if undo or st.config.exact else None
        if undo:
            st.remember(lambda: ops.scatter(buf, old, origins))
        if st.config.exact:
            if residual is not None:
                new = new + ops.gather(residual, origins, bi.tile)
            inside = st.memo(("inside", id(bi), id(region)), (bi, region), lambda: bi.mask_tiles(region))
            ops.scatter(buf, torch.where(inside, new.to(buf.dtype), old), origins)
        else:
            ops.scatter(buf, new, origins, residual)

    def _write_inside(self, rows, bi, new, region, residual, undo) -> None:
        """Exact mode: write only the tile pixels inside `region` into the buffer's pixel rows `rows`, so the positions
        outside stay bit-identical without reading the old tiles back and blending them."""
        st = self.state
        lin, at = st.memo(("inside pixels", id(bi), id(region)), (bi, region), lambda: bi.inside_pixels(region))
        res = None
        if residual is not None:
            res = _rows(residual)
            if res is None:  # a residual in another layout: added to the tiles first (the same sum per pixel)
                new = new + ops.gather(residual, bi.origins, bi.tile)
        old = ops.write_pixels(rows, new, at, lin, res, keep_old=undo)
        if undo:
            st.remember(lambda: ops.scatter_tokens(rows, old, lin))

    def write_dense(self, buf, new, region, residual=None) -> torch.Tensor:
        """Dense fallback: the full map was computed; keep the cached values outside `region`. Returns the layer's
        output: `buf`, or, when every position changed in an uncommitted run, `new` itself (the cache is not touched,
        so there is nothing to copy and nothing to undo: dense work at the cost of dense work)."""
        st = self.state
        if residual is not None:
            new = new + residual
        if st.is_scratch(buf) and new.shape == buf.shape:
            return new  # nothing cached to keep: the whole fresh map is the output (valid everywhere)
        if st.all(region) and not st.commit and new.dtype == buf.dtype and new.shape == buf.shape:
            return new
        if st.needs_undo(buf):
            old = buf.clone()
            st.remember(lambda: buf.copy_(old))
        if st.all(region):
            buf.copy_(new)
        else:
            buf.copy_(torch.where(region[:, None], new.to(buf.dtype), buf))
        return buf

    def output_region(self, region_in: torch.Tensor, geometry: Geometry, out_hw) -> torch.Tensor:
        st = self.state
        if not st.any(region_in):
            return st.empty((region_in.shape[0], *out_hw), region_in.device)
        if st.config.exact:
            return st.propagate(region_in, geometry)
        if st.all(region_in):  # an untracked input: everything may have changed
            return st.full((region_in.shape[0], *out_hw), region_in.device)
        return st.pyramid(out_hw)

    def run_tiles(self, x, region_out, geometry, compute, compute_dense, buf, residual, prologue) -> torch.Tensor:
        """Compute `region_out` of this layer's output into `buf`: sparse tiles, or dense when tiles do not pay.

        `compute(x, bi, prologue)` returns the output tiles of `bi`; `compute_dense(x, prologue)` the full output.
        Returns the layer's output (`buf`, or a fresh map from `write_dense`), which the caller tags with its region.
        """
        with untracked():
            return self._run_tiles(x, region_out, geometry, compute, compute_dense, buf, residual, prologue)

    def _run_tiles(self, x, region_out, geometry, compute, compute_dense, buf, residual, prologue) -> torch.Tensor:
        st = self.state
        st.start_laps()
        out_hw = tuple(buf.shape[-2:])
        per_pos = self.macs_per_position(buf)
        dense_macs = per_pos * buf.shape[0] * out_hw[0] * out_hw[1]
        if not st.any(region_out):
            st.record(LayerRecord(self.name, self.kind, out_hw, dense_macs, 0, 0.0))
            return buf
        bi = self.tiles(region_out, geometry, buf)
        frac = bi.covered_fraction
        st.lap("plan")
        if frac > st.config.dense_threshold:
            new = compute_dense(x, prologue)
            st.lap("dense")
            out = self.write_dense(buf, new, region_out, residual)
            st.lap("scatter")
            st.record(LayerRecord(self.name, self.kind, out_hw, dense_macs, dense_macs, 1.0, "cost model"))
            return out
        new = compute(x, bi, prologue)
        st.lap("compute")
        self.write(buf, bi, new, region_out, residual)
        st.lap("scatter")
        sparse_macs = per_pos * bi.num_blocks * bi.tile[0] * bi.tile[1]
        st.record(LayerRecord(self.name, self.kind, out_hw, dense_macs, sparse_macs, frac))
        return buf
