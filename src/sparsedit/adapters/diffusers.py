"""diffusers models: attachment through `diffusers.hooks`, and handlers for diffusers' own layers.

Imported only when a model containing diffusers modules is sparsified.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.embeddings import Timesteps

from ..nn.base import SparseHandler, register_dense_safe


HOOK_NAME = "sparsedit_spatial"

register_dense_safe(Timesteps)


class SparseHook(ModelHook):
    """Routes a module's forward through its sparse handler."""

    def __init__(self, handler: SparseHandler):
        super().__init__()
        self.handler = handler

    def new_forward(self, module, *args, **kwargs):
        return self.handler.forward(*args, **kwargs)


class HookAttach:
    @staticmethod
    def attach(handler: SparseHandler) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(handler.module)
        if registry.get_hook(HOOK_NAME) is not None:
            raise RuntimeError(
                f"{handler.name} already carries a {HOOK_NAME} hook; call `sparsedit.unsparsify_(model)` first."
            )
        hook = SparseHook(handler)
        registry.register_hook(hook, HOOK_NAME)
        handler.original = hook.fn_ref.original_forward
        handler.module._sparsedit_handler = handler

    @staticmethod
    def detach(handler: SparseHandler) -> None:
        handler.module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        handler.module.__dict__.pop("_sparsedit_handler", None)
