"""Captions of the procedural scenes, and prompt edits whose true region the renderer knows (issue 21).

A caption is written from the rendered label map, so it says what the picture shows: the ground ("a lake", "the
sea", "a meadow", "a desert"), the mountains (snowy or not), the sky (clear or cloudy), trees and rocks and where they
stand (left, right, across). A prompt edit changes the scene's description (delete the lake, remove the trees, melt
the snow, clear the clouds, add rocks) and renders it again: the pixels whose class or colour changed are the edit's
true region, and the edited caption is the caption of the edited render.

```python
from sparsedit.data import captions, scenes
scene = scenes.describe(1_000_000, 0)
image, labels = scenes.render(scene, (64, 64))
captions.caption(labels)                  # "a lake below mountains, trees on the left, a clear sky"
for e in captions.prompt_edits(scene, (64, 64)):
    e["prompt"], e["edited_prompt"], e["region"].float().mean()
```
"""

from __future__ import annotations

import copy

import torch

from .scenes import CLOUDS, MOUNTAINS, ROCKS, SAND, SNOW, TREES, WATER, render


__all__ = ["attributes", "caption", "prompt_edits"]

_MIN = 0.004  # a class covering less of the image than this is not mentioned


def _where(mask: torch.Tensor) -> str:
    """ "on the left", "on the right" or "across the land", from where a class's pixels lie."""
    xs = mask.nonzero()[:, 1].float() / mask.shape[1]
    if xs.numel() == 0:
        return ""
    lo, hi = float(torch.quantile(xs, 0.1)), float(torch.quantile(xs, 0.9))
    if hi < 0.55:
        return "on the left"
    if lo > 0.45:
        return "on the right"
    return "across the land"


def attributes(labels: torch.Tensor) -> dict[str, str]:
    """What a caption says about a label map `[H, W]`, one value per attribute: `ground` ("a lake", "the sea",
    "a meadow", "a desert"), `mountains` ("snowy mountains", "mountains", ""), `trees` and `rocks` ("on the left",
    "on the right", "across the land", "": none) and `sky` ("a clear sky", "a cloudy sky"). `caption` writes them
    out; comparing two maps' attributes says whether a picture shows what its caption says."""
    lab = labels if labels.dim() == 2 else labels[0]
    frac = torch.bincount(lab.flatten().long(), minlength=9).float() / lab.numel()
    if frac[WATER] > _MIN:
        water = lab == WATER
        touches = bool(water[:, 0].any() and water[:, -1].any())
        ground = "the sea" if touches else "a lake"
    elif frac[SAND] > 0.25:
        ground = "a desert"
    else:
        ground = "a meadow"
    mountains = ""
    if frac[MOUNTAINS] + frac[SNOW] > _MIN:
        mountains = "snowy mountains" if frac[SNOW] > _MIN else "mountains"
    return {
        "ground": ground,
        "mountains": mountains,
        "trees": _where(lab == TREES) if frac[TREES] > _MIN else "",
        "rocks": _where(lab == ROCKS) if frac[ROCKS] > _MIN else "",
        "sky": "a cloudy sky" if frac[CLOUDS] > 0.02 else "a clear sky",
    }


def caption(labels: torch.Tensor) -> str:
    """The caption of a rendered label map `[H, W]` (class ids of `scenes.CLASSES`)."""
    a = attributes(labels)
    parts = [f"{a['ground']} below {a['mountains']}" if a["mountains"] else a["ground"]]
    parts += [f"{what} {a[what]}" for what in ("trees", "rocks") if a[what]]
    parts.append(a["sky"])
    return ", ".join(parts)


def _variants(scene: dict) -> list[tuple[str, str, dict]]:
    """Edits of a scene description: (kind, what, edited description)."""
    out = []

    def edited(**changes):
        s = copy.copy(scene)
        s.update(changes)
        return s

    if scene["layout"] == "lake":
        out.append(("delete", "the lake", edited(layout="meadow")))
    if scene["layout"] == "meadow":
        out.append(("insert", "a lake", edited(layout="lake", lake=(0.5, 0.45, 0.25, 0.12))))
    if scene["trees"]:
        out.append(("delete", "the trees", edited(trees=[])))
    else:
        out.append(("insert", "trees", edited(trees=[(0.2, 0.5, 1.2, True, 0.0), (0.3, 0.7, 1.1, False, 0.0)])))
    if scene["rocks"]:
        out.append(("delete", "the rocks", edited(rocks=[])))
    else:
        out.append(("insert", "rocks", edited(rocks=[(0.75, 0.6, 1.4), (0.85, 0.8, 1.2)])))
    if any(r["snowline"] < 2.0 for r in scene["ridges"]):
        out.append(("swap", "snowy mountains -> mountains",
                    edited(ridges=[{**r, "snowline": 2.0} for r in scene["ridges"]])))  # fmt: skip
    if scene["cloud_cover"] > 0.05:
        out.append(("swap", "cloudy -> clear", edited(cloud_cover=0.0)))
    return out


def prompt_edits(scene: dict, size: tuple[int, int] = (64, 64), min_region: float = 0.002) -> list[dict]:
    """The prompt edits of one scene with their true regions: `{"kind", "what", "prompt", "edited_prompt",
    "region" (bool [H, W]), "image", "edited_image" ([3, H, W] in [-1, 1])}`. Edits whose caption does not change, or
    whose region is under `min_region` of the image, are left out."""
    image, labels = render(scene, size)
    prompt = caption(labels)
    out = []
    for kind, what, variant in _variants(scene):
        edited_image, edited_labels = render(variant, size)
        edited_prompt = caption(edited_labels)
        region = (edited_labels != labels) | ((edited_image - image).abs().amax(0) > 2 / 255)
        if edited_prompt == prompt or float(region.float().mean()) < min_region:
            continue
        out.append({"kind": kind, "what": what, "prompt": prompt, "edited_prompt": edited_prompt, "region": region,
                    "image": image, "edited_image": edited_image})  # fmt: skip
    return out
