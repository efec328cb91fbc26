"""A sparsified model's non-image inputs (timestep, prompt embeddings, flags, a ControlNet's residuals): what a
capture records of them and what makes an edit's inputs stale."""

from __future__ import annotations

import torch

from ..cache import StaleCacheError
from ..nn.state import SparseState
from .attachment import Attachment


def first_image(args, kwargs) -> torch.Tensor:
    """The model's image input: its first `[B, C, H, W]` tensor; for a model without one, a token sequence
    `[B, N, C]` passed first or as `hidden_states` (FLUX's packed latents) as a one-row map `[B, C, 1, N]` (a view)."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            return v
    tokens = args[0] if args else kwargs.get("hidden_states")
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 3:
        view = tokens.transpose(1, 2).unsqueeze(2)
        view._sparsedit_tokens = tokens  # the input it shows (not an auxiliary input)
        return view
    raise ValueError("a sparsified model's input must include a [B, C, H, W] tensor (or [B, N, C] tokens first).")


def aux_inputs(args, kwargs, image: torch.Tensor, skip=frozenset()) -> dict[str, object]:
    """Every input other than the image (timestep, prompt embeddings, flags), by name, for the staleness check;
    `skip`: keyword inputs whose changes the caller tracks (`capturing(spatial_inputs=...)`)."""
    named = {_aux_name(i): v for i, v in enumerate(args)}
    named.update({_aux_name(k): v for k, v in kwargs.items() if k not in skip})
    source = getattr(image, "_sparsedit_tokens", image)
    return {k: v for k, v in named.items() if v is not image and v is not source}


def _aux_name(key) -> str:
    return f"argument {key!r}" if isinstance(key, str) else f"argument {key}"


def _same_input(a, b) -> bool:
    """Equal inputs: tensors by value (shape, dtype, every element), dicts, lists and tuples element by element."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_input(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_input(x, y) for x, y in zip(a, b))
    return a == b


def clone_input(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: clone_input(x) for k, x in v.items()}
    return v


def check_aux(captured: dict[str, object], now: dict[str, object], changeable=frozenset()) -> frozenset:
    """Refuse an input that differs from the captured run's unless `changeable` names it; returns the changeable
    inputs that did change (a prompt edit's context), which a handler may need to recompute."""
    allowed = {_aux_name(k) for k in changeable}
    changed = frozenset(k for k in changeable if not _same_input(captured.get(_aux_name(k)), now.get(_aux_name(k))))
    for name in sorted((set(captured) | set(now)) - allowed):
        if not _same_input(captured.get(name), now.get(name)):
            raise StaleCacheError(
                f"{name} differs from the captured run (e.g. another timestep, prompt or conditioning); the cache "
                "only holds activations for the captured inputs. Capture again, or select the matching step with "
                "`sparsedit.scope(model, ...)`."
            )
    return changed


def tag_inputs(st: SparseState, att: Attachment, kwargs) -> None:
    """Give the spatial inputs named in `editing(input_regions=...)` their changed regions for this run (a tensor,
    or one per tensor of a list or tuple input); any such input left without a region counts as changed everywhere."""
    for name, regions in att.input_regions.items():
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            value, regions = [value], [regions]
        if value is None or regions is None:
            continue
        if len(value) != len(regions):
            raise ValueError(f"input_regions[{name!r}] has {len(regions)} regions for {len(value)} tensors.")
        for t, r in zip(value, regions):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and r is not None:
                if tuple(r.shape) != (t.shape[0], *t.shape[-2:]):
                    raise ValueError(
                        f"input_regions[{name!r}]: a region of shape {tuple(r.shape)} for a map of shape "
                        f"{tuple(t.shape)}; give [B, H, W] at the map's resolution."
                    )
                st.set_region(t, r.to(device=t.device, dtype=torch.bool))


def remember_changed_aux(att: Attachment, args, kwargs) -> None:
    """A committed run with a changed (allowed) input, e.g. a new prompt: the cache now belongs to that input."""
    if not att.changeable:
        return
    if att.txn_aux is not None and att.state.scope not in att.txn_aux:
        att.txn_aux[att.state.scope] = dict(att.aux.get(att.state.scope, {}))
    now = aux_inputs(args, kwargs, first_image(args, kwargs), att.spatial_inputs)
    stored = att.aux.setdefault(att.state.scope, {})
    for name in {_aux_name(k) for k in att.changeable} & set(now):
        v = now[name]
        stored[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v
