"""scene-dit's architecture (issue 38) as the loader assembles it: random weights written in the package's format load
offline as diffusers Stable Diffusion 3 pipelines, and each runs. (The trained weights are tested once shipped.)"""

import pytest
import torch
from PIL import Image

from sparsedit import pretrained


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return pretrained.build("scene-dit")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("scene-dit") / "w.safetensors"
    return pretrained.save("scene-dit", model, path, scaling_factor=1.25, shift_factor=0.0)


def test_the_architecture(model):
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in model.items()}
    assert 15e6 < params["transformer"] < 20e6 and params["vae"] < 3.5e6, params
    assert model["transformer"].config.sample_size * 8 == 256 and model["vae"].config.latent_channels == 16
    with pytest.raises(ValueError, match="multiples of 16"):
        pretrained.build("scene-dit", size=72)


def test_loads_offline_and_draws(monkeypatch, weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusion3Pipeline

    pipe = pretrained.load("scene-dit", path=weights)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 256
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.25, 0.0)
    embeds = pipe.encode_prompt("a lake below mountains, a clear sky", None, None, do_classifier_free_guidance=False)
    assert embeds[0].shape == (1, 32 + 256, 128) and embeds[2].shape == (1, 128)  # 32 CLIP tokens, 256 zero ones
    out = pipe(prompt=["a desert, a clear sky"], height=64, width=64, num_inference_steps=1, guidance_scale=2.0,
               output_type="pt", generator=torch.Generator().manual_seed(0), max_sequence_length=0).images  # fmt: skip
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint(weights, kind):
    import diffusers

    pipe = pretrained.load("scene-dit", path=weights, pipeline=kind, size=64)
    assert type(pipe) is getattr(diffusers, pretrained.DIT_PIPELINES[kind])
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
    image = Image.new("RGB", (64, 64), (90, 180, 60))
    extra = {"mask_image": Image.new("L", (64, 64), 255)} if kind == "inpaint" else {}
    out = pipe(prompt="a meadow, a cloudy sky", image=image, strength=0.5, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0), **extra).images  # fmt: skip
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_scene_dit.py --part vae"):
        pretrained.load("scene-dit", path=tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="inpaint"):
        pretrained.load("scene-dit", pipeline="controlnet")
