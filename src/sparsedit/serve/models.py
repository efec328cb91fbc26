"""The models a server offers, and one session's editor on one of them.

Every session gets its own copy of the model's modules that shares the weights (`shared_copy`): an editor attaches
its caches and hooks to the modules it edits, so two sessions must not share module objects, but they can share
every parameter tensor. A copy costs milliseconds and no weight memory.
"""

from __future__ import annotations

import copy
import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


__all__ = ["Model", "ModelRegistry", "SessionEditor", "shared_copy"]


def shared_copy(obj, modules):
    """A deep copy of `obj` (a pipeline or a module) in which every parameter and buffer of `modules` is the same
    tensor as in `obj`; everything else (module objects, the scheduler and its state) is new."""
    memo = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            memo[id(t)] = t
    return copy.deepcopy(obj, memo)


def _modules_of(obj) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    return [v for v in getattr(obj, "components", {}).values() if isinstance(v, torch.nn.Module)]


SCENE_SD_GUIDANCE = 3.0  # the classifier-free guidance scene-sd follows its captions best at (docs/training.md)
SCENE_DIT_GUIDANCE = 4.0  # scene-dit's default guidance in the editor (docs/training.md measures its adherence)


def pipeline_kind(pipeline_class: str) -> tuple[str, tuple[str, ...]]:
    """What the server offers for a diffusers pipeline class, from its registered adapter: its kind (`"ddpm"`,
    `"sd-img2img"`, `"sdxl-inpaint"`, ...) and what a session takes (an image, a mask, a prompt). Raises `ValueError`
    for a class no adapter is registered for, or one that needs inputs the web editor does not send."""
    from ..adapters.pipelines import adapter_class, supported_pipelines

    cls = adapter_class(pipeline_class)
    if cls is None or cls.extra_images:
        served = sorted(n for n in supported_pipelines() if not adapter_class(n).extra_images)
        raise ValueError(f"a {pipeline_class or 'unknown pipeline'}; the server takes {served}.")
    kind = "ddpm" if not cls.latent else cls.kind.replace("_", "-") if "_" in cls.kind else f"sd-{cls.kind}"
    takes = ("image",) * cls.takes_image + ("mask",) * cls.takes_mask + ("prompt",) * cls.latent
    return kind, takes


@dataclass
class Model:
    """One model a server offers: its name, kind (`"ddpm"`, `"gan"`, `"sd-img2img"`, ...), what an edit takes, its
    defaults, and how to load it (once, lazily)."""

    name: str
    kind: str
    takes: tuple[str, ...]
    loader: object
    defaults: dict = field(default_factory=dict)
    size: int | None = None  # the native image size, when fixed
    _base: object = None
    _cost: object = None
    dense_seconds: dict = field(default_factory=dict)  # (height, width, options) -> a plain call's seconds
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cost_lock: threading.Lock = field(default_factory=threading.Lock)

    def base(self):
        with self._lock:
            if self._base is None:
                self._base = self.loader()
            return self._base

    def cost(self):
        """This model's `cost.CostModel`, measured on first use (two small dense captures at its native size, 512
        for a directory's model): what predicts a request's time."""
        from .cost import CostModel, reference_state, steps_run

        with self._cost_lock:  # one measurement, whoever asks first (base() takes `_lock` inside it)
            if self._cost is None:
                cost = CostModel(self)
                options = {**self.defaults, "steps": 4, "seed": 0}
                cost.measure(reference_state(self, self.size or 512), options, steps_run(self, options),
                             lambda o: SessionEditor(self, o))  # fmt: skip
                self._cost = cost
            return self._cost

    def instance(self):
        """A copy of the model for one session, sharing the weights."""
        base = self.base()
        return shared_copy(base, _modules_of(base))

    def describe(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "takes": list(self.takes), "defaults": self.defaults}
        if self.size:
            out["size"] = self.size
        if self.kind == "gan":
            from ..data import scenes

            out["classes"] = [{"id": i, "name": n, "colour": scenes.PALETTE[i].tolist()}
                              for i, n in enumerate(scenes.CLASSES)]  # fmt: skip
        return out


def dense_key(model: Model, options: dict, state: dict) -> tuple:
    """What a measured plain call (`Model.dense_seconds`) is kept under: the input's size and the session's options
    but its seed."""
    key = "image" if "image" in state else "labels" if "labels" in state else None
    size = tuple(state[key].shape[:2]) if key is not None else (model.size, model.size)
    return (*size, tuple(sorted((k, str(v)) for k, v in options.items() if k != "seed")))


def ddpm_sdedit(pipe, image, strength, num_inference_steps, generator, **_):
    """SDEdit with a `DDPMPipeline` in plain diffusers calls (it takes no image): `image` in [-1, 1] noised to the
    start step, then denoised; the dense reference of the editor's DDPM loop."""
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps)
    timesteps = sched.timesteps[int(num_inference_steps * (1 - strength)) :]
    x = sched.add_noise(image, torch.randn(image.shape, generator=generator), timesteps[:1])
    for t in timesteps:
        x = sched.step(pipe.unet(x, t).sample, t, x, generator=generator).prev_sample
    return x


class ModelRegistry:
    """The shipped scene models, always, and local diffusers pipeline directories (`--model DIR`)."""

    def __init__(self, dirs=()):
        from .. import pretrained

        self.models: dict[str, Model] = {
            "scene-ddpm": Model(
                "scene-ddpm",
                "ddpm",
                ("image",),
                lambda: pretrained.load("scene-ddpm"),
                {"strength": 0.5, "steps": 50},
                64,
            ),  # fmt: skip
            "scene-spade": Model("scene-spade", "gan", ("labels",), lambda: pretrained.load("scene-spade"), {}, 64),
        }
        for name, pipeline, kind, takes, strength in (("scene-sd", "txt2img", "sd-txt2img", ("prompt",), 1.0),
                                                      ("scene-sd-img2img", "img2img", "sd-img2img", ("image", "prompt"), 0.7)):  # fmt: skip
            self.models[name] = Model(name, kind, takes, lambda p=pipeline: pretrained.load("scene-sd", pipeline=p),
                                      {"strength": strength, "steps": 20, "guidance": SCENE_SD_GUIDANCE}, 64)  # fmt: skip
        if "scene-dit" in pretrained.available():  # the 256 px transformer, first: the editor opens on it
            dit = {}
            for name, pipeline, strength in (("scene-dit", "img2img", 0.6), ("scene-dit-txt2img", "txt2img", 1.0)):
                cls = pretrained.DIT_PIPELINES[pipeline]
                kind, takes = pipeline_kind(cls)
                dit[name] = Model(name, kind, takes, lambda p=pipeline: pretrained.load("scene-dit", pipeline=p),
                                  {"strength": strength, "steps": 20, "guidance": SCENE_DIT_GUIDANCE}, 256)  # fmt: skip
            self.models = {**dit, **self.models}
        for d in dirs:
            self.add_dir(Path(d))

    def add_dir(self, path: Path) -> Model:
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--model {path}: not a diffusers pipeline directory (no model_index.json in it).")
        import json

        cls = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        try:
            kind, takes = pipeline_kind(cls)
        except ValueError as e:
            raise ValueError(f"--model {path}: {e}") from None

        def load():
            import diffusers

            # Components saved as None (SD3 without T5, no image encoder) are absent from the directory; diffusers
            # wants them named as None again when it loads.
            index = json.loads((path / "model_index.json").read_text())
            absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
            pipe = getattr(diffusers, cls).from_pretrained(str(path), local_files_only=True, **absent)
            pipe.set_progress_bar_config(disable=True)
            return pipe

        name = path.name
        defaults = {"strength": 0.7 if "img2img" in kind or kind == "ddpm" else 1.0, "steps": 20}
        self.models[name] = Model(name, kind, takes, load, defaults)
        return self.models[name]

    def get(self, name: str) -> Model:
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; GET /models lists the {len(self.models)} this server has.")
        return self.models[name]

    def describe(self) -> list[dict]:
        return [m.describe() for m in self.models.values()]


# -- images in and out ---------------------------------------------------------------------------------------------
class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the server takes (checked before decoding)."""


def png_to_array(data: bytes, what: str, read: str = "rgb", max_pixels: int | None = None) -> np.ndarray:
    """A PNG (or JPEG, WebP) as an array: `read="rgb"` gives `uint8 [H, W, 3]` colours whatever the mode (palette
    colours looked up, grey repeated, alpha composited over white, 16-bit scaled to 8); `read="ids"` gives a
    `uint8 [H, W]` label map (a palette image's indices, a grey image's values, an RGB image's red channel). The size
    is checked against `max_pixels` from the header, before any pixel is decoded (`ImageTooLarge`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"{what} is {w}x{h} = {w * h} pixels, over this server's limit of {max_pixels} "
                                "(--max-pixels); send a smaller image.")  # fmt: skip
        img.load()
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} is not a readable PNG image ({e}); send a base64-encoded PNG.") from None
    return _as_ids(img, what) if read == "ids" else _as_rgb(img)


def _as_rgb(img) -> np.ndarray:
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: the high byte, rounded
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode != "I" or a.max() > 255 else 255.0
        grey = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _as_ids(img, what: str) -> np.ndarray:
    if img.mode in ("P", "L", "1"):
        return np.asarray(img if img.mode != "1" else img.convert("L")).astype(np.uint8)
    a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., 0]
    if a.max(initial=0) > 255:
        raise ValueError(f"{what} holds values up to {int(a.max())}; a label map holds class ids 0-255.")
    return np.ascontiguousarray(a).astype(np.uint8)


def array_to_png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def tensor_to_png(x: torch.Tensor, lo: float = 0.0) -> bytes:
    """`[1, 3, H, W]` in [lo, 1] → PNG bytes."""
    x = (x[0].float() - lo) / (1 - lo)
    a = (x.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return array_to_png(a)


def region_to_png(region: torch.Tensor | None) -> bytes | None:
    if region is None:
        return None
    return array_to_png((region[0].cpu().numpy().astype(np.uint8) * 255))


# -- one session's editor --------------------------------------------------------------------------------------------
class SessionEditor:
    """An editor on a session's own copy of a model, with the inputs of its current state in plain form so the
    session can be parked, resumed and replayed: `capture(state)`, `edit(state)`, where a state is
    `{"image": uint8 [H, W, 3], "labels": uint8 [H, W], "mask": uint8 [H, W], "prompt": str}`."""

    def __init__(self, model: Model, options: dict, reproducible: bool = False, cache_budget: int | None = None):
        self.model = model
        self.options = options  # strength, steps, seed, guidance
        self.reproducible = reproducible
        self.cache_budget = cache_budget  # the server's memory budget: a capture that cannot fit it is refused first
        self.target = model.instance()
        self.editor = self._make()

    def _make(self):
        # `reproducible`: the calibrated sparse-or-dense choice is off and every edit runs sparse, giving the same
        # bits on any machine (GAN edits are exact either way). Otherwise an edit runs dense where this process's
        # calibration (measured once per model and size) says sparse would be slower: the same bits under any load.
        import dataclasses

        from ..editors import GANEditor, SparseEditor
        from ..spatial import SparseConfig

        fallback = not self.reproducible
        if self.model.kind == "gan":
            default = getattr(self.target, "default_sparse_config", None)
            config = default() if default is not None else SparseConfig(exact=True)
            return GANEditor(self.target, dataclasses.replace(config, measured_fallback=fallback))
        from ..editors.editor import family_config

        # The editor's own default for the pipeline family (transformers: one token), but 2 for the pixel-space DDPM.
        own = family_config(self.target)
        if self.model.kind == "ddpm":
            own = dataclasses.replace(own, input_dilation=2)
        return SparseEditor(self.target, dataclasses.replace(own, measured_fallback=fallback,
                                                             cache_budget=self.cache_budget))  # fmt: skip

    # -- inputs -----------------------------------------------------------------------------------------------------
    def _image(self, a: np.ndarray) -> torch.Tensor | object:
        if self.model.kind == "ddpm":
            return torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        from PIL import Image

        return Image.fromarray(a[..., :3])

    def _labels(self, a: np.ndarray) -> torch.Tensor:
        from ..data import scenes

        labels = torch.from_numpy(a.astype(np.int64))[None]
        if int(labels.max()) >= scenes.NUM_CLASSES:
            raise ValueError(
                f"labels holds class id {int(labels.max())}; this model has {scenes.NUM_CLASSES} classes (0-"
                f"{scenes.NUM_CLASSES - 1})."
            )
        return labels

    def _generator(self):
        return torch.Generator().manual_seed(int(self.options.get("seed", 0)))

    def capture(self, state: dict) -> torch.Tensor:
        """Returns the result `[1, 3, H, W]` in [0, 1]."""
        kind = self.model.kind
        if kind == "gan":
            return (self.editor.capture(self._labels(state["labels"])) + 1) / 2
        return self.editor.capture(**self._call_kwargs(state)).images

    def _call_kwargs(self, state: dict) -> dict:
        """The pipeline call's arguments for `state` under this session's options (what the capture runs)."""
        kind = self.model.kind
        kw = {"num_inference_steps": int(self.options["steps"]), "generator": self._generator(), "output_type": "pt"}
        if "strength" in self.options and "txt2img" not in kind:
            kw["strength"] = float(self.options["strength"])
        if self.options.get("guidance") is not None and kind != "ddpm":
            kw["guidance_scale"] = float(self.options["guidance"])
        if "prompt" in self.model.takes:
            kw["prompt"] = state.get("prompt") or ""
        if "image" in self.model.takes:
            kw["image"] = self._image(state["image"])
        if "mask" in self.model.takes and state.get("mask") is not None:
            kw["mask_image"] = self._mask(state["mask"])
        return kw

    def measure_dense(self, state: dict) -> float:
        """Time one plain call of the model on `state` (the pipeline itself, or the generator), once per input size
        and options for this model in this process, and remember it (`dense_seconds`). The editor's caches are not
        touched: the call runs outside its capture and edits."""
        key = dense_key(self.model, self.options, state)
        if key not in self.model.dense_seconds:
            if self.model.kind == "gan":
                labels = self._labels(state["labels"])
                call = lambda: self.target(labels)  # noqa: E731
            elif self.model.kind == "ddpm":  # `DDPMPipeline` takes no image: SDEdit as plain calls, as the editor's
                kw = self._call_kwargs(state)
                call = lambda: ddpm_sdedit(self.target, **kw)  # noqa: E731
            else:
                kw = self._call_kwargs(state)
                call = lambda: self.target(**kw)  # noqa: E731
            with torch.no_grad():
                started = time.perf_counter()
                call()
                self.model.dense_seconds[key] = time.perf_counter() - started
        return self.model.dense_seconds[key]

    def _mask(self, a: np.ndarray):
        from PIL import Image

        return Image.fromarray(a if a.ndim == 2 else a[..., 0])

    def edit(self, state: dict, commit: bool = True) -> torch.Tensor:
        kind = self.model.kind
        if kind == "gan":
            return (self.editor.edit(self._labels(state["labels"]), commit=commit) + 1) / 2
        kw = {"commit": commit, "output_type": "pt"}
        if "image" in self.model.takes and state.get("image") is not None:
            kw["image"] = self._image(state["image"])
        if "mask" in self.model.takes and state.get("mask") is not None:
            kw["mask_image"] = self._mask(state["mask"])
        prompt = state.get("prompt")
        if "prompt" in self.model.takes and prompt is not None and prompt != self.editor.current.call["prompt"]:
            kw["prompt"] = prompt  # a prompt edit (the capture's prompt again is no change)
        return self.editor.edit(**kw).images

    def watch(self, progress) -> None:
        """Report `progress(steps_done, steps)` after every denoising step of the next captures and edits (None:
        stop). A GAN's edit is one forward: nothing to report."""
        if hasattr(self.editor, "progress"):
            self.editor.progress = progress

    # -- parking ------------------------------------------------------------------------------------------------------
    def park(self, path: Path) -> bool:
        """Write the editor's session to `path` and release the model copy; `False` when it cannot be saved."""
        try:
            self.editor.save(path)
        except NotImplementedError:
            return False
        self.close()
        return True

    @classmethod
    def resume(cls, model: Model, options: dict, path: Path, reproducible: bool = False,
               cache_budget: int | None = None) -> SessionEditor:  # fmt: skip
        from ..editors import GANEditor, SparseEditor

        self = cls.__new__(cls)
        self.model, self.options, self.reproducible, self.cache_budget = model, options, reproducible, cache_budget
        self.target = model.instance()
        self.editor = (GANEditor if model.kind == "gan" else SparseEditor).load(self.target, path)
        return self

    def close(self) -> None:
        self.editor.remove()

    @property
    def cache_bytes(self) -> int:
        return int(self.editor.last_stats.get("cache_bytes", 0) or 0)
