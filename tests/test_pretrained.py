"""The shipped scene models: they load offline, they learned, and sparse edits with them track dense ones."""

import pytest
import torch

from sparsedit import GANEditor, SparseConfig, SparseEditor, pretrained
from sparsedit.data import scenes
from sparsedit.metrics import psnr, ssim


HELD_OUT = 1_000_000  # the training pools use seeds below this


@pytest.fixture(scope="module")
def held_out():
    return scenes.sample(16, 64, seed=HELD_OUT + 7)


def test_weights_ship_with_the_package_and_fit_the_budget():
    total = 0
    for name in pretrained.available():
        f = pretrained.weights_file(name)
        assert f.exists(), f"{name}: {f} is missing"
        total += f.stat().st_size
    # scene-ddpm 8.3 MiB, scene-spade 11.1 MiB, scene-sd 13.2 MiB, scene-dit 41.9 MiB (float16). Raised from 40 MiB
    # for scene-dit (issue 38): a 256 px transformer (22 M parameters: an 18 M SD3-style denoiser, 8 blocks 256
    # wide, and its VAE) is the smallest model whose edits show the speed-up, and it ships in float16 already.
    assert total <= 80 * 2**20


def test_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDPMPipeline

    from sparsedit.models import SPADEGenerator

    pipe = pretrained.load("scene-ddpm")
    assert isinstance(pipe, DDPMPipeline) and pipe.unet.config.sample_size == 64
    gen = pretrained.load("scene-spade")
    assert isinstance(gen, SPADEGenerator) and not gen.training and gen.size == (64, 64)
    assert pretrained.load("scene-spade", size=(64, 128)).size == (64, 128)
    assert pretrained.load("scene-spade", dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="available"):
        pretrained.load("scene-vae")
    with pytest.raises(FileNotFoundError, match="training/"):
        pretrained.load("scene-spade", path=tmp_path / "none.safetensors")
    other = pretrained.build("scene-spade")
    path = pretrained.save("scene-spade", other, tmp_path / "w.safetensors")
    assert pretrained.load("scene-spade", path=path) is not None  # a round trip through the format
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"architecture": '{"generator": {"ngf": 1}}'})
    with pytest.raises(ValueError, match="different architecture"):
        pretrained.load("scene-spade", path=path)


def test_the_diffusion_model_learned(held_out):
    """Noise-prediction MSE on held-out scenes: far below an untrained copy's at every noise level."""
    pipe = pretrained.load("scene-ddpm")
    torch.manual_seed(0)
    raw = pretrained.build("scene-ddpm").eval()
    g = torch.Generator().manual_seed(0)
    x0 = held_out["image"][:8]
    with torch.no_grad():
        for t in (50, 300, 700):
            noise = torch.randn(x0.shape, generator=g)
            a = pipe.scheduler.alphas_cumprod[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            ts = torch.full((8,), t)
            trained = (pipe.unet(xt, ts).sample - noise).square().mean()
            untrained = (raw(xt, ts).sample - noise).square().mean()
            assert trained < 0.25 * untrained, (t, float(trained), float(untrained))
            assert trained < 0.2


def test_the_gan_learned(held_out):
    """The generator's pictures of held-out label maps are close to the rendered scenes."""
    gen = pretrained.load("scene-spade")
    torch.manual_seed(0)
    raw = pretrained.build("scene-spade").eval()
    with torch.no_grad():
        fake, untrained = gen(held_out["labels"]), raw(held_out["labels"])
    real = held_out["image"]
    assert psnr(fake, real).mean() > psnr(untrained, real).mean() + 8
    assert psnr(fake, real).mean() > 20 and ssim(fake, real).mean() > 0.6


def test_gan_edit_with_trained_weights_is_exact(held_out):
    gen = pretrained.load("scene-spade")
    labels = held_out["labels"][:1]
    new = labels.clone()
    new[0, 40:52, 8:30] = scenes.WATER
    editor = GANEditor(gen)
    with torch.no_grad():
        editor.capture(labels)
        sparse = editor.edit(new)
        dense = gen(new)
    assert editor.last_stats["exact"] and editor.last_stats["macs_sparse"] < editor.last_stats["macs_dense"]
    assert (sparse - dense).abs().max() < 1e-4


def test_sdedit_with_trained_weights_tracks_dense():
    """A stroke edit with the trained DDPM: the sparse result is close to the dense SDEdit of the same edit, and
    the stroke's change is carried (the result differs from the unedited capture inside the stroke)."""
    from sparsedit.demo import scene_inputs

    pipe = pretrained.load("scene-ddpm")
    inputs = scene_inputs(64)
    kw = {"strength": 0.5, "num_inference_steps": 20, "output_type": "pt"}
    editor = SparseEditor(pipe, SparseConfig(input_dilation=2))
    before = editor.capture(image=inputs["image"], generator=torch.Generator().manual_seed(0), **kw).images
    sparse = editor.edit(image=inputs["stroke"], output_type="pt", commit=False).images
    editor.remove()
    reference = SparseEditor(pipe)
    dense = reference.capture(image=inputs["stroke"], generator=torch.Generator().manual_seed(0), **kw).images
    lake = inputs["lake"]
    effect = (dense - before).abs()[..., lake].mean()
    err = (sparse - dense).abs()
    assert err[..., lake].mean() < 0.25 * effect
    assert psnr(sparse * 2 - 1, dense * 2 - 1) > 25
