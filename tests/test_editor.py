"""SparseEditor on tiny offline pixel-space pipelines (SDEdit, as SIGE's church model)."""

import pytest
import torch

import sparsedit
from sparsedit import SparseConfig, SparseEditor


diffusers = pytest.importorskip("diffusers")


def tiny_pipe(kind="ddpm", dtype=torch.float32):
    torch.manual_seed(0)
    unet = (
        diffusers.UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )
        .eval()
        .to(dtype)
    )
    if kind == "ddpm":
        return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    return diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))


def image(b=1, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def stroke(x, box=(4, 10, 18, 26)):
    y = x.clone()
    y[:, :, box[0] : box[1], box[2] : box[3]] = torch.tensor([0.9, -0.8, -0.7])[:, None, None]
    return y


def run(editor, x, **kw):
    return editor.capture(image=x, strength=0.7, num_inference_steps=10, generator=torch.Generator().manual_seed(3),
                          output_type="pt", **kw).images  # fmt: skip


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_empty_edit_returns_the_current_image_for_free(kind):
    editor = SparseEditor(tiny_pipe(kind))
    x = image()
    out0 = run(editor, x)
    out1 = editor.edit(image=x.clone(), output_type="pt").images
    assert torch.equal(out0, out1)
    assert editor.last_stats["macs_sparse"] == 0 < editor.last_stats["macs_dense"]


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_stroke_edit_is_sparse_and_keeps_the_background(kind):
    editor = SparseEditor(tiny_pipe(kind), SparseConfig(input_dilation=2, tile_size=4))
    x = image(h=48, w=48)
    out0 = run(editor, x)
    x_edit = stroke(x)
    out1 = editor.edit(image=x_edit, output_type="pt").images
    stats = editor.last_stats
    assert 0 < stats["macs_sparse"] < 0.6 * stats["macs_dense"]
    region = sparsedit.regions.dilate(sparsedit.difference_mask(x, x_edit), 2)
    assert torch.equal(out1[..., ~region[0]], out0[..., ~region[0]])  # background: bit for bit
    assert not torch.equal(out1[..., region[0]], out0[..., region[0]])
    assert set(stats) >= {"macs_dense", "macs_sparse", "active_fraction", "seconds", "cache_bytes"}
    assert stats["cache_bytes"] > 0


def test_sparse_edit_tracks_a_dense_recomputation():
    """The SDEdit result of the edit, computed densely from the same noise, against the sparse one."""
    pipe = tiny_pipe()
    editor = SparseEditor(pipe, SparseConfig(input_dilation=2, tile_size=4))
    x = image(h=48, w=48)
    run(editor, x)
    x_edit = stroke(x)
    sparse = editor.edit(image=x_edit, output_type="pt", commit=False).images
    editor.remove()
    dense = SparseEditor(pipe, SparseConfig(input_dilation=2, tile_size=4))
    want = run(dense, x_edit)
    region = sparsedit.regions.dilate(sparsedit.difference_mask(x, x_edit), 2)[0]
    err = (sparse - want).abs()[..., region]
    effect = (want - run(dense, x)).abs()[..., region]
    assert err.mean() < 0.15 * effect.mean()  # measured 0.05: the edit is reproduced inside the region


def test_remove_restores_the_pipeline_bit_identically():
    pipe = tiny_pipe()
    before = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    editor = SparseEditor(pipe)
    run(editor, image())
    editor.edit(image=stroke(image()))
    editor.remove()
    after = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert (before.images == after.images).all()


def test_sequential_edits_are_incremental():
    config = SparseConfig(input_dilation=2, tile_size=4)
    editor = SparseEditor(tiny_pipe(), config)
    x0 = image(h=48, w=48)
    x1 = stroke(x0, (4, 10, 4, 10))
    x2 = stroke(x1, (30, 36, 30, 36))
    run(editor, x0)
    editor.edit(image=x1)
    out2 = editor.edit(image=x2, output_type="pt").images
    assert editor.last_stats["region_fraction"] < 0.05  # the second edit only recomputes the second stroke
    fresh = SparseEditor(tiny_pipe(), config)
    run(fresh, x1)
    want = fresh.edit(image=x2, output_type="pt").images
    # The first stroke's pixels came from a sparse (approximate) run instead of a dense capture.
    assert (out2 - want).abs().max() < 0.1  # measured 0.055


def test_batch_non_square_bf16():
    editor = SparseEditor(tiny_pipe(dtype=torch.bfloat16), SparseConfig(input_dilation=2))
    x = image(b=2, h=64, w=96)
    out0 = run(editor, x)
    out1 = editor.edit(image=stroke(x), output_type="pt").images
    assert out1.shape == (2, 3, 64, 96) and out1.dtype == torch.bfloat16
    assert not torch.equal(out0, out1)
    assert editor.last_stats["macs_sparse"] < editor.last_stats["macs_dense"]


def test_errors_say_what_to_do():
    editor = SparseEditor(tiny_pipe())
    with pytest.raises(RuntimeError, match="capture"):
        editor.edit(image=image())
    run(editor, image())
    with pytest.raises(ValueError, match="keep the size"):
        editor.edit(image=image(h=48))
    region = torch.zeros(32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside `region`"):
        editor.edit(image=stroke(image()), region=region)
    with pytest.raises(NotImplementedError, match="DDPMPipeline"):
        SparseEditor(object())
    with pytest.raises(RuntimeError, match="unsparsify_"):
        SparseEditor(editor.pipe)


def test_scheduler_use_or_change_between_capture_and_edit():
    pipe = tiny_pipe("ddim")
    editor = SparseEditor(pipe)
    x = image()
    run(editor, x)
    first = editor.edit(image=stroke(x), output_type="pt", commit=False).images
    pipe(batch_size=1, num_inference_steps=3, output_type="np")  # resets the scheduler's timesteps
    again = editor.edit(image=stroke(x), output_type="pt", commit=False).images
    assert torch.equal(first, again)  # the edit restores the capture's schedule itself
    pipe.scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(sparsedit.StaleCacheError, match="scheduler"):
        editor.edit(image=stroke(x))


def test_coarse_maps_dense_and_attention_policy():
    """`dense_below` gives coarse maps their whole area; `attention="dense"` recomputes every query. With every map
    whole and statistics recomputed, the approximate machinery reproduces the dense UNet output."""
    unet = tiny_pipe().unet
    x = image(h=32, w=32)
    x_edit = stroke(x)
    t = torch.tensor([500])
    region = sparsedit.difference_mask(x, x_edit)
    with torch.no_grad():
        want = unet(x_edit, t).sample
    errors = {}
    for name, cfg in {
        "sparse": SparseConfig(input_dilation=1, tile_size=4),
        "whole": SparseConfig(
            input_dilation=1, tile_size=4, dense_below=32, norm_stats="recompute", attention="dense"
        ),
        "coarse": SparseConfig(input_dilation=1, tile_size=4, dense_below=16),
    }.items():
        sparsedit.sparsify_(unet, cfg)
        with torch.no_grad():
            with sparsedit.capturing(unet):
                unet(x, t)
            with sparsedit.editing(unet, region=region):
                got = unet(x_edit, t).sample
                layers = sparsedit.last_stats(unet)["layers"]
        sparsedit.unsparsify_(unet)
        errors[name] = float((got - want).abs().max())
        coarse = [r for r in layers if r["resolution"][0] <= 16 and r["macs_sparse"] > 0]
        attn = [r for r in layers if r["kind"] == "attention"]
        assert attn
        if name == "sparse":
            assert all(r["active_fraction"] < 1 for r in attn)
        if name in ("whole", "coarse"):  # coarse maps: every position of every layer that ran
            assert coarse and all(r["active_fraction"] == 1.0 for r in coarse)
        if name == "whole":
            assert all(r["dense_reason"] == "dense attention (policy)" for r in attn)
    assert errors["whole"] < 1e-4
    assert errors["sparse"] > 1e-3  # the default approximations are visible at this size, so the check means something
    with pytest.raises(ValueError, match="attention"):
        SparseConfig(attention="global")
    with pytest.raises(ValueError, match="dense_below"):
        SparseConfig(dense_below=-1)
