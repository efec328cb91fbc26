"""The token active set (`nn/tokens.py`), against plain per-position loops: gather, scatter into a cached map with its
undo log and region tag, and the refresh of cached keys and values."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedit import SparseConfig
from sparsedit.cache import ActivationCache
from sparsedit.nn.state import SparseState
from sparsedit.nn.tokens import ActiveTokens, joint_kv, pixel_tokens, sparse_joint_attention
from tests.strategies import regions


def _state() -> SparseState:
    state = SparseState(SparseConfig(), ActivationCache())
    state.commit = True  # committed writes are undo-logged
    return state


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_active_tokens_gather_scatter_refresh_and_undo(data):
    b, c, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7)), 5
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    torch.manual_seed(data.draw(st.integers(0, 99)))
    region = data.draw(regions(b, h, w))
    index = region.any(dim=0).reshape(-1).nonzero()[:, 0]
    active = ActiveTokens(index, (h, w))
    assert active.count == int(region.any(dim=0).sum()) and active.fraction == active.count / (h * w)
    x = torch.randn(b, c, h, w, dtype=dtype)
    rows = active.gather(x)
    for k, p in enumerate(index.tolist()):
        assert torch.equal(rows[:, k], x[:, :, p // w, p % w])
    state = _state()
    buf = torch.randn(b, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)  # as the cache keeps it
    before = buf.clone()
    new = torch.randn(b, active.count, c, dtype=dtype)
    active.scatter(state, buf, new)
    want = before.clone()
    for k, p in enumerate(index.tolist()):
        want[:, :, p // w, p % w] = new[:, k]
    assert torch.equal(buf, want)
    assert torch.equal(state.region_of(buf), region.any(dim=0, keepdim=True).expand(b, h, w))
    # Keys and values of the active rows recomputed in place from their inputs; every other row kept.
    attn = nn.Module()
    attn.to_k, attn.to_v = nn.Linear(c, 4).to(dtype), nn.Linear(c, 4).to(dtype)
    k_all, v_all = torch.randn(b, h * w, 4, dtype=dtype), torch.randn(b, h * w, 4, dtype=dtype)
    k0, v0 = k_all.clone(), v_all.clone()
    with torch.no_grad():
        active.refresh_kv(state, attn, k_all, v_all, new)
        k_new, v_new = attn.to_k(new), attn.to_v(new)  # the same batched projection: the same bits
        for k, p in enumerate(index.tolist()):
            assert torch.equal(k_all[:, p], k_new[:, k]) and torch.equal(v_all[:, p], v_new[:, k])
    others = torch.ones(h * w, dtype=torch.bool)
    others[index] = False
    assert torch.equal(k_all[:, others], k0[:, others]) and torch.equal(v_all[:, others], v0[:, others])
    state.rollback()  # an uncommitted edit leaves the cache as captured
    assert torch.equal(buf, before) and torch.equal(k_all, k0) and torch.equal(v_all, v0)


def test_pixel_tokens_is_a_view_of_a_channels_last_map():
    buf = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    tokens = pixel_tokens(buf)
    assert tokens.shape == (2, 20, 3) and tokens.data_ptr() == buf.data_ptr()


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_sparse_joint_attention_equals_the_processor_for_one_layer(data):
    """SD3's joint attention with the active image rows changed: their outputs (and the context's, when recomputed)
    equal what diffusers' `JointAttnProcessor2_0` gives on the whole edited sequence (keys of the other rows are the
    capture's, which one layer recomputes identically); with the context cached, its keys are the capture's; rolling
    back restores the captured keys and values."""
    diffusers_attention = pytest.importorskip("diffusers.models.attention")
    qk_norm = data.draw(st.sampled_from([None, "rms_norm"]))
    pre_only = data.draw(st.booleans())
    recompute = data.draw(st.booleans())
    torch.manual_seed(data.draw(st.integers(0, 99)))
    block = diffusers_attention.JointTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8,
                                                      context_pre_only=pre_only, qk_norm=qk_norm).eval()  # fmt: skip
    attn = block.attn
    b, h, w, m = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), 4, data.draw(st.integers(1, 6))
    region = data.draw(regions(b, h, w))
    index = region.any(dim=0).reshape(-1).nonzero()[:, 0]
    active = ActiveTokens(index, (h, w))
    context_at = ActiveTokens(torch.arange(h * w, h * w + m), (1, h * w + m))
    hidden, context = torch.randn(b, h * w, 16), torch.randn(b, m, 16)
    edited = hidden.clone()
    edited[:, index] += torch.randn(b, len(index), 16)
    state = _state()
    with torch.no_grad():
        k_all, v_all = joint_kv(attn, hidden, context)  # the capture's
        k0, v0 = k_all.clone(), v_all.clone()
        want_rows, want_context = attn(hidden_states=edited, encoder_hidden_states=context)
        rows, ctx_out = sparse_joint_attention(
            state, attn, active, edited[:, index], k_all, v_all, context if recompute else None, context_at
        )
    torch.testing.assert_close(rows, want_rows[:, index], rtol=1e-5, atol=1e-5)
    if recompute:
        torch.testing.assert_close(ctx_out, want_context, rtol=1e-5, atol=1e-5)
    else:
        assert ctx_out is None
    state.rollback()
    assert torch.equal(k_all, k0) and torch.equal(v_all, v0)
