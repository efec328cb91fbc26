"""Stable Diffusion's UNet2DConditionModel (cross-attention transformers) through the model-level contract."""

import pytest
import torch

import sparsedit
from sparsedit import SparseConfig, StaleCacheError


diffusers = pytest.importorskip("diffusers")


# Max error over max edit effect, measured at input_dilation 2 / 5 / 8: 0.248 / 0.085 / 0.064 (MACs 11% / 21% / 34%).
ERROR_BOUND = 0.2


def tiny_sd_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 48, generator=g)  # batch 2: the two classifier-free guidance branches
    region = torch.zeros(2, 32, 48, dtype=torch.bool)
    region[:, 4:9, 30:36] = True
    x_edit = torch.where(region[:, None], x + torch.randn(x.shape, generator=g), x)
    ctx = torch.randn(2, 7, 32, generator=g)  # unconditional and conditional prompt embeddings
    return x, x_edit, region, torch.tensor([500, 500]), ctx


def test_capture_and_removal_are_bit_identical_and_exact_mode_is_exact():
    unet = tiny_sd_unet()
    x, x_edit, region, t, ctx = inputs()
    with torch.no_grad():
        before, want = unet(x, t, ctx).sample, unet(x_edit, t, ctx).sample
    sparsedit.sparsify_(unet, SparseConfig(exact=True))
    with sparsedit.capturing(unet):
        assert torch.equal(unet(x, t, ctx).sample, before)
    with sparsedit.editing(unet, region=region):
        out = unet(x_edit, t, ctx).sample
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    sparsedit.unsparsify_(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, before)


def test_transformers_run_sparse_over_active_tokens():
    unet = tiny_sd_unet()
    x, x_edit, region, t, ctx = inputs()
    with torch.no_grad():
        captured, want = unet(x, t, ctx).sample, unet(x_edit, t, ctx).sample
    sparsedit.sparsify_(unet, SparseConfig(tile_size=4, input_dilation=5))
    with sparsedit.capturing(unet):
        unet(x, t, ctx)
    with sparsedit.editing(unet, region=region):
        out = unet(x_edit, t, ctx).sample
    stats = sparsedit.last_stats(unet)
    transformers = [r for r in stats["layers"] if r["kind"] == "transformer"]
    assert len(transformers) == 4 and all(0 < r["active_fraction"] < 0.5 for r in transformers)
    assert not stats["dense_layers"]
    assert stats["macs_sparse"] < 0.3 * stats["macs_dense"]
    # Approximate: frozen GroupNorm statistics, stale halos, inactive pixels keep their attention outputs.
    assert (out - want).abs().max() < ERROR_BOUND * (want - captured).abs().max()


def test_other_prompt_is_stale():
    unet = tiny_sd_unet()
    x, x_edit, region, t, ctx = inputs()
    sparsedit.sparsify_(unet)
    with sparsedit.capturing(unet):
        unet(x, t, ctx)
    with pytest.raises(StaleCacheError, match="argument 2"):
        with sparsedit.editing(unet, region=region):
            unet(x_edit, t, ctx + 1)


def _sd_edit(pair: bool, region, poison: bool):
    from sparsedit.adapters import diffusers as adapter

    unet = tiny_sd_unet()
    x, x_edit, _, t, ctx = inputs()
    x_edit = torch.where(region[:, None], x_edit, x)
    real = adapter.pair_token_consumers
    if not pair:
        adapter.pair_token_consumers = lambda model: None
    try:
        sparsedit.sparsify_(unet, SparseConfig(tile_size=4, input_dilation=2, poison_scratch=poison))
    finally:
        adapter.pair_token_consumers = real
    with sparsedit.capturing(unet):
        unet(x, t, ctx)
    names = {key[0] for key, fields in sparsedit.spatial.sparse_state(unet).cache.export() if "out" in fields}
    with sparsedit.editing(unet, region=region):
        out = unet(x_edit, t, ctx).sample
    return out, names, sparsedit.last_stats(unet)["cache_bytes"]


@pytest.mark.parametrize("rows", ["same", "different"])
def test_resnets_feeding_transformers_store_no_output_and_edits_are_unchanged(rows):
    # Each ResNet of a cross-attention block hands its output to the transformer only, which reads it at the active
    # pixels; the capture keeps no copy and the sparse run writes conv2's tiles into (here NaN-poisoned) scratch.
    # With batch rows of different regions the transformer would read pixels one row never computed: that block
    # then runs whole, and the result must still equal the one from the stored outputs bit for bit.
    region = torch.zeros(2, 32, 48, dtype=torch.bool)
    region[:, 4:9, 30:36] = True
    if rows == "different":
        region[1] = False
        region[1, 20:26, 5:12] = True
    kept, kept_names, kept_bytes = _sd_edit(False, region, poison=False)
    out, names, nbytes = _sd_edit(True, region, poison=True)
    fed = {"down_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1", "mid_block.resnets.0"}
    assert fed <= kept_names and not fed & names
    assert kept_names - names == fed
    assert nbytes < kept_bytes
    assert torch.isfinite(out).all()
    if rows == "same":
        assert torch.equal(out, kept)
    else:  # the whole-map blocks recompute what the stored version read stale: no further from the dense edit
        unet = tiny_sd_unet()
        x, x_edit, _, t, ctx = inputs()
        with torch.no_grad():
            want = unet(torch.where(region[:, None], x_edit, x), t, ctx).sample
        assert (out - want).abs().max() <= (kept - want).abs().max() * 1.05
