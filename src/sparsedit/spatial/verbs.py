"""`sparsify_` and `unsparsify_`: attach the engine's handlers and hooks to a model, and take exactly them away."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import attachments
from ..cache import ActivationCache
from ..config import SparseConfig
from ..nn.base import SparseHandler, UnsupportedLayerError, handler_for, handler_of, is_dense_safe
from ..nn.blocks import ResidualHandler, residual_child
from ..nn.layers import PointwiseHandler, WindowedHandler
from ..nn.state import SparseState
from .attachment import Attachment, attachment_of, is_sparsified
from .hooks import make_post_hook, make_pre_hook


def sparsify_(model: nn.Module, config: SparseConfig | None = None) -> None:
    """Make `model` run spatially sparse, in place. Outside `capturing`/`editing` it computes exactly as before.

    Args:
        model: any `nn.Sequential` (nested allowed) of supported layers, or a module composed of `sparsedit.nn`
            blocks; a custom module's own arithmetic runs densely and stays correct.
        config: a `SparseConfig`.

    Raises:
        UnsupportedLayerError: the model holds a layer the engine cannot make sparse (and `config.strict`).
    """
    config = SparseConfig() if config is None else config
    if not isinstance(config, SparseConfig):
        raise TypeError(f"sparsify_ expects a SparseConfig, got {type(config).__name__}.")
    if is_sparsified(model):
        raise RuntimeError(
            "This model is already sparsified; call `sparsedit.unsparsify_(model)` before sparsifying it again."
        )
    if attachments.has(model, attachments.TEMPORAL):
        raise RuntimeError(
            "This model carries temporal reuse; its hooks must sit outside the sparse ones. Call "
            "`sparsedit.temporal.remove_encoder_propagation(model)`, sparsify, then apply temporal reuse again."
        )
    cache = ActivationCache(
        storage_dtype=None if config.storage_dtype is None else getattr(torch, config.storage_dtype),
        storage_device=config.cache_device,
        budget=config.budget_bytes,
    )
    state = SparseState(config, cache)
    handlers, problems = [], []
    attach = _attach_strategy(model)
    _refuse_unregistered_transformers(model)
    owned: list[str] = []  # handlers that run their whole subtree themselves (diffusion transformers)
    for name, module in model.named_modules():
        if any(name.startswith(o) for o in owned):
            continue
        cls = handler_for(module)
        if cls is None:
            if not any(True for _ in module.children()) and not is_dense_safe(module):
                problems.append(f"  {name or '<root>'}: {type(module).__name__} has no sparse implementation")
            elif _user_module(module) and (child := residual_child(module)) is not None:
                handlers.append(ResidualHandler(module, name or "root", state, child))  # `x + self.body(x)`
            continue
        handler = cls(module, name or "root", state)
        try:
            handler.check_supported()
        except UnsupportedLayerError as e:
            problems.append(f"  {e}")
            if getattr(cls, "owns_subtree", False):  # its refusal covers its layers: listing them would be noise
                owned.append(f"{name}." if name else "")
            continue
        handlers.append(handler)
        if getattr(cls, "owns_subtree", False):
            owned.append(f"{name}." if name else "")
    if problems and config.strict:
        raise UnsupportedLayerError(
            "These layers cannot run sparse:\n" + "\n".join(problems) + "\n"
            "Replace them, or pass SparseConfig(strict=False) to run them densely on every call (correct, slower)."
        )
    for h in handlers:
        attach.attach(h)
    for h in reversed(handlers):  # descendants first: a container's plan may read its children's
        h.prepare()
    if hasattr(attach, "prepare"):  # adapters that know their library's blocks (which output feeds what)
        attach.prepare(model)
    _defer_heads(model)
    att = Attachment(state, handlers, [])
    att.strategy = attach
    att.hooks.append(model.register_forward_pre_hook(make_pre_hook(model, att), with_kwargs=True))
    att.hooks.append(model.register_forward_hook(make_post_hook(att), with_kwargs=True, always_call=True))
    attachments.attach(model, attachments.SPATIAL, att)


def _user_module(module: nn.Module) -> bool:
    """A module of the user's own code (not torch's, not a library's that an adapter handles): worth tracing for a
    Python-level residual add."""
    origin = type(module).__module__
    return not origin.startswith(("torch.", "diffusers.", "transformers."))


# diffusers' transformer models (SD3, FLUX, PixArt, Sana, ...): their blocks mix tokens through attention in code no
# handler sees, so run densely they would compute everything while the records counted only the linear layers.
_TRANSFORMERS = "diffusers.models.transformers."


def _refuse_unregistered_transformers(model: nn.Module) -> None:
    """One clear error for a diffusion transformer no handler is registered for (the UNets' `Transformer2DModel` is)."""
    owned: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(o) for o in owned):
            continue
        if getattr(handler_for(module), "owns_subtree", False):
            owned.append(f"{name}." if name else "")
        elif type(module).__module__.startswith(_TRANSFORMERS) and handler_for(module) is None:
            raise UnsupportedLayerError(
                f"{name or '<root>'}: {type(module).__name__} ({type(module).__module__}) is a diffusion transformer "
                "with no token-sparse handler registered (`sparsedit.nn.base.register_handler`); the spatial engine "
                "supports UNets, VAEs, ControlNets, GAN generators and conv models so far. Edit it with "
                "`sparsedit.temporal` reuse, or densely."
            )


# An output head called one layer after another from a parent's `forward` (diffusers' UNets, VAE encoder and decoder).
_HEAD = ("conv_norm_out", "conv_act", "conv_out")


def _defer_heads(model: nn.Module) -> None:
    """Mark the pointwise layers of output heads as deferred: their outputs are not cached, and the windowed layer
    after them gathers from their input with them folded in (virtual.py). Correct whatever the parent's `forward`
    does with them (any other reader fills the lazy output densely); it only saves the two cached maps."""
    for module in model.modules():
        layers = [getattr(module, n, None) for n in _HEAD]
        if not all(isinstance(m, nn.Module) for m in layers):
            continue
        *pointwise, consumer = map(handler_of, layers)
        if not (isinstance(consumer, WindowedHandler) and all(isinstance(h, PointwiseHandler) for h in pointwise)):
            continue
        for h in reversed(pointwise):  # from the consumer back, while each one folds into the next
            if not h.pointwise:
                break
            h.defer = True


def unsparsify_(model: nn.Module) -> None:
    """Detach every handler and hook and drop the cache; the model computes bit-identically to before."""
    att = attachment_of(model)
    att.state.rollback()
    for h in reversed(att.handlers):
        att.strategy.detach(h)
    for hook in att.hooks:
        hook.remove()
    att.state.cache.clear()
    attachments.detach(model, attachments.SPATIAL)


class _InstanceForward:
    """Default attachment: an instance-level `forward` (removal restores the class method exactly)."""

    @staticmethod
    def attach(handler: SparseHandler) -> None:
        handler.attach()

    @staticmethod
    def detach(handler: SparseHandler) -> None:
        handler.detach()


def _attach_strategy(model: nn.Module):
    """Models built with diffusers attach through `diffusers.hooks`, so sparsedit composes with diffusers' own hooks
    (caching, offloading); the import happens only for such models, keeping `import sparsedit` lean."""
    if any(type(m).__module__.startswith("diffusers.") for m in model.modules()):
        from ..adapters import diffusers as diffusers_adapter

        return diffusers_adapter.HookAttach
    return _InstanceForward
