"""The plain-PyTorch reference of the token-sparse transformer engine: the dense model, with every block's inactive
rows (and, with the context cached, its context output) put back to the capture's after the block."""

import torch


def clamped_reference(model, blocks, x, kw, x_edit, tokens: torch.Tensor, cache_context: bool) -> torch.Tensor:
    """The model on `x_edit` where each of `blocks` (returning `(context, hidden)`, or the joint sequence context
    first as FLUX.2's single-stream blocks do) keeps the capture's (its run on `x`) hidden rows outside `tokens`
    `[N]`, and its context output when `cache_context`."""
    captured = {}
    n = tokens.shape[0]

    def keep(i):
        def hook(mod, args, kwargs, out):
            out = (out[:, :-n], out[:, -n:]) if torch.is_tensor(out) else out
            captured[i] = tuple(o.clone() if o is not None else None for o in out)

        return hook

    def clamp(i):
        def hook(mod, args, kwargs, out):
            joint = torch.is_tensor(out)
            ctx, hidden = (out[:, :-n], out[:, -n:]) if joint else out
            hidden = hidden.clone()
            hidden[:, ~tokens] = captured[i][1][:, ~tokens]
            ctx = captured[i][0] if cache_context else ctx
            return torch.cat([ctx, hidden], dim=1) if joint else (ctx, hidden)

        return hook

    with torch.no_grad():
        hooks = [blk.register_forward_hook(keep(i), with_kwargs=True) for i, blk in enumerate(blocks)]
        model(x, **kw)
        for h in hooks:
            h.remove()
        hooks = [blk.register_forward_hook(clamp(i), with_kwargs=True) for i, blk in enumerate(blocks)]
        try:
            return model(x_edit, **kw).sample
        finally:
            for h in hooks:
                h.remove()
