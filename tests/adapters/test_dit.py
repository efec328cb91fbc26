"""Token-sparse diffusion transformers (`adapters/dit.py`), on tiny random SD3/SD3.5 transformers, against plain
PyTorch references: the capture is the plain model bit for bit; a sparse edit equals the dense model run with the
inactive rows (and, with `dit_context="cache"`, the context stream) held at the capture's after every block; the
latents outside the active tokens are the capture's bit for bit; MACs are what ran."""

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
dit = pytest.importorskip("sparsedit.adapters.dit")


def _sd3(layers=3, qk_norm=None, dual=(), seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        qk_norm=qk_norm, dual_attention_layers=dual,
    )  # fmt: skip
    return model.eval() if dtype == torch.float32 else model.eval().to(dtype)


def _inputs(b=2, size=16, m=5, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g, dtype=dtype)
    kw = {
        "encoder_hidden_states": torch.randn(b, m, 16, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(b, 8, generator=g, dtype=dtype),
        "timestep": torch.full((b,), 500.0),
    }
    return x, kw


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sparse_edit_equals_the_dense_model_with_inactive_rows_held(data):
    """Random regions, dilations, qk-norm, dual attention (SD3.5), batch sizes, context cached or recomputed: the edit
    equals the clamped dense reference to float tolerance, and the latents outside the active tokens are the
    capture's bit for bit."""
    qk = data.draw(st.sampled_from([None, "rms_norm"]))
    dual = data.draw(st.sampled_from([(), (0,), (0, 1)]))
    context = data.draw(st.sampled_from(["cache", "recompute"]))
    dilation = data.draw(st.integers(0, 1))
    b = data.draw(st.integers(1, 2))
    model = _sd3(qk_norm=qk, dual=dual, seed=data.draw(st.integers(0, 9)))
    x, kw = _inputs(b=b)
    region = data.draw(regions(b, 16, 16))
    x_edit = torch.where(region[:, None], x + torch.randn_like(x), x)
    union = region.any(dim=0, keepdim=True).expand(b, -1, -1)
    tokens = dit.token_region(union, 2, dilation)[0].reshape(-1)
    with torch.no_grad():
        plain = model(x, **kw).sample
    want = clamped_reference(model, model.transformer_blocks, x, kw, x_edit, tokens, context == "cache")
    sparsedit.sparsify_(model, SparseConfig(dilation=dilation, dit_context=context, max_region_fraction=1.0))
    with torch.no_grad():
        with sparsedit.capturing(model):
            captured = model(x, **kw).sample
        with sparsedit.editing(model):
            got = model(x_edit, **kw).sample
    assert torch.equal(captured, plain)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    outside = ~tokens.reshape(8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(got[:, :, outside], plain[:, :, outside])
    assert torch.equal(
        sparsedit.output_regions(model)["sample"][:, outside], torch.zeros_like(got[:, 0, outside], dtype=bool)
    )


def test_every_token_active_with_the_context_recomputed_equals_dense():
    model = _sd3(qk_norm="rms_norm", dual=(0,))
    x, kw = _inputs()
    x_new = x + torch.randn_like(x)
    with torch.no_grad():
        want = model(x_new, **kw).sample
        sparsedit.sparsify_(model, SparseConfig(dilation=0, dit_context="recompute", max_region_fraction=1.0))
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model):
            got = model(x_new, **kw).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sparsedit.last_stats(model)["layers"][0]["active_fraction"] == 1.0


def test_rows_are_written_before_they_are_read():
    """NaN in the cached keys, values and output rows of the active tokens: an edit that read any of them before
    recomputing it would return NaN; the rows outside stay the capture's."""
    model = _sd3(qk_norm="rms_norm", dual=(1,))
    x, kw = _inputs()
    region = torch.zeros(2, 16, 16, dtype=torch.bool)
    region[:, 4:7, 6:11] = True
    x_edit = torch.where(region[:, None], -x, x)
    sparsedit.sparsify_(model, SparseConfig(dilation=1))
    with torch.no_grad():
        with sparsedit.capturing(model):
            captured = model(x, **kw).sample
        tokens = dit.token_region(region, 2, 1)[0].reshape(-1)
        att = sparsedit.spatial.attachment_of(model)
        (key,) = [k for k in att.state.cache.keys() if "root" in str(k)]
        for name, t in att.state.cache.get(key).items():
            t[:, : tokens.numel()][:, tokens] = float("nan")  # image rows come first in the joint layout
        with sparsedit.editing(model):
            got = model(x_edit, **kw).sample
    assert torch.isfinite(got).all()
    outside = ~tokens.reshape(8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(got[:, :, outside], captured[:, :, outside])


def test_uncommitted_edits_roll_back_committed_ones_stay_and_remove_restores_the_model():
    model = _sd3(dual=(0,))
    x, kw = _inputs()
    with torch.no_grad():
        plain = model(x, **kw).sample
    x_edit = x.clone()
    x_edit[:, :, 2:5, 2:5] += 1
    sparsedit.sparsify_(model)
    with torch.no_grad():
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model):
            first = model(x_edit, **kw).sample
        with sparsedit.editing(model):  # uncommitted: the cache is the capture's again
            assert torch.equal(model(x_edit, **kw).sample, first)
        with sparsedit.editing(model, commit=True):
            committed = model(x_edit, **kw).sample
        assert torch.equal(committed, first)
        with sparsedit.editing(model):  # the committed edit is the new reference: nothing changed since
            again = model(x_edit, **kw).sample
            assert sparsedit.last_stats(model)["macs_sparse"] == 0
        assert torch.equal(again, committed)
    sparsedit.unsparsify_(model)
    with torch.no_grad():
        assert torch.equal(model(x, **kw).sample, plain)


def _attention_macs(model, b, nq, mq, n, m):
    """QK^T and AV of `nq` image and `mq` context queries over `n` image and `m` context keys, per block."""
    total = 0
    for blk in model.transformer_blocks:
        total += 2 * b * (nq + mq) * (n + m) * blk.attn.inner_dim
        if blk.attn2 is not None:
            total += 2 * b * nq * n * blk.attn.inner_dim
    return total


def test_macs_count_every_layer_that_ran():
    """Dense and sparse MACs equal torch's FLOP counter over the calls that ran (its CPU attention kernel is not
    counted there, so attention is added by hand), so nothing the run computed is left out."""
    model = _sd3(qk_norm="rms_norm", dual=(0,))
    x, kw = _inputs()
    x_edit = x.clone()
    x_edit[:, :, 0:3, 8:12] -= 1
    sparsedit.sparsify_(model, SparseConfig(dilation=0))
    with torch.no_grad():
        with sparsedit.capturing(model), FlopCounterMode(display=False) as dense:
            model(x, **kw)
        stats = sparsedit.last_stats(model)
        assert stats["macs_dense"] == dense.get_total_flops() // 2 + _attention_macs(model, 2, 64, 5, 64, 5)
        with sparsedit.editing(model), FlopCounterMode(display=False) as sparse:
            model(x_edit, **kw)
        stats = sparsedit.last_stats(model)
    n = 2 * 2  # rows 0-2 and columns 8-11 of the latent: 2 x 2 tokens
    assert stats["macs_sparse"] == sparse.get_total_flops() // 2 + _attention_macs(model, 2, n, 0, 64, 5)
    assert stats["macs_dense"] / stats["macs_sparse"] > 8


def test_refusals_name_the_problem():
    model = _sd3()
    with pytest.raises(UnsupportedLayerError, match="exact edit is a dense one"):
        sparsedit.sparsify_(model, SparseConfig(exact=True))
    assert not sparsedit.is_sparsified(model)
    x, kw = _inputs()
    sparsedit.sparsify_(model)
    model.transformer_blocks[1].attn.set_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    with pytest.raises(UnsupportedLayerError, match=r"blocks\[1\] runs attention through AttnProcessor2_0"):
        with sparsedit.capturing(model):
            model(x, **kw)
    model.transformer_blocks[1].attn.set_processor(diffusers.models.attention_processor.JointAttnProcessor2_0())
    with pytest.raises(UnsupportedLayerError, match="joint_attention_kwargs"):
        with sparsedit.capturing(model):
            model(x, **kw, joint_attention_kwargs={"scale": 1.0})
    with pytest.raises(ValueError, match="dit_context must be one of"):
        SparseConfig(dit_context="maybe")


def test_bfloat16_edit_stays_close_and_keeps_the_background():
    model = _sd3(qk_norm="rms_norm", dtype=torch.bfloat16)
    x, kw = _inputs(dtype=torch.bfloat16)
    x_edit = x.clone()
    x_edit[:, :, 6:10, 6:10] = 0
    with torch.no_grad():
        dense = model(x_edit, **kw).sample.float()
        plain = model(x, **kw).sample
    sparsedit.sparsify_(model, SparseConfig(dilation=1))
    with torch.no_grad():
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model):
            got = model(x_edit, **kw).sample
    region = sparsedit.output_regions(model)["sample"]
    assert torch.equal(got[:, :, ~region[0]], plain[:, :, ~region[0]])
    assert (got.float() - dense).abs().max() < 0.5 * (dense - plain.float()).abs().max()


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
def test_a_smaller_cache_keeps_the_background_and_stays_close(cache_dtype):
    """Keys and values stored in bfloat16 or int8 (per-channel scales): the output tokens stay at full precision, so
    the latents outside the active tokens are still the capture's bit for bit; inside, the error is small."""
    model = _sd3(qk_norm="rms_norm", dual=(0,))
    x, kw = _inputs()
    x_edit = x.clone()
    x_edit[:, :, 4:8, 4:10] += 1
    with torch.no_grad():
        plain = model(x, **kw).sample
    sparsedit.sparsify_(model, SparseConfig(dilation=1))
    with torch.no_grad():
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model):
            full = model(x_edit, **kw).sample
    sparsedit.unsparsify_(model)
    sparsedit.sparsify_(model, SparseConfig(dilation=1, cache_dtype=cache_dtype))
    with torch.no_grad():
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model):
            small = model(x_edit, **kw).sample
    region = sparsedit.output_regions(model)["sample"][0]
    assert torch.equal(small[:, :, ~region], plain[:, :, ~region])
    assert (small - full).abs().max() < 0.05 * (full - plain).abs().max()


def _steps(n=4, b=2):
    """`n` denoising steps' inputs: latents and timesteps that differ from step to step, one prompt."""
    x, kw = _inputs(b=b)
    steps = []
    for i in range(n):
        xi, _ = _inputs(b=b, seed=10 + i)
        steps.append((xi, {**kw, "timestep": torch.full((b,), 900.0 - 200 * i)}))
    return steps


def _kv_bytes(model) -> int:
    cache = sparsedit.spatial.attachment_of(model).state.cache
    return sum(t.numel() * t.element_size() for k in cache.keys() if "root" in str(k)
               for name, t in cache.get(k).items() if name != "out")  # fmt: skip


@settings(max_examples=8, deadline=None)
@given(share=st.integers(2, 3), data=st.data())
def test_keys_and_values_shared_between_steps(share, data):
    """`dit_kv_share=s`: only the first step of every `s` keeps keys and values (ceil(n/s) of n steps' bytes), and
    every step reads its group's: its edit equals the per-step engine's with that step's cached keys and values
    replaced by the group's first step's (so it is the clamped reference of the test above with shared inactive K/V);
    the latents outside the active tokens stay each step's own capture, bit for bit."""
    model = _sd3(qk_norm=data.draw(st.sampled_from([None, "rms_norm"])), dual=data.draw(st.sampled_from([(), (0,)])))
    steps = _steps()
    region = data.draw(regions(2, 16, 16))
    edits = [(torch.where(region[:, None], x + 1, x), kw) for x, kw in steps]
    cfg = {"dilation": 1, "max_region_fraction": 1.0}

    def capture_and_edit(share_kv, borrow=False):
        sparsedit.sparsify_(model, SparseConfig(dit_kv_share=share_kv, **cfg))
        outs = []
        with torch.no_grad():
            with sparsedit.capturing(model):
                captured = []
                for i, (x, kw) in enumerate(steps):
                    with sparsedit.scope(model, i):
                        captured.append(model(x, **kw).sample)
            nbytes = _kv_bytes(model)
            if borrow:  # the per-step engine, given the group's first step's keys and values
                cache = sparsedit.spatial.attachment_of(model).state.cache
                for key in list(cache.keys()):
                    if "root" in str(key) and key[2] % share:
                        anchor = cache.get((*key[:2], key[2] - key[2] % share, *key[3:]))
                        for name, t in cache.get(key).items():
                            if name != "out":
                                t.copy_(anchor[name])
            for i, (x, kw) in enumerate(edits):
                with sparsedit.scope(model, i), sparsedit.editing(model):
                    outs.append(model(x, **kw).sample)
        sparsedit.unsparsify_(model)
        return captured, outs, nbytes

    _, want, full = capture_and_edit(1, borrow=True)
    captured, got, shared = capture_and_edit(share)
    assert shared == full // 4 * -(-4 // share)  # ceil(4 / s) of the 4 steps' keys and values
    tokens = dit.token_region(region.any(0, keepdim=True), 2, 1)[0].reshape(-1)
    outside = ~tokens.reshape(8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    for i in range(4):
        assert torch.equal(got[i], want[i])
        assert torch.equal(got[i][:, :, outside], captured[i][:, :, outside])


def test_kv_share_is_checked():
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="dit_kv_share"):
            SparseConfig(dit_kv_share=bad)


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_hidden_states_cached_instead_of_keys_and_values(data):
    """`dit_cache="hidden"`: the capture keeps the attentions' inputs (half the bytes of keys and values), and a sparse
    edit projects every token's keys and values from them: the same result as the keys-and-values cache (to float
    tolerance: the projections are the same GEMMs on the same rows), for random regions, qk-norm, dual attention,
    cached or recomputed context, shared steps; committing keeps the edited inputs; MACs add the projections."""
    qk = data.draw(st.sampled_from([None, "rms_norm"]))
    dual = data.draw(st.sampled_from([(), (0,), (0, 1)]))
    context = data.draw(st.sampled_from(["cache", "recompute"]))
    share = data.draw(st.integers(1, 2))
    model = _sd3(qk_norm=qk, dual=dual, seed=data.draw(st.integers(0, 9)))
    steps = _steps(n=2)
    region = data.draw(regions(2, 16, 16))
    edits = [(torch.where(region[:, None], x - 1, x), kw) for x, kw in steps]
    results = {}
    for cache in ("kv", "hidden"):
        sparsedit.sparsify_(model, SparseConfig(dilation=1, dit_context=context, dit_cache=cache, dit_kv_share=share,
                                                max_region_fraction=1.0))  # fmt: skip
        with torch.no_grad():
            with sparsedit.capturing(model):
                for i, (x, kw) in enumerate(steps):
                    with sparsedit.scope(model, i):
                        model(x, **kw)
            cache_bytes = _kv_bytes(model)
            outs, macs = [], []
            for i, (x, kw) in enumerate(edits):
                with sparsedit.scope(model, i), sparsedit.editing(model, commit=True):
                    outs.append(model(x, **kw).sample)
                macs.append(sparsedit.last_stats(model)["macs_sparse"])
            again, second = [], []  # after the commit: the same inputs (the committed result), then a new stroke
            for i, (x, kw) in enumerate(edits):
                with sparsedit.scope(model, i), sparsedit.editing(model):
                    again.append(model(x, **kw).sample)
                x2 = x.clone()
                x2[:, :, 10:14, 2:6] += 2  # the first edit's rows are inactive now: read from the committed cache
                with sparsedit.scope(model, i), sparsedit.editing(model):
                    second.append(model(x2, **kw).sample)
        sparsedit.unsparsify_(model)
        results[cache] = outs, cache_bytes, macs, again, second
    (kv, kv_bytes, kv_macs, _, kv2), (hid, hid_bytes, hid_macs, hid_again, hid2) = results["kv"], results["hidden"]
    assert hid_bytes * 2 == kv_bytes
    for a, b, c, a2, b2 in zip(kv, hid, hid_again, kv2, hid2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(c, b)
        torch.testing.assert_close(b2, a2, rtol=1e-5, atol=1e-5)
    if region.any():
        assert all(h > k for h, k in zip(hid_macs, kv_macs, strict=True))


def test_hidden_states_macs_count_the_projections():
    """MACs of a `dit_cache="hidden"` edit equal torch's FLOP counter over what ran, plus attention by hand."""
    model = _sd3(qk_norm="rms_norm", dual=(0,))
    x, kw = _inputs()
    x_edit = x.clone()
    x_edit[:, :, 0:3, 8:12] -= 1
    sparsedit.sparsify_(model, SparseConfig(dilation=0, dit_cache="hidden"))
    with torch.no_grad():
        with sparsedit.capturing(model):
            model(x, **kw)
        with sparsedit.editing(model), FlopCounterMode(display=False) as sparse:
            model(x_edit, **kw)
        stats = sparsedit.last_stats(model)
    assert stats["macs_sparse"] == sparse.get_total_flops() // 2 + _attention_macs(model, 2, 4, 0, 64, 5)


def test_hidden_states_are_refused_where_not_built():
    with pytest.raises(ValueError, match="dit_cache must be one of"):
        SparseConfig(dit_cache="both")
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))  # fmt: skip
    with pytest.raises(UnsupportedLayerError, match=r"dit_cache='hidden'\) is built for SD3") as refused:
        sparsedit.sparsify_(flux, SparseConfig(dit_cache="hidden"))
    problems = [line for line in str(refused.value).splitlines() if line.startswith("  ")]
    assert len(problems) == 1, problems  # the transformer's refusal alone, not its layers one by one
