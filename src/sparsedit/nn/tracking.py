"""Region tracking through the plain tensor arithmetic between sparse layers.

Models glue their layers together with `torch.cat` (U-Net skips), `+` (residuals, time embeddings), scaling,
`F.interpolate` and `F.pad`. During a sparse run a `TorchFunctionMode` watches those calls. They still compute densely
on the full (correct) maps, but their output is tagged with the union of their inputs' regions, so the next sparse
layer stays sparse instead of treating the result as changed everywhere.

Soundness: a tensor without a region counts as changed everywhere. Non-spatial operands (scalars, `[B, C, 1, 1]`
time embeddings) count as unchanged, which holds because every non-image input of the model is fingerprinted
against the capture. Anything computed from tracked data by an operation this module does not know (say, `x.std()`)
is *tainted*: whatever it touches afterwards counts as changed everywhere.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .resample import SEPARABLE_MODES, propagate_resample, taps_for
from .state import Mode, SparseState
from .virtual import LazyConcat, LazyPad, LazyUpsample


_T = torch.Tensor
# Elementwise functions: the output at a pixel depends only on the inputs at that pixel.
_POINTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.where, torch.clamp,
    torch.sigmoid, torch.tanh, torch.exp, torch.relu, F.silu, F.relu, F.gelu, F.leaky_relu, F.mish,
    F.prelu, F.elu, F.selu, F.celu, F.hardswish, F.hardsigmoid, F.hardtanh, F.relu6, F.softplus, F.softsign,
    F.tanhshrink, F.logsigmoid, _T.relu,
    _T.add, _T.__add__, _T.__radd__, _T.__iadd__, _T.sub, _T.__sub__, _T.__rsub__,
    _T.mul, _T.__mul__, _T.__rmul__, _T.div, _T.__truediv__, _T.__rtruediv__, _T.neg, _T.__neg__,
    _T.clamp, _T.sigmoid, _T.tanh, _T.to, _T.float, _T.half, _T.bfloat16, _T.type_as,
    _T.contiguous, _T.clone, _T.detach,
}  # fmt: skip
_CONCAT = {torch.cat, torch.concat}
LAZY_PAD = True  # `LazyPad` for `F.pad` of a tracked map (off: the padded map is built; for A/B measurements)
LAZY_UPSAMPLE = True  # `LazyUpsample` for nearest upsampling (off: the full map is built; for A/B measurements)
_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_SHUFFLE = {F.pixel_shuffle, F.pixel_unshuffle}  # (these are torch.pixel_shuffle and torch.pixel_unshuffle)


@contextlib.contextmanager
def untracked():
    """Region tracking off for a sparse layer's own arithmetic (gathers, GEMMs, scatters, token math): the layer
    tags its output itself, and each torch call through the mode costs a few microseconds of Python (about 11,000
    calls, 30 ms, per SD 1.5 step). Only pops the mode when it is the innermost one, so a user's own mode stays."""
    n = torch._C._len_torch_function_stack()
    if not n or not isinstance(torch._C._get_function_stack_at(n - 1), RegionTracking):
        yield
        return
    mode = torch._C._pop_torch_function_stack()
    try:
        yield
    finally:
        torch._C._push_on_torch_function_stack(mode)


def tracked_call(state: SparseState, func, *args, **kwargs):
    """`func(*args, **kwargs)` with its output's region tagged as the tracking mode would tag it: for a handler that
    runs untracked but calls one glue op whose region it wants followed (SPADE's label-map resize)."""
    return RegionTracking(state).__torch_function__(func, (), args, kwargs)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """Tensors among the arguments, one level into lists and tuples (cheaper than a full pytree flatten)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found


class RegionTracking(TorchFunctionMode):
    def __init__(self, state: SparseState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if func in _CONCAT and st.mode is Mode.SPARSE:
            lazy = self._lazy_concat(args, kwargs)
            if lazy is not None:
                return lazy
        if func is F.interpolate and st.mode is Mode.SPARSE and LAZY_UPSAMPLE:
            lazy = self._lazy_upsample(args, kwargs)
            if lazy is not None:
                return lazy
        if func is F.pad and st.mode is Mode.SPARSE and LAZY_PAD:
            lazy = self._lazy_pad(args, kwargs)
            if lazy is not None:
                return lazy
        out = func(*args, **kwargs)
        if st.mode is not Mode.SPARSE:  # a dense fallback run: nothing to track
            return out
        inputs = _tensors(args, kwargs)
        tracked = any(st.has_region(a) for a in inputs)
        tainted = any(st.is_tainted(a) for a in inputs)
        if not tracked and not tainted:
            return out
        if not isinstance(out, torch.Tensor):
            for o in _tensors(out if isinstance(out, (list, tuple)) else (out,), {}):
                st.taint(o)
            return out
        region = None
        if not tainted:
            if func in _POINTWISE:
                region = self._pointwise(out, inputs)
            elif func in _CONCAT:
                region = self._concat(out, args, kwargs)
            elif func is F.interpolate:
                region = self._interpolate(out, args, kwargs)
            elif func in _SHUFFLE:
                region = self._shuffle(func, out, args, kwargs)
            elif func is F.pad:
                region = self._zero_pad(out, args, kwargs)
        if region is not None:
            st.set_region(out, region)
        elif out.dim() != 4:
            st.taint(out)
        # A 4D output without a region counts as changed everywhere (SparseState.region_of).
        return out

    def _lazy_concat(self, args, kwargs):
        """A channel concatenation of tracked maps: a `LazyConcat` that gathers read part by part (see virtual.py)."""
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        st = self.state
        if (
            dim not in (1, -3)
            or "out" in kwargs
            or not isinstance(tensors, (list, tuple))
            or len(tensors) < 2
            or not all(isinstance(t, torch.Tensor) and t.dim() == 4 and st.has_region(t) for t in tensors)
        ):
            return None
        first = tensors[0]
        if any(t.shape[0] != first.shape[0] or t.shape[2:] != first.shape[2:] or t.dtype != first.dtype
               or t.device != first.device for t in tensors):  # fmt: skip
            return None
        out = LazyConcat.of(tensors)
        st.add_lazy(out)
        st.set_region(out, st.union(*(st.region_of(t) for t in tensors)))
        return out

    def _lazy_upsample(self, args, kwargs):
        """A nearest upsampling of a tracked map by power-of-two factors: a `LazyUpsample` that gathers read through
        (see virtual.py). `None` for anything else (it then runs as called)."""
        a = dict(zip(_INTERPOLATE_ARGS, args))
        a.update(kwargs)
        x, st = a.get("input"), self.state
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 4
            or set(a) - set(_INTERPOLATE_ARGS)
            or a.get("mode", "nearest") != "nearest"
            or a.get("align_corners") is not None
            or a.get("antialias")
            or not st.has_region(x)
            or st.is_partial(x)
        ):
            return None
        h, w = x.shape[-2:]
        size, scale = a.get("size"), a.get("scale_factor")
        if size is not None and scale is None:
            oh, ow = (size, size) if isinstance(size, int) else tuple(size)
        elif scale is not None and size is None:
            sy, sx = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
            oh, ow = math.floor(h * sy), math.floor(w * sx)
            if (oh, ow) != (h * sy, w * sx):
                return None
        else:
            return None
        fy, fx = oh // h, ow // w
        # Powers of two only: torch's source index floor(y * (1 / f)) is then exactly y // f.
        if (oh, ow) != (h * fy, w * fx) or any(f < 2 or f & (f - 1) for f in (fy, fx)):
            return None
        call = {k: v for k, v in a.items() if k != "input"}
        out = LazyUpsample.of(x, (fy, fx), call)
        st.add_lazy(out)
        st.set_region(out, st.repeat(st.region_of(x), fy, fx))
        return out

    def _lazy_pad(self, args, kwargs):
        """`F.pad` of a tracked map with zeros (any non-negative amounts: diffusers' `Downsample2D` pads right and
        bottom by one), or by reflection or replication: a `LazyPad` that the next convolution reads through (a
        padding-free one folds a symmetric pad into its gather's index mapping; a zero pad is read by shifting the
        tiles' origins). `None` for anything else (it then runs as called)."""
        names = ("input", "pad", "mode", "value")
        a = dict(zip(names, args))
        a.update(kwargs)
        x, pad, st = a.get("input"), a.get("pad"), self.state
        mode, value = a.get("mode", "constant"), a.get("value")
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 4
            or set(a) - set(names)
            or not isinstance(pad, (list, tuple))
            or len(pad) != 4
            or not all(isinstance(p, int) and p >= 0 for p in pad)
            or not st.has_region(x)
            or st.is_partial(x)
        ):
            return None
        if mode == "constant" and value in (None, 0, 0.0):
            lazy_mode = "zeros"
        elif mode in ("reflect", "replicate") and value is None:
            lazy_mode = mode
            if mode == "reflect" and (max(pad[2:]) >= x.shape[-2] or max(pad[:2]) >= x.shape[-1]):
                return None  # F.pad raises for these: let it
        else:
            return None
        region = padded_region(st.region_of(x), tuple(pad), mode, value)
        if region is None:
            return None
        out = LazyPad.of(x, None, tuple(pad), lazy_mode)
        st.add_lazy(out)
        st.set_region(out, region)
        return out

    def _pointwise(self, out, inputs):
        if out.dim() != 4:
            return None
        b, _, h, w = out.shape
        st = self.state
        regions = []
        for t in inputs:
            if t.dim() == 4 and t.shape[-2:] == (h, w):
                if not st.has_region(t):
                    return None  # an untracked spatial operand (fresh noise, say): changed everywhere
                regions.append(st.region_of(t))
            elif t.dim() >= 2 and t.shape[-2:] != (1, 1) and t.numel() > 1:
                return None  # some other spatial tensor: don't guess
        if not regions:
            return st.empty((b, h, w), out.device)
        if any(r.shape[0] != b for r in regions):  # broadcast over the batch
            return st.union(*(r.expand(b, h, w) if r.shape[0] != b else r for r in regions))
        return st.union(*regions)

    def _concat(self, out, args, kwargs):
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if out.dim() != 4 or dim not in (1, -3):
            return None
        regions = []
        for t in tensors:
            if not self.state.has_region(t):
                return None
            regions.append(self.state.region_of(t))
        return self.state.union(*regions)

    def _shuffle(self, func, out, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if out.dim() != 4 or x.dim() != 4 or not self.state.has_region(x):
            return None
        st = self.state
        region = st.region_of(x)
        if func is F.pixel_shuffle:  # output pixel (y, x) is a channel of input pixel (y // r, x // r)
            r = out.shape[-1] // x.shape[-1]
            return st.repeat(region, r)
        r = x.shape[-1] // out.shape[-1]  # unshuffle: output pixel (y, x) holds the input's r x r block there
        build = lambda: F.max_pool2d(region[:, None].to(torch.float32), r)[:, 0] > 0  # noqa: E731
        return st.memo(("unshuffle", id(region), r), (region,), build)

    def _interpolate(self, out, args, kwargs):
        a = dict(zip(_INTERPOLATE_ARGS, args))
        a.update(kwargs)
        x, mode = a["input"], a.get("mode", "nearest")
        if out.dim() != 4 or x.dim() != 4 or not self.state.has_region(x) or mode not in SEPARABLE_MODES:
            return None
        (h, w), (oh, ow) = x.shape[-2:], out.shape[-2:]
        st = self.state
        region = st.region_of(x)
        if mode == "nearest" and oh >= h and ow >= w and not (oh % h or ow % w):
            return st.repeat(region, oh // h, ow // w)
        if mode == "nearest" and oh <= h and ow <= w and not (h % oh or w % ow):
            # Nearest downsampling by an integer factor s reads source pixel floor(i * s) = i * s: a strided slice.
            return st.memo(
                ("nearest", id(region), oh, ow), (region,), lambda: region[:, :: h // oh, :: w // ow].contiguous()
            )
        # Any other separable resampling: the outputs whose taps (read from torch, per shape) touch the region.
        ty, tx = taps_for(
            x, (oh, ow), mode, a.get("align_corners"), a.get("size"), a.get("scale_factor"),
            a.get("recompute_scale_factor"), a.get("antialias", False),
        )  # fmt: skip
        return propagate_resample(region, ty, tx)

    def _zero_pad(self, out, args, kwargs):
        x = args[0]
        pad = args[1] if len(args) > 1 else kwargs.get("pad")
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        if out.dim() != 4 or len(pad) != 4 or not self.state.has_region(x) or min(pad) < 0:
            return None
        return padded_region(self.state.region_of(x), tuple(pad), mode, value)


def padded_region(region: torch.Tensor, pad: tuple, mode: str = "constant", value=None) -> torch.Tensor | None:
    """The region of `F.pad(x, pad, mode)` given x's region `[B, H, W]`; `None` for a padding it cannot follow.

    Constant padding adds unchanged pixels (when the value is fixed); reflect, replicate and circular padding copy
    pixels, so a padded pixel changed exactly when the pixel it copies changed (a change at the left edge of a
    circularly padded map reaches the padding right of it).
    """
    if mode == "constant":
        return F.pad(region, pad) if value in (None, 0, 0.0) else None
    if mode in ("reflect", "replicate", "circular"):
        return F.pad(region[:, None].to(torch.uint8), pad, mode=mode)[:, 0].bool()
    return None
