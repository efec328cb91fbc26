"""Lazy feature maps: glue between sparse layers that is never computed at full size.

A U-Net's decoder concatenates each upsampled map with its skip connection (`torch.cat([h, skip], dim=1)`) and feeds
the result to a ResNet block, whose convolutions read only active tiles of it. Computing the concatenation densely
costs a full-size copy per skip (9% of a DDPM-256 sparse forward). During a sparse run, region tracking instead returns
a `LazyConcat`: a tensor of the right shape and layout whose memory is allocated but not written, that remembers its
parts. Gathers read tiles straight from the parts (`Prologue.gather`); any other use of the tensor (a torch function
the engine has not taught to read parts, a dense fallback, user code) first fills it with the real concatenation, so
every reader sees correct values. Nothing outlives the run unfilled: `SparseState.end_run` fills what is left.

A model's output head (diffusers' `conv_norm_out` → `conv_act` → `conv_out`, in the UNets and both VAE halves) is
called from the parent's `forward`, not from an `nn.Sequential`, so no static chain fuses it. Its norm and activation
are marked *deferred* (`spatial._defer_heads`): the capture does not store their outputs, and during a sparse run they
return a `LazyPointwise` (their input and the folded scale/shift + activation) that the next windowed layer gathers
from directly, applying the prologue to the input's tiles. Any other reader fills it with the prologue applied to the
whole (complete) input, which is what the layers compute densely, so correctness never depends on the dataflow.

An explicit padding module before a padding-free convolution (pix2pix's `ReflectionPad2d`, `ZeroPad2d`) returns a
`LazyPad` (its input, the prologue folded into it, the padding and its mode): the convolution reads its input's tiles
with that padding in the gather's index mapping (as a convolution's own `padding_mode` does), so no padded copy of
the map is made.

A nearest upsampling by a power-of-two factor (diffusers' `Upsample2D`: `F.interpolate(x, scale_factor=2.0)` before
its convolution) returns a `LazyUpsample`: the convolution's gather reads the source's tiles (a tile of `T` output
pixels reads `ceil(T / s) + 1` source pixels per axis) and repeats each pixel in place, so no upsampled copy of the
map is made (a full-size write of 4x its input per upsampler per forward).
"""

from __future__ import annotations

import torch


__all__ = ["LazyConcat", "LazyPad", "LazyPointwise", "LazyUpsample"]

# Torch functions that read a tensor's metadata, never its values: they leave a lazy tensor lazy.
_METADATA = {
    torch.Tensor.dim,
    torch.Tensor.size,
    torch.Tensor.stride,
    torch.Tensor.numel,
    torch.Tensor.element_size,
    torch.Tensor.is_contiguous,
    torch.Tensor.is_floating_point,
    torch.Tensor.data_ptr,
    torch.Tensor.__len__,
    torch.Tensor.shape.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.layout.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_cuda.__get__,
}


class _Lazy(torch.Tensor):
    """A feature map allocated but not yet written: any torch function other than a metadata read fills it first."""

    filled: bool

    def materialize(self) -> None:
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    if isinstance(t, _Lazy):
                        t.materialize()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """`t` as a plain tensor, filled first if it is lazy."""
    if isinstance(t, _Lazy):
        t.materialize()
        return t.as_subclass(torch.Tensor)
    return t


class LazyConcat(_Lazy):
    """`torch.cat(parts, dim=1)`, not yet computed. Create with `LazyConcat.of(parts)`."""

    parts: tuple[torch.Tensor, ...]

    @staticmethod
    def of(parts) -> LazyConcat:
        first = parts[0]
        shape = (first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:])
        channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in parts)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch._C.DisableTorchFunctionSubclass():
            storage = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=fmt)
        t = torch.Tensor._make_subclass(LazyConcat, storage)
        t.parts = tuple(p.as_subclass(torch.Tensor) if isinstance(p, _Lazy) and p.filled else p for p in parts)
        t.filled = False
        return t

    def materialize(self) -> None:
        if self.filled:
            return
        parts = [_plain(p) for p in self.parts]
        with torch._C.DisableTorchFunctionSubclass():
            torch.cat(parts, dim=1, out=self.as_subclass(torch.Tensor))
        self.filled = True
        self.parts = ()


class _FromSource(_Lazy):
    """A lazy map computed from one `source` map: filled with `compute(source)`, after which the source is let go."""

    source: torch.Tensor

    def compute(self, source: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def materialize(self) -> None:
        if self.filled:
            return
        source = _plain(self.source)
        with torch._C.DisableTorchFunctionSubclass():
            self.as_subclass(torch.Tensor).copy_(self.compute(source))
        self.filled = True
        self.source = None


class LazyPointwise(_FromSource):
    """`prologue.apply_dense(source)` (a per-channel affine, then an activation), not yet computed. Create with
    `LazyPointwise.of(source, prologue)`; a windowed layer reads `source` and `prologue` instead of the values."""

    source: torch.Tensor
    prologue: object  # nn.base.Prologue (not imported here: base imports this module)

    @staticmethod
    def of(source: torch.Tensor, prologue) -> LazyPointwise:
        with torch._C.DisableTorchFunctionSubclass():
            storage = torch.empty_like(source.as_subclass(torch.Tensor))
        t = torch.Tensor._make_subclass(LazyPointwise, storage)
        t.source = source.as_subclass(torch.Tensor) if isinstance(source, _Lazy) and source.filled else source
        t.prologue = prologue
        t.filled = False
        return t

    def compute(self, source: torch.Tensor) -> torch.Tensor:
        return self.prologue.apply_dense(source)


class LazyPad(_FromSource):
    """`F.pad(prologue.apply_dense(source), pad, mode)`, not yet computed. Create with `LazyPad.of(...)`; a convolution
    without padding of its own reads `source`'s tiles with the padding instead (`mode`: "zeros", "reflect",
    "replicate", as `ops.gather`'s `padding_mode`)."""

    source: torch.Tensor
    prologue: object  # nn.base.Prologue, or None: nothing applied (region tracking's `F.pad`)
    pad: tuple[int, int, int, int]  # left, right, top, bottom, as F.pad takes them
    mode: str

    _F_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}

    @staticmethod
    def of(source: torch.Tensor, prologue, pad: tuple[int, int, int, int], mode: str) -> LazyPad:
        b, c, h, w = source.shape
        shape = (b, c, h + pad[2] + pad[3], w + pad[0] + pad[1])
        fmt = (
            torch.channels_last if source.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        )
        with torch._C.DisableTorchFunctionSubclass():
            storage = torch.empty(shape, dtype=source.dtype, device=source.device, memory_format=fmt)
        t = torch.Tensor._make_subclass(LazyPad, storage)
        t.source = source.as_subclass(torch.Tensor) if isinstance(source, _Lazy) and source.filled else source
        t.prologue, t.pad, t.mode = prologue, tuple(pad), mode
        t.filled = False
        return t

    def compute(self, source: torch.Tensor) -> torch.Tensor:
        x = source if self.prologue is None else self.prologue.apply_dense(source)
        return torch.nn.functional.pad(x, self.pad, self._F_MODES[self.mode])


class LazyUpsample(_FromSource):
    """`F.interpolate(source, **call)` with `mode="nearest"` and power-of-two integer factors `factor` (`(fy, fx)`),
    not yet computed: output pixel `(y, x)` is source pixel `(y // fy, x // fx)`. Create with `LazyUpsample.of(...)`;
    `Prologue.gather` reads the source's tiles instead. Filled by replaying the call itself, so every other reader
    sees exactly what the model computes."""

    source: torch.Tensor
    factor: tuple[int, int]
    call: dict

    @staticmethod
    def of(source: torch.Tensor, factor: tuple[int, int], call: dict) -> LazyUpsample:
        b, c, h, w = source.shape
        fmt = (
            torch.channels_last if source.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        )
        with torch._C.DisableTorchFunctionSubclass():
            storage = torch.empty(
                (b, c, h * factor[0], w * factor[1]), dtype=source.dtype, device=source.device, memory_format=fmt
            )
        t = torch.Tensor._make_subclass(LazyUpsample, storage)
        t.source = source.as_subclass(torch.Tensor) if isinstance(source, _Lazy) and source.filled else source
        t.factor, t.call = tuple(factor), dict(call)
        t.filled = False
        return t

    def compute(self, source: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(source, **self.call)
