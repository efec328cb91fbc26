"""Edits that cannot go wrong silently (issue 19): one caller at a time, staleness of every component and of
in-place writes, bad pixels, lossy inputs, and a capture that is the pipeline's own call."""

import io
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedit import EditorBusyError, SparseConfig, SparseEditor, StaleCacheError

from .sd_fixtures import tiny_sd_img2img


pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "strength": 0.7, "num_inference_steps": 6, "output_type": "pt"}
CONFIG = SparseConfig(input_dilation=1)


def gen():
    return torch.Generator().manual_seed(3)


def scene(h=64, w=64):
    """A smooth picture (gradients and soft shapes), as photos are: JPEG keeps it close."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    r = 0.3 + 0.5 * xx
    g = 0.2 + 0.6 * yy
    b = 0.5 + 0.3 * torch.sin(6 * xx) * torch.cos(4 * yy)
    disk = ((yy - 0.6) ** 2 + (xx - 0.3) ** 2 < 0.03).float()
    return torch.stack([r, g * (1 - 0.5 * disk), b]).clamp(0, 1)[None]


def stroke(x, y0=10, x0=12, value=0.9):
    y = x.clone()
    y[:, :, y0 : y0 + 10, x0 : x0 + 16] = value
    return y


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_img2img(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def editor(pipe):
    ed = SparseEditor(pipe, CONFIG)
    ed.capture(image=scene(), generator=gen(), **KW)
    yield ed
    ed.remove()


# -- one caller at a time -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [2, 4])
def test_threads_editing_one_editor_get_their_own_results(editor, threads):
    x = scene()
    strokes = [stroke(x, 8 + 10 * i, 6 + 8 * i, 0.1 * i) for i in range(threads)]
    want = [editor.edit(image=s, commit=False, output_type="pt").images for s in strokes]
    got, errors = [None] * threads, []
    barrier = threading.Barrier(threads)

    def work(i):
        try:
            barrier.wait()
            for _ in range(2):
                got[i] = editor.edit(image=strokes[i], commit=False, output_type="pt").images
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not errors
    for i in range(threads):
        assert torch.equal(got[i], want[i])


def test_a_non_blocking_editor_refuses_a_concurrent_call(pipe):
    ed = SparseEditor(pipe, CONFIG, blocking=False)
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        held, release = threading.Event(), threading.Event()

        def hold():
            with ed._lock:
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        with pytest.raises(EditorBusyError, match="another thread"):
            ed.edit(image=stroke(scene()), output_type="pt")
        release.set()
        t.join()
        ed.edit(image=stroke(scene()), output_type="pt")  # free again
    finally:
        ed.remove()


# -- staleness: every component, every kind of in-place write -------------------------------------------------------
WRITES = {
    "data.add_": lambda p: p.data.add_(1e-2),
    "data.copy_": lambda p: p.data.copy_(p.data * 1.01),
    "data[:] =": lambda p: p.data.__setitem__(slice(None), p.data + 1e-2),
    "no_grad add_": lambda p: p.add_(1e-2),
    "permuted": lambda p: p.data.copy_(p.data.flip(0)),  # the same values, reordered: an order-free sum misses it
}
COMPONENTS = {
    "unet": lambda pipe: pipe.unet.conv_in.weight,
    "vae": lambda pipe: pipe.vae.decoder.conv_out.weight,
    "text_encoder": lambda pipe: pipe.text_encoder.embeddings.token_embedding.weight,
}


@pytest.mark.parametrize("component", list(COMPONENTS))
@pytest.mark.parametrize("write", list(WRITES))
def test_an_in_place_weight_write_is_a_stale_capture(pipe, component, write):
    param = COMPONENTS[component](pipe)
    saved = param.detach().clone()
    ed = SparseEditor(pipe, CONFIG)
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        with torch.no_grad():
            WRITES[write](param)
        with pytest.raises(StaleCacheError, match=component.replace("_", ".")):
            ed.edit(image=stroke(scene()), output_type="pt")
    finally:
        ed.remove()
        with torch.no_grad():
            param.copy_(saved)


def test_the_stale_weights_error_names_the_tensor_and_restored_weights_work_again(pipe):
    """A permuted output-channel order is stale and the message names the component and the tensor (never raw data
    pointers); putting the captured bits back (here through `load_state_dict`, which gives the UNet's tensors new
    version counters) makes the editor usable again, with the edit it gave before."""
    param = pipe.unet.conv_in.weight
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ed = SparseEditor(pipe, CONFIG)
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        want = ed.edit(image=stroke(scene()), commit=False, output_type="pt").images
        with torch.no_grad():
            param.data.copy_(param.data.flip(0))
        with pytest.raises(StaleCacheError, match=r"unet \(conv_in\.weight\)") as e:
            ed.edit(image=stroke(scene()), output_type="pt")
        assert "0x" not in str(e.value) and "data_ptr" not in str(e.value)
        pipe.unet.load_state_dict(state)
        assert torch.equal(ed.edit(image=stroke(scene()), commit=False, output_type="pt").images, want)
    finally:
        ed.remove()


def test_model_level_staleness_by_content_names_the_tensor_and_accepts_restored_bits():
    import sparsedit

    from .nn.test_plan import captured_stack

    model, x, _, region = captured_stack(16, (slice(2, 5), slice(2, 5)))
    x2 = torch.where(region[:, None], x + 1, x)
    with sparsedit.editing(model, region=region):
        want = model(x2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].weight.copy_(model[2].weight.flip(0))  # bumps the version counter: the identity differs
    with pytest.raises(StaleCacheError, match=r"Sequential \(2\.weight\)") as e:
        with sparsedit.editing(model, region=region):
            model(x2)
    assert "(140" not in str(e.value)
    model.load_state_dict(saved)
    with sparsedit.editing(model, region=region):
        assert torch.equal(model(x2), want)


def test_on_stale_recapture_sees_in_place_writes(pipe):
    param = pipe.unet.conv_in.weight
    saved = param.detach().clone()
    ed = SparseEditor(pipe, CONFIG, on_stale="recapture")
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        with torch.no_grad():
            param.data.add_(1e-2)
        got = ed.edit(image=stroke(scene()), output_type="pt").images
        assert "recaptured_seconds" in ed.last_stats
    finally:
        ed.remove()
    fresh = SparseEditor(pipe, CONFIG)
    try:
        fresh.capture(image=scene(), generator=gen(), **KW)
        assert torch.equal(got, fresh.edit(image=stroke(scene()), output_type="pt").images)
    finally:
        fresh.remove()
        with torch.no_grad():
            param.copy_(saved)


def test_the_staleness_check_is_measured(editor):
    editor.edit(image=stroke(scene()), commit=False, output_type="pt")
    assert 0 < editor.last_stats["check_seconds"] < editor.last_stats["seconds"]


# -- bad pixels ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_pixels_are_refused_before_anything_runs(editor, bad):
    before = editor.current.version
    x = stroke(scene())
    x[0, 1, 30, 40] = bad
    with pytest.raises(ValueError, match=r"y=30, x=40"):
        editor.edit(image=x, output_type="pt")
    assert editor.current.version == before
    out = editor.edit(image=stroke(scene()), output_type="pt").images
    assert torch.isfinite(out).all()


def test_non_finite_values_inside_a_run_abort_it_without_committing(pipe, editor):
    want = editor.edit(image=stroke(scene(), 40, 36, 0.1), commit=False, output_type="pt").images
    handle = pipe.unet.conv_out.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="nothing was committed"):
            editor.edit(image=stroke(scene()), output_type="pt")
    finally:
        handle.remove()
    assert editor.current.version == 0
    assert torch.equal(editor.edit(image=stroke(scene(), 40, 36, 0.1), commit=False, output_type="pt").images, want)


# -- lossy inputs -------------------------------------------------------------------------------------------------
def jpeg(x, quality):
    from PIL import Image

    a = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float32) / 255
    return torch.from_numpy(back).permute(2, 0, 1)[None]


@pytest.mark.parametrize("quality", [75, 90])
def test_a_jpeg_resave_is_noise_not_an_edit(pipe, quality):
    x = (scene(128, 128) * 255).round() / 255  # an 8-bit image, as a saved file holds
    ed = SparseEditor(pipe, CONFIG)
    try:
        out0 = ed.capture(image=x, generator=gen(), **KW).images
        resaved = jpeg(x, quality)
        assert (resaved - x).abs().max() > 1 / 255  # it did change the pixels
        out = ed.edit(image=resaved, output_type="pt").images
        assert ed.last_stats["ignored_pixels"] > 0 and ed.last_stats["region_fraction"] == 0
        assert torch.equal(out, out0)
        # A real stroke on the re-saved image is found, and only the stroke (its JPEG noise is ignored).
        ed.edit(image=stroke(resaved, 40, 36, 0.1), output_type="pt")
        assert 160 / 128**2 <= ed.last_stats["region_fraction"] <= 2 * 160 / 128**2
        assert ed.last_stats["ran_dense"] is None
    finally:
        ed.remove()


def test_an_fp16_copy_is_no_change_and_a_faint_stroke_is_one(editor):
    x = scene()
    out = editor.edit(image=x.half().float(), output_type="pt")
    assert editor.last_stats["region_fraction"] == 0
    faint = x.clone()
    faint[..., 20:30, 20:30] += 0.06  # 15 in 8-bit units: above the default threshold of 12
    editor.edit(image=faint, commit=False, output_type="pt")
    assert editor.last_stats["region_fraction"] == pytest.approx(100 / 64**2)
    assert out is not None


def test_a_change_everywhere_runs_dense_says_so_and_warns(pipe):
    ed = SparseEditor(pipe, SparseConfig(input_dilation=1, change_threshold=0))
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        with pytest.warns(RuntimeWarning, match="painted on the result"):
            ed.edit(image=jpeg(scene(), 90), commit=False, output_type="pt")
        assert ed.last_stats["region_fraction"] > 0.9 and "max_region_fraction" in ed.last_stats["ran_dense"]
    finally:
        ed.remove()


def test_check_region_false_keeps_the_current_pixels_outside_the_region(pipe):
    x = scene()
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[10:20, 12:28] = True
    both = stroke(stroke(x), 40, 36, 0.1)  # two strokes, the region covers the first only
    strict = SparseEditor(pipe, CONFIG)
    try:
        strict.capture(image=x, generator=gen(), **KW)
        with pytest.raises(ValueError, match="check_region=False"):
            strict.edit(image=both, region=region)
        want = strict.edit(image=stroke(x), region=region, output_type="pt").images
    finally:
        strict.remove()
    lax = SparseEditor(pipe, SparseConfig(input_dilation=1, check_region=False))
    try:
        lax.capture(image=x, generator=gen(), **KW)
        got = lax.edit(image=both, region=region, output_type="pt").images
        assert torch.equal(got, want) and lax.last_stats["ignored_pixels"] == 160
        assert torch.equal(lax.current.image, lax.loop.adapter.preprocess(stroke(x)))
    finally:
        lax.remove()


# -- capture is the pipeline's call ------------------------------------------------------------------------------
def test_capture_takes_the_pipelines_arguments(pipe):
    x = scene()
    ed = SparseEditor(pipe, CONFIG)
    try:
        want = pipe(image=x, generator=gen(), **{**KW, "output_type": "latent"}).images
        got = ed.capture(image=x, generator=gen(), **{**KW, "output_type": "latent"}).images
        assert torch.equal(got, want) and got.shape[1] == 4
        edited = ed.edit(image=stroke(x), commit=False, output_type="latent").images
        assert edited.shape == want.shape and not torch.equal(edited, want)
        with_eta = pipe(image=x, generator=gen(), eta=0.5, **KW).images
        assert torch.equal(ed.capture(image=x, generator=gen(), eta=0.5, **KW).images, with_eta)
        embeds = pipe.encode_prompt("a red house", "cpu", 1, True)
        kw = {k: v for k, v in KW.items() if k != "prompt"}
        want = pipe(image=x, generator=gen(), prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], **kw).images
        got = ed.capture(image=x, generator=gen(), prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], **kw)
        assert torch.equal(got.images, want)
        seen = []
        ed.capture(image=x, generator=gen(), callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw, **KW)
        assert seen == list(range(len(ed.current.timesteps)))
        with pytest.raises(NotImplementedError, match="changed the latents"):
            ed.capture(image=x, generator=gen(), **KW,
                       callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] + 1})  # fmt: skip
        with pytest.raises(NotImplementedError, match="list of generators"):
            ed.capture(image=x, generator=[gen()], **KW)
        _, nsfw = ed.capture(image=x, generator=gen(), **{**KW, "return_dict": False})
        assert nsfw is None  # the tiny pipeline has no safety checker
    finally:
        ed.remove()


def test_the_safety_checker_runs_when_the_pipeline_has_one(pipe, monkeypatch):
    calls = []

    def checker(image, device, dtype):
        calls.append(image.shape)
        return torch.zeros_like(image), [True] * image.shape[0]

    monkeypatch.setattr(pipe, "safety_checker", object(), raising=False)
    monkeypatch.setattr(pipe, "run_safety_checker", checker)
    ed = SparseEditor(pipe, CONFIG)
    try:
        out = ed.capture(image=scene(), generator=gen(), **KW)
        assert calls and out.nsfw_content_detected == [True]
        ed.edit(image=stroke(scene()), output_type="pt")
        assert len(calls) == 2
    finally:
        ed.remove()


# -- errors that name the right fix -----------------------------------------------------------------------------
def test_remove_is_idempotent_and_a_removed_editor_says_so(pipe):
    ed = SparseEditor(pipe, CONFIG)
    ed.capture(image=scene(), generator=gen(), **KW)
    other = None
    with pytest.raises(RuntimeError, match=r"editor\.remove\(\)"):
        other = SparseEditor(pipe, CONFIG)
    assert other is None
    ed.remove()
    ed.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        ed.capture(image=scene(), generator=gen(), **KW)
    with pytest.raises(RuntimeError, match="was removed"):
        ed.edit(image=scene())


def test_a_gan_checkpoint_of_another_configuration_says_which(tmp_path):
    from sparsedit.models import SPADEGenerator

    small = SPADEGenerator(
        label_nc=5, size=(32, 64), ngf=4, hidden=8, use_instance=False, num_upsampling_layers="normal"
    )
    torch.save(small.state_dict(), tmp_path / "latest_net_G.pth")
    with pytest.raises(ValueError, match=r"label maps have 5 channels.*config="):
        SPADEGenerator.from_checkpoint(tmp_path / "latest_net_G.pth")
    config = {
        "label_nc": 5,
        "size": (32, 64),
        "ngf": 4,
        "hidden": 8,
        "use_instance": False,
        "num_upsampling_layers": "normal",
    }
    assert SPADEGenerator.from_checkpoint(tmp_path / "latest_net_G.pth", config=config).size == (32, 64)


# -- no silent no-ops, and a clear error for every simple mistake (issue 34) ------------------------------------------
def test_an_edit_entirely_below_the_change_threshold_warns_and_says_so(editor):
    subtle = scene()
    subtle[:, :, 16:48, 16:48] += 10 / 255  # +10 in 8-bit units over a 32x32 patch
    with pytest.warns(RuntimeWarning, match=r"change_threshold=12.*lower SparseConfig\(change_threshold"):
        out = editor.edit(image=subtle.clamp(0, 1), commit=False, output_type="pt").images
    assert editor.last_stats["macs_sparse"] == 0 and editor.last_stats["ignored_pixels"] > 0
    assert "changed nothing" in editor.last_stats["unchanged"]
    assert out.shape[-2:] == (64, 64)


def test_a_lower_threshold_edits_what_the_default_ignores(pipe):
    subtle = scene()
    subtle[:, :, 16:48, 16:48] += 10 / 255
    ed = SparseEditor(pipe, SparseConfig(input_dilation=1, change_threshold=2.0))
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        ed.edit(image=subtle.clamp(0, 1), commit=False, output_type="pt")
        assert ed.last_stats["macs_sparse"] > 0 and "unchanged" not in ed.last_stats
    finally:
        ed.remove()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be a whole number of steps, at least 1"),
        ({"num_inference_steps": 2.5}, ValueError, "num_inference_steps must be a whole number"),
        ({"prompt": 123}, TypeError, "prompt must be a string or a non-empty list of strings"),
        ({"negative_prompt": ["ok", 3]}, TypeError, "negative_prompt must be a string"),
        ({"strength": 0.0}, ValueError, r"strength must be in \(0, 1\]"),
        ({"strength": "0.5"}, TypeError, "strength must be a number"),
        ({"guidance_scale": float("nan")}, TypeError, "guidance_scale must be a number"),
        ({"guidance_scale": 1e308}, ValueError, r"guidance_scale must be in \[0, 10000\]"),
    ],
)
def test_bad_capture_arguments_name_the_argument(pipe, kwargs, error, match):
    ed = SparseEditor(pipe, CONFIG)
    try:
        with pytest.raises(error, match=match):
            ed.capture(image=scene(), generator=gen(), **{**KW, **kwargs})
    finally:
        ed.remove()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"commit": "yes"}, TypeError, "commit must be True"),
        ({"commit": None}, TypeError, "commit must be True"),
        ({"num_inference_steps": 2.5}, ValueError, "num_inference_steps must be a whole number"),
        ({"prompt": 123}, TypeError, "prompt must be a string"),
        ({"image": torch.rand(1, 4, 64, 64)}, ValueError, "4 channels but the capture had 3"),
    ],
)
def test_bad_edit_arguments_name_the_argument(editor, kwargs, error, match):
    with pytest.raises(error, match=match):
        editor.edit(**{"image": stroke(scene()), "output_type": "pt", **kwargs})


def test_a_removed_editor_says_so_for_its_cache_bytes(pipe):
    ed = SparseEditor(pipe, CONFIG)
    ed.capture(image=scene(), generator=gen(), **KW)
    ed.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        ed.cache_bytes


def test_a_gan_edit_takes_a_bool_commit():
    from sparsedit import GANEditor

    from .test_gan import blob_labels, tiny_spade

    ed = GANEditor(tiny_spade())
    labels = blob_labels(1, 32, 64, 5, seed=4)
    ed.capture(labels)
    with pytest.raises(TypeError, match="commit must be True"):
        ed.edit(labels, commit="no")
    ed.remove()


def test_a_dense_run_for_size_says_which_region_it_measured(pipe):
    """The run-level reason names the model's own input and dilation, so it cannot read as a contradiction of the
    image's `region_fraction` beside it."""
    ed = SparseEditor(pipe, SparseConfig(input_dilation=5))
    try:
        ed.capture(image=scene(), generator=gen(), **KW)
        ed.edit(image=stroke(scene()), commit=False, output_type="pt")
        stats = ed.last_stats
        assert stats["region_fraction"] < 0.1
        assert "of the model's 8x8 input after input_dilation=5 > max_region_fraction=0.4" in stats["ran_dense"]
        assert stats["calibration"]["break_even"] == 1.0  # the tests' fixed calibration (conftest.py)
    finally:
        ed.remove()


DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def reference_checksum(t: torch.Tensor) -> int:
    """`tensor_checksum`'s definition in plain Python integers, one tensor at a time: the words of the memory in rows
    of 1024, their sum, and the row- and column-weighted sums, modulo 2**64, mixed with the shape and dtype."""
    from sparsedit.fingerprints import _MIX, _mixed, _words

    if t.numel() == 0:
        return _mixed(tuple(t.shape), t.dtype, 0, 0)
    words = [int(w) for w in _words(t.contiguous().reshape(-1))]
    total, weighted = sum(words), 0
    rows = len(words) // 1024
    for p, w in enumerate(words):
        r, c = divmod(p, 1024)
        weighted += w * ((r + 1) + _MIX * (c + 1)) if r < rows else w * (rows + 1) * (c + 1)
    return _mixed(tuple(t.shape), t.dtype, total % 2**64, weighted % 2**64)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(
        st.sampled_from([0, 1, 3, 7, 1023, 1024, 1025, 2049, 5000, 16384, 16385, 20000]), min_size=1, max_size=6
    ),  # fmt: skip
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_checksums_taken_together_equal_each_tensors_own(sizes, dtypes, transposed, seed):
    """`tensor_checksums` batches the small tensors of a model (one padded grid per word type and row count) and
    moves all sums to Python at once; it must give exactly the definition's value for every tensor (a reference in
    plain integers), and a one-word change or a swap of two different words must change it."""
    from sparsedit.fingerprints import tensor_checksums
    from sparsedit.guard import tensor_checksum

    g = torch.Generator().manual_seed(seed)
    tensors = []
    for n, dtype in zip(sizes, dtypes, strict=False):
        x = torch.randn(n, generator=g) * 50
        t = x > 0 if dtype is torch.bool else x.to(dtype)
        if transposed and n % 4 == 0 and n:
            t = t.view(4, -1).t()  # not contiguous
        tensors.append(t)
    want = [reference_checksum(t) for t in tensors]
    assert tensor_checksums(tensors) == want
    assert [tensor_checksum(t) for t in tensors] == want
    for t in tensors:
        flat = t.reshape(-1).clone()
        if flat.numel() < 2 or flat[0] == flat[-1]:
            continue
        before = tensor_checksums([flat])[0]
        swapped = flat.clone()
        swapped[0], swapped[-1] = flat[-1], flat[0]
        assert tensor_checksums([swapped])[0] != before
        changed = flat.clone()
        changed[flat.numel() // 2] = ~changed[flat.numel() // 2] if flat.dtype is torch.bool else changed[0] + 1
        if not torch.equal(changed, flat):
            assert tensor_checksums([changed])[0] != before
