"""Token-sparse FLUX.2 transformer (`adapters/flux2.py`) on tiny random configs, against plain-PyTorch references:
the capture is the plain model bit for bit; a sparse edit equals the dense model with the inactive rows (and the
cached context) held at the capture's after every double- and single-stream block, with and without a reference
image in the sequence (Klein's editing); tokens outside the active set are the capture's bit for bit; MACs are what
ran."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import sparsedit
from sparsedit import SparseConfig
from sparsedit.nn.base import UnsupportedLayerError
from tests.adapters.dit_reference import clamped_reference
from tests.strategies import regions


diffusers = pytest.importorskip("diffusers")
flux = pytest.importorskip("sparsedit.adapters.flux")
H = W = 6  # the token grid of the generated image (and of the reference image, when there is one)


def _flux2(guidance=False, seed=0, layers=1, single=2):
    torch.manual_seed(seed)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance,
    ).eval()  # fmt: skip


def _grid(t):
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([torch.full((H * W,), t), rows.reshape(-1), cols.reshape(-1), torch.zeros(H * W)], 1)


def _inputs(b=2, m=5, guidance=False, reference=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.cat([_grid(0), _grid(10)]) if reference else _grid(0)  # Klein puts references at t = 10
    txt_ids = torch.stack([torch.zeros(m), torch.zeros(m), torch.zeros(m), torch.arange(m)], 1)
    kw = {
        "encoder_hidden_states": torch.randn(b, m, 16, generator=g),
        "timestep": torch.full((b,), 0.5),
        "img_ids": img_ids[None].expand(b, -1, -1),
        "txt_ids": txt_ids[None].expand(b, -1, -1),
    }
    if guidance:
        kw["guidance"] = torch.full((b,), 3.5)
    return torch.randn(b, img_ids.shape[0], 4, generator=g), kw


def _blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_sparse_edit_equals_the_dense_model_with_inactive_rows_held(data):
    guidance, reference = data.draw(st.booleans()), data.draw(st.booleans())
    context = data.draw(st.sampled_from(["cache", "recompute"]))
    dilation = data.draw(st.integers(0, 1))
    b = data.draw(st.integers(1, 2))
    model = _flux2(guidance=guidance, seed=data.draw(st.integers(0, 9)))
    x, kw = _inputs(b=b, guidance=guidance, reference=reference)
    n = x.shape[1]
    region = data.draw(regions(b, 1, n))
    flat = region.reshape(b, -1)
    x_edit = torch.where(flat[..., None], x + torch.randn_like(x), x)
    tokens = flux.grid_dilate(flat.any(dim=0), kw["img_ids"][0], dilation)
    with torch.no_grad():
        plain = model(x, **kw).sample
    want = clamped_reference(model, _blocks(model), x, kw, x_edit, tokens, context == "cache")
    sparsedit.sparsify_(model, SparseConfig(dilation=dilation, dit_context=context, max_region_fraction=1.0))
    with torch.no_grad():
        with sparsedit.capturing(model):
            captured = model(x, **kw).sample
        with sparsedit.editing(model, region=flat[:, None]):
            got = model(x_edit, **kw).sample
    assert torch.equal(captured, plain)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, ~tokens], plain[:, ~tokens])


def test_dilation_stays_within_each_image_of_the_sequence():
    """A stroke at the right edge of the generated image dilates on its own grid, not into the reference image that
    follows it in the sequence (the sequence's next token)."""
    ids = torch.cat([_grid(0), _grid(10)])
    active = torch.zeros(2 * H * W, dtype=torch.bool)
    active[H * W - 1] = True  # the generated image's last token (bottom right)
    got = flux.grid_dilate(active, ids, 1)
    assert int(got[: H * W].sum()) == 4 and not bool(got[H * W :].any())


def test_every_token_active_with_the_context_recomputed_equals_dense_and_remove_restores():
    model = _flux2(guidance=True)
    x, kw = _inputs(guidance=True, reference=True)
    x_new = x + torch.randn_like(x)
    with torch.no_grad():
        plain, want = model(x, **kw).sample, model(x_new, **kw).sample
        sparsedit.sparsify_(model, SparseConfig(dilation=0, dit_context="recompute", max_region_fraction=1.0))
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model):  # the region: the tokens that changed (all of them)
            got = model(x_new, **kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        sparsedit.unsparsify_(model)
        assert torch.equal(model(x, **kw).sample, plain)


def test_rows_are_written_before_they_are_read_and_edits_roll_back():
    model = _flux2()
    x, kw = _inputs(reference=True)
    n = x.shape[1]
    x_edit = x.clone()
    x_edit[:, 45:47] += 1  # reference tokens 9-10: its row 1, columns 3-4
    sparsedit.sparsify_(model, SparseConfig(dilation=1))
    with torch.no_grad():
        with sparsedit.capturing(model):
            captured = model(x, **kw).sample
        with sparsedit.editing(model):
            first = model(x_edit, **kw).sample
        changed = torch.arange(n).ge(45) & torch.arange(n).lt(47)
        tokens = flux.grid_dilate(changed, kw["img_ids"][0], 1)
        att = sparsedit.spatial.attachment_of(model)
        (key,) = [k for k in att.state.cache.keys() if "root" in str(k)]
        for name, t in att.state.cache.get(key).items():
            image = t[:, -n:] if name != "out" else t  # the joint layout: context first, then the image tokens
            image[:, tokens] = float("nan")
        with sparsedit.editing(model):
            got = model(x_edit, **kw).sample
        with sparsedit.editing(model, commit=False):  # a preview leaves the cache as the last commit left it
            model(x, **kw)
        with sparsedit.editing(model):
            again = model(x_edit, **kw).sample
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, first, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[:, ~tokens], captured[:, ~tokens])
    assert torch.equal(again, got)


def test_macs_count_every_layer_that_ran():
    model = _flux2(guidance=True)
    x, kw = _inputs(guidance=True, reference=True)
    n = x.shape[1]
    x_edit = x.clone()
    x_edit[:, 0] -= 1
    sparsedit.sparsify_(model, SparseConfig(dilation=0))

    def attention(nq, mq, m=5):
        return sum(2 * 2 * (nq + mq) * (n + m) * blk.attn.inner_dim for blk in _blocks(model))

    with torch.no_grad():
        with sparsedit.capturing(model), FlopCounterMode(display=False) as dense:
            model(x, **kw)
        assert sparsedit.last_stats(model)["macs_dense"] == dense.get_total_flops() // 2 + attention(n, 5)
        with sparsedit.editing(model), FlopCounterMode(display=False) as sparse:
            model(x_edit, **kw)
    assert sparsedit.last_stats(model)["macs_sparse"] == sparse.get_total_flops() // 2 + attention(1, 0)


def test_refusals_name_the_problem():
    model = _flux2()
    x, kw = _inputs()
    sparsedit.sparsify_(model)
    with pytest.raises(UnsupportedLayerError, match="kv_cache_mode"):
        with sparsedit.capturing(model):
            model(x, **kw, kv_cache_mode="extract", num_ref_tokens=4)
    with pytest.raises(UnsupportedLayerError, match="joint_attention_kwargs"):
        with sparsedit.capturing(model):
            model(x, **kw, joint_attention_kwargs={"scale": 0.5})
    model.transformer_blocks[0].attn.fused_projections = True
    with pytest.raises(UnsupportedLayerError, match="unfuse_qkv_projections"):
        with sparsedit.capturing(model):
            model(x, **kw)
