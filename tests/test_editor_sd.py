"""SparseEditor on a tiny offline StableDiffusionImg2ImgPipeline (SDEdit in latent space)."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor

from .sd_fixtures import tiny_sd_img2img


pytest.importorskip("diffusers")
KW = {"strength": 0.7, "num_inference_steps": 6, "output_type": "pt"}


@pytest.fixture
def pipe(tmp_path):
    return tiny_sd_img2img(tmp_path)


def photo(b=1, h=128, w=128):
    """An image tensor in [0, 1], as diffusers' image processor expects."""
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def stroke(x):
    y = x.clone()
    y[:, :, 16:40, 72:104] = 0.8
    return y


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_capture_is_the_pipelines_own_result(pipe, guidance_scale):
    x = photo(h=64, w=96)
    want = pipe(image=x, prompt="a red house", guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(5), **KW).images  # fmt: skip
    editor = SparseEditor(pipe)
    got = editor.capture(image=x, prompt="a red house", guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(5), **KW).images  # fmt: skip
    assert torch.equal(got, want)
    editor.remove()
    again = pipe(image=x, prompt="a red house", guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(5), **KW).images  # fmt: skip
    assert torch.equal(again, want)


def test_stroke_edit_is_sparse_and_keeps_the_background(pipe):
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4))
    x = photo()
    out0 = editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW).images
    x_edit = stroke(x)
    out1 = editor.edit(image=x_edit, output_type="pt").images
    stats = editor.last_stats
    assert 0 < stats["macs_sparse"] < 0.6 * stats["macs_dense"]
    assert "composited" in stats["background"]
    # Outside the latent region (dilated 1 latent px = 8 image px), the pixels are the captured image's.
    keep = torch.zeros(128, 128, dtype=torch.bool)
    keep[8:48, 64:112] = True
    assert torch.equal(out1[..., ~keep], out0[..., ~keep])
    assert not torch.equal(out1[..., keep], out0[..., keep])


def test_empty_edit_returns_the_current_image_for_free(pipe):
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    x = photo()
    out0 = editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW).images
    out1 = editor.edit(image=x.clone(), output_type="pt").images
    assert torch.equal(out0, out1)
    assert editor.last_stats["macs_sparse"] == 0


def test_batch_of_two_prompts(pipe):
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4))
    x = photo(b=2)
    out0 = editor.capture(image=x, prompt=["a red house", "a blue lake"],
                          generator=torch.Generator().manual_seed(5), **KW).images  # fmt: skip
    out1 = editor.edit(image=stroke(x), output_type="pt").images
    assert out1.shape == out0.shape == (2, 3, 128, 128)
    assert editor.last_stats["macs_sparse"] < editor.last_stats["macs_dense"]


def test_prompt_is_required_and_pixel_models_take_none(pipe):
    editor = SparseEditor(pipe)
    with pytest.raises(ValueError, match="needs a prompt"):
        editor.capture(image=photo(), **KW)


def test_sd_edit_tracks_a_dense_recomputation(pipe):
    """Against the dense SDEdit of the edited image from the same noise, inside the region (outside, the capture's
    pixels are kept by design). Random weights make the edit's own effect small; measured mean error 0.0017 against
    a mean effect of 0.0040."""
    config = SparseConfig(input_dilation=1, tile_size=4)
    editor = SparseEditor(pipe, config)
    x = photo()
    out0 = editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW).images
    sparse = editor.edit(image=stroke(x), output_type="pt", commit=False).images
    assert editor.last_stats["macs_sparse"] < 0.6 * editor.last_stats["macs_dense"]  # UNet and VAE decoder
    editor.remove()
    dense = SparseEditor(pipe, config)
    want = dense.capture(
        image=stroke(x), prompt="a red house", generator=torch.Generator().manual_seed(5), **KW
    ).images
    keep = torch.zeros(128, 128, dtype=torch.bool)
    keep[8:48, 64:112] = True
    err = (sparse - want).abs()[..., keep].mean()
    effect = (want - out0).abs()[..., keep].mean()
    assert err < 0.6 * effect
