"""A request's time, predicted before it runs: the server refuses a capture predicted over `--max-request-seconds`.

For each model, once per process (the first time a session of it is made), a small dense capture runs at the
model's reference size while forward hooks record the calls of its networks (the denoiser each step, the VAE's
encoder and decoder, a GAN's generator) with their tensors' shapes. Its wall time over its multiply-accumulates gives
the machine's rate for that model. A request at another size replays the recorded calls with the spatial sizes scaled
on PyTorch's meta device under `FlopCounterMode` (nothing is computed; attention's quadratic growth is counted), and
the predicted time is its MACs over that rate, the denoiser's calls scaled by the request's steps.
"""

from __future__ import annotations

import copy
import threading
import time

import torch


__all__ = ["CostModel", "RequestTooSlow", "reference_state", "steps_run"]


class RequestTooSlow(ValueError):
    """A capture predicted to take longer than the server's `--max-request-seconds`."""


def _networks(pipe) -> dict[str, torch.nn.Module]:
    """The networks whose calls are recorded: name -> module (denoiser, VAE encoder/decoder, or the GAN itself)."""
    if isinstance(pipe, torch.nn.Module):
        return {"generator": pipe}
    out = {}
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is not None:
        out["denoiser"] = denoiser
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        out["encoder"], out["decoder"] = vae.encoder, vae.decoder
    return out


def _shape_of(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_shape_of(v) for v in x)
    if isinstance(x, dict):
        return {k: _shape_of(v) for k, v in x.items()}
    return x


def _scaled(spec, ref_hw: tuple[int, int], scale: tuple[float, float]):
    """`spec` (from `_shape_of`) as meta tensors, with the spatial sizes scaled: a 4-D tensor's last two dims when
    they are the reference latent size, and a token count equal to the reference's latent area over 1 or 4 (packed
    2x2 patches) scaled by the area ratio."""
    h, w = ref_hw
    sy, sx = scale
    if isinstance(spec, tuple) and len(spec) == 3 and spec[0] == "tensor":
        _, shape, dtype = spec
        shape = list(shape)
        if len(shape) >= 3 and shape[-2:] == [h, w]:
            shape[-2:] = [max(1, round(h * sy)), max(1, round(w * sx))]
        elif len(shape) == 3 and any(shape[1] * k == h * w for k in (1, 4)):  # [B, tokens, C]
            shape[1] = max(1, round(shape[1] * sy * sx))
        return torch.empty(shape, dtype=dtype, device="meta")
    if isinstance(spec, (list, tuple)):
        return type(spec)(_scaled(v, ref_hw, scale) for v in spec)
    if isinstance(spec, dict):
        return {k: _scaled(v, ref_hw, scale) for k, v in spec.items()}
    return spec


class CostModel:
    """One model's calls and rate, measured once (`measure`), and `predict(height, width, steps_run)`."""

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[str, tuple, dict]] = []  # (network, args spec, kwargs spec) of the reference capture
        self.ref_size: tuple[int, int] | None = None
        self.ref_latent: dict[str, tuple[int, int]] = {}  # network -> the spatial size of its input at the reference
        self.ref_steps = 0
        self.seconds_per_mac = None
        self._meta: dict[str, torch.nn.Module] = {}
        self._predicted: dict[tuple, float] = {}
        self._lock = threading.Lock()

    # -- measuring ----------------------------------------------------------------------------------------------------
    def measure(self, state: dict, options: dict, steps_run: int, make_editor) -> None:
        """Run one dense capture of `state` (at the reference size) with hooks on the networks: their calls'
        shapes and the wall time, then the MACs of those calls (meta replay) and the rate. `make_editor(options)`:
        a fresh `models.SessionEditor` of the model."""
        editor = make_editor(options)
        hooks = []

        def recorder(name):
            def hook(module, args, kwargs):
                self.calls.append((name, _shape_of(args), _shape_of(kwargs)))
                first = next((a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
                if first is not None and name not in self.ref_latent and first.dim() >= 3:
                    self.ref_latent[name] = tuple(first.shape[-2:])

            return hook

        try:
            # The first capture loads, calibrates (once per model and size: extra forwards) and warms up; the
            # second, on a fresh editor, is the one recorded and timed.
            editor.capture(state)
            editor.close()
            editor = make_editor(options)
            networks = _networks(editor.target)
            for name, module in networks.items():
                hooks.append(module.register_forward_pre_hook(recorder(name), with_kwargs=True))
            started = time.perf_counter()
            editor.capture(state)
            seconds = time.perf_counter() - started
        finally:
            for h in hooks:
                h.remove()
            editor.close()
        key = "image" if "image" in state else "labels"
        self.ref_size = tuple(state[key].shape[:2]) if key in state else (self.model.size, self.model.size)
        self.ref_steps = max(1, steps_run)
        macs = self._macs(self.ref_size, self.ref_steps)
        self.seconds_per_mac = seconds / max(macs, 1)

    def _meta_module(self, name: str) -> torch.nn.Module:
        if name not in self._meta:
            self._meta[name] = copy.deepcopy(_networks(self.model.base())[name]).to("meta")
        return self._meta[name]

    def _macs(self, size: tuple[int, int], steps_run: int) -> float:
        """The MACs of the recorded calls at `size` (each distinct call counted once on the meta device, then
        multiplied by how often it ran), the denoiser's scaled from the reference's steps to `steps_run`."""
        from torch.utils.flop_counter import FlopCounterMode

        scale = (size[0] / self.ref_size[0], size[1] / self.ref_size[1]) if self.ref_size else (1.0, 1.0)
        distinct: dict[str, list] = {}
        for name, args, kwargs in self.calls:
            key = f"{name}|{args!r}|{kwargs!r}"
            distinct.setdefault(key, [name, args, kwargs, 0])[3] += 1
        total = 0.0
        with torch.no_grad():
            for name, args, kwargs, count in distinct.values():
                ref = self.ref_latent.get(name, (0, 0))
                with FlopCounterMode(display=False) as counter:
                    self._meta_module(name)(*_scaled(args, ref, scale), **_scaled(kwargs, ref, scale))
                macs = counter.get_total_flops() / 2 * count
                if name == "denoiser":
                    macs *= steps_run / self.ref_steps  # the reference ran ref_steps steps
                total += macs
        return total

    # -- predicting ---------------------------------------------------------------------------------------------------
    def predict(self, height: int, width: int, steps_run: int) -> float:
        """Seconds a dense capture of `height` x `width` with `steps_run` denoising steps is predicted to take. A
        network that cannot run on the meta device at that size (a GAN built for one label-map size) is scaled by
        the pixel count instead (convolutions' cost)."""
        with self._lock:
            key = (height, width, steps_run)
            if key not in self._predicted:
                try:
                    macs = self._macs((height, width), steps_run)
                except Exception:  # noqa: BLE001 - the pixel-proportional estimate instead
                    area = height * width / (self.ref_size[0] * self.ref_size[1])
                    macs = self._macs(self.ref_size, steps_run) * area
                if len(self._predicted) > 256:
                    self._predicted.clear()
                self._predicted[key] = macs * self.seconds_per_mac
            return self._predicted[key]


def reference_state(model, size: int) -> dict:
    """A scene at `size` in the form `model` takes (image, labels, an empty prompt): what `CostModel.measure` runs."""
    import numpy as np

    from ..data import scenes

    batch = scenes.sample(1, size, seed=0)
    state = {}
    if "image" in model.takes:
        state["image"] = ((batch["image"][0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    if "labels" in model.takes:
        state["labels"] = batch["labels"][0].numpy().astype(np.uint8)
    if "prompt" in model.takes:
        state["prompt"] = ""
    return state


def steps_run(model, options: dict) -> int:
    """How many denoising steps a capture with `options` runs (SDEdit: the strength's share of `steps`)."""
    if model.kind == "gan":
        return 1
    steps = int(options.get("steps", 20))
    if "strength" in options and "txt2img" not in model.kind:
        return max(1, int(steps * float(options["strength"])))
    return max(1, steps)
