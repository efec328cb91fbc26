"""SparseEditor on a tiny offline StableDiffusionXLImg2ImgPipeline: two text encoders, pooled embeddings and
`text_time` conditioning (issue 18)."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor, StaleCacheError
from sparsedit.testing import tiny_sdxl


pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "strength": 0.7, "num_inference_steps": 6, "output_type": "pt"}


@pytest.fixture
def pipe(tmp_path):
    return tiny_sdxl(tmp_path / "tok")


def photo(h=128, w=128):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def stroke(x):
    y = x.clone()
    y[:, :, 16:40, 72:104] = 0.8
    return y


def run(pipe, x, **kw):
    return pipe(image=x, generator=torch.Generator().manual_seed(3), **{**KW, **kw}).images


def test_capture_is_the_pipelines_own_result_and_remove_restores_it(pipe):
    want = run(pipe, photo())  # the pipeline's defaults (guidance 5.0 for SDXL)
    editor = SparseEditor(pipe)
    got = editor.capture(image=photo(), generator=torch.Generator().manual_seed(3), **KW).images
    assert torch.equal(got, want)
    assert editor.kind == "sdxl_img2img" and editor.last_stats["cache_bytes"]["unet"] > 0
    same = editor.edit(image=photo(), output_type="pt").images  # nothing changed: the capture, at no cost
    assert torch.equal(same, want) and editor.last_stats["macs_sparse"] == 0
    editor.remove()
    assert torch.equal(run(pipe, photo()), want)


def test_stroke_edit_is_sparse_keeps_the_background_and_matches_dense(pipe):
    x = photo()
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    out0 = editor.capture(image=x, generator=torch.Generator().manual_seed(3), **KW).images
    out1 = editor.edit(image=stroke(x), commit=False, output_type="pt").images
    stats = editor.last_stats
    assert 0 < stats["macs_sparse"] < 0.7 * stats["macs_dense"]
    keep = editor.last_region[0]
    assert keep.any() and not keep.all()
    assert torch.equal(out1[..., ~keep], out0[..., ~keep])  # the background, bit for bit
    dense = run(pipe, stroke(x))
    assert (out1 - dense).abs().max() < 0.03  # measured 0.015 (the SD tests' approximation)


def test_added_conditions_are_checked_and_saved(pipe, tmp_path):
    x = photo()
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    editor.capture(image=x, generator=torch.Generator().manual_seed(3), **KW)
    editor.save(tmp_path / "s")
    want = editor.edit(image=stroke(x), commit=False, output_type="pt").images
    # The pooled embedding is part of the recorded UNet inputs: a different one is a stale cache, not a silent mix.
    editor.adapter.conditions = {"text_embeds": editor.current.conditions["text_embeds"] + 1}
    editor.current.conditions = dict(editor.adapter.conditions)
    with pytest.raises(StaleCacheError, match="added_cond_kwargs"):
        editor.edit(image=stroke(x), commit=False, output_type="pt")
    editor.remove()
    loaded = SparseEditor.load(pipe, tmp_path / "s")
    assert torch.equal(loaded.edit(image=stroke(x), commit=False, output_type="pt").images, want)
    with pytest.raises(ValueError, match="prompt edits"):
        loaded.edit(prompt="a blue house")


@pytest.mark.parametrize(
    ("kind", "norm_stats", "bound"), [("inpaint9", "frozen", 0.5), ("inpaint", "recompute", 0.75)]
)
def test_sdxl_inpaint_capture_and_sparse_mask_edit(tmp_path, kind, norm_stats, bound):
    pipe = tiny_sdxl(tmp_path / "tok", kind)
    x = photo(64, 64)
    empty = torch.zeros(1, 1, 64, 64)
    mask = empty.clone()
    mask[..., 8:30, 20:50] = 1
    kw = {"prompt": "a red house", "num_inference_steps": 6, "output_type": "pt"}
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    want = pipe(image=x, mask_image=empty, generator=gen(), **kw).images  # the pipeline's defaults (strength 0.9999)
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4, norm_stats=norm_stats))
    out0 = editor.capture(image=x, mask_image=empty, generator=gen(), **kw).images
    assert torch.equal(out0, want) and editor.kind == "sdxl_inpaint"
    sparse = editor.edit(mask_image=mask, commit=False, output_type="pt").images
    near = editor.last_region[0]
    assert near.any() and not near.all()
    assert torch.equal(sparse[..., ~near], out0[..., ~near])  # outside the (dilated) mask change: the capture
    dense = pipe(image=x, mask_image=mask, generator=gen(), **kw).images
    err = (sparse - dense).abs()[..., near].mean()
    effect = (dense - out0).abs()[..., near].mean()
    assert err < bound * effect  # random weights: the bound is relative to the edit's own effect, as for SD
    editor.remove()


def test_sdxl_text_to_image_capture_and_prompt_edits(tmp_path):
    from sparsedit import TextEditConfig

    pipe = tiny_sdxl(tmp_path / "tok", "txt2img")
    kw = {"num_inference_steps": 6, "output_type": "pt", "height": 128, "width": 128}
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    want = pipe(prompt="a red house", generator=gen(), **kw).images
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4, measured_fallback=False))
    try:
        out0 = editor.capture(prompt="a red house", generator=gen(), **kw).images
        assert torch.equal(out0, want) and editor.kind == "sdxl_txt2img"
        same = editor.edit(prompt="a red house", output_type="pt").images
        assert torch.equal(same, out0)
        region = torch.zeros(128, 128, dtype=torch.bool)
        region[40:72, 48:88] = True
        out1 = editor.edit(prompt="a blue lake", region=region, commit=False, output_type="pt").images
        keep = editor.last_region[0]
        assert keep.any() and not keep.all() and keep[region].all()
        assert torch.equal(out1[..., ~keep], out0[..., ~keep])  # outside the region: the capture, bit for bit
        assert (out1 - out0).abs()[..., keep].mean() > 1e-3  # the region follows the new prompt
        assert editor.last_stats["macs_sparse"] < 0.9 * editor.last_stats["macs_dense"]
        # The whole image as the region: the new pooled embedding and hidden states everywhere, the pipeline's own
        # regeneration (random weights move the whole image with a word, so a small region is not compared).
        dense = pipe(prompt="a blue lake", generator=gen(), **kw).images
        whole = editor.edit(prompt="a blue lake", region=torch.ones(128, 128, dtype=torch.bool), commit=False,
                            output_type="pt").images  # fmt: skip
        assert torch.allclose(whole, dense, atol=1e-5)
        # A committed prompt edit makes the new pooled embedding the capture's: the same prompt again is free.
        editor.edit(prompt="a blue lake", region=region, output_type="pt")
        assert torch.equal(editor.current.conditions["text_embeds"], editor.adapter.conditions["text_embeds"])
        again = editor.edit(prompt="a blue lake", output_type="pt").images
        assert editor.last_stats["macs_sparse"] == 0 and again.shape == out0.shape
        found = editor.find_region(prompt="a red lake", text_config=TextEditConfig(region="latent_diff"))
        assert found.shape == (1, 128, 128)
    finally:
        editor.remove()


def test_sdxl_text_to_image_capture_fits_a_cache_budget(tmp_path):
    """`cache_budget` on an SDXL text-to-image capture measures it as text-to-image (no image to encode), as for SD:
    once the kind was compared with the string "txt2img" and SDXL's "sdxl_txt2img" took the image branch."""
    pipe = tiny_sdxl(tmp_path / "tok", "txt2img")
    kw = {"num_inference_steps": 4, "output_type": "pt", "height": 128, "width": 128}
    want = pipe(prompt="a red house", generator=torch.Generator().manual_seed(3), **kw).images
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1, tile_size=4, cache_budget="1GiB"))
    try:
        out = editor.capture(prompt="a red house", generator=torch.Generator().manual_seed(3), **kw).images
        assert torch.equal(out, want)
        assert editor.last_stats["budget"]["choice"] == "as configured"
    finally:
        editor.remove()
