"""SparseEditor on a tiny offline StableDiffusionInpaintPipeline: the region comes from the change of `mask_image`."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor, StaleCacheError

from .sd_fixtures import tiny_sd


pytest.importorskip("diffusers")
KW = {"num_inference_steps": 5, "output_type": "pt", "prompt": "a red house", "height": 128, "width": 128}
CONFIG = SparseConfig(input_dilation=1, tile_size=4)


def photo(b=1, h=128, w=128):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def box_mask(b=1, h=128, w=128, box=(16, 48, 64, 104)):
    m = torch.zeros(b, 1, h, w)
    m[:, :, box[0] : box[1], box[2] : box[3]] = 1.0
    return m


def gen():
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize(("unet_in", "strength", "guidance_scale"), [(9, 1.0, 7.5), (4, 1.0, 7.5), (9, 0.8, 1.0)])
def test_capture_is_the_pipelines_own_result(tmp_path, unet_in, strength, guidance_scale):
    pipe = tiny_sd(tmp_path, "inpaint", unet_in_channels=unet_in)
    x, m = photo(h=64, w=96), box_mask(h=64, w=96, box=(8, 40, 16, 56))
    kw = {**KW, "strength": strength, "guidance_scale": guidance_scale, "height": 64, "width": 96}
    want = pipe(image=x, mask_image=m, generator=gen(), **kw).images
    editor = SparseEditor(pipe, CONFIG)
    got = editor.capture(image=x, mask_image=m, generator=gen(), **kw).images
    assert torch.equal(got, want)
    editor.remove()
    assert torch.equal(pipe(image=x, mask_image=m, generator=gen(), **kw).images, want)


@pytest.mark.parametrize(("unet_in", "norm_stats", "bound"), [(9, "frozen", 0.5), (4, "recompute", 0.75)])
def test_new_mask_is_inpainted_sparsely(tmp_path, unet_in, norm_stats, bound):
    """A 4-channel UNet blends the image's noised latents outside the mask, so a new mask turns the region from the
    image's latents into a fresh generation: the GroupNorm statistics move far, and frozen statistics (error 1.5x the
    effect here, with random weights) are a poor fit. Recomputed statistics bring it to 0.62x."""
    pipe = tiny_sd(tmp_path, "inpaint", unet_in_channels=unet_in)
    x, m = photo(), box_mask()
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4, norm_stats=norm_stats))
    out0 = editor.capture(image=x, generator=gen(), **KW).images  # nothing masked
    sparse = editor.edit(mask_image=m, output_type="pt", commit=False).images
    stats = editor.last_stats
    assert 0 < stats["macs_sparse"] < 0.6 * stats["macs_dense"]
    assert abs(stats["region_fraction"] - float(m.mean())) < 1e-6
    # Outside the latent region (the mask dilated by 1 latent pixel = 8 image pixels), the capture's pixels.
    near = box_mask(box=(8, 56, 56, 112))[0, 0].bool()
    assert torch.equal(sparse[..., ~near], out0[..., ~near])
    # Inside, it follows the dense inpainting of the same mask from the same noise (random weights: the edit's own
    # effect is small, so the bound is relative to it).
    dense = pipe(image=x, mask_image=m, generator=gen(), **KW).images
    err = (sparse - dense).abs()[..., near].mean()
    effect = (dense - out0).abs()[..., near].mean()
    assert err < bound * effect


def test_unchanged_mask_is_free_and_masks_are_incremental(tmp_path):
    pipe = tiny_sd(tmp_path, "inpaint")
    x, m1 = photo(b=2), box_mask(b=2)
    m2 = m1.clone()
    m2[1, :, 80:100, 8:40] = 1.0  # the second image gets one more hole
    editor = SparseEditor(pipe, CONFIG)
    editor.capture(image=x, mask_image=m1, generator=gen(), **KW)
    first = editor.edit(mask_image=m1, output_type="pt").images
    assert editor.last_stats["macs_sparse"] == 0
    editor.edit(mask_image=m2)
    stats = editor.last_stats
    assert abs(stats["region_fraction"] - float((m2 != m1).float().mean())) < 1e-6
    again = editor.edit(mask_image=m2, output_type="pt").images
    assert editor.last_stats["macs_sparse"] == 0
    assert torch.equal(again[0], first[0])  # the first image's mask never changed


def test_mask_is_for_inpainting_only(tmp_path):
    editor = SparseEditor(tiny_sd(tmp_path, "img2img"), CONFIG)
    x = photo()
    editor.capture(image=x, generator=gen(), strength=0.7, **KW)
    with pytest.raises(ValueError, match="mask_image is for StableDiffusionInpaintPipeline"):
        editor.edit(mask_image=box_mask())


@pytest.mark.parametrize("on_stale", ["raise", "recapture"])
def test_a_changed_scheduler_raises_or_recaptures(tmp_path, on_stale):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe = tiny_sd(tmp_path, "inpaint")
    x, m = photo(), box_mask()
    editor = SparseEditor(pipe, CONFIG, on_stale=on_stale)
    editor.capture(image=x, generator=gen(), **KW)
    ddim = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(ddim.config)
    if on_stale == "raise":
        with pytest.raises(StaleCacheError, match="scheduler"):
            editor.edit(mask_image=m)
        return
    got = editor.edit(mask_image=m, output_type="pt").images
    assert "recaptured_seconds" in editor.last_stats
    assert editor.last_stats["macs_sparse"] < editor.last_stats["macs_dense"]
    editor.remove()
    fresh = SparseEditor(pipe, CONFIG)  # the same as capturing under the new scheduler, then editing
    fresh.capture(image=x, generator=gen(), **KW)
    assert torch.equal(fresh.edit(mask_image=m, output_type="pt").images, got)
    assert isinstance(ddim, DDIMScheduler)
