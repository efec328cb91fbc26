"""SparseEditor on a tiny offline FLUX.1 img2img pipeline (issue 36): packed latents, the resolution-shifted
flow-matching schedule, distilled guidance as an input, the transformer token-sparse (`adapters/flux.py`)."""

import pytest
import torch

import sparsedit
from sparsedit import SparseEditor
from sparsedit.testing import tiny_flux


diffusers = pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "strength": 0.6, "num_inference_steps": 6, "guidance_scale": 3.5}


@pytest.fixture
def pipe(tmp_path):
    return tiny_flux(tmp_path / "tok")


def photo(h=128, w=128):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def stroke(x, y0=40, x0=40):
    y = x.clone()
    y[:, :, y0 : y0 + 16, x0 : x0 + 24] = 0.9
    return y


def run(pipe, x, output_type="pt"):
    return pipe(image=x, generator=torch.Generator().manual_seed(3), output_type=output_type, **KW).images


def test_capture_is_the_pipelines_own_result_edits_keep_the_background(pipe, tmp_path):
    want, want_latents = run(pipe, photo()), run(pipe, photo(), "latent")
    editor = SparseEditor(pipe)
    got = editor.capture(image=photo(), generator=torch.Generator().manual_seed(3), output_type="pt", **KW).images
    assert torch.equal(got, want) and editor.kind == "flux_img2img"
    assert torch.equal(editor.edit(image=photo(), output_type="latent").images, want_latents)  # packed, as FLUX's
    out = editor.edit(image=stroke(photo()), output_type="pt").images
    stats, keep = editor.last_stats, editor.last_region[0]
    assert stats["ran_dense"] is None and 0 < stats["macs_sparse"] < 0.8 * stats["macs_dense"]
    assert keep.any() and not keep.all()
    assert torch.equal(out[..., ~keep], got[..., ~keep])
    dense = run(pipe, stroke(photo()))
    inside = stroke(torch.zeros(1, 1, 128, 128)).bool()[0, 0]
    assert (out - dense)[..., inside].abs().mean() < 0.7 * (dense - got)[..., inside].abs().mean()
    committed = editor.edit(image=stroke(photo()), commit=True, output_type="pt").images
    assert torch.equal(committed, out)
    editor.save(tmp_path / "session")
    editor.remove()
    assert not sparsedit.is_sparsified(pipe.transformer)
    assert torch.equal(run(pipe, photo()), want)
    loaded = SparseEditor.load(pipe, tmp_path / "session")
    again = loaded.edit(image=stroke(stroke(photo()), 90, 80), output_type="pt").images
    assert torch.isfinite(again).all() and loaded.last_stats["ran_dense"] is None


def test_sizes_follow_the_pipeline(pipe):
    """FLUX's image processor rounds a size down to its 16 px multiple (the VAE's 8x, then 2x2 packing); the capture
    does what the pipeline does."""
    want = pipe(image=photo(120, 128), height=120, width=128, generator=torch.Generator().manual_seed(3),
                output_type="pt", **KW).images  # fmt: skip
    editor = SparseEditor(pipe)
    got = editor.capture(image=photo(120, 128), height=120, width=128, generator=torch.Generator().manual_seed(3),
                         output_type="pt", **KW).images  # fmt: skip
    assert got.shape[-2:] == (112, 128) and torch.equal(got, want)


def test_cache_budget_dry_run_feeds_the_unpacked_latents(pipe):
    """Before: `cache_budget` on FLUX failed in its dry run (the transformer got the packed channel count as the
    unpacked latents' and its embedding refused the shape)."""
    editor = SparseEditor(pipe, sparsedit.SparseConfig(input_dilation=1, cache_budget="1GiB"))
    got = editor.capture(image=photo(), generator=torch.Generator().manual_seed(3), output_type="pt", **KW).images
    assert torch.equal(got, run(pipe, photo()))
    out = editor.edit(image=stroke(photo()), output_type="pt").images
    assert editor.last_stats["ran_dense"] is None and torch.equal(out[..., ~editor.last_region[0]],
                                                                   got[..., ~editor.last_region[0]])  # fmt: skip


@pytest.mark.parametrize("kind", ["inpaint", "fill"])
def test_inpainting_regenerates_where_the_mask_changed(kind, tmp_path):
    """`FluxInpaintPipeline` (64 channels, latent blending with `scale_noise`) and `FluxFillPipeline` (384 channels:
    the masked image's latents and the pixel mask packed with the latents): the capture is the pipeline's own
    result; a new hole is an edit whose background is the capture's, and which follows the dense pipeline inside."""
    pipe = tiny_flux(tmp_path / "tok", kind)
    kw = {**KW, "strength": 0.6 if kind == "inpaint" else 1.0}
    x = photo()
    hole = torch.zeros(1, 1, 128, 128)
    hole[..., 32:64, 48:80] = 1.0
    empty = torch.zeros(1, 1, 128, 128)
    want = pipe(image=x, mask_image=empty, generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    editor = SparseEditor(pipe)
    assert editor.kind == f"flux_{kind}"
    got = editor.capture(image=x, mask_image=empty, generator=torch.Generator().manual_seed(3), output_type="pt",
                         **kw).images  # fmt: skip
    assert torch.equal(got, want)
    out = editor.edit(mask_image=hole, output_type="pt").images
    keep = editor.last_region[0]
    assert editor.last_stats["ran_dense"] is None and keep.any() and not keep.all()
    assert 0 < editor.last_stats["macs_sparse"] < 0.8 * editor.last_stats["macs_dense"]
    assert torch.equal(out[..., ~keep], got[..., ~keep])
    dense = pipe(image=x, mask_image=hole, generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    inside = hole[0, 0].bool()
    # Measured: 0.76 of the edit's effect for the blending pipeline (near-uniform random attention leans on the cached
    # tokens), under 0.7 for Fill.
    bound = 0.85 if kind == "inpaint" else 0.7
    assert (out - dense)[..., inside].abs().mean() < bound * (dense - got)[..., inside].abs().mean()


def test_a_transformer_of_the_other_inpainting_kind_is_refused(tmp_path):
    pipe = tiny_flux(tmp_path / "tok", "fill")
    inpaint = diffusers.FluxInpaintPipeline(**pipe.components)
    with pytest.raises(ValueError, match="64 packed input channels, this one 384"):
        SparseEditor(inpaint)


def test_prompt_edits_on_flux_txt2img_recompute_the_context_and_keep_the_rest(tmp_path):
    """`FluxPipeline`: the capture is the pipeline's own generation; a prompt edit regenerates its region with the new
    prompt's tokens and pooled embedding, and keeps the latents outside it."""
    pipe = tiny_flux(tmp_path / "tok", "txt2img")
    kw = {"num_inference_steps": 6, "output_type": "pt", "height": 128, "width": 128, "guidance_scale": 3.5}
    want = pipe(prompt="a red house", generator=torch.Generator().manual_seed(3), **kw).images
    editor = SparseEditor(pipe)
    assert editor.kind == "flux_txt2img"
    got = editor.capture(prompt="a red house", generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(got, want)
    region = torch.zeros(1, 128, 128, dtype=torch.bool)
    region[:, 48:72, 48:72] = True
    out = editor.edit(prompt="a blue lake", region=region, commit=False, output_type="pt").images
    keep = editor.last_region[0]
    assert editor.last_stats["ran_dense"] is None and keep.any() and not keep.all()
    assert torch.equal(out[..., ~keep], got[..., ~keep])
    assert not torch.equal(out[..., keep], got[..., keep])  # the new prompt took effect
    found = editor.edit(prompt="a blue lake", output_type="pt").images  # the region from the latents' difference
    assert editor.last_stats["region_method"] == "latent_diff" and torch.isfinite(found).all()
