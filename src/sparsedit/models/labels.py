"""Label maps for conditional GANs: validation, one-hot encoding and instance edges."""

from __future__ import annotations

import torch


__all__ = ["encode_labels", "instance_edges"]


def _as_batch(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() == 2:
        return t[None]
    if t.dim() != 3:
        raise ValueError(
            f"{what} must be [B, H, W] or [H, W] integer class ids (or one-hot [B, C, H, W] floats), got shape "
            f"{tuple(t.shape)}."
        )
    return t


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """Boundaries of an instance map `[B, H, W]` (integer ids): 1 where a pixel's id differs from a 4-neighbour's,
    on both sides of the boundary, as SPADE computes its edge channel. Returns `[B, 1, H, W]` float32."""
    if not isinstance(instance, torch.Tensor) or instance.is_floating_point() or instance.is_complex():
        raise TypeError("instance maps must be integer tensors of instance ids, [B, H, W].")
    t = _as_batch(instance, "instance map")
    edge = torch.zeros_like(t, dtype=torch.bool)
    dx = t[:, :, 1:] != t[:, :, :-1]
    dy = t[:, 1:, :] != t[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge[:, None].float()


def encode_labels(
    labels: torch.Tensor,
    num_classes: int,
    size: tuple[int, int] | None = None,
    instance: torch.Tensor | None = None,
    instance_channel: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """An integer label map as the one-hot tensor a conditional generator takes.

    Args:
        labels: `[B, H, W]` or `[H, W]` integer class ids in `[0, num_classes)`, or an already encoded float
            `[B, C, H, W]` tensor (checked and returned in `dtype`).
        num_classes: classes of the label map (channels of the one-hot part).
        size: `(H, W)` the generator was built for; `None` accepts any size.
        instance: optional `[B, H, W]` instance ids; their boundaries fill the extra edge channel.
        instance_channel: whether the generator takes the edge channel (SPADE with instance maps). Without an
            instance map the channel is all zeros (no boundaries).
        dtype: floating dtype of the result.

    Returns:
        `[B, num_classes (+1), H, W]` tensor in `dtype`.
    """
    channels = num_classes + int(instance_channel)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"label maps must be torch tensors, got {type(labels).__name__}.")
    if labels.is_floating_point():
        if labels.dim() != 4 or labels.shape[1] != channels:
            raise ValueError(
                f"a float label map must be one-hot [B, {channels}, H, W] ({num_classes} classes"
                f"{' + the instance-edge channel' if instance_channel else ''}), got shape {tuple(labels.shape)}. "
                "Pass integer class ids [B, H, W] to have them encoded."
            )
        if instance is not None:
            raise ValueError("pass `instance` with integer class ids only; a one-hot map already holds its edges.")
        out = labels.to(dtype)
    elif labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"label maps must hold integer class ids, got dtype {labels.dtype}; use `labels.long()`.")
    else:
        labels = _as_batch(labels, "label map")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                bad = hi if hi >= num_classes else lo
                raise ValueError(
                    f"the label map holds class id {bad}, outside [0, {num_classes}) for this generator's "
                    f"{num_classes} classes. Map ignored/void ids to a valid class first."
                )
        out = torch.zeros(labels.shape[0], channels, *labels.shape[-2:], dtype=dtype, device=labels.device)
        out.scatter_(1, labels[:, None].long(), 1.0)
        if instance is not None:
            if not instance_channel:
                raise ValueError("this generator takes no instance-edge channel; leave `instance` out.")
            inst = _as_batch(instance, "instance map")
            if inst.shape != labels.shape:
                raise ValueError(
                    f"the instance map has shape {tuple(inst.shape)} but the label map {tuple(labels.shape)}; "
                    "they must match."
                )
            out[:, num_classes:] = instance_edges(inst).to(dtype)
    if size is not None and tuple(out.shape[-2:]) != tuple(size):
        raise ValueError(
            f"the label map is {out.shape[-2]}x{out.shape[-1]} but the generator is built for {size[0]}x{size[1]}; "
            "resize it with nearest-neighbour sampling (never bilinear: ids are not numbers) or build the "
            "generator for this size."
        )
    return out
