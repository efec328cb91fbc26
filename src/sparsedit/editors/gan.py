"""`GANEditor`: label-map editing with a conditional GAN generator, recomputing only what the edit reaches.

```python
from sparsedit import GANEditor
from sparsedit.models import SPADEGenerator

editor = GANEditor(SPADEGenerator.from_checkpoint("/local/spade/cityscapes/latest_net_G.pth"))
image = editor.capture(labels)  # [B, H, W] class ids -> [B, 3, H, W] in [-1, 1]
labels[:, 100:140, 200:260] = 21  # draw vegetation
edited = editor.edit(labels)  # sparse: only what the changed labels reach
editor.last_stats  # macs_dense, macs_sparse, active_fraction, region_fraction, seconds, exact
```
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..config import SparseConfig
from ..guard import check_commit, check_finite, make_lock, serialized
from ..regions import as_region
from ..spatial import capturing, editing, is_sparsified, last_stats, sparse_state, sparsify_, transaction, unsparsify_
from ..stats import EditStats


__all__ = ["GANEditor"]


class GANEditor:
    """Sparse label-map editing for a conditional generator (`SPADEGenerator`, `Pix2PixGenerator`, or any
    `nn.Module` of supported layers that maps a `[B, C, H, W]` input to an image).

    Args:
        generator: the generator. It is put in eval mode and sparsified in place; `remove()` undoes that.
        config: the `SparseConfig`. Defaults to the generator's `default_sparse_config()`: exact for SPADE with
            BatchNorm and pix2pix with BatchNorm, approximate (frozen InstanceNorm statistics) otherwise.

    The region of an edit is every pixel whose encoded input changed (any class or instance-edge channel), and with
    `exact=True` the engine propagates it layer by layer through each kernel's reach: the result equals the dense
    generator's to float tolerance, and pixels the edit cannot reach are bit-identical to the capture.
    """

    def __init__(self, generator: nn.Module, config: SparseConfig | None = None, blocking: bool = True):
        if not isinstance(generator, nn.Module):
            raise TypeError(f"GANEditor takes a generator nn.Module, got {type(generator).__name__}.")
        if is_sparsified(generator):
            raise RuntimeError(
                "this generator already has a GANEditor (or `sparsedit.sparsify_`) attached: call `editor.remove()` on "
                "that editor first (or `sparsedit.unsparsify_(generator)` for the model-level API)."
            )
        if config is None:
            default = getattr(generator, "default_sparse_config", None)
            config = default() if default is not None else SparseConfig(exact=True)
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}.")
        self.generator = generator.eval()
        self.config = config
        self.blocking = bool(blocking)  # one call at a time: other threads wait (or, with False, EditorBusyError)
        self._lock = make_lock()
        self._removed = False
        sparsify_(generator, config)
        self.last_stats: EditStats = EditStats()
        self.last_region: torch.Tensor | None = None
        self._input: torch.Tensor | None = None
        self._image: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.config.exact

    @property
    def current(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current (committed) generator input and image, or `None` before `capture`."""
        return None if self._input is None else (self._input, self._image)

    def encode(self, labels: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        """The generator's input for a label map: integer ids are one-hot encoded (with instance edges for SPADE),
        float inputs are checked and passed through."""
        g = self.generator
        if g.training:
            raise RuntimeError(
                "the generator is in training mode (BatchNorm would use batch statistics, dropout is random); call "
                "`generator.eval()` before capturing or editing."
            )
        if hasattr(g, "encode"):
            return g.encode(labels, instance)
        if instance is not None:
            raise ValueError(f"{type(g).__name__} takes no instance map.")
        if not isinstance(labels, torch.Tensor) or not labels.is_floating_point() or labels.dim() != 4:
            raise TypeError(f"{type(g).__name__} takes a float [B, C, H, W] input.")
        return labels

    @serialized
    def capture(self, labels: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        """Run the generator densely on `labels` and cache what edits need. Returns the image `[B, 3, H, W]`. A
        capture that fails (any exception, Ctrl-C) leaves the previous one in place."""
        x = self._input_of(labels, instance)
        started = time.perf_counter()
        with transaction(self.generator), capturing(self.generator):
            image = self.generator(x)
            if not bool(torch.isfinite(image).all()):
                raise FloatingPointError("the generator produced NaN or infinite values; nothing was cached.")
        stats = last_stats(self.generator)
        self._input, self._image = x, image
        self.last_region = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
        self.last_stats = EditStats.of(
            {
                "macs_dense": stats["macs_dense"],
                "macs_sparse": stats["macs_dense"],
                "active_fraction": {},
                "region_fraction": 0.0,
                "seconds": time.perf_counter() - started,
                "cache_bytes": stats["cache_bytes"],
                "exact": self.exact,
            }
        )
        return image

    @serialized
    def edit(
        self,
        labels: torch.Tensor,
        instance: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
        commit: bool = True,
    ) -> torch.Tensor:
        """Generate the image for an edited label map, computing only what the change reaches.

        Args:
            labels: the edited label map, in the form `capture` took.
            instance: the edited instance map (SPADE with instance edges).
            region: optional bool `[H, W]`/`[B, H, W]` to recompute, at least every changed pixel (checked).
                `None`: the changed pixels.
            commit: make this the current label map, so the next edit is incremental against it. Otherwise the
                cache stays as it was.

        Returns:
            The image `[B, 3, H, W]`.
        """
        commit = check_commit(commit)
        if self._input is None:
            raise RuntimeError("Nothing captured yet: call `editor.capture(labels)` first.")
        x = self._input_of(labels, instance)
        changed = self._changed(x, region)
        started = time.perf_counter()
        if not bool(changed.any()):
            image = self._image.clone()
            stats = {"macs_dense": self.last_stats.get("macs_dense", 0), "macs_sparse": 0, "active_fraction": {},
                     "dense_layers": {}, "cache_bytes": sparse_state(self.generator).cache.nbytes}  # fmt: skip
        else:
            # (`_changed` compared the whole input: the forward need not again; a commit is one transaction)
            with editing(self.generator, region=changed, commit=commit, region_checked=True):
                image = self.generator(x)
                if not bool(torch.isfinite(image).all()):
                    raise FloatingPointError("the edit produced NaN or infinite values; nothing was committed.")
            stats = {
                **last_stats(self.generator, detail=False),
                "cache_bytes": sparse_state(self.generator).cache.nbytes,
            }
        if commit:
            self._input, self._image = x, image
        self.last_region = changed
        self.last_stats = EditStats.of(
            {
                "macs_dense": stats["macs_dense"],
                "macs_sparse": stats["macs_sparse"],
                "active_fraction": stats["active_fraction"],
                "region_fraction": float(changed.float().mean()),
                "seconds": time.perf_counter() - started,
                "cache_bytes": stats["cache_bytes"],
                "dense_layers": stats["dense_layers"],
                "time": stats.get("time", {}),
                "dense_run": stats.get("dense_run"),
                "exact": self.exact,
            }
        )
        return image

    def _input_of(self, labels: torch.Tensor, instance: torch.Tensor | None) -> torch.Tensor:
        """The generator's input, checked for NaN when it came as floats (integer label maps encode to finite one-hot
        maps: no pass over them)."""
        x = self.encode(labels, instance)
        if labels.is_floating_point() or (instance is not None and instance.is_floating_point()):
            check_finite("the generator's input", x)
        return x

    def _changed(self, x: torch.Tensor, region) -> torch.Tensor:
        """Where the generator's input changed, or the given `region` (checked to cover every change)."""
        if x.shape != self._input.shape:
            raise ValueError(
                f"the edited input has shape {tuple(x.shape)} but the capture's was {tuple(self._input.shape)}; "
                "an edit keeps the batch size and image size (capture again for a new size)."
            )
        changed = (x != self._input).any(dim=1)
        if region is None:
            return changed
        region = as_region(region, x.shape[0], x.shape[-2], x.shape[-1], x.device)
        if bool((changed & ~region).any()):
            raise ValueError(
                "the label map changed outside `region`; enlarge the region or leave it out to use the changed pixels."
            )
        return region

    @serialized
    def save(self, path) -> None:
        """Write this session (the generator's cache, the current label map and image, the config and a content
        fingerprint of the generator's weights) to the directory `path`; `GANEditor.load(generator, path)`
        resumes it, and the next edit is bit-identical to the one this editor would make."""
        from . import sessions

        sessions.save_gan(self, path)

    @classmethod
    def load(cls, generator: nn.Module, path, *, mmap: bool = True) -> GANEditor:
        """Resume a session written by `editor.save(path)` on `generator` (same class and weights; otherwise
        `StaleCacheError`). With `mmap`, the cache is memory-mapped copy-on-write from the file."""
        from . import sessions

        editor, (editor._input, editor._image) = sessions.load_gan(cls, generator, path, mmap=mmap)
        return editor

    @serialized
    def remove(self) -> None:
        """Detach the engine: the generator computes bit-identically to before. The cache is dropped. Calling it
        again does nothing."""
        if self._removed:
            return
        self._removed = True
        unsparsify_(self.generator)
        self._input = self._image = None
