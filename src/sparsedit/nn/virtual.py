"""Lazy feature maps: glue between sparse layers that is never computed at full size.

A U-Net's decoder concatenates each upsampled map with its skip connection (`torch.cat([h, skip], dim=1)`) and feeds
the result to a ResNet block, whose convolutions read only active tiles of it. Computing the concatenation densely
costs a full-size copy per skip (9% of a DDPM-256 sparse forward). During a sparse run, region tracking instead returns
a `LazyConcat`: a tensor of the right shape and layout whose memory is allocated but not written, that remembers its
parts. Gathers read tiles straight from the parts (`Prologue.gather`); any other use of the tensor (a torch function
the engine has not taught to read parts, a dense fallback, user code) first fills it with the real concatenation, so
every reader sees correct values. Nothing outlives the run unfilled: `SparseState.end_run` fills what is left.
"""

from __future__ import annotations

import torch


__all__ = ["LazyConcat"]

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


class LazyConcat(torch.Tensor):
    """`torch.cat(parts, dim=1)`, not yet computed. Create with `LazyConcat.of(parts)`."""

    parts: tuple[torch.Tensor, ...]
    filled: bool

    @staticmethod
    def of(parts) -> LazyConcat:
        first = parts[0]
        shape = (first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:])
        channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in parts)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch._C.DisableTorchFunctionSubclass():
            storage = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=fmt)
        t = torch.Tensor._make_subclass(LazyConcat, storage)
        t.parts = tuple(p.as_subclass(torch.Tensor) if isinstance(p, LazyConcat) and p.filled else p for p in parts)
        t.filled = False
        return t

    def materialize(self) -> None:
        if self.filled:
            return
        for p in self.parts:
            if isinstance(p, LazyConcat):
                p.materialize()
        with torch._C.DisableTorchFunctionSubclass():
            torch.cat([p.as_subclass(torch.Tensor) for p in self.parts], dim=1, out=self.as_subclass(torch.Tensor))
        self.filled = True
        self.parts = ()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA:
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    if isinstance(t, LazyConcat):
                        t.materialize()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
