"""SparseEditor on a tiny offline StableDiffusionImg2ImgPipeline (SDEdit in latent space)."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor, StaleCacheError
from sparsedit.spatial import attachment_of

from .sd_fixtures import tiny_sd, tiny_sd_img2img


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


def test_models_device_and_dtype_are_read_once_per_edit(pipe, monkeypatch):
    """diffusers' `ModelMixin.device`/`.dtype` walk every submodule on each read: an edit reads each model's once
    (issue 39), and a later edit reads them afresh (a model moved or cast between edits is seen)."""
    import diffusers.models.modeling_utils as mu

    editor = SparseEditor(pipe)
    x = photo(h=64, w=64)
    editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    reads = []
    for name in ("get_parameter_device", "get_parameter_dtype"):
        real = getattr(mu, name)
        monkeypatch.setattr(mu, name, lambda m, _real=real, _name=name: reads.append((_name, id(m))) or _real(m))
    for _ in range(2):
        reads.clear()
        editor.edit(image=stroke(x), commit=False, output_type="pt")
        assert reads and len(reads) == len(set(reads)), reads  # each model's device and dtype once, not per use
        assert editor.adapter._pins is None  # nothing pinned between calls


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


def test_bf16_non_square(tmp_path):
    pipe = tiny_sd(tmp_path, "img2img", dtype=torch.bfloat16)
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4))
    x = photo(h=64, w=96)
    out0 = editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW).images
    y = x.clone()
    y[:, :, 8:24, 40:64] = 0.9
    out1 = editor.edit(image=y, output_type="pt").images
    assert out1.shape == out0.shape == (1, 3, 64, 96)
    assert not torch.equal(out0, out1)
    assert editor.last_stats["macs_sparse"] < editor.last_stats["macs_dense"]


def test_sequential_edits_track_a_fresh_capture_then_edit(pipe):
    config = SparseConfig(input_dilation=1, tile_size=4)
    x0 = photo()
    x1 = x0.clone()
    x1[:, :, 8:24, 8:24] = 0.9
    x2 = stroke(x1)
    editor = SparseEditor(pipe, config)
    editor.capture(image=x0, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    editor.edit(image=x1)
    out2 = editor.edit(image=x2, output_type="pt").images
    assert editor.last_stats["region_fraction"] < 0.06  # the second edit recomputes the second stroke only
    editor.remove()
    fresh = SparseEditor(pipe, config)
    fresh.capture(image=x0, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    want = fresh.edit(image=x2, output_type="pt").images
    # Two approximate sparse runs against one: measured max 0.0019, mean 2.3e-5.
    assert (out2 - want).abs().max() < 0.02


def test_changed_weights_raise_and_a_bf16_cache_halves_memory(pipe):
    x = photo()
    full = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4, cache_dtype=None))  # the model's dtype
    full.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    want = full.edit(image=stroke(x), output_type="pt", commit=False).images
    full_bytes = full.cache_bytes
    full_unet = attachment_of(pipe.unet).state.cache.nbytes
    weight = pipe.unet.conv_in.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.0)  # an in-place update that keeps every bit (a new version counter): the cache still holds
    assert torch.equal(full.edit(image=stroke(x), output_type="pt", commit=False).images, want)
    with torch.no_grad():
        weight.mul_(1.01)  # an in-place update, as an optimiser or load_state_dict makes
    with pytest.raises(StaleCacheError, match="weights"):
        full.edit(image=stroke(x))
    full.remove()
    with torch.no_grad():
        weight.copy_(saved)
    half = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4, cache_dtype="bfloat16"))
    half.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    got = half.edit(image=stroke(x), output_type="pt", commit=False).images
    # The UNet's per-step cache halves; the VAE's caches keep the model dtype (converting them whole per edit would
    # raise the peak memory).
    assert attachment_of(pipe.unet).state.cache.nbytes < 0.6 * full_unet
    assert half.cache_bytes < full_bytes
    assert (got - want).abs().max() < 0.02  # measured 0.003 (mean 3e-5), at 0.50x the cache bytes


def test_vae_encoder_runs_sparse_and_tiling_is_refused(pipe):
    import sparsedit

    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4))
    x = photo()
    editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    editor.edit(image=stroke(x), commit=False)
    enc = sparsedit.last_stats(pipe.vae.encoder)
    assert 0 < enc["macs_sparse"] < 0.6 * enc["macs_dense"]
    pipe.vae.enable_tiling()
    with pytest.raises(ValueError, match="disable_tiling"):
        editor.edit(image=stroke(x))
    pipe.vae.disable_tiling()


def test_an_uncommitted_edit_that_runs_as_the_plain_unet_decides_once(pipe, monkeypatch):
    """A region over `max_region_fraction` makes every step the plain UNet. An uncommitted edit decides that at its
    first step and runs the others as plain calls (no per-step check, region or stats work); the result, the MACs and
    the step counts equal those of the committing edit, which takes the full path at every step."""
    import sparsedit.editors.runs as runs

    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    x = photo(h=64, w=64)
    editor.capture(image=x, prompt="a red house", generator=torch.Generator().manual_seed(5), **KW)
    big = x.clone()
    big[:, :, 4:60, 4:60] = 0.8  # most of the 8x8 latent
    calls = []
    real = runs.last_stats
    monkeypatch.setattr(runs, "last_stats", lambda m, **k: calls.append(m) or real(m, **k))
    preview = editor.edit(image=big, commit=False, output_type="pt").images
    stats = dict(editor.last_stats)
    assert sum(m is pipe.unet for m in calls) == 1  # the first step's
    steps = stats["dense_steps"]
    assert steps > 1 and "max_region_fraction" in stats["ran_dense"]
    calls.clear()
    committed = editor.edit(image=big, commit=True, output_type="pt").images
    assert sum(m is pipe.unet for m in calls) == steps
    assert torch.equal(preview, committed)
    for key in ("macs_dense", "macs_sparse", "dense_steps", "ran_dense"):
        assert editor.last_stats[key] == stats[key], key
