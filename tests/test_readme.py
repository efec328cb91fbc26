"""Every Python block of README.md runs as written (issue 19), with tiny offline models standing in for the local
paths a user would load, and small stand-ins for the user's images."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


pytest.importorskip("diffusers")
README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def picture(seed: int, size: int = 64) -> Image.Image:
    a = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    return Image.fromarray(a)


def painted(img: Image.Image, box, colour) -> Image.Image:
    a = np.array(img)
    y0, y1, x0, x1 = box
    a[y0:y1, x0:x1] = colour
    return Image.fromarray(a)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """`from_pretrained` of the pipelines the README loads returns tiny offline ones; the user's images are small
    pictures. Returns the names the blocks use but do not define."""
    import diffusers

    import sparsedit
    from sparsedit.models import SPADEGenerator
    from sparsedit.testing import (
        randomize_batchnorm,
        street_scene,
        tiny_controlnet,
        tiny_flux2_klein,
        tiny_sd,
        tiny_sd3,
    )

    tok = tmp_path / "tok"

    def pretrained(build):
        return classmethod(lambda cls, *args, **kwargs: build(*args, **kwargs))

    cn = tiny_controlnet(tok, "img2img")
    monkeypatch.setattr(
        diffusers.DDPMPipeline, "from_pretrained", pretrained(lambda *a: sparsedit.pretrained.load("scene-ddpm"))
    )
    for name, kind in (("StableDiffusionPipeline", "txt2img"), ("StableDiffusionImg2ImgPipeline", "img2img"),
                       ("StableDiffusionInpaintPipeline", "inpaint")):  # fmt: skip
        monkeypatch.setattr(
            getattr(diffusers, name), "from_pretrained", pretrained(lambda *a, k=kind: tiny_sd(tok, k))
        )
    monkeypatch.setattr(
        diffusers.StableDiffusion3Img2ImgPipeline, "from_pretrained", pretrained(lambda *a, **k: tiny_sd3(tok))
    )
    monkeypatch.setattr(
        diffusers.Flux2KleinPipeline, "from_pretrained", pretrained(lambda *a, **k: tiny_flux2_klein(tok))
    )
    monkeypatch.setattr(diffusers.ControlNetModel, "from_pretrained", pretrained(lambda *a: cn.controlnet))
    monkeypatch.setattr(
        diffusers.StableDiffusionControlNetImg2ImgPipeline,
        "from_pretrained",
        pretrained(lambda *a, controlnet: type(cn)(**{**cn.components, "controlnet": controlnet})),
    )
    monkeypatch.setattr(
        SPADEGenerator,
        "from_checkpoint",
        classmethod(lambda cls, *a, **k: randomize_batchnorm(SPADEGenerator.cityscapes(ngf=4, hidden=8))),
    )
    monkeypatch.chdir(tmp_path)
    labels, instance = street_scene(256, 512)
    photo = picture(0)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:32, 24:40] = True
    return {
        "photo": photo,
        "photo_with_stroke": painted(photo, (16, 26, 20, 40), (230, 40, 40)),
        "hole": Image.fromarray((mask.numpy() * 255).astype(np.uint8)),
        "edges": picture(1),
        "edges_with_a_new_line": painted(picture(1), (40, 42, 8, 56), (255, 255, 255)),
        "mask": mask,
        "g": torch.Generator().manual_seed(0),
        "labels": labels,
        "instance": instance,
        "torch": torch,
        "sparsedit": sparsedit,
    }


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs_as_written(stand_ins, index):
    code = blocks()[index]
    namespace = dict(stand_ins)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
