"""Pipeline adapters: what each diffusers pipeline family does around the denoising loop (its inputs, conditions,
starting latents, UNet conditioning, steps, decoding and output), one file per family. `SparseEditor` owns the loop and
the techniques and asks `adapter_for(pipe)` for everything that differs between pipelines; a new family is a new file
here whose classes register themselves with `register_pipeline` (and its tests)."""

from . import controlnet, flux, flux2, pixel, sd, sd3, sdxl  # noqa: F401  (the families, each registering its pipeline classes)
from .base import PipelineAdapter, adapter_class, adapter_for, register_pipeline, supported_pipelines


__all__ = ["PipelineAdapter", "adapter_class", "adapter_for", "register_pipeline", "supported_pipelines"]
