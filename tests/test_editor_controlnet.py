"""SparseEditor on tiny offline ControlNet pipelines (issue 18): the ControlNet runs sparse beside the UNet, a change
of `control_image` is an edit region, a changed `controlnet_conditioning_scale` is a stale capture."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor, StaleCacheError
from sparsedit.spatial import last_stats
from sparsedit.testing import tiny_controlnet


pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "num_inference_steps": 6, "output_type": "pt"}
# measured_fallback=False: the tiny models run faster dense, and these tests are about the sparse path.
CONFIG = SparseConfig(input_dilation=1, tile_size=4, measured_fallback=False)


def gen():
    return torch.Generator().manual_seed(3)


def rand(seed, h=128, w=128):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def painted(x, y0=16, y1=40, x0=72, x1=100, value=0.9):
    y = x.clone()
    y[..., y0:y1, x0:x1] = value
    return y


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_controlnet(tmp_path_factory.mktemp("tok"), "img2img")


@pytest.mark.parametrize(
    "options",
    [{}, {"guess_mode": True}, {"controlnet_conditioning_scale": 0.6, "control_guidance_end": 0.5}],
    ids=["defaults", "guess_mode", "scale_and_guidance_end"],
)
def test_capture_is_the_pipelines_call_and_remove_restores_it(pipe, options):
    x, c = rand(0), rand(1)
    want = pipe(image=x, control_image=c, generator=gen(), **KW, **options).images
    editor = SparseEditor(pipe, CONFIG)
    try:
        got = editor.capture(image=x, control_image=c, generator=gen(), **KW, **options).images
        assert torch.equal(got, want) and editor.kind == "controlnet_img2img"
        assert editor.last_stats["cache_bytes"]["controlnet"] > 0
        same = editor.edit(output_type="pt").images  # nothing changed: the capture, at no cost
        assert torch.equal(same, want) and editor.last_stats["macs_sparse"] == 0
    finally:
        editor.remove()
    assert torch.equal(pipe(image=x, control_image=c, generator=gen(), **KW, **options).images, want)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_control_only_edit_recomputes_only_its_region(pipe, guess_mode):
    x, c = rand(0), rand(1)
    c2 = painted(c)
    editor = SparseEditor(pipe, CONFIG)
    try:
        out0 = editor.capture(image=x, control_image=c, generator=gen(), guess_mode=guess_mode, **KW).images
        out1 = editor.edit(control_image=c2, commit=False, output_type="pt").images
        stats = editor.last_stats
        near = editor.last_region[0]
        assert near.any() and near.float().mean() < 0.25
        assert torch.equal(out1[..., ~near], out0[..., ~near])  # outside the control change: the capture, bit for bit
        assert 0 < stats["macs_sparse"] < 0.5 * stats["macs_dense"] and stats["dense_steps"] == 0
        # The ControlNet's residuals reach the UNet with their regions: no UNet layer at the latents' resolution
        # recomputes its whole map (without the regions, the whole decoder half would).
        top = [
            layer["active_fraction"] for layer in last_stats(pipe.unet)["layers"] if layer["resolution"] == (16, 16)
        ]
        assert len(top) > 10 and max(top) < 0.75
        dense = pipe(image=x, control_image=c2, generator=gen(), guess_mode=guess_mode, **KW).images
        effect = (dense - out0).abs()[..., near].mean()
        assert effect > 0
        assert (out1 - dense).abs()[..., near].mean() < 0.5 * effect  # measured 0.3-0.4 (random weights)
        assert (out1 - out0).abs()[..., near].mean() > 0.5 * effect  # the control change is not ignored
    finally:
        editor.remove()


def test_stroke_edit_with_a_controlnet_matches_the_dense_pipeline(pipe):
    x, c = rand(0), rand(1)
    editor = SparseEditor(pipe, CONFIG)
    try:
        out0 = editor.capture(image=x, control_image=c, generator=gen(), **KW).images
        out1 = editor.edit(image=painted(x, 60, 90, 20, 50, 0.2), output_type="pt").images
        near = editor.last_region[0]
        assert torch.equal(out1[..., ~near], out0[..., ~near])
        dense = pipe(image=painted(x, 60, 90, 20, 50, 0.2), control_image=c, generator=gen(), **KW).images
        assert (out1 - dense).abs().max() < 0.05  # measured 0.037; SD img2img without the ControlNet: 0.037 too
        # Committed: the next control edit is against the stroked image.
        out2 = editor.edit(control_image=painted(c), output_type="pt").images
        both = pipe(image=painted(x, 60, 90, 20, 50, 0.2), control_image=painted(c), generator=gen(), **KW).images
        assert (out2 - both).abs().max() < 0.05
    finally:
        editor.remove()


def test_conditioning_scale_and_arguments_are_checked(pipe):
    x, c = rand(0), rand(1)
    editor = SparseEditor(pipe, CONFIG)
    try:
        with pytest.raises(ValueError, match="control image"):
            editor.capture(image=x, generator=gen(), **KW)
        with pytest.raises(TypeError, match="controlnet_conditioning_scal"):
            editor.capture(image=x, control_image=c, controlnet_conditioning_scal=0.5, **KW)
        editor.capture(image=x, control_image=c, generator=gen(), **KW)
        with pytest.raises(StaleCacheError, match="controlnet_conditioning_scale=0.5"):
            editor.edit(control_image=painted(c), controlnet_conditioning_scale=0.5)
        editor.edit(controlnet_conditioning_scale=[pipe_default(pipe)], output_type="pt")  # the captured value
    finally:
        editor.remove()
    editor = SparseEditor(pipe, CONFIG, on_stale="recapture")
    try:
        editor.capture(image=x, control_image=c, generator=gen(), **KW)
        got = editor.edit(controlnet_conditioning_scale=0.5, output_type="pt").images
        assert "recaptured_seconds" in editor.last_stats
        want = pipe(image=x, control_image=c, controlnet_conditioning_scale=0.5, generator=gen(), **KW).images
        assert torch.equal(got, want)
    finally:
        editor.remove()


def pipe_default(pipe):
    import inspect

    return inspect.signature(type(pipe).__call__).parameters["controlnet_conditioning_scale"].default


def test_a_controlnet_session_saves_and_resumes(pipe, tmp_path):
    x, c = rand(0), rand(1)
    editor = SparseEditor(pipe, CONFIG)
    editor.capture(image=x, control_image=c, generator=gen(), **KW)
    editor.edit(control_image=painted(c, 80, 100, 10, 30), output_type="pt")  # committed: saved with the session
    editor.save(tmp_path / "s")
    history = editor.history
    assert [h["edit"] for h in history] == [1] and history[0]["kind"] == "image"
    want = editor.edit(control_image=painted(c), commit=False, output_type="pt").images
    assert editor.history == history  # an uncommitted edit is not part of the history
    editor.remove()
    loaded = SparseEditor.load(pipe, tmp_path / "s")
    try:
        assert loaded.history == history
        assert torch.equal(loaded.edit(control_image=painted(c), commit=False, output_type="pt").images, want)
    finally:
        loaded.remove()


@pytest.mark.parametrize("kind", ["inpaint", "inpaint9"])
def test_controlnet_inpaint_capture_and_sparse_edits(tmp_path, kind):
    pipe = tiny_controlnet(tmp_path / "tok", kind)
    x, c = rand(0), rand(1)
    empty = torch.zeros(1, 1, 128, 128)
    mask = empty.clone()
    mask[..., 70:100, 20:50] = 1
    want = pipe(image=x, mask_image=empty, control_image=c, generator=gen(), **KW).images
    editor = SparseEditor(pipe, CONFIG)
    try:
        out0 = editor.capture(image=x, mask_image=empty, control_image=c, generator=gen(), **KW).images
        assert torch.equal(out0, want) and editor.kind == "controlnet_inpaint"
        assert out0.shape[-1] == 128  # this pipeline keeps the image's size
        out1 = editor.edit(mask_image=mask, control_image=painted(c), commit=False, output_type="pt").images
        near = editor.last_region[0]
        assert near.any() and not near.all()
        assert torch.equal(out1[..., ~near], out0[..., ~near])
        dense = pipe(image=x, mask_image=mask, control_image=painted(c), generator=gen(), **KW).images
        effect = (dense - out0).abs()[..., near].mean()
        assert (out1 - dense).abs()[..., near].mean() < 0.75 * effect  # as the SD inpainting tests bound it
    finally:
        editor.remove()


def test_cache_budget_counts_the_controlnet(pipe):
    from sparsedit import CacheBudgetError

    x, c = rand(0), rand(1)
    free = SparseEditor(pipe, SparseConfig(input_dilation=1, cache_dtype=None))
    try:
        free.capture(image=x, control_image=c, generator=gen(), **KW)
        need, controlnet = int(free.cache_bytes), free.cache_bytes["controlnet"]
    finally:
        free.remove()
    probe = SparseEditor(pipe, SparseConfig(input_dilation=1, cache_dtype=None, cache_budget=1))
    try:
        with pytest.raises(CacheBudgetError) as refused:
            probe.capture(image=x, control_image=c, generator=gen(), **KW)
    finally:
        probe.remove()
    estimate = refused.value.needs["as configured"]
    assert controlnet > 0.1 * need and 0.9 * need <= estimate <= 1.2 * need  # the ControlNet's share is counted


def test_controlnet_weights_are_checked_once_per_edit_and_a_change_is_refused(pipe, monkeypatch):
    import sparsedit.spatial.hooks as spatial

    x, c = rand(0), rand(1)
    editor = SparseEditor(pipe, CONFIG)
    weight = pipe.controlnet.conv_in.weight.detach().clone()
    try:
        editor.capture(image=x, control_image=c, generator=gen(), **KW)
        calls = []
        real = spatial.weights_identity
        monkeypatch.setattr(spatial, "weights_identity", lambda model: calls.append(model) or real(model))
        editor.edit(control_image=painted(c), output_type="pt", commit=False)
        # One walk over the weights' identity per model per edit (the UNet and the ControlNet at their first sparse step), not per step.
        assert sum(m is pipe.controlnet for m in calls) == 1 and sum(m is pipe.unet for m in calls) == 1
        with torch.no_grad():
            pipe.controlnet.conv_in.weight.add_(1e-3)
        with pytest.raises(StaleCacheError):
            editor.edit(control_image=painted(c, value=0.1), output_type="pt")
    finally:
        with torch.no_grad():
            pipe.controlnet.conv_in.weight.copy_(weight)
        editor.remove()
