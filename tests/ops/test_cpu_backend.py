"""The compiled CPU backend against the reference backend (its oracle), the dispatcher's choice, and its build."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedit
from sparsedit import SparseConfig, ops
from sparsedit.ops import cpu
from sparsedit.ops.reference import ReferenceBackend


pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")

REF = ReferenceBackend()


@pytest.fixture(scope="module")
def compiled():
    cpu.build()  # a no-op after `make setup`; compiles here otherwise (about 10 s)
    backend = next(b for b in ops.backends() if b.name == "cpu-compiled")
    cpu._STATE.clear()  # a build made by this fixture loads now
    assert backend.unavailable_reason() is None
    return backend


def _origins(data, b, h, w, th, tw, n):
    rows = [[data.draw(st.integers(0, b - 1)), data.draw(st.integers(-th - 2, h + 1)),
             data.draw(st.integers(-tw - 2, w + 1))] for _ in range(n)]  # fmt: skip
    return torch.tensor(rows, dtype=torch.int64).reshape(n, 3)


@given(data=st.data())
@settings(deadline=None, max_examples=150)
def test_gather_matches_the_reference(compiled, data):
    """Every activation (those without a kernel go to the reference inside the call), padding mode, prologue,
    layout and dtype; tiles reaching far past the border, pixel tiles that overlap, empty gathers."""
    b, c = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 3, 16, 17, 64, 70]))
    h, w = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    th, tw = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))
    n = data.draw(st.integers(0, 8))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    layout = data.draw(st.sampled_from([torch.channels_last, torch.contiguous_format]))
    x = (3 * torch.randn(b, c, h, w)).to(dtype).contiguous(memory_format=layout)
    origins = _origins(data, b, h, w, th, tw, n)
    scale = torch.randn(b, c).to(dtype) if data.draw(st.booleans()) else None
    shift = torch.randn(b, c).to(dtype) if data.draw(st.booleans()) else None
    act = data.draw(st.sampled_from(ops.ACTIVATIONS))
    weight = torch.randn(data.draw(st.sampled_from([1, c]))).to(dtype) if act == "prelu" else None
    mode = data.draw(st.sampled_from(ops.PADDING_MODES))
    poison = data.draw(st.booleans())
    args = (x, origins, th, tw, scale, shift, act, 0.2, poison, (), weight, mode)
    got, want = compiled.gather(*args), REF.gather(*args)
    assert got.shape == want.shape == (n, c, th, tw) and got.dtype == want.dtype
    assert not torch.isnan(got).any()
    if dtype == torch.float32 and act in cpu.ACTIVATION_CODES:
        # The same arithmetic in the same order; transcendental activations may differ in the last bits (torch's
        # scalar tail loops against the vector code).
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # delegated to the reference: the same bits
        assert torch.equal(got, want)
    before = x.clone()
    got.add_(1)  # a fresh tensor, never a view of x: the caller may write into it
    assert torch.equal(x, before)


@given(data=st.data())
@settings(deadline=None, max_examples=80)
def test_scatter_matches_the_reference_bit_for_bit(compiled, data):
    b, c = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 4, 16, 33]))
    h, w = data.draw(st.integers(2, 12)), data.draw(st.integers(2, 12))
    th, tw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    n = data.draw(st.integers(0, 8))
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    # Disjoint tiles on a grid at a random offset (overlapping tiles must carry equal values where they overlap:
    # the first tile is scattered twice).
    oy, ox = data.draw(st.integers(0, h - th)), data.draw(st.integers(0, w - tw))
    cells = [[bb, y, x] for bb in range(b) for y in range(oy, h - th + 1, th) for x in range(ox, w - tw + 1, tw)]
    picked = data.draw(st.lists(st.sampled_from(range(len(cells))), max_size=n, unique=True))
    n = len(picked)
    origins = torch.tensor([cells[i] for i in picked], dtype=torch.int64).reshape(n, 3)
    if n:
        origins = torch.cat([origins, origins[:1]])
    tiles_layout = data.draw(st.sampled_from(["channels_last", "contiguous", "permuted"]))
    tiles = torch.randn(origins.shape[0], c, th, tw)
    if n:
        tiles[-1] = tiles[0]
    if tiles_layout == "channels_last":
        tiles = tiles.contiguous(memory_format=torch.channels_last)
    elif tiles_layout == "permuted":  # a row's pixels not back to back
        tiles = tiles.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    out_layout = data.draw(st.sampled_from([torch.channels_last, torch.contiguous_format]))
    out = torch.randn(b, c, h, w).contiguous(memory_format=out_layout)
    residual = torch.randn(b, c, h, w).contiguous(memory_format=out_layout) if data.draw(st.booleans()) else None
    got, want = out.clone(), out.clone()
    compiled.scatter(got, tiles, origins, residual)
    REF.scatter(want, tiles, origins, residual)
    assert torch.equal(got, want)


def test_bad_origins_raise_instead_of_writing_outside(compiled):
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    tiles = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    for bad in ([0, 5, 0], [0, 0, -1], [2, 0, 0]):
        with pytest.raises(RuntimeError, match="does not lie inside"):
            compiled.scatter(x, tiles, torch.tensor([bad]), None)
    with pytest.raises(RuntimeError, match="names batch 2 of 2"):
        compiled.gather(x, torch.tensor([[2, 0, 0]]), 3, 3, None, None, "relu", 0.0, False, (), None, "zeros")


def test_the_dispatcher_takes_it_for_float32_on_cpu_and_can_turn_it_off(compiled):
    x32, x16 = torch.empty(1, 1, 1, 1), torch.empty(1, 1, 1, 1, dtype=torch.bfloat16)
    assert ops.select_backend("gather", [x32]).__self__ is compiled
    assert ops.select_backend("gather", [x16]).__self__.name == "reference"
    assert ops.select_backend("gather_tokens", [x32]).__self__.name == "reference"
    ops.set_backend_enabled("cpu-compiled", False)
    try:
        assert ops.select_backend("gather", [x32]).__self__.name == "reference"
        assert "turned off" in " ".join(compiled.not_supported_reasons("gather", [x32]))
    finally:
        ops.set_backend_enabled("cpu-compiled", True)
    assert ops.select_backend("gather", [x32]).__self__ is compiled
    with pytest.raises(ValueError, match="no backend named"):
        ops.set_backend_enabled("triton", False)


def test_a_missing_build_is_reported_and_the_reference_runs(tmp_path):
    code = (
        "import torch; from sparsedit import ops, info; "
        "print(ops.select_backend('gather', [torch.empty(1, 1, 1, 1)]).__self__.name); print(info.info_text())"
    )
    env = {**os.environ, "SPARSEDIT_OPS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "reference"
    assert "cpu-compiled unavailable: not built" in out.stdout and "sparsedit build-ops" in out.stdout


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.c1 = nn.Conv2d(3, 32, 3)
        self.n1 = nn.GroupNorm(8, 32)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h = self.c1(self.pad(x))
        h = h + self.c2(nn.functional.silu(self.n1(h)))
        return self.c3(nn.functional.prelu(h, torch.full((1,), 0.1)))


@pytest.mark.parametrize("exact", [True, False])
def test_a_sparse_edit_is_the_same_on_both_backends(compiled, exact):
    torch.manual_seed(0)
    net = _Net().eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    sparsedit.sparsify_(net, SparseConfig(exact=exact, measured_fallback=False))
    region = torch.zeros(1, 48, 48, dtype=torch.bool)
    region[:, 10:16, 20:30] = True
    x2 = torch.where(region[:, None], torch.randn_like(x), x)
    results = {}
    with torch.no_grad():
        with sparsedit.capturing(net):
            net(x)
        for on in (True, False):
            ops.set_backend_enabled("cpu-compiled", on)
            try:
                with sparsedit.editing(net, region=region):
                    results[on] = net(x2)
            finally:
                ops.set_backend_enabled("cpu-compiled", True)
        dense = net(x2)
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)
    if exact:
        torch.testing.assert_close(results[True], dense, rtol=1e-4, atol=1e-4)


@given(data=st.data())
@settings(deadline=None, max_examples=80)
def test_write_pixels_matches_the_reference_bit_for_bit(compiled, data):
    """Exact mode's write of the tile pixels inside the region, with and without a residual and the undo copy; the
    undo rows hold the values from before the write, and writing them back restores the rows."""
    n, c = data.draw(st.integers(1, 6)), data.draw(st.sampled_from([1, 3, 16, 33]))
    th, tw = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    p = data.draw(st.integers(1, 200))
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    layout = data.draw(st.sampled_from([torch.channels_last, torch.contiguous_format]))
    tiles = torch.randn(n, c, th, tw).contiguous(memory_format=layout)
    k = data.draw(st.integers(0, min(p, n * th * tw)))
    lin = torch.randperm(p)[:k]  # distinct rows, as the engine's inside pixels are
    at = torch.randint(0, n * th * tw, (k,))
    rows = torch.randn(1, p, c)
    residual = torch.randn(1, p, c) if data.draw(st.booleans()) else None
    keep = data.draw(st.booleans())
    got_rows, want_rows = rows.clone(), rows.clone()
    got = compiled.write_pixels(got_rows, tiles, at, lin, residual, keep)
    want = REF.write_pixels(want_rows, tiles, at, lin, residual, keep)
    assert torch.equal(got_rows, want_rows)
    if keep:
        assert torch.equal(got, want) and torch.equal(got, rows[0, lin])
        ops.scatter_tokens(got_rows, got, lin)
        assert torch.equal(got_rows, rows)
    else:
        assert got is None and want is None


def test_write_pixels_refuses_indices_out_of_range(compiled):
    rows, tiles = torch.zeros(1, 10, 4), torch.zeros(2, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    for at, lin in (([8], [0]), ([0], [10]), ([-1], [0])):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.write_pixels(rows, tiles, torch.tensor(at), torch.tensor(lin))
    assert torch.equal(rows, torch.zeros(1, 10, 4))
    with pytest.raises(ValueError, match="equal length"):
        ops.write_pixels(rows, tiles, torch.tensor([0, 1]), torch.tensor([0]))


@given(data=st.data())
@settings(deadline=None, max_examples=60)
def test_weight_checksums_are_the_same_with_and_without_the_kernel(compiled, data):
    """`fingerprints.tensor_checksums` sums every tensor's words in one compiled pass; the torch reductions (the
    path off the CPU or without a build) must give the same checksums, for every word type and length."""
    from sparsedit.fingerprints import tensor_checksums

    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8, torch.int16, torch.bool]
    tensors = []
    for _ in range(data.draw(st.integers(1, 6))):
        n = data.draw(st.sampled_from([0, 1, 3, 1023, 1024, 1025, 2047, 16385, 40000]))
        dtype = data.draw(st.sampled_from(dtypes))
        t = torch.randn(n) * 100
        t = t > 0 if dtype == torch.bool else t.to(dtype)
        tensors.append(t)
    got = tensor_checksums(tensors)
    ops.set_backend_enabled("cpu-compiled", False)
    try:
        want = tensor_checksums(tensors)
    finally:
        ops.set_backend_enabled("cpu-compiled", True)
    assert got == want


@given(data=st.data())
@settings(deadline=None, max_examples=80)
def test_difference_masks_are_the_same_with_and_without_the_kernel(compiled, data):
    """`regions.difference_mask(eps=0)` runs one compiled pass over both maps; the XOR and reductions (the path off the
    CPU or without a build) must give the same mask: every bit counts, -0.0 against 0.0 differs, equal NaNs do not."""
    from sparsedit import regions

    b, c = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 40))
    h, w = data.draw(st.integers(1, 19)), data.draw(st.integers(1, 19))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8,
                                       torch.int64, torch.bool]))  # fmt: skip
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    a = torch.randn(b, c, h, w) * 10
    a = a > 0 if dtype == torch.bool else a.to(dtype)
    new = a.clone()
    for _ in range(data.draw(st.integers(0, 6))):  # single changed words, anywhere
        i = tuple(data.draw(st.integers(0, n - 1)) for n in (b, c, h, w))
        kind = data.draw(st.sampled_from(["flip", "neg-zero", "nan"]))
        if dtype.is_floating_point and kind == "neg-zero":
            a[i], new[i] = 0.0, -0.0
        elif dtype.is_floating_point and kind == "nan":
            a[i], new[i] = float("nan"), float("nan")
        else:
            new[i] = ~new[i] if dtype in (torch.bool, torch.uint8, torch.int64) else new[i] + 1
    if data.draw(st.booleans(), label="channels_last"):
        a, new = a.contiguous(memory_format=torch.channels_last), new.contiguous(memory_format=torch.channels_last)
    got = regions.difference_mask(new, a, eps=0.0)
    kernel, regions.DIFF_KERNEL = regions.DIFF_KERNEL, None
    try:
        want = regions.difference_mask(new, a, eps=0.0)
    finally:
        regions.DIFF_KERNEL = kernel
    assert kernel is not None and kernel(new, a) is not None, "the compiled pass must run here"
    assert got.shape == want.shape == (b, h, w)
    assert torch.equal(got, want)


@given(data=st.data())
@settings(deadline=None, max_examples=60)
def test_scatter_tokens_matches_the_reference_bit_for_bit(compiled, data):
    b, l, c = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 50)), data.draw(st.sampled_from([1, 5, 16, 33]))
    k = data.draw(st.integers(0, b * l))
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    index = torch.randperm(b * l)[:k]
    out = torch.randn(b, l, c)
    tokens = torch.randn(k, c)
    residual = torch.randn(b, l, c) if data.draw(st.booleans()) else None
    got, want = out.clone(), out.clone()
    compiled.scatter_tokens(got, tokens, index, residual)
    REF.scatter_tokens(want, tokens, index, residual)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="out of range"):
        compiled.scatter_tokens(out, torch.zeros(1, c), torch.tensor([b * l]), None)


def test_pooled_outputs_never_alias_a_live_tensor(compiled):
    """Large gathers reuse buffers no tensor references any more: while a result (or a view of it) lives, later
    gathers get other memory, and writing into one result never changes another."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    org = torch.stack(
        [torch.zeros(200, dtype=torch.long), torch.randint(-2, 62, (200,)), torch.randint(-2, 62, (200,))], 1
    )
    want = REF.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros")
    held = [compiled.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros") for _ in range(3)]
    view = held[0][:, :1]
    del held[0]
    more = [compiled.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros") for _ in range(3)]
    storages = {t.untyped_storage().data_ptr() for t in [view, *held, *more]}
    assert len(storages) == 6
    for t in [*held, *more]:
        t.add_(1)
    assert torch.equal(view, want[:, :1])
    assert cpu.pool_bytes() >= 6 * want.numel() * 4
    del view, held, more
    cpu.release_pool()
    assert cpu.pool_bytes() == 0
    again = compiled.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros")
    assert torch.equal(again, want)


def test_info_says_which_backend_runs_each_op_and_why(compiled):
    from sparsedit.info import info_text

    text = info_text()
    lines = {" ".join(line.split()[:3]): line for line in text.splitlines() if line.startswith("  ")}
    assert lines["gather cpu float32"].split()[3] == "cpu-compiled"
    bf16 = lines["gather cpu bfloat16"]
    assert bf16.split()[3] == "reference" and "cpu-compiled: dtype torch.bfloat16" in bf16
    assert "does not implement gather_tokens" in lines["gather_tokens cpu float32"]


def test_pooled_outputs_follow_inference_mode(compiled):
    """A buffer made under `torch.inference_mode` is never handed out outside it (in-place writes into an inference
    tensor fail there), and a result made outside it can be written in place."""
    x = torch.randn(1, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    org = torch.stack(
        [torch.zeros(200, dtype=torch.long), torch.randint(-2, 62, (200,)), torch.randint(-2, 62, (200,))], 1
    )
    cpu.release_pool()
    with torch.inference_mode():
        compiled.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros").add_(1)
    out = compiled.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros")
    assert not out.is_inference()
    out.add_(1)
    with torch.inference_mode():
        assert compiled.gather(x, org, 6, 6, None, None, "relu", 0.0, False, (), None, "zeros").is_inference()
