"""`Capture`: what a capture run depended on and produced, and what every edit runs against."""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = ["Capture", "guidance_copies"]


def guidance_copies(embeds, guidance_scale: float, batched: bool = True) -> int:
    """How many copies of the latents a guided UNet call batches: 2 with classifier-free guidance, else 1 (and 1 for
    a pipeline whose guidance is not batched: FLUX's distilled guidance is an input of the transformer)."""
    return 2 if batched and embeds is not None and guidance_scale > 1.0 else 1


@dataclass
class Capture:
    """What a capture run depended on and produced, for the staleness check and for edits.

    `latents` holds the tensors an edit recomputes only inside the region and takes from here outside it: the
    encoded image (`"image"`), the encoded masked image and the latent mask (inpainting), and the decoded result.
    """

    image: torch.Tensor  # the current (last accepted) input image, [-1, 1]
    mask: torch.Tensor | None  # inpainting: the current mask, [B, 1, H, W] in {0, 1}
    trajectory: list[torch.Tensor]  # latents entering each step, then the final latents
    timesteps: list
    generator_state: torch.Tensor
    generator_device: str
    call: dict  # the capture's arguments (prompt, strength, steps, guidance...), to recapture
    embeds: torch.Tensor | None
    latents: dict
    decoded: torch.Tensor
    scheduler: tuple
    attention: dict | None = (
        None  # prompt edits: the cross-attention maps/probabilities recorded, and for which version
    )
    version: int = 0  # bumped by every committed edit
    step_macs: int = 0  # one dense UNet step
    macs: int = 0  # the whole dense run
    conditions: dict | None = None  # the adapter's conditioning besides the text context (SDXL's pooled embedding)
    text_fingerprint: tuple | None = None  # the text encoders the embeddings came from (`_text_fingerprint`)
    inputs: dict | None = None  # the adapter's `extra_images` (the ControlNet's control image), at image resolution
    checksums: dict | None = None  # `guard.weights_checksum` of every model component, taken after the capture
    batched_guidance: bool = True  # the adapter's `batches_guidance` (FLUX: False)

    def generator(self) -> torch.Generator:
        """A generator in the capture's starting state: replaying it draws the capture's noise again."""
        generator = torch.Generator(device=self.generator_device)
        generator.set_state(self.generator_state)
        return generator

    @property
    def copies(self) -> int:
        """Batch copies of every UNet call: 2 with classifier-free guidance (unconditional, conditional), else 1."""
        return guidance_copies(self.embeds, self.call["guidance_scale"], self.batched_guidance)
