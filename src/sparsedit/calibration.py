"""Never slower than dense, and the same bits every time: a calibration measured once, then only looked up.

Whether an edit runs sparse or as one plain dense forward is a deterministic function of the edit's plan (the
fraction of the model's input the region reaches, after `input_dilation`) and of a `Calibration`: how long a dense
forward and sparse forwards at two probe regions took for this model, input shape, dtype, device, thread count and
config. It is measured once per process and key, when a capture ends (`sparsedit.calibrate`), and reused by every
later edit, every fresh editor of the same model in this process, and every saved session (which stores the
calibrations its editor used). The timing of the run in progress never decides anything, so a preview equals its
commit and the machine's load cannot change a result.

What is guaranteed: on one machine, the same calibration gives the same choices and so the same bits. What is not:
another machine (or the same one under other load, in a new process) may measure another calibration, and then edits
near the break-even size may choose differently. A server that needs identical bits across machines pins one:

```python
sparsedit.calibration.save("calibration.json")  # after a capture on the reference machine
sparsedit.calibration.load("calibration.json")  # on every machine, before the first capture
```

or turns the measured choice off (`SparseConfig(measured_fallback=False)`: only `max_region_fraction` decides).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


__all__ = ["Calibration", "PROBE_FRACTIONS", "clear", "export", "install", "load", "lookup", "model_key", "save"]

# The two probe regions, as fractions of the model's input: a small stroke, and a region near the point where sparse
# work stops paying on most models (measured: DDPM-256 still paid at 36%).
PROBE_FRACTIONS = (0.02, 0.25)
FORMAT = 1


@dataclass(frozen=True)
class Calibration:
    """How fast one model runs sparse and dense on this machine, for one input shape, dtype and config.

    Attributes:
        key: what it was measured for (`model_key`): the model's class and parameter shapes, every tensor input's
            shape and dtype, the device, the thread count and the config.
        about: the same, for people.
        dense_seconds: one plain dense forward.
        probes: `(fraction of the input, seconds)` of sparse forwards at `PROBE_FRACTIONS` (plan building excluded: an
            edit pays it once for all its denoising steps).
        break_even: the largest fraction of the input an edit may reach and still run sparse (the linear fit of the
            probes meets `dense_seconds` there); negative when sparse never pays for this model on this machine.
    """

    key: str
    about: str
    dense_seconds: float
    probes: tuple[tuple[float, float], ...]
    break_even: float

    @classmethod
    def fit(cls, key: str, about: str, dense_seconds: float, probes) -> Calibration:
        probes = tuple((float(f), float(s)) for f, s in sorted(probes))
        (f1, s1), (f2, s2) = probes[0], probes[-1]
        if s1 >= dense_seconds:
            break_even = -1.0  # even the smallest probe runs no faster than dense
        elif s2 <= s1 or f2 <= f1:
            break_even = 1.0  # sparse time does not grow with the region at these sizes
        else:
            break_even = min(1.0, f1 + (dense_seconds - s1) * (f2 - f1) / (s2 - s1))
        return cls(key, about, float(dense_seconds), probes, float(break_even))

    def decide(self, fraction: float) -> str | None:
        """Why an edit that reaches `fraction` of the input runs densely, or `None`: it runs sparse."""
        if fraction <= self.break_even:
            return None
        if self.break_even < 0:
            f, s = self.probes[0]
            return (
                f"calibrated: this model runs no faster sparse than dense on this machine (sparse {s:.4f} s at "
                f"{100 * f:.0f}% of the input, dense {self.dense_seconds:.4f} s)"
            )
        return (
            f"calibrated: sparse pays up to {100 * self.break_even:.1f}% of the input on this machine, this edit "
            f"reaches {100 * fraction:.1f}%"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "probes": [list(p) for p in self.probes]}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        try:
            return cls(str(d["key"]), str(d.get("about", "")), float(d["dense_seconds"]),
                       tuple((float(f), float(s)) for f, s in d["probes"]), float(d["break_even"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a sparsedit calibration ({type(e).__name__}: {e}): {str(d)[:120]}") from None


_TABLE: dict[str, Calibration] = {}
_LOCK = threading.Lock()


def lookup(key: str) -> Calibration | None:
    with _LOCK:
        return _TABLE.get(key)


def install(calibration: Calibration, replace: bool = False) -> Calibration:
    """Make `calibration` the one this process uses for its key; an existing one wins unless `replace`. Returns the
    one in force."""
    with _LOCK:
        if replace or calibration.key not in _TABLE:
            _TABLE[calibration.key] = calibration
        return _TABLE[calibration.key]


def export() -> dict:
    """Every calibration this process has measured or loaded, as JSON-ready dicts keyed by `model_key`."""
    with _LOCK:
        return {"format": FORMAT, "calibrations": [c.to_dict() for c in _TABLE.values()]}


def save(path) -> None:
    """Write `export()` to a JSON file, for `load` on other processes or machines."""
    Path(path).write_text(json.dumps(export(), indent=1))


def load(path_or_dict) -> int:
    """Pin the calibrations of a file written by `save` (or of an `export()` dict): they replace this process's own
    for the same keys, and captures reuse them instead of measuring. Returns how many were loaded."""
    data = path_or_dict
    if not isinstance(data, dict):
        try:
            data = json.loads(Path(path_or_dict).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a calibration file from {path_or_dict}: {e}") from None
    if data.get("format") != FORMAT or not isinstance(data.get("calibrations"), list):
        raise ValueError(f"not a sparsedit calibration file of format {FORMAT}: {str(data)[:120]}")
    cals = [Calibration.from_dict(d) for d in data["calibrations"]]
    for c in cals:
        install(c, replace=True)
    return len(cals)


def clear() -> None:
    """Forget every calibration of this process (the next capture of each model measures again)."""
    with _LOCK:
        _TABLE.clear()


def _shapes(v, out: list) -> None:
    if isinstance(v, torch.Tensor):
        out.append(f"{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}")
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            out.append(str(k))
            _shapes(v[k], out)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _shapes(x, out)
    elif v is None or isinstance(v, (bool, int, float, str)):
        out.append(type(v).__name__)  # a value's type, not the value: a timestep must not make a new key


def model_key(model: torch.nn.Module, x: torch.Tensor, args, kwargs, config_json: str) -> tuple[str, str]:
    """The key of a model's calibration and a description of it: what the speed of its forward depends on (its
    class and parameter shapes, every input's shape and dtype, the device, the thread count, the config), never
    the values of weights or inputs."""
    parts = [type(model).__qualname__, f"threads={torch.get_num_threads()}", str(x.device), config_json]
    for name, p in model.named_parameters():
        parts.append(f"{name}{tuple(p.shape)}{p.dtype}")
    _shapes(list(args), parts)
    _shapes(dict(kwargs), parts)
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()
    about = (
        f"{type(model).__name__}, input {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}, "
        f"{torch.get_num_threads()} threads"
    )
    return f"{type(model).__name__}-{digest}", about
