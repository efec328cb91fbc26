"""diffusers UNet2DModel through the model-level contract: hooks, exactness, staleness, per-step scopes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import sparsedit
from sparsedit import SparseConfig, StaleCacheError


diffusers = pytest.importorskip("diffusers")


def tiny_unet(attention: bool = False):
    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        add_attention=attention,
    ).eval()


def inputs(h=32, w=48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, h, w, generator=g)
    region = torch.zeros(2, h, w, dtype=torch.bool)
    region[:, 5:9, 30:35] = True
    x_edit = torch.where(region[:, None], x + torch.randn(x.shape, generator=g), x)
    return x, x_edit, region, torch.tensor([500, 500])


def test_attaches_through_diffusers_hooks_and_detaches_bit_identically():
    unet = tiny_unet()
    x, x_edit, region, t = inputs()
    with torch.no_grad():
        before = unet(x, t).sample
    sparsedit.sparsify_(unet, SparseConfig())
    hooked = [
        n
        for n, m in unet.named_modules()
        if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook("sparsedit_spatial")
    ]
    assert "conv_in" in hooked and "down_blocks.0.resnets.0.conv1" in hooked
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, before)  # attached, outside any context: unchanged
    with sparsedit.capturing(unet):
        assert torch.equal(unet(x, t).sample, before)
    with sparsedit.editing(unet, region=region):
        unet(x_edit, t)
    sparsedit.unsparsify_(unet)
    assert not any(
        m._diffusers_hook.get_hook("sparsedit_spatial") for m in unet.modules() if hasattr(m, "_diffusers_hook")
    )
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, before)


def test_exact_mode_equals_dense():
    unet = tiny_unet()
    x, x_edit, region, t = inputs()
    with torch.no_grad():
        want = unet(x_edit, t).sample
    sparsedit.sparsify_(unet, SparseConfig(exact=True))
    with sparsedit.capturing(unet):
        unet(x, t)
    with sparsedit.editing(unet, region=region):
        out = unet(x_edit, t).sample
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_approximate_mode_stays_sparse_through_skip_concats():
    unet = tiny_unet()
    x, x_edit, region, t = inputs(64, 64)
    with torch.no_grad():
        want = unet(x_edit, t).sample
    # SIGE's setting for diffusion models: dilate the edit by 5 px at input resolution.
    sparsedit.sparsify_(unet, SparseConfig(tile_size=4, input_dilation=5))
    with sparsedit.capturing(unet):
        captured = unet(x, t).sample
    with sparsedit.editing(unet, region=region):
        out = unet(x_edit, t).sample
    stats = sparsedit.last_stats(unet)
    # The up blocks concatenate skips with torch.cat; region tracking keeps the convolutions after them sparse.
    up_convs = [r for r in stats["layers"] if r["name"].startswith("up_blocks") and r["kind"] == "conv"]
    assert up_convs and all(r["dense_reason"] is None and r["active_fraction"] < 0.5 for r in up_convs)
    assert stats["macs_sparse"] < 0.2 * stats["macs_dense"]
    # Approximate (stale halos, frozen GroupNorm statistics; measured 0.112 vs an edit effect of 1.197 here), and the
    # far background is the capture's, bit for bit.
    assert (out - want).abs().max() < 0.15 * (want - captured).abs().max()
    far = torch.ones(64, 64, dtype=torch.bool)
    far[:24, 16:] = False
    assert torch.equal(out[..., far], captured[..., far])


def test_empty_edit_returns_the_capture_for_free():
    unet = tiny_unet()
    x, _, _, t = inputs()
    sparsedit.sparsify_(unet, SparseConfig())
    with sparsedit.capturing(unet):
        captured = unet(x, t).sample
    with sparsedit.editing(unet):
        out = unet(x.clone(), t).sample
    assert torch.equal(out, captured)
    assert sparsedit.last_stats(unet)["macs_sparse"] == 0


def test_other_timestep_is_stale():
    unet = tiny_unet()
    x, x_edit, region, t = inputs()
    sparsedit.sparsify_(unet, SparseConfig())
    with sparsedit.capturing(unet):
        unet(x, t)
    with pytest.raises(StaleCacheError, match="timestep"):
        with sparsedit.editing(unet, region=region):
            unet(x_edit, torch.tensor([400, 400]))


def test_per_step_scopes():
    """A denoising loop captures every step in its own scope; each edited step runs against its own capture."""
    unet = tiny_unet()
    x, x_edit, region, _ = inputs()
    steps = [torch.tensor([900, 900]), torch.tensor([500, 500])]
    with torch.no_grad():
        want = [unet(x_edit, t).sample for t in steps]
    sparsedit.sparsify_(unet, SparseConfig(exact=True))
    with sparsedit.capturing(unet):
        for i, t in enumerate(steps):
            with sparsedit.scope(unet, i):
                unet(x, t)
    with sparsedit.editing(unet, region=region):
        for i, t in enumerate(steps):
            with sparsedit.scope(unet, i):
                out = unet(x_edit, t).sample
            torch.testing.assert_close(out, want[i], rtol=1e-5, atol=1e-5)
        with pytest.raises(StaleCacheError, match="scope"):
            with sparsedit.scope(unet, 7):
                unet(x_edit, steps[0])


def test_sparse_attention_is_exact_at_active_pixels():
    """Without GroupNorm, keys/values are exact everywhere after the in-place update, so the active pixels' outputs
    equal the dense ones (only the inactive pixels keep stale values: the approximation)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, residual_connection=True, rescale_output_factor=2.0).eval()
    x = torch.randn(2, 16, 9, 11)
    region = torch.zeros(2, 9, 11, dtype=torch.bool)
    region[:, 2:5, 3:6] = True
    x_edit = torch.where(region[:, None], torch.randn_like(x), x)
    with torch.no_grad():
        want = attn(x_edit)
    sparsedit.sparsify_(attn, SparseConfig(dilation=0))
    with sparsedit.capturing(attn):
        captured = attn(x)
    with sparsedit.editing(attn, region=region):
        out = attn(x_edit)
    inside = region[:, None].expand_as(out)
    torch.testing.assert_close(out[inside], want[inside], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~inside], captured[~inside])
    stats = sparsedit.last_stats(attn)
    assert 0 < stats["macs_sparse"] < 0.2 * stats["macs_dense"]


def test_unet_with_attention_runs_sparse_end_to_end():
    unet = tiny_unet(attention=True)
    x, x_edit, region, t = inputs(64, 64)
    with torch.no_grad():
        want = unet(x_edit, t).sample
        captured = unet(x, t).sample
    sparsedit.sparsify_(unet, SparseConfig(tile_size=4, input_dilation=5))
    with sparsedit.capturing(unet):
        unet(x, t)
    with sparsedit.editing(unet, region=region):
        out = unet(x_edit, t).sample
    stats = sparsedit.last_stats(unet)
    assert stats["macs_sparse"] < 0.15 * stats["macs_dense"]
    assert not stats["dense_layers"]
    # measured: max error 0.112 against an edit effect of 0.778
    assert (out - want).abs().max() < 0.2 * (want - captured).abs().max()


def test_fused_resnet_blocks_are_at_least_as_close_to_dense_as_the_unfused_path():
    """The fused ResnetBlock2D (norm+SiLU in the gathers, time embedding in the norm shift, shortcut in the scatter,
    conv1 computed where conv2 reads it instead of cached) reads no stale conv1 halo, so it is at least as close to
    the dense model as running each child layer sparse on its own (measured: RMS error 0.00579 against 0.00589)."""
    x, x_edit, region, t = inputs(64, 64)
    with torch.no_grad():
        want = tiny_unet(attention=True)(x_edit, t).sample
    errors = []
    for fused in (True, False):
        unet = tiny_unet(attention=True)
        sparsedit.sparsify_(unet, SparseConfig(tile_size=4, input_dilation=5, poison_scratch=True))
        resnets = [m._sparsedit_handler for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
        assert resnets and all(h.fused for h in resnets)
        for h in resnets:
            h.fused = fused
        with sparsedit.capturing(unet):
            unet(x, t)
        with sparsedit.editing(unet, region=region):
            out = unet(x_edit, t).sample
        assert torch.isfinite(out).all()
        errors.append((out - want).pow(2).mean().sqrt().item())
        if fused:
            assert any(r["kind"] == "conv" and ".resnets." in r["name"] for r in sparsedit.last_stats(unet)["layers"])
    assert errors[0] <= errors[1] * 1.0001


def _frozen_group_norm(x, gn, ref):
    """GroupNorm of `x` with the statistics of `ref` (what the fused block's frozen statistics compute)."""
    b, c = x.shape[:2]
    var, mean = torch.var_mean(ref.reshape(b, gn.num_groups, -1), dim=-1, unbiased=False)
    mean = mean.repeat_interleave(c // gn.num_groups, 1)[:, :, None, None]
    rstd = torch.rsqrt(var + gn.eps).repeat_interleave(c // gn.num_groups, 1)[:, :, None, None]
    return (x - mean) * rstd * gn.weight[:, None, None] + gn.bias[:, None, None]


def _frozen_resnet(m, x, ref, temb):
    """diffusers' ResnetBlock2D forward with both norms' statistics taken from the capture's input `ref`."""
    act = torch.nn.functional.silu
    h_ref = m.conv1(act(m.norm1(ref)))
    h = m.conv1(act(_frozen_group_norm(x, m.norm1, ref)))
    t = m.time_emb_proj(act(temb))[:, :, None, None]
    if m.time_embedding_norm == "default":
        h, h_ref = h + t, h_ref + t
        h = _frozen_group_norm(h, m.norm2, h_ref)
    else:
        scale, shift = t.chunk(2, dim=1)
        h = _frozen_group_norm(h, m.norm2, h_ref) * (1 + scale) + shift
    h = m.conv2(act(h))
    return (x if m.conv_shortcut is None else m.conv_shortcut(x)) + h


@settings(max_examples=25, deadline=None)
@given(data=hst.data(), small_maps=hst.booleans())
def test_fused_resnet_computes_conv1_fresh_wherever_conv2_reads_it(data, small_maps):
    """conv1's output is not cached: the fused block computes it on its tiles and, on demand, at the pixels around
    them that conv2's windows read. So every pixel the edit recomputes equals the block with frozen statistics run
    densely on the edited input (no stale halo anywhere), and every other pixel is the capture's, bit for bit.
    Scratch is NaN-poisoned, so a read of an uncomputed pixel shows. Random masks, shapes, tile sizes (1: pixel
    tiles), shortcut and time-embedding variants. (`small_maps`: maps this small keep conv1 cached by default, and
    its halo is the capture's, so only the sizes are lowered to reach the recompute path.)"""
    from diffusers.models.resnet import ResnetBlock2D

    from sparsedit.adapters.diffusers import ResnetBlock2DHandler

    cin = data.draw(hst.sampled_from([8, 16]), label="in")
    cout = data.draw(hst.sampled_from([8, 16]), label="out")
    norm = data.draw(hst.sampled_from(["default", "scale_shift"]), label="temb norm")
    h = data.draw(hst.integers(6, 20), label="h")
    w = data.draw(hst.integers(6, 20), label="w")
    tile = data.draw(hst.sampled_from([1, 2, 4, 8]), label="tile")
    dilation = data.draw(hst.integers(0, 2), label="input dilation")
    torch.manual_seed(data.draw(hst.integers(0, 2**16), label="seed"))
    block = ResnetBlock2D(
        in_channels=cin, out_channels=cout, temb_channels=12, groups=4, time_embedding_norm=norm
    ).eval()
    x = torch.randn(2, cin, h, w)
    temb = torch.randn(2, 12)
    y0, x0 = data.draw(hst.integers(0, h - 1)), data.draw(hst.integers(0, w - 1))
    y1, x1 = data.draw(hst.integers(y0 + 1, h)), data.draw(hst.integers(x0 + 1, w))
    region = torch.zeros(2, h, w, dtype=torch.bool)
    region[:, y0:y1, x0:x1] = True
    x_edit = torch.where(region[:, None], torch.randn_like(x), x)
    with torch.no_grad():
        want = _frozen_resnet(block, x_edit, x, temb)
    cfg = SparseConfig(
        tile_size=tile,
        input_dilation=dilation,
        poison_scratch=True,
        dense_threshold=1.0,
        max_region_fraction=1.0,
        measured_fallback=False,
    )
    sparsedit.sparsify_(block, cfg)
    handler = block._sparsedit_handler
    assert handler.fused
    if not small_maps:
        handler.recompute_conv1_from = 1  # instance attribute: this block only
    with sparsedit.capturing(block):
        captured = block(x, temb)
    with sparsedit.editing(block, region=region):
        out = block(x_edit, temb)
    assert torch.isfinite(out).all()
    stored = any(k[0].endswith("conv1") for k, _ in sparsedit.spatial.sparse_state(block).cache.export())
    assert stored == (small_maps and h * w < ResnetBlock2DHandler.recompute_conv1_from)
    if stored:
        return  # the stale-halo approximation, covered by the UNet tests
    fresh = torch.isclose(out, want, rtol=1e-4, atol=1e-4)
    assert (fresh | (out == captured)).all()
    assert fresh.permute(1, 0, 2, 3)[:, region].all()
