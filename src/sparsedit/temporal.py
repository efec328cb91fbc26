"""Temporal reuse across denoising steps: Faster Diffusion's encoder propagation (Li et al., NeurIPS 2024) and
DeepCache's deep-feature reuse (Ma et al., CVPR 2024), one schedule and one set of hooks.

```python
from sparsedit import temporal

temporal.enable(pipe, temporal.TemporalConfig())  # key steps: the paper's schedule for the pipeline's step count
image = pipe(prompt, num_inference_steps=20).images[0]
temporal.disable(pipe)  # the pipeline computes bit-identically to before

temporal.apply_encoder_propagation(unet, TemporalConfig(every=3, reuse="deep"))  # your own loop
temporal.remove_encoder_propagation(unet)
```

At a key step the model runs whole and the outputs of the units a non-key step reuses are kept (UNet: `conv_in`,
each resnet/attention layer and down/upsampler of the blocks, the mid block; DiT: the transformer blocks). At a
non-key step those units return the kept outputs instead of computing. Every unit carries a `diffusers.hooks` hook;
the model carries one more that finds the step: from the pipeline's own loop (the scheduler's `step` calls) under
`enable`, from the editor's loop under `SparseEditor(..., temporal=...)`, or, at model level, from the timestep
argument (a new value is a new step; a larger one starts a new generation).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import attachments
from .config import TemporalConfig
from .nn.state import Mode


__all__ = [
    "TemporalConfig",
    "apply_encoder_propagation",
    "disable",
    "enable",
    "inject_prior_noise",
    "is_applied",
    "remove_encoder_propagation",
    "stats",
]

HOOK_NAME = "sparsedit_temporal"


# -- what a non-key step does with each unit ------------------------------------------------------------------------
RUN, REPLAY, PASS, DELTA_IN, DELTA_OUT = "run", "replay", "pass", "delta_in", "delta_out"


@dataclass
class _Unit:
    name: str
    modules: list[nn.Module]
    role: str = RUN  # at non-key steps


def _pairs(block) -> list[list[nn.Module]]:
    """A UNet block's layers: each resnet with the attention after it, in forward order."""
    attentions = list(getattr(block, "attentions", None) or [])
    resnets = list(block.resnets)
    if attentions and len(attentions) != len(resnets):
        raise NotImplementedError(f"{type(block).__name__}: {len(attentions)} attentions for {len(resnets)} resnets.")
    return [[r] + ([attentions[i]] if attentions else []) for i, r in enumerate(resnets)]


_UNET_BLOCKS = {
    "DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D",
}  # fmt: skip


def _unet_units(unet: nn.Module, config: TemporalConfig) -> list[_Unit]:
    """UNet units and their roles. Skip connection r is produced by encoder unit r (`conv_in`, then each layer and
    downsampler of the down blocks) and consumed by decoder unit K-1-r (the up blocks' layers in forward order)."""
    for block in [*unet.down_blocks, *unet.up_blocks]:
        if type(block).__name__ not in _UNET_BLOCKS:
            raise NotImplementedError(
                f"temporal reuse knows the UNet blocks {sorted(_UNET_BLOCKS)}, not {type(block).__name__}."
            )
    encoder = [_Unit("conv_in", [unet.conv_in])]
    for b, block in enumerate(unet.down_blocks):
        encoder += [_Unit(f"down_blocks.{b}.layers.{i}", m) for i, m in enumerate(_pairs(block))]
        encoder += [_Unit(f"down_blocks.{b}.downsamplers.{i}", [d]) for i, d in enumerate(block.downsamplers or [])]
    decoder = []
    for b, block in enumerate(unet.up_blocks):
        layers = _pairs(block)
        layers[-1] = layers[-1] + list(block.upsamplers or [])  # the upsampler belongs to the block's last layer
        decoder += [_Unit(f"up_blocks.{b}.layers.{i}", m) for i, m in enumerate(layers)]
    if len(encoder) != len(decoder):
        raise NotImplementedError(
            f"{type(unet).__name__}: {len(encoder)} skip connections produced but {len(decoder)} consumed; temporal "
            "reuse needs the standard UNet layout."
        )
    mid = [_Unit("mid_block", [unet.mid_block])] if unet.mid_block is not None else []
    k, s = len(encoder), min(config.skip_level, len(encoder) - 1)
    for u in mid:
        u.role = REPLAY
    for r, u in enumerate(encoder):
        u.role = RUN if (config.reuse == "deep" and r <= s) else REPLAY
    for j, u in enumerate(decoder):
        u.role = REPLAY if (config.reuse != "encoder" and k - 1 - j > s) else RUN
    return encoder + mid + decoder


def _dit_units(model: nn.Module, config: TemporalConfig) -> list[_Unit]:
    blocks = list(model.transformer_blocks)
    n = len(blocks)
    units = [_Unit(f"transformer_blocks.{i}", [b]) for i, b in enumerate(blocks)]
    if config.reuse == "encoder":
        e = config.encoder_blocks if config.encoder_blocks is not None else max(1, round(n * 18 / 28))
        if e >= n:
            raise ValueError(f"TemporalConfig.encoder_blocks={e} leaves no decoder block of the model's {n}.")
        for u in units[: e - 1]:
            u.role = PASS
        units[e - 1].role = REPLAY
    elif config.reuse == "deep":
        s = config.skip_level + 1
        middle = units[s : n - s]
        if not middle:
            raise ValueError(
                f"TemporalConfig.skip_level={config.skip_level} leaves no middle block of the model's {n}."
            )
        for u in middle[:-1]:
            u.role = PASS
        middle[0].role = DELTA_IN if len(middle) > 1 else DELTA_OUT
        middle[-1].role = DELTA_OUT
    else:
        raise ValueError("DiT-family transformers have no skip connections: use reuse='encoder' or 'deep'.")
    return units


def _units(model: nn.Module, config: TemporalConfig) -> list[_Unit]:
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks") and hasattr(model, "conv_in"):
        return _unet_units(model, config)
    if hasattr(model, "transformer_blocks"):
        return _dit_units(model, config)
    raise NotImplementedError(
        f"temporal reuse supports UNet2DModel, UNet2DConditionModel and DiT-family transformers "
        f"(DiTTransformer2DModel, PixArtTransformer2DModel), not {type(model).__name__}."
    )


# -- state -----------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    config: TemporalConfig
    total: int | None = None  # steps in the loop (None: unknown yet)
    driven: bool = False  # the step comes from a loop (pipeline or editor), not from timesteps
    step: int | None = None  # the loop index of the current call; None: plain dense call
    call: int = 0  # calls of the model within the current step (unbatched guidance calls it twice)
    last_t: float | None = None
    phase: str | None = None  # "record" (key step), "replay" (non-key step) or None (plain)
    repeat: int = 1  # a parallel call batches this many steps
    store: dict = field(default_factory=dict)  # (call, unit) -> kept output (and its regions) or input
    ahead: dict = field(default_factory=dict)  # (step, call) -> output of a parallel decoder batch
    timesteps: list | None = None  # the pipeline's timesteps (parallel decoding looks ahead in them)
    keys: list[int] | None = None
    counts: dict = field(default_factory=lambda: {"key": 0, "reuse": 0, "parallel_calls": 0})
    pipe: object = None  # weakref to the pipeline under `enable`
    scheduler: object = None
    call_step: int | None = None  # the step the last call belonged to
    restore: tuple | None = None  # `enable`: the scheduler and its own methods, for `disable`
    hooked: list = field(default_factory=list)  # the unit modules carrying a hook, for removal

    def new_generation(self) -> None:
        self.step, self.call, self.last_t, self.call_step = 0, 0, None, None
        self.store.clear()
        self.ahead.clear()
        self.keys = None
        self.counts = {"key": 0, "reuse": 0, "parallel_calls": 0}

    def key_steps(self) -> list[int] | None:
        """The loop's key steps; None while the step count is unknown (model level, `every` or explicit steps)."""
        if self.keys is None and self.total is not None:
            self.keys = self.config.key_steps_for(self.total)
        if self.keys is None and self.config.needs_total:
            raise RuntimeError(
                f"TemporalConfig(key_steps={self.config.key_steps!r}) depends on the number of steps: pass "
                "`num_inference_steps=` to `apply_encoder_propagation`, give explicit `key_steps` or `every`, or use "
                "`sparsedit.temporal.enable(pipe, config)`."
            )
        return self.keys

    def is_key(self, i: int) -> bool:
        keys = self.key_steps()
        if keys is not None:
            return i in keys
        return i % self.config.every == 0 if self.config.every is not None else i in self.config.key_steps

    def next_key(self, i: int) -> int:
        """The first key step after step `i` (the loop's end if none)."""
        keys = self.key_steps()
        if keys is None:  # model level, the step count unknown
            if self.config.every is not None:
                return (i // self.config.every + 1) * self.config.every
            keys = self.config.key_steps
        later = [k for k in keys if k > i]
        return later[0] if later else (self.total if self.total is not None else i + 1)

    @property
    def reuses(self) -> bool:
        """Whether this loop reuses anything (prior noise compensates only then)."""
        keys = self.key_steps()
        return keys is None or len(keys) < self.total


def _state(model: nn.Module) -> _State:
    st = attachments.get(model, attachments.TEMPORAL)
    if st is None:
        raise RuntimeError(
            f"temporal reuse is not applied to this {type(model).__name__}; call "
            "`sparsedit.temporal.apply_encoder_propagation(model, TemporalConfig())` first."
        )
    return st


def is_applied(model: nn.Module) -> bool:
    return attachments.has(model, attachments.TEMPORAL)


def loop_state(model: nn.Module) -> _State:
    """The temporal-reuse state of `model` (its current step, key steps and counters), for a loop that drives it."""
    return _state(model)


def drive(model: nn.Module) -> None:
    """Steps come from the caller's own loops (`begin_loop`, `loop_state(model).step`); other calls run whole."""
    _state(model).driven = True


# -- hooks -----------------------------------------------------------------------------------------------------------
def _timestep_value(args, kwargs, names) -> float | None:
    t = kwargs.get("timestep", args[names.index("timestep")] if "timestep" in names[: len(args)] else None)
    if t is None:
        return None
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def _spatial_state(owner):
    """The sparse engine's state when the model (`owner`, a weakref) is sparsified and inside an edit (region tags
    travel with reused features), else None."""
    model = owner()
    st = None if model is None else attachments.engine_state(model)
    return st if st is not None and st.mode is Mode.SPARSE else None


def _repeat(out, m: int):
    return out if m == 1 else tree_map(lambda t: torch.cat([t] * m) if isinstance(t, torch.Tensor) else t, out)


class _UnitHook:
    """Per unit module: runs (keeping the output at key steps), or reuses at non-key steps."""

    def __init__(self, state: _State, unit: _Unit, last: bool, owner):
        super().__init__()
        self.state, self.unit, self.last, self.owner = state, unit, last, owner

    def new_forward(self, module, *args, **kwargs):
        st, unit = self.state, self.unit
        role = unit.role
        if st.phase is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        if st.phase == "record":
            if role == DELTA_IN:
                st.store[(st.call, DELTA_IN)] = x.detach().clone()
            out = self.fn_ref.original_forward(*args, **kwargs)
            if role == REPLAY and self.last:
                st.store[(st.call, unit.name)] = self._keep(out)
            elif role == DELTA_OUT:
                start = st.store.pop((st.call, DELTA_IN), None)
                st.store[(st.call, DELTA_OUT)] = out.detach() - (x if start is None else start)
            return out
        # A non-key step.
        if role in (PASS, DELTA_IN) or (role == REPLAY and not self.last):
            return x  # replaced downstream anyway (or, DiT: the residual comes at the middle's end)
        if role == DELTA_OUT:
            return x + _repeat(st.store[(st.call, DELTA_OUT)], st.repeat)
        kept = st.store.get((st.call, unit.name))
        if kept is None:
            raise RuntimeError(
                f"temporal reuse: nothing kept for {unit.name} (call {st.call}) from a key step; the first step of a "
                "loop must be a key step, and each step must call the model as often as the key step did."
            )
        out, regions = kept
        out = _repeat(out, st.repeat)
        spatial = _spatial_state(self.owner)
        if spatial is not None and regions is not None:
            for t, r in zip(tree_flatten(out)[0], regions):
                if r is not None:
                    spatial.set_region(t, r)
        return out

    def _keep(self, out):
        """A copy of a unit's output (a sparse run's buffers change later) and, inside an edit, the regions where it
        differs from the capture's: reused, it stays sparse."""
        spatial = _spatial_state(self.owner)
        leaves, spec = tree_flatten(out)
        kept = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        regions = None
        if spatial is not None:
            regions = [
                spatial.region_of(t) if isinstance(t, torch.Tensor) and spatial.has_region(t) else None for t in leaves
            ]
        return tree_unflatten(kept, spec), regions


def _split(out, m: int) -> list:
    """A batched model output → `m` outputs of the same type (the batch is `m` steps, step-major)."""
    if isinstance(out, torch.Tensor):
        return list(out.chunk(m))
    if isinstance(out, tuple):
        parts = [_split(o, m) for o in out]
        return [tuple(p[j] for p in parts) for j in range(m)]
    if hasattr(out, "keys"):  # a diffusers BaseOutput
        parts = {k: _split(v, m) for k, v in out.items()}
        return [type(out)(**{k: v[j] for k, v in parts.items()}) for j in range(m)]
    return [out] * m


class _RootHook:
    """On the model: finds the step of each call and sets the phase its units follow."""

    def __init__(self, state: _State, names: list[str]):
        super().__init__()
        self.state, self.names = state, names

    def _locate(self, args, kwargs) -> None:
        st = self.state
        t = _timestep_value(args, kwargs, self.names)
        if st.driven:
            if st.pipe is not None:
                self._check_scheduler()
                if st.total is None:  # the loop runs from the first call's timestep to the end
                    ts = st.timesteps or []
                    pos = next((i for i, v in enumerate(ts) if t is not None and float(v) == t), 0)
                    st.total = len(ts) - pos if ts else None
            st.call = st.call + 1 if st.step is not None and st.call_step == st.step else 0
            st.call_step, st.last_t = st.step, t
            return
        if t is None:
            raise ValueError("temporal reuse at model level finds the step from the `timestep` argument; pass one.")
        if st.last_t is None or t > st.last_t:
            st.new_generation()
        elif t < st.last_t:
            st.step += 1
            st.call = 0
        else:
            st.call += 1
        st.last_t = t

    def _check_scheduler(self) -> None:
        st = self.state
        pipe = st.pipe()
        if pipe is not None and pipe.scheduler is not st.scheduler:
            raise RuntimeError(
                "the pipeline's scheduler was replaced after `sparsedit.temporal.enable`; the step count comes from "
                "the scheduler it wrapped. Call `temporal.disable(pipe)` and `temporal.enable(pipe, config)` again."
            )

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        self._locate(args, kwargs)
        if st.step is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        key = st.is_key(st.step)
        st.counts["key" if key else "reuse"] += 1
        if not key and st.config.parallel:
            return self._parallel(args, kwargs)
        st.phase = "record" if key else "replay"
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            st.phase = None

    def _parallel(self, args, kwargs):
        st = self.state
        done = st.ahead.pop((st.step, st.call), None)
        if done is not None:
            return done
        if st.timesteps is None:
            raise RuntimeError(
                "TemporalConfig(parallel=True) needs the coming timesteps: use `sparsedit.temporal.enable(pipe, "
                "config)`, which reads them from the pipeline's scheduler."
            )
        ts = [float(v) for v in st.timesteps]
        t_now = st.last_t
        pos = next((i for i, v in enumerate(ts) if v == t_now), None)
        if pos is None:
            raise RuntimeError(f"parallel decoding: timestep {t_now} is not among the scheduler's timesteps.")
        m = st.next_key(st.step) - st.step
        if st.config.parallel_batch is not None:
            m = min(m, st.config.parallel_batch)
        m = max(1, min(m, len(ts) - pos))
        arguments = dict(zip(self.names, args), **kwargs)
        batch = next(v.shape[0] for k, v in arguments.items() if isinstance(v, torch.Tensor) and v.dim() >= 1)

        def batched(x):
            return torch.cat([x] * m) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch else x

        new = {k: tree_map(batched, v) for k, v in arguments.items() if k != "timestep"}
        new["timestep"] = torch.cat([self._timestep(arguments["timestep"], ts[pos + j], batch) for j in range(m)])
        st.phase, st.repeat = "replay", m
        st.counts["parallel_calls"] += 1
        try:
            out = self.fn_ref.original_forward(**new)
        finally:
            st.phase, st.repeat = None, 1
        outs = _split(out, m)
        for j in range(1, m):
            st.ahead[(st.step + j, st.call)] = outs[j]
        return outs[0]

    @staticmethod
    def _timestep(v, value: float, batch: int) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            if v.numel() > 1 and not bool((v == v.flatten()[0]).all()):
                raise RuntimeError("parallel decoding needs one timestep per call, got several different ones.")
            return torch.full((batch,), value, dtype=v.dtype, device=v.device)
        return torch.full((batch,), value)


@functools.cache
def _hook_classes():
    """The hooks as `diffusers.hooks.ModelHook`s (diffusers is imported only when temporal reuse is applied)."""
    from diffusers.hooks import ModelHook

    return (
        type("TemporalUnitHook", (_UnitHook, ModelHook), {}),
        type("TemporalRootHook", (_RootHook, ModelHook), {}),
    )


def _forward_names(model: nn.Module) -> list[str]:
    return list(inspect.signature(type(model).forward).parameters)[1:]


# -- model level -----------------------------------------------------------------------------------------------------
def apply_encoder_propagation(
    model: nn.Module, config: TemporalConfig | None = None, num_inference_steps: int | None = None
) -> None:
    """Attach temporal reuse to a UNet (`UNet2DModel`, `UNet2DConditionModel`) or a DiT-family transformer, in place.

    Without a driving loop, each call's step comes from its `timestep` argument: a new value is the next step, a
    larger one starts a new generation. Prior noise injection needs the loop's latents: use `enable(pipe, config)`,
    or call `inject_prior_noise` in your loop. Apply after `sparsedit.sparsify_` when combining both.

    Args:
        model: the denoising model.
        config: a `TemporalConfig` (default: encoder propagation on the paper's schedule).
        num_inference_steps: the loop's step count, for the preset schedules.
    """
    config = TemporalConfig() if config is None else config
    if not isinstance(config, TemporalConfig):
        raise TypeError(f"apply_encoder_propagation expects a TemporalConfig, got {type(config).__name__}.")
    if is_applied(model):
        raise RuntimeError(
            "Temporal reuse is already applied to this model; call "
            "`sparsedit.temporal.remove_encoder_propagation(model)` first."
        )
    from diffusers.hooks import HookRegistry

    unit_hook, root_hook = _hook_classes()
    units = _units(model, config)
    state = _State(config, total=num_inference_steps)
    owner = weakref.ref(model)
    hooked = state.hooked
    for unit in units:
        if unit.role == RUN:
            continue
        for i, module in enumerate(unit.modules):
            hook = unit_hook(state, unit, i == len(unit.modules) - 1, owner)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
            hooked.append(module)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(root_hook(state, _forward_names(model)), HOOK_NAME)
    attachments.attach(model, attachments.TEMPORAL, state)


def remove_encoder_propagation(model: nn.Module) -> None:
    """Detach every hook `apply_encoder_propagation` added; the model computes bit-identically to before."""
    for module in [*_state(model).hooked, model]:
        module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    attachments.detach(model, attachments.TEMPORAL)


def stats(model: nn.Module) -> dict:
    """What the last generation did: its key steps, how many model calls computed whole, reused, or ran as
    parallel decoder batches, and `kept_bytes`, the memory the features kept for reuse hold now."""
    st = _state(model)
    kept = [t for t in tree_flatten(list(st.store.values()))[0] if isinstance(t, torch.Tensor)]
    return {
        "key_steps": list(st.keys) if st.keys is not None else None,
        "total_steps": st.total,
        "key_calls": st.counts["key"],
        "reuse_calls": st.counts["reuse"],
        "parallel_calls": st.counts["parallel_calls"],
        "kept_bytes": sum(t.numel() * t.element_size() for t in {id(t): t for t in kept}.values()),
    }


# -- driving loops ----------------------------------------------------------------------------------------------------
def begin_loop(model: nn.Module, total: int | None, timesteps=None) -> _State:
    """Start a new generation of `total` steps (a new trajectory: nothing is reused from the last one)."""
    st = _state(model)
    st.new_generation()
    st.driven, st.total, st.timesteps = True, total, timesteps
    return st


def inject_prior_noise(z: torch.Tensor, t, z_T: torch.Tensor, config: TemporalConfig) -> torch.Tensor:
    """Faster Diffusion's prior noise injection: `z + prior_noise * z_T` after a step at a timestep below
    `prior_noise_below` (restores the high-frequency detail that reuse smooths away); `z` unchanged otherwise."""
    if config.prior_noise == 0 or float(t) >= config.prior_noise_below:
        return z
    return z + config.prior_noise * z_T.to(z.dtype)


def _denoising_model(pipe) -> nn.Module:
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return model
    raise NotImplementedError(f"{type(pipe).__name__} has no `unet` or `transformer` to apply temporal reuse to.")


def enable(pipe, config: TemporalConfig | None = None) -> None:
    """Temporal reuse on a diffusers pipeline: its UNet (or transformer) reuses features between key steps, the step
    index comes from the pipeline's own loop (each `scheduler.step` is one step; `set_timesteps` starts a loop), and
    prior noise is injected into the latents the scheduler returns.

    Args:
        pipe: a diffusers pipeline with a `unet` or a `transformer` and a `scheduler`.
        config: a `TemporalConfig`.
    """
    config = TemporalConfig() if config is None else config
    model = _denoising_model(pipe)
    sched = pipe.scheduler
    if config.parallel and getattr(sched, "order", 1) != 1:
        raise ValueError(
            f"parallel decoding steps the scheduler through precomputed predictions; {type(sched).__name__} is of "
            "order {sched.order} (it calls the model more than once per step). Use parallel=False."
        )
    apply_encoder_propagation(model, config)
    st = _state(model)
    st.driven, st.pipe, st.scheduler = True, weakref.ref(pipe), sched
    own_set, own_step = sched.__dict__.get("set_timesteps"), sched.__dict__.get("step")
    set_timesteps, step = sched.set_timesteps, sched.step
    prior = {"z_T": None}

    # `functools.wraps`: pipelines inspect these signatures (custom timesteps, `eta`, `generator`).
    @functools.wraps(set_timesteps)
    def set_timesteps_wrapper(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        begin_loop(model, None, list(sched.timesteps))
        st.pipe, st.scheduler = weakref.ref(pipe), sched
        prior["z_T"] = None
        return out

    @functools.wraps(step)
    def step_wrapper(model_output, timestep, sample, *args, **kwargs):
        if prior["z_T"] is None:
            prior["z_T"] = sample.detach() / float(getattr(sched, "init_noise_sigma", 1.0))
        out = step(model_output, timestep, sample, *args, **kwargs)
        if st.step is not None:
            st.step += 1
            if st.total is not None and st.step >= st.total:
                st.step = None  # the loop is over: later calls (outside any loop) run plainly
        if not st.reuses:
            return out
        if isinstance(out, tuple):
            return (inject_prior_noise(out[0], timestep, prior["z_T"], config), *out[1:])
        out.prev_sample = inject_prior_noise(out.prev_sample, timestep, prior["z_T"], config)
        return out

    sched.set_timesteps, sched.step = set_timesteps_wrapper, step_wrapper
    st.restore = (sched, own_set, own_step)


def disable(pipe) -> None:
    """Undo `enable`: the pipeline computes bit-identically to before."""
    model = _denoising_model(pipe)
    st = _state(model)
    restore = getattr(st, "restore", None)
    if restore is not None:
        sched, own_set, own_step = restore
        for name, own in (("set_timesteps", own_set), ("step", own_step)):
            if own is None:
                sched.__dict__.pop(name, None)
            else:
                setattr(sched, name, own)
    remove_encoder_propagation(model)
