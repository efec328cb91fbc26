"""Composite blocks: residual add, channel concat, a GroupNorm ResNet block, and fused `nn.Sequential` chains.

These are ordinary `nn.Module`s (usable without sparsedit); their handlers fuse the pointwise layers before a
convolution into its gather (GroupNorm affine + SiLU, as SIGE does) and the residual add into the scatter.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap

import torch
import torch.nn as nn

from .. import ops
from ..regions import Geometry
from .base import IDENTITY, Prologue, SparseHandler, handler_of, register_handler
from .state import Mode
from .tracking import untracked


__all__ = ["Add", "Concat", "ResBlock"]

_POINT = Geometry()


class Add(nn.Module):
    """`a + b` as a module, so a residual connection is visible to the sparse engine."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    """Channel concatenation (skip connections of U-Nets) as a module."""

    def __init__(self, dim: int = 1):
        super().__init__()
        if dim != 1:
            raise ValueError("Concat joins channels (dim=1) only.")
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv → GroupNorm → SiLU → 3×3 conv, plus a (1×1 conv) shortcut; as in diffusion UNets.

    Args:
        in_channels, out_channels: channel counts.
        groups: GroupNorm groups (must divide both channel counts).
        eps: GroupNorm epsilon.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.act1 = nn.SiLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.act2 = nn.SiLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.act2(self.norm2(h)))
        return self.add(self.shortcut(x), h)


def _foldable(handlers: list[SparseHandler]) -> bool:
    """Pointwise layers fold into one scale/shift + activation when every affine precedes the single activation."""
    seen_act = False
    for h in handlers:
        if not h.pointwise:
            return False
        if h.affine:
            if seen_act:
                return False
        elif getattr(h, "activation", "identity") != "identity":
            if seen_act:
                return False
            seen_act = True
    return True


class Chain:
    """A planned run of modules: pointwise layers folded into the gather of the layer that consumes them.

    Plan items are `(prologue_handlers, handler_or_module)`; a bare module (no handler) runs as torch would, and its
    output counts as changed everywhere.
    """

    def __init__(self, modules: list[nn.Module]):
        self.items: list[tuple[list[SparseHandler], object]] = []
        pending: list[SparseHandler] = []
        for m in modules:
            h = handler_of(m)
            if h is not None and h.pointwise:
                pending.append(h)
                continue
            if h is not None and h.consumes_prologue and pending and _foldable(pending):
                self.items.append((pending, h))
                pending = []
                continue
            self._flush(pending)
            pending = []
            self.items.append(([], h if h is not None else m))
        self._flush(pending)

    def _flush(self, pending: list[SparseHandler]) -> None:
        if len(pending) > 1 and _foldable(pending):
            self.items.append((pending[:-1], pending[-1]))
        else:
            self.items.extend(([], h) for h in pending)

    @property
    def folded(self) -> set[int]:
        return {id(h) for pro, _ in self.items for h in pro}

    def capture(self, x: torch.Tensor, state, store_last: bool = True) -> torch.Tensor:
        """Dense forward that skips storing outputs that sparse runs never read (folded layers)."""
        n = len(self.items)
        for i, (pro, last) in enumerate(self.items):
            for h in pro:
                with _no_store(state):
                    x = h.module(x)
            module = last.module if isinstance(last, SparseHandler) else last
            if i == n - 1 and not store_last:
                with _no_store(state):
                    x = module(x)
            else:
                x = module(x)
        return x

    def sparse(self, x: torch.Tensor, state, residual: torch.Tensor | None = None, into=None) -> torch.Tensor:
        n = len(self.items)
        for i, (pro, last) in enumerate(self.items):
            if not isinstance(last, SparseHandler):
                x = last(x)
                continue
            extra = {}
            if i == n - 1 and residual is not None:
                extra["residual"] = residual
            if i == n - 1 and into is not None:
                extra["into"] = into
            # A leaf tags its output itself: it and its folded norms run with region tracking popped (as their
            # own `forward` would run them).
            with untracked() if last.sets_own_region else contextlib.nullcontext():
                prologue = fold(pro, x, state)
                x = last.sparse(x, prologue, **extra) if last.consumes_prologue else last.sparse(x, **extra)
        return x


def fold(handlers: list[SparseHandler], x: torch.Tensor, state) -> Prologue:
    p = IDENTITY
    for h in handlers:
        p = h.fold(x, state.key(h.name), p)
    return p


@contextlib.contextmanager
def _no_store(state):
    prev, state.no_store = state.no_store, True
    try:
        yield
    finally:
        state.no_store = prev


@register_handler(nn.Sequential)
class SequentialHandler(SparseHandler):
    """`nn.Sequential`: children run as a fused chain in sparse mode."""

    kind = "sequential"

    def prepare(self):
        self.chain = Chain(list(self.module))

    def forward(self, *args, **kwargs):
        st = self.state
        if st.mode is Mode.CAPTURE:
            return self.chain.capture(*args, st)
        if st.mode is Mode.SPARSE:
            return self.sparse(*args)
        return self.original(*args, **kwargs)

    def sparse(self, x, residual=None, into=None):
        return self.chain.sparse(x, self.state, residual, into)


@register_handler(Add)
class AddHandler(SparseHandler):
    kind = "add"

    def macs_per_position(self, out):
        return 0

    def sparse(self, a, b):
        st = self.state
        buf = self.buffer(st.key(self.name))
        region = st.union(st.region_of(a), st.region_of(b))
        poison = st.config.poison_scratch

        def compute(_, bi, __):
            return ops.gather(a, bi.origins, bi.tile, poison=poison) + ops.gather(
                b, bi.origins, bi.tile, poison=poison
            )

        out = self.run_tiles(None, region, _POINT, compute, lambda _, __: a + b, buf, None, IDENTITY)
        st.set_region(out, region)
        return out


@register_handler(Concat)
class ConcatHandler(SparseHandler):
    kind = "concat"

    def sparse(self, *xs):
        st = self.state
        buf = self.buffer(st.key(self.name))
        region = st.union(*(st.region_of(x) for x in xs))
        poison = st.config.poison_scratch

        def compute(_, bi, __):
            return torch.cat([ops.gather(x, bi.origins, bi.tile, poison=poison) for x in xs], dim=1)

        out = self.run_tiles(None, region, _POINT, compute, lambda _, __: torch.cat(xs, 1), buf, None, IDENTITY)
        st.set_region(out, region)
        return out


@register_handler(ResBlock)
class ResBlockHandler(SparseHandler):
    """Fused ResNet block: norm+SiLU inside each conv's gather, shortcut add inside conv2's scatter (written straight
    into the block's output buffer)."""

    kind = "resblock"

    def prepare(self):
        m = self.module
        self.main = Chain([m.norm1, m.act1, m.conv1, m.norm2, m.act2, m.conv2])
        self.add = handler_of(m.add)

    def forward(self, x):
        st = self.state
        if st.mode is Mode.CAPTURE:
            m = self.module
            # conv2's output is never read in sparse runs: the fused add writes the block's output directly.
            h = self.main.capture(x, st, store_last=False)
            return m.add(self._shortcut(x), h)
        if st.mode is Mode.SPARSE:
            return self.sparse(x)
        return self.original(x)

    def _shortcut(self, x):
        shortcut = self.module.shortcut
        return x if isinstance(shortcut, nn.Identity) else shortcut(x)

    def sparse(self, x):
        st = self.state
        skip = self._shortcut(x)
        out = self.add.buffer(st.key(self.add.name))
        return self.main.sparse(x, st, residual=skip, into=out)


# -- a user's residual block: `x + self.body(x)` in Python ---------------------------------------------------------------
def residual_child(module: nn.Module) -> str | None:
    """The name of the child `body` when `module.forward(x)` is exactly `return x + self.body(x)` (or `body(x) + x`,
    or the sum assigned to a name that is returned), read from the source of its class's `forward` (no tracing: an
    `fx` trace patches `nn.Module.__call__` for every thread while it runs); `None` for anything else or when the
    source is not available."""
    forward = type(module).forward
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
        return None
    a = fn.args
    if a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or a.defaults or len(a.args) != 2:
        return None
    this, x = a.args[0].arg, a.args[1].arg
    body = (
        fn.body[1:]
        if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
        else fn.body
    )
    if len(body) == 1 and isinstance(body[0], ast.Return):
        total = body[0].value
    elif (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
          and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
          and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):  # fmt: skip
        total = body[0].value
    else:
        return None
    if not isinstance(total, ast.BinOp) or not isinstance(total.op, ast.Add):
        return None

    def is_x(e):
        return isinstance(e, ast.Name) and e.id == x

    def child_of_x(e):
        if not (isinstance(e, ast.Call) and len(e.args) == 1 and not e.keywords and is_x(e.args[0])):
            return None
        f = e.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == this:
            return f.attr
        return None

    child = child_of_x(total.right) if is_x(total.left) else child_of_x(total.left) if is_x(total.right) else None
    if child is None or not isinstance(getattr(module, child, None), nn.Module):
        return None
    return child if child in dict(module.named_children()) else None


def _takes_residual(handler: SparseHandler | None) -> bool:
    """Whether `handler.sparse` can write `its output + residual` into a given buffer (a chain: its last layer)."""
    if handler is None:
        return False
    if isinstance(handler, SequentialHandler):
        items = getattr(handler, "chain", None)
        if items is None or not items.items:
            return False
        return _takes_residual(items.items[-1][1] if isinstance(items.items[-1][1], SparseHandler) else None)
    params = inspect.signature(handler.sparse).parameters
    return "residual" in params and "into" in params


class ResidualHandler(SparseHandler):
    """A module whose `forward` is `x + self.body(x)` (pix2pix's `ResnetBlock`, most users' residual blocks), found in
    its source (`residual_child`). Sparse runs compute `body` with the add fused into its last layer's scatter, written
    into this module's cached output: no full-size add, and the body's own output is never stored."""

    kind = "residual"

    def __init__(self, module: nn.Module, name: str, state, child: str):
        super().__init__(module, name, state)
        self.child = child

    def prepare(self):
        self.body = handler_of(getattr(self.module, self.child))
        self.fused = _takes_residual(self.body)

    def forward(self, *args, **kwargs):
        st = self.state
        plain = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].dim() == 4
        if st.mode not in (Mode.CAPTURE, Mode.SPARSE) or not plain or not self.fused:
            return self.original(*args, **kwargs)  # (profiling: its children record themselves)
        (x,) = args
        if st.mode is Mode.CAPTURE:
            body = getattr(self.module, self.child)
            if isinstance(self.body, SequentialHandler):
                h = self.body.chain.capture(x, st, store_last=False)  # sparse runs write past it, into ours
            else:
                with _no_store(st):
                    h = body(x)
            out = x + h
            self.capture(st.key(self.name), out)
            return out
        return self.sparse(x)

    def sparse(self, x):
        if not self.fused:  # (called by a parent chain) the module's own forward, its add tracked
            return self.original(x)
        st = self.state
        out = self.buffer(st.key(self.name))
        return self.body.sparse(x, residual=x, into=out)
