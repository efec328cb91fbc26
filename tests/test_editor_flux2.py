"""SparseEditor on a tiny offline FLUX.2 [klein] pipeline with an input image (issue 36): the image is a reference in
the transformer's sequence, a stroke on it is the edit; generation from noise in four steps, the transformer
token-sparse (`adapters/flux2.py`)."""

import numpy as np
import pytest
import torch
from PIL import Image

import sparsedit
from sparsedit import SparseEditor
from sparsedit.testing import tiny_flux2_klein


pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "num_inference_steps": 4}


@pytest.fixture
def pipe(tmp_path):
    return tiny_flux2_klein(tmp_path / "tok")


def photo(h=128, w=128, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a)


def stroke(im, y0=48, x0=40):
    a = np.array(im)
    a[y0 : y0 + 16, x0 : x0 + 24] = (230, 40, 40)
    return Image.fromarray(a)


def run(pipe, image, output_type="pt", **kw):
    return pipe(image=image, generator=torch.Generator().manual_seed(3), output_type=output_type, **KW, **kw).images


def test_capture_is_the_pipelines_own_result_edits_keep_the_background(pipe, tmp_path):
    want, want_latents = run(pipe, photo()), run(pipe, photo(), "latent")
    editor = SparseEditor(pipe)
    got = editor.capture(image=photo(), generator=torch.Generator().manual_seed(3), output_type="pt", **KW).images
    assert torch.equal(got, want) and editor.kind == "flux2_klein"
    assert torch.equal(editor.edit(image=photo(), output_type="latent").images, want_latents)
    out = editor.edit(image=stroke(photo()), output_type="pt").images
    stats, keep = editor.last_stats, editor.last_region[0]
    assert stats["ran_dense"] is None and 0 < stats["macs_sparse"] < 0.8 * stats["macs_dense"]
    assert keep.any() and not keep.all()
    assert torch.equal(out[..., ~keep], got[..., ~keep])
    committed = editor.edit(image=stroke(photo()), commit=True, output_type="pt").images
    assert torch.equal(committed, out)
    editor.save(tmp_path / "session")
    editor.remove()
    assert not sparsedit.is_sparsified(pipe.transformer)
    assert torch.equal(run(pipe, photo()), want)
    loaded = SparseEditor.load(pipe, tmp_path / "session")
    again = loaded.edit(image=stroke(stroke(photo()), 90, 80), output_type="pt").images
    assert torch.isfinite(again).all() and loaded.last_stats["ran_dense"] is None


def test_guided_base_model_batches_its_guidance(tmp_path):
    """The base (undistilled) model's classifier-free guidance: the empty prompt and the prompt in one batched call,
    which equals the pipeline's two calls to float rounding; edits keep the background bit for bit."""
    pipe = tiny_flux2_klein(tmp_path / "tok", distilled=False)
    want = run(pipe, photo(), guidance_scale=4.0)
    editor = SparseEditor(pipe)
    got = editor.capture(image=photo(), generator=torch.Generator().manual_seed(3), output_type="pt",
                         guidance_scale=4.0, **KW).images  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = editor.edit(image=stroke(photo()), output_type="pt").images
    keep = editor.last_region[0]
    assert editor.last_stats["ran_dense"] is None and torch.equal(out[..., ~keep], got[..., ~keep])


def test_the_reference_image_is_prepared_as_the_pipeline_prepares_it(pipe):
    """A size not a multiple of 16 is cropped as the pipeline crops it; a different output size, a batch of
    references, a strength or a negative prompt are refused by name."""
    want = run(pipe, photo(120, 136))
    editor = SparseEditor(pipe)
    got = editor.capture(image=photo(120, 136), generator=torch.Generator().manual_seed(3), output_type="pt",
                         **KW).images  # fmt: skip
    assert got.shape[-2:] == (112, 128) and torch.equal(got, want)
    with pytest.raises(ValueError, match="reference image's size"):
        editor.capture(image=photo(), height=64, width=128, **KW)
    with pytest.raises(ValueError, match="one reference image"):
        editor.capture(image=[photo(), photo(seed=1)], **KW)
    with pytest.raises(ValueError, match="no strength"):
        editor.capture(image=photo(), strength=0.6, **KW)
    with pytest.raises(ValueError, match="negative_prompt"):
        editor.capture(image=photo(), negative_prompt="blurry", **KW)


def test_cache_budget_sizes_the_capture(pipe):
    editor = SparseEditor(pipe, sparsedit.SparseConfig(input_dilation=1, cache_budget="1GiB"))
    editor.capture(image=photo(), generator=torch.Generator().manual_seed(3), output_type="pt", **KW)
    out = editor.edit(image=stroke(photo()), output_type="pt").images
    assert torch.isfinite(out).all() and editor.last_stats["ran_dense"] is None
