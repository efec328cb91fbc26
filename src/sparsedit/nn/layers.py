"""Handlers for torch's own layers: convolution, pooling, normalisation, activations, nearest upsampling."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import NormStats
from ..regions import Geometry, block_index, propagate
from .base import IDENTITY, Prologue, SparseHandler, UnsupportedLayerError, register_handler
from .resample import SEPARABLE_MODES, propagate_resample, resample_tiles, taps_for
from .state import LayerRecord
from .tracking import padded_region, untracked
from .virtual import LazyPad, LazyPointwise, _plain


__all__ = [
    "ActivationHandler",
    "BatchNormHandler",
    "ConvHandler",
    "ConvTransposeHandler",
    "GroupNormHandler",
    "InstanceNormHandler",
    "PadHandler",
    "PixelShuffleHandler",
    "PixelUnshuffleHandler",
    "PoolHandler",
    "UpsampleHandler",
    "group_stats",
]

_POINT = Geometry()


def group_stats(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and 1/std of a `[B, C, ...]` tensor, in float32, as GroupNorm computes them."""
    var, mean = torch.var_mean(x.detach().reshape(x.shape[0], num_groups, -1).float(), dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


class WindowedHandler(SparseHandler):
    """A sliding-window layer: output tiles read input tiles with a halo, computed with padding 0."""

    consumes_prologue = True
    sets_own_region = True
    geometry: Geometry
    padding_mode = "zeros"  # what the halo reads past the border: see `ops.gather`

    def apply(self, tiles: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, x, bi, prologue: Prologue):
        poison = self.state.config.poison_scratch
        self.state.complete(x, bi)  # a map computed on demand: its pixels under these windows first
        tiles = prologue.gather(x, bi.input_origins(), bi.input_tile, poison, self.padding_mode)
        self.state.lap("gather")
        return self.apply(tiles)

    def compute_dense(self, x, prologue: Prologue):
        self.state.complete(x)
        return self.apply_dense(x if prologue is IDENTITY else prologue.apply_dense(x))

    def fill(self, x, prologue: Prologue, out: torch.Tensor, missing: torch.Tensor | None) -> None:
        """Write this layer's output at the `missing` output pixels (`None`: all) into `out`, one receptive field per
        pixel (pixel tiles: a GEMM for a convolution). The `fill` of `SparseState.partial`."""
        st = self.state
        x, prologue = Prologue.unwrap(x, prologue)
        if missing is None:
            out.copy_(self.compute_dense(x, prologue))
            return
        bi = st.block_index(missing, self.geometry, 1)
        ops.scatter(out, self.compute(x, bi, prologue).to(out.dtype), bi.origins)
        # Its MACs count (its time is the consumer's, whose call this runs in); no dense MACs: the layer has its own.
        macs = self.macs_per_position(out) * bi.num_blocks
        frac = bi.num_blocks / max(1, math.prod(missing.shape))
        st.records.append(LayerRecord(f"{self.name} (halo)", self.kind, tuple(out.shape[-2:]), 0, macs, frac))

    def sparse(self, x, prologue: Prologue = IDENTITY, residual: torch.Tensor | None = None, into=None):
        st = self.state
        key = st.key(self.name)
        buf = into if into is not None else self.buffer(key)
        x, prologue = Prologue.unwrap(x, prologue)  # a deferred norm/activation: read its input's tiles
        region = self.output_region(st.region_of(x), self.geometry, tuple(buf.shape[-2:]))
        if residual is not None:
            region = st.union(region, st.region_of(residual))
        out = self.run_tiles(x, region, self.geometry, self.compute, self.compute_dense, buf, residual, prologue)
        st.set_region(out, region)
        return out


_PAD_MODES = ("zeros", "reflect", "replicate", "circular")
PACK_WEIGHTS = True  # `ConvHandler.packed_weight` (off: always `F.conv2d`; for A/B measurements)


@register_handler(nn.Conv2d)
class ConvHandler(WindowedHandler):
    """Conv2d, any groups, stride and dilation. With `padding_mode` reflect, replicate or circular the halo of a tile
    at the border reads the reflected, replicated or wrapped-around pixels (an index mapping in the gather, no padded
    copy of the map), and the region reaches through that padding: a change at one edge of a circularly padded map
    changes the outputs at the opposite edge."""

    kind = "conv"

    def check_supported(self):
        m = self.module
        if m.padding_mode not in _PAD_MODES:
            raise UnsupportedLayerError(
                f"{self.name}: Conv2d with padding_mode={m.padding_mode!r} cannot run sparse (supported: "
                f"{sorted(_PAD_MODES)}); pad explicitly before the convolution or pass SparseConfig(strict=False) "
                "to run it densely."
            )
        self.padding_mode = m.padding_mode
        if isinstance(m.padding, str):
            if m.padding == "valid":
                padding = (0, 0)
            else:  # "same": symmetric only when each total padding is even
                totals = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
                if any(t % 2 for t in totals):
                    raise UnsupportedLayerError(
                        f"{self.name}: Conv2d(padding='same') with an even kernel pads asymmetrically, which the "
                        "tile geometry cannot express; use explicit integer padding."
                    )
                padding = tuple(t // 2 for t in totals)
        else:
            padding = m.padding
        self.geometry = Geometry.of(m.kernel_size, m.stride, padding, m.dilation)

    def output_region(self, region_in, geometry, out_hw):
        st = self.state
        if self.padding_mode == "zeros" or not st.config.exact or not st.any(region_in):
            return super().output_region(region_in, geometry, out_hw)
        # The padding copies pixels: pad the region the same way, then slide the window over it without padding.
        (py, px), mode = geometry.padding, self.padding_mode

        def build():
            padded = padded_region(region_in, (px, px, py, py), mode)
            return propagate(padded, Geometry(geometry.kernel, geometry.stride, (0, 0), geometry.dilation))

        return st.memo(("padded conv", id(region_in), geometry, mode), (region_in,), build)

    def macs_per_position(self, out):
        m = self.module
        return m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def sparse(self, x, prologue: Prologue = IDENTITY, residual: torch.Tensor | None = None, into=None):
        folded = self._padded(x, prologue)
        if folded is not None:  # an explicit padding module before this padding-free convolution
            handler, x, prologue = folded
            return WindowedHandler.sparse(handler, x, prologue, residual, into)
        return super().sparse(x, prologue, residual, into)

    def _padded(self, x, prologue: Prologue):
        """For a `LazyPad` input this convolution can read through (no padding of its own, the same padding on both
        sides of each axis, nothing but a pad-commuting prologue after it): a copy of this handler with the padding
        in its geometry and padding mode, the pad's source and the combined prologue; otherwise `None`."""
        if not isinstance(x, LazyPad) or x.filled or self.geometry.padding != (0, 0) or self.padding_mode != "zeros":
            return None
        left, right, top, bottom = x.pad
        if left != right or top != bottom or min(x.pad) < 0:
            return None
        if prologue is not IDENTITY and x.mode == "zeros":
            return None  # the prologue would act on the padded zeros too
        combined = (x.prologue or IDENTITY).then(prologue)
        if combined is None:
            return None
        key = ((top, left), x.mode)
        folded = self.__dict__.setdefault("_folded", {}).get(key)
        if folded is None:
            folded = copy.copy(self)
            g = self.geometry
            folded.geometry = Geometry(g.kernel, g.stride, (top, left), g.dilation)
            folded.padding_mode = x.mode
            self._folded[key] = folded
        source, combined = Prologue.unwrap(x.source, combined)
        return folded, source, combined

    def apply(self, tiles):
        m = self.module
        if tiles.shape[-2:] == m.kernel_size and m.groups == 1 and m.dilation == (1, 1):
            return self.apply_pixels(tiles)
        packed = self.packed_weight(tiles)
        if packed is not None:
            bias = None if m.bias is None else m.bias.detach()
            return torch.ops.mkldnn._convolution_pointwise(
                tiles, packed, bias, [0, 0], list(m.stride), list(m.dilation), m.groups, "none", [], ""
            )
        return F.conv2d(tiles, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

    def packed_weight(self, tiles: torch.Tensor) -> torch.Tensor | None:
        """The weight in oneDNN's blocked layout, when a CPU convolution of these tiles would otherwise spend more
        time reordering the weight (which `F.conv2d` does on every call) than computing: fewer input values than
        weights (the deep layers of GauGAN and UNets, where an edit covers a few tiles of 512-1280 channels; measured
        on 2 cores: 1024 channels, 2 tiles of 8x8, 22 GMAC/s -> 74 GMAC/s, the same bits). Packed once per weight
        version and dtype and kept beside the weight; `None` where it does not pay or cannot run."""
        m = self.module
        w = m.weight
        if (
            tiles.device.type != "cpu"
            or tiles.dtype not in (torch.float32, torch.bfloat16)
            or w.numel() < tiles.numel()
            or (torch.is_grad_enabled() and (w.requires_grad or tiles.requires_grad))
            or not tiles.is_contiguous(memory_format=torch.channels_last)
            or self.__dict__.get("_pack_failed")
            or not PACK_WEIGHTS
            or not torch.backends.mkldnn.is_available()
        ):
            return None
        key = (w.data_ptr(), w._version, tiles.dtype)
        cached = self.__dict__.get("_packed")
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            dense = w.detach().to(tiles.dtype)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                dense.to_mkldnn(), [0, 0], list(m.stride), list(m.dilation), m.groups, list(tiles.shape)
            )
        except RuntimeError:  # a build or configuration oneDNN does not take: the plain convolution
            self._pack_failed = True
            return None
        self._packed = (key, packed)
        return packed

    def apply_pixels(self, tiles):
        """Output tiles of one pixel: each gathered tile is exactly one receptive field, so the convolution is one
        GEMM over the active pixels (im2col of only those pixels), with no halo and no per-tile kernel launch.

        The GEMM takes the weight as it is, never a permuted copy (kept per layer, those held 0.86 GiB beside SD
        1.5's 3.8 GiB of NCHW weights). A channels-last weight's `(ky, kx, c)` rows match the gathered tiles'
        channels-last memory (both views); any other weight's `(c, ky, kx)` rows get the tiles in that order, one
        copy of the windows (about 4% of a 640-channel layer's time)."""
        m = self.module
        n, field = tiles.shape[0], math.prod(tiles.shape[1:])
        w = m.weight.detach()
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            cols, w = tiles.permute(0, 2, 3, 1).reshape(n, field), w.permute(0, 2, 3, 1).reshape(w.shape[0], field)
        else:
            cols, w = tiles.reshape(n, field), w.reshape(w.shape[0], field)
        out = F.linear(cols, w.to(cols.dtype), None if m.bias is None else m.bias.to(cols.dtype))
        return out[:, :, None, None]

    def apply_dense(self, x):
        m = self.module
        if self.padding_mode != "zeros":
            py, px = self.geometry.padding
            x = F.pad(x, (px, px, py, py), mode=self.padding_mode)
            return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
        return F.conv2d(x, m.weight, m.bias, m.stride, self.geometry.padding, m.dilation, m.groups)


@register_handler(nn.PixelUnshuffle)
class PixelUnshuffleHandler(WindowedHandler):
    """Space-to-depth by a factor r: an r x r window with stride r, computed on the active tiles."""

    kind = "shuffle"

    def check_supported(self):
        r = self.module.downscale_factor
        self.geometry = Geometry.of(r, r, 0, 1)

    def apply(self, tiles):
        return F.pixel_unshuffle(tiles, self.module.downscale_factor)

    apply_dense = apply


@register_handler(nn.AvgPool2d, nn.MaxPool2d)
class PoolHandler(WindowedHandler):
    kind = "pool"

    def check_supported(self):
        m = self.module
        pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding, m.padding)
        if any(pad) or m.ceil_mode or getattr(m, "return_indices", False):
            raise UnsupportedLayerError(
                f"{self.name}: {type(m).__name__} runs sparse only with padding=0, ceil_mode=False and no indices."
            )
        stride = m.stride if m.stride is not None else m.kernel_size
        self.geometry = Geometry.of(m.kernel_size, stride, 0, getattr(m, "dilation", 1))

    def macs_per_position(self, out):
        k = self.geometry.kernel
        return out.shape[1] * k[0] * k[1] if isinstance(self.module, nn.AvgPool2d) else 0

    def apply(self, tiles):
        return self.module.__class__.forward(self.module, tiles)

    apply_dense = apply


class PointwiseHandler(SparseHandler):
    """A per-position layer. Inside a fused chain it becomes part of the next layer's gather (its `prologue`);
    alone it gathers its region, applies itself and writes back."""

    pointwise = True
    consumes_prologue = True
    sets_own_region = True
    affine = False  # a per-channel affine (True) or an activation (False), for static fusion planning
    # Deferred (a model's output head, see `spatial._defer_heads`): the capture stores no output, and a sparse run
    # returns a `LazyPointwise` that the next windowed layer folds into its gather.
    defer = False

    def capture(self, key, out, *args, **kwargs):
        if not self.defer:
            super().capture(key, out, *args, **kwargs)

    def prologue(self, x: torch.Tensor, key) -> Prologue:
        raise NotImplementedError

    def fold(self, x, key, prologue: Prologue) -> Prologue:
        folded = prologue.then(self.prologue(x, key))
        if folded is None:  # planning guarantees this never happens
            raise RuntimeError(f"{self.name}: cannot fold into the preceding prologue")
        return folded

    def sparse(self, x, prologue: Prologue = IDENTITY, residual: torch.Tensor | None = None, into=None):
        st = self.state
        key = st.key(self.name)
        if self.defer and into is None and residual is None:
            return self._deferred(x, key, prologue)
        buf = into if into is not None else self.buffer(key)
        p = self.fold(x, key, prologue)
        region = st.region_of(x)
        if residual is not None:
            region = st.union(region, st.region_of(residual))
        poison = st.config.poison_scratch
        out = self.run_tiles(
            x,
            region,
            _POINT,
            lambda x_, bi, p_: p_.gather(x_, bi.origins, bi.tile, poison),
            lambda x_, p_: p_.apply_dense(x_),
            buf,
            residual,
            p,
        )
        st.set_region(out, region)
        return out

    def _deferred(self, x, key, prologue: Prologue) -> torch.Tensor:
        """This layer's output as a `LazyPointwise` of its input (unwrapped if that is lazy too): nothing is computed
        here. A prologue that reads the input's values (recomputed GroupNorm statistics) fills a lazy input first."""
        st = self.state
        region = st.region_of(x)
        p = self.prologue(x, key)  # once: recomputed statistics update (and undo-log) their cell sums
        mine = prologue.then(p)
        macs = self.macs_dense(x)
        if mine is None:  # does not fold into one scale/shift + activation: compute it whole (nothing was cached)
            with untracked():
                out = p.apply_dense(prologue.apply_dense(_plain(x)))
            st.record(LayerRecord(self.name, self.kind, tuple(x.shape[-2:]), macs, macs, 1.0, "deferred, unfoldable"))
        else:
            out = LazyPointwise.of(*Prologue.unwrap(x, mine))
            st.add_lazy(out)
            st.record(LayerRecord(self.name, self.kind, tuple(x.shape[-2:]), macs, 0, 0.0))
        st.set_region(out, region)
        return out


_ACTIVATION_NAMES = {
    nn.SiLU: "silu",
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",
    nn.PReLU: "prelu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardtanh: "hardtanh",  # nn.ReLU6 is a Hardtanh(0, 6)
    nn.Mish: "mish",
    nn.Softplus: "softplus",
}


def _activation_params(m: nn.Module) -> tuple[float, ...]:
    """The float parameters an activation module carries, in the order `ops.gather(params=...)` takes them."""
    if isinstance(m, (nn.ELU, nn.CELU)):
        return (float(m.alpha),)
    if isinstance(m, nn.Hardtanh):
        return (float(m.min_val), float(m.max_val))
    if isinstance(m, nn.Softplus):
        return (float(m.beta), float(m.threshold))
    return ()


@register_handler(nn.Identity, nn.Dropout, nn.Dropout2d, *_ACTIVATION_NAMES)
class ActivationHandler(PointwiseHandler):
    """Elementwise activations (and Identity, eval-mode Dropout): folded into the next layer's gather, or applied
    to the active tiles alone. PReLU's learnable slope travels with the prologue as a per-channel weight."""

    kind = "activation"

    def check_supported(self):
        m = self.module
        name = next((n for t, n in _ACTIVATION_NAMES.items() if isinstance(m, t)), "identity")
        if isinstance(m, nn.GELU):
            if m.approximate not in ("none", "tanh"):
                raise UnsupportedLayerError(f"{self.name}: GELU(approximate={m.approximate!r}) is not supported.")
            name = "gelu" if m.approximate == "none" else "gelu_tanh"
        self.activation = name
        self.slope = float(getattr(m, "negative_slope", 0.01))
        self.params = _activation_params(m)

    def prologue(self, x, key):
        m = self.module
        if isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.training and m.p > 0:
            raise RuntimeError(f"{self.name}: Dropout in training mode is random; call model.eval() before editing.")
        weight = None
        if isinstance(m, nn.PReLU):
            if m.weight.numel() not in (1, x.shape[1]):
                raise ValueError(
                    f"{self.name}: PReLU has {m.weight.numel()} slopes but its input has {x.shape[1]} channels; "
                    "use num_parameters=1 or the input's channel count."
                )
            weight = m.weight.detach()
        return Prologue(activation=self.activation, slope=self.slope, params=self.params, weight=weight)


@register_handler(nn.BatchNorm2d)
class BatchNormHandler(PointwiseHandler):
    """Eval-mode BatchNorm: a fixed per-channel affine, exact under sparse computation."""

    kind = "norm"
    affine = True

    def check_supported(self):
        if not self.module.track_running_stats:
            raise UnsupportedLayerError(
                f"{self.name}: BatchNorm2d without running statistics normalises by batch statistics, which depend "
                "on the whole map; it cannot run sparse."
            )

    def macs_per_position(self, out):
        return out.shape[1]

    def prologue(self, x, key):
        m = self.module
        if m.training:
            raise RuntimeError(f"{self.name}: BatchNorm2d is in training mode; call model.eval() before editing.")
        # The same for every run until a statistic or parameter changes: made once (a sparse forward otherwise spent
        # a quarter of a millisecond per norm on these small ops through the region tracking).
        tensors = [t for t in (m.running_var, m.running_mean, m.weight, m.bias) if t is not None]
        key = (x.shape[0], *((t.data_ptr(), t._version) for t in tensors))
        memo = self.__dict__.get("_affine_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        with untracked(), torch.no_grad():
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight
            shift = -m.running_mean * scale
            if m.bias is not None:
                shift = shift + m.bias
            b = x.shape[0]
            p = Prologue(scale.expand(b, -1), shift.expand(b, -1))
        self._affine_memo = (key, p, tensors)  # (holds the tensors: their addresses cannot be reused meanwhile)
        return p


@register_handler(nn.GroupNorm)
class GroupNormHandler(PointwiseHandler):
    """GroupNorm. Its statistics span the whole map, so sparse runs either freeze them from the capture (SIGE,
    FISEdit) or recompute them exactly from cached per-tile sums (only the active tiles are re-summed). In exact mode
    the statistics are recomputed densely and everything downstream becomes dense."""

    kind = "norm"
    affine = True

    def check_supported(self):
        # In exact mode a GroupNorm changes every output position, so it never folds into a sparse gather.
        self.pointwise = not self.state.config.exact
        self.covers_map = not self.pointwise
        self.groups, self.channels = self.module.num_groups, self.module.num_channels

    def macs_per_position(self, out):
        return 2 * out.shape[1]  # statistics + affine

    def _grid(self, h: int) -> int:
        return self.state.config.tile_for(h)

    def capture(self, key, out, x, *args, **kwargs):
        super().capture(key, out)
        m = self.module
        b, c, h, w = x.shape
        mean, rstd = group_stats(x, self.groups, m.eps)
        tensors = {"mean": mean, "rstd": rstd}
        if self.state.config.norm_stats is NormStats.RECOMPUTE:
            t = self._grid(h)
            ny, nx = -(-h // t), -(-w // t)
            xp = F.pad(x.detach().double(), (0, nx * t - w, 0, ny * t - h))
            cells = xp.reshape(b, self.groups, c // self.groups, ny, t, nx, t)
            tensors["cell_sum"] = cells.sum(dim=(2, 4, 6))
            tensors["cell_sumsq"] = cells.square().sum(dim=(2, 4, 6))
        self.state.cache.put(key, **tensors)

    def _affine(self, mean, rstd, b):
        m = self.module
        g = self.groups
        per = self.channels // g
        scale = rstd.repeat_interleave(per, dim=1)
        shift = -mean.repeat_interleave(per, dim=1) * scale
        if m.weight is not None:
            scale = scale * m.weight
            shift = shift * m.weight + m.bias
        return scale.reshape(b, -1), shift.reshape(b, -1)

    def prologue(self, x, key):
        entry = self.state.cache.get(key)
        if self.state.config.norm_stats is NormStats.FROZEN:
            mean, rstd, m = entry["mean"], entry["rstd"], self.module
            params = [t for t in (m.weight, m.bias) if t is not None]
            memo_key = (x.shape[0], *((t.data_ptr(), t._version) for t in (mean, rstd, *params)))
            memos = self.__dict__.setdefault("_prologue_memo", {})  # per call key: a layer called at several steps
            memo = memos.get(key)
            if memo is None or memo[0] != memo_key:
                with untracked(), torch.no_grad():
                    memo = (memo_key, Prologue(*self._affine(mean, rstd, x.shape[0])), (mean, rstd))
                memos[key] = memo  # (holds the statistics, so their addresses cannot be reused while it lives)
            return memo[1]
        return Prologue(*self._affine(*self._recompute(x, entry), x.shape[0]))

    def _recompute(self, x, entry):
        """Exact new statistics: cached totals, minus the old sums of the active cells, plus their new sums."""
        m = self.module
        b, c, h, w = x.shape
        t = self._grid(h)
        region = self.state.region_of(x)
        cells = self.state.block_index(region, _POINT, t, clamp=False)
        csum, csq = entry["cell_sum"], entry["cell_sumsq"]
        if cells.num_blocks:
            tiles = ops.gather(x, cells.origins, (t, t)).double()  # zeros past the border add nothing
            tiles = tiles.reshape(tiles.shape[0], self.groups, -1)
            bi, cy, cx = cells.origins[:, 0], cells.origins[:, 1] // t, cells.origins[:, 2] // t
            index = (bi, slice(None), cy, cx)
            old_sum, old_sq = csum[index].clone(), csq[index].clone()
            self.state.remember(lambda: (csum.__setitem__(index, old_sum), csq.__setitem__(index, old_sq)))
            csum[index] = tiles.sum(-1)
            csq[index] = tiles.square().sum(-1)
        n = (c // self.groups) * h * w
        mean = csum.sum(dim=(2, 3)) / n
        var = (csq.sum(dim=(2, 3)) / n - mean.square()).clamp_min(0)
        return mean.float(), torch.rsqrt(var + m.eps).float()

    def sparse(self, x, prologue: Prologue = IDENTITY, residual: torch.Tensor | None = None, into=None):
        if self.pointwise:
            return super().sparse(x, prologue, residual, into)
        # Exact mode: new statistics move every position, so compute densely and mark the whole map changed.
        st = self.state
        key = st.key(self.name)
        buf = into if into is not None else self.buffer(key)
        new = self.original(x if prologue is IDENTITY else prologue.apply_dense(x))
        region = st.full((buf.shape[0], *buf.shape[-2:]), buf.device)
        out = self.write_dense(buf, new, region, residual)
        macs = self.macs_dense(buf)
        st.record(LayerRecord(self.name, self.kind, tuple(buf.shape[-2:]), macs, macs, 1.0, "exact GroupNorm"))
        st.set_region(out, region)
        return out


@register_handler(nn.InstanceNorm2d)
class InstanceNormHandler(GroupNormHandler):
    """InstanceNorm2d: GroupNorm with one group per channel (pix2pix, SPADE's `spadeinstance`). Its statistics span
    the whole map, so sparse runs freeze them from the capture or recompute them (approximate mode); in exact mode it
    runs densely. With `track_running_stats=True` in eval mode it is a fixed affine, exact like BatchNorm."""

    def check_supported(self):
        m = self.module
        self.running = m.track_running_stats
        self.pointwise = self.running or not self.state.config.exact
        self.covers_map = not self.pointwise
        self.groups = self.channels = m.num_features

    def capture(self, key, out, x, *args, **kwargs):
        if self.running:
            return SparseHandler.capture(self, key, out)
        return super().capture(key, out, x, *args, **kwargs)

    def prologue(self, x, key):
        if not self.running:
            return super().prologue(x, key)
        return BatchNormHandler.prologue(self, x, key)


@register_handler(nn.ConvTranspose2d)
class ConvTransposeHandler(SparseHandler):
    """A transposed convolution (pix2pix's upsampling). An output tile reads the input pixels whose scattered
    kernels reach it; the tile is computed with `conv_transpose2d` at padding 0 on those pixels and cropped."""

    kind = "conv"
    consumes_prologue = True
    sets_own_region = True

    def check_supported(self):
        m = self.module
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise UnsupportedLayerError(f"{self.name}: ConvTranspose2d runs sparse only with integer zero padding.")
        reach = [d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation)]
        if any(s > r for s, r in zip(m.stride, reach)):
            raise UnsupportedLayerError(
                f"{self.name}: ConvTranspose2d with stride {m.stride} larger than its kernel's reach {reach} leaves "
                "output positions no input reaches; it cannot run sparse."
            )

    def macs_per_position(self, out):
        m = self.module
        per_input = m.in_channels * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        return per_input // (m.stride[0] * m.stride[1])

    def propagate(self, region: torch.Tensor, out_hw) -> torch.Tensor:
        """Output positions that any changed input position scatters into (exact)."""
        m = self.module
        if not bool(region.any()):
            return region.new_zeros((region.shape[0], *out_hw))
        ones = torch.ones(1, 1, *m.kernel_size, device=region.device)
        out = F.conv_transpose2d(
            region[:, None].float(), ones, None, m.stride, m.padding, m.output_padding, 1, m.dilation
        )
        return out[:, 0, : out_hw[0], : out_hw[1]] > 0

    def _span(self, axis: int, o0: int, t: int) -> tuple[int, int, int]:
        """Input start, input length and crop offset of the output rows (or columns) `[o0, o0 + t)`."""
        m = self.module
        s, p, d, k = m.stride[axis], m.padding[axis], m.dilation[axis], m.kernel_size[axis]
        i0 = -(-(o0 + p - d * (k - 1)) // s)
        i1 = (o0 + t - 1 + p) // s
        return i0, i1 - i0 + 1, o0 - s * i0 + p

    def compute(self, x, bi, prologue: Prologue):
        m = self.module
        (th, tw), poison = bi.tile, self.state.config.poison_scratch
        out = None
        origins = bi.origins
        # Tiles whose origins share a residue modulo the stride read equally sized input windows: one batch each.
        ry, rx = origins[:, 1] % m.stride[0], origins[:, 2] % m.stride[1]
        for y in ry.unique().tolist():
            for x_ in rx.unique().tolist():
                sel = ((ry == y) & (rx == x_)).nonzero()[:, 0]
                if sel.numel() == 0:
                    continue
                o = origins[sel]
                iy, ny, cy = self._span(0, y, th)
                ix, nx, cx = self._span(1, x_, tw)
                # The spans for residue y hold for every origin o0 = y + k*s, shifted by k input pixels.
                inp = o.clone()
                inp[:, 1] = (o[:, 1] - y) // m.stride[0] + iy
                inp[:, 2] = (o[:, 2] - x_) // m.stride[1] + ix
                tiles = prologue.gather(x, inp, (ny, nx), poison)
                res = F.conv_transpose2d(tiles, m.weight, m.bias, m.stride, 0, 0, m.groups, m.dilation)
                res = res[:, :, cy : cy + th, cx : cx + tw]
                if out is None:
                    out = res.new_empty((origins.shape[0], res.shape[1], th, tw))
                out[sel] = res
        return out

    def compute_dense(self, x, prologue: Prologue):
        return self.original(x if prologue is IDENTITY else prologue.apply_dense(x))

    def sparse(self, x, prologue: Prologue = IDENTITY, residual: torch.Tensor | None = None, into=None):
        st = self.state
        buf = into if into is not None else self.buffer(st.key(self.name))
        out_hw = tuple(buf.shape[-2:])
        region_in = st.region_of(x)
        if st.config.exact or st.all(region_in) or not st.any(region_in):
            region = st.memo(
                ("convT", id(self), id(region_in)), (region_in,), lambda: self.propagate(region_in, out_hw)
            )
        else:
            region = st.pyramid(out_hw)
        if residual is not None:
            region = st.union(region, st.region_of(residual))
        out = self.run_tiles(x, region, _POINT, self.compute, self.compute_dense, buf, residual, prologue)
        st.set_region(out, region)
        return out


@register_handler(nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d)
class PadHandler(SparseHandler):
    """Explicit padding before a padding-free convolution (pix2pix's reflection pads). A sparse run makes no padded
    copy: it returns a `LazyPad` that the convolution after it reads through, with the padding in its gather's index
    mapping (the preceding norm and activation fold in as the convolution's prologue); any other reader fills it
    with the padded map. The region is padded the same way, so the convolution stays sparse either way."""

    kind = "pad"
    consumes_prologue = True
    sets_own_region = True
    _MODES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate"}

    def capture(self, key, out, *args, **kwargs):
        pass  # sparse runs never read the padded map from the cache

    def sparse(self, x, prologue: Prologue = IDENTITY):
        st = self.state
        st.key(self.name)
        m = self.module
        mode = self._MODES.get(type(m), "constant")
        value = getattr(m, "value", 0)
        region = padded_region(st.region_of(x), tuple(m.padding), mode, value)
        x, prologue = Prologue.unwrap(x, prologue)
        if mode == "constant" and value not in (0, 0.0):
            with untracked():
                out = self.original(_plain(x) if prologue is IDENTITY else prologue.apply_dense(_plain(x)))
        else:
            out = LazyPad.of(x, prologue, tuple(m.padding), "zeros" if mode == "constant" else mode)
            st.add_lazy(out)
        if region is not None:
            st.set_region(out, region)
        return out


class _UpscaleHandler(SparseHandler):
    """An integer upscaling where output pixel `(y, x)` depends on input pixel `(y // s, x // s)` only: the active
    input tiles (of `tile / s` pixels) are gathered with the prologue fused, upscaled, and written as output tiles
    of `tile` pixels (a multiple of the factor)."""

    consumes_prologue = True
    sets_own_region = True

    def factor(self, x, buf) -> int:
        raise NotImplementedError

    def upscale(self, tiles: torch.Tensor, s: int) -> torch.Tensor:
        raise NotImplementedError

    def sparse(self, x, prologue: Prologue = IDENTITY, into=None):
        st = self.state
        key = st.key(self.name)
        buf = into if into is not None else self.buffer(key)
        return self.sparse_upscale(x, prologue, buf, self.factor(x, buf))

    def sparse_upscale(self, x, prologue: Prologue, buf: torch.Tensor, s: int):
        st = self.state
        oh, ow = buf.shape[-2:]
        region_in = st.region_of(x)
        if st.config.exact or not st.any(region_in) or st.all(region_in):
            region = st.repeat(region_in, s)
        else:
            region = st.pyramid((oh, ow))

        def indices():
            need = F.max_pool2d(region[:, None].float(), s)[:, 0] > 0  # input pixels whose copies are in the region
            bi_in = block_index(need, _POINT, max(1, self.tile_for(oh) // s))
            bi_out = type(bi_in)(bi_in.origins * bi_in.origins.new_tensor([1, s, s]), (bi_in.tile[0] * s,
                                 bi_in.tile[1] * s), (buf.shape[0], oh, ow), _POINT)  # fmt: skip
            return bi_in, bi_out

        bi_in, bi_out = st.memo(("upsample tiles", id(region), s, self.tile_for(oh)), (region,), indices)
        macs = 0
        if bi_out.covered_fraction > st.config.dense_threshold:
            buf = self.write_dense(buf, self.upscale(prologue.apply_dense(x), s), region)
            st.record(LayerRecord(self.name, self.kind, (oh, ow), macs, macs, 1.0, "cost model"))
        elif bi_in.num_blocks:
            tiles = prologue.gather(x, bi_in.origins, bi_in.tile, st.config.poison_scratch)
            self.write(buf, bi_out, self.upscale(tiles, s), region)
            st.record(LayerRecord(self.name, self.kind, (oh, ow), macs, macs, bi_out.covered_fraction))
        else:
            st.record(LayerRecord(self.name, self.kind, (oh, ow), macs, macs, 0.0))
        st.set_region(buf, region)
        return buf


@register_handler(nn.PixelShuffle)
class PixelShuffleHandler(_UpscaleHandler):
    """Depth-to-space by a factor r (sub-pixel convolution upsampling): output pixel `(y, x)` is one channel of input
    pixel `(y // r, x // r)`, so the region maps exactly and only the active input tiles are shuffled."""

    kind = "shuffle"

    def factor(self, x, buf):
        return self.module.upscale_factor

    def upscale(self, tiles, s):
        return F.pixel_shuffle(tiles, s)


@register_handler(nn.Upsample, nn.UpsamplingNearest2d)
class UpsampleHandler(_UpscaleHandler):
    """`nn.Upsample` (and `UpsamplingBilinear2d`). Nearest by an equal integer factor copies the active input tiles.
    Bilinear, bicubic (either `align_corners`), nearest by other factors, nearest-exact and area resample separably:
    the region is the exact set of outputs whose taps touch a changed input (`resample.propagate_resample`), and each
    active output tile is computed from an input window covering its taps, with the weights torch uses."""

    kind = "upsample"

    def check_supported(self):
        m = self.module
        if m.mode not in SEPARABLE_MODES:
            raise UnsupportedLayerError(
                f"{self.name}: Upsample(mode={m.mode!r}) cannot run sparse; supported modes on 2D maps: "
                f"{SEPARABLE_MODES}."
            )

    def macs_per_position(self, out):
        return out.shape[1] * {"bilinear": 4, "bicubic": 16}.get(self.module.mode, 0)

    def upscale(self, tiles, s):  # nearest by an integer factor: copies, in one pass that keeps the tiles' layout
        return F.interpolate(tiles, scale_factor=s, mode="nearest")

    def sparse(self, x, prologue: Prologue = IDENTITY, into=None):
        st = self.state
        key = st.key(self.name)
        buf = into if into is not None else self.buffer(key)
        (h, w), (oh, ow) = x.shape[-2:], buf.shape[-2:]
        if self.module.mode == "nearest" and not (oh % h or ow % w) and oh // h == ow // w:
            return self.sparse_upscale(x, prologue, buf, oh // h)
        m = self.module
        ty, tx = taps_for(x, (oh, ow), m.mode, m.align_corners, m.size, m.scale_factor, m.recompute_scale_factor)
        region_in = st.region_of(x)
        if st.config.exact or not st.any(region_in) or st.all(region_in):
            region = st.memo(
                ("resample", id(region_in), id(ty), id(tx)),
                (region_in, ty, tx),
                lambda: propagate_resample(region_in, ty, tx),
            )
        else:
            region = st.pyramid((oh, ow))
        poison = st.config.poison_scratch

        def compute(x_, bi, p):
            return resample_tiles(x_, bi.origins, bi.tile, ty, tx, lambda t, o, size: p.gather(t, o, size, poison))

        def compute_dense(x_, p):
            return self.original(x_ if p is IDENTITY else p.apply_dense(x_))

        out = self.run_tiles(x, region, _POINT, compute, compute_dense, buf, None, prologue)
        st.set_region(out, region)
        return out
