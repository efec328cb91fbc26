"""Edits that cannot go wrong silently (issue 19): a failure at any point of a committing edit or a capture (an
exception or Ctrl-C) leaves the editor exactly as it was, so the next edit equals a fresh editor's."""

import pytest
import torch
import torch.nn as nn

import sparsedit
from sparsedit import GANEditor, SparseConfig, SparseEditor

from .sd_fixtures import tiny_sd_img2img
from .test_gan import blob_labels, tiny_spade


pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "strength": 0.7, "num_inference_steps": 6, "output_type": "pt"}


class Boom(Exception):
    pass


def photo(h=64, w=64):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def stroke(x, y0=10, x0=12, value=0.9):
    y = x.clone()
    y[:, :, y0 : y0 + 10, x0 : x0 + 16] = value
    return y


def gen():
    return torch.Generator().manual_seed(3)


def fail_at(module: nn.Module, call: int, error: type[BaseException]):
    """Make the `call`-th forward of `module` from now on raise `error` (a hook; returns its handle)."""
    count = [0]

    def hook(mod, args):
        count[0] += 1
        if count[0] == call:
            raise error("injected")

    return module.register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_img2img(tmp_path_factory.mktemp("tok"))


def fresh_edit(pipe, config, x, edited):
    editor = SparseEditor(pipe, config)
    try:
        editor.capture(image=x, generator=gen(), **KW)
        return editor.edit(image=edited, output_type="pt").images
    finally:
        editor.remove()


# Where a failure strikes: the VAE encoder, the UNet at the first step, in the middle of the loop (in a block, and
# in the scheduler between two committed steps), the VAE decoder.
POINTS = {
    "vae encoder": (lambda p: p.vae.encoder.down_blocks[1], 1),
    "unet, first step": (lambda p: p.unet.mid_block, 1),
    "unet, step 3": (lambda p: p.unet.up_blocks[1], 3),
    "vae decoder": (lambda p: p.vae.decoder.up_blocks[1], 1),
}


@pytest.mark.parametrize("cache_dtype", [None, "bfloat16", "int8"])
@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failed_committing_edit_leaves_the_editor_as_it_was(pipe, cache_dtype, point, error):
    config = SparseConfig(input_dilation=1, cache_dtype=cache_dtype)
    x = photo()
    want = fresh_edit(pipe, config, x, stroke(x, 40, 36, 0.1))
    editor = SparseEditor(pipe, config)
    try:
        before = editor.capture(image=x, generator=gen(), **KW).images
        module, call = POINTS[point]
        handle = fail_at(module(pipe), call, error)
        try:
            with pytest.raises(error):
                editor.edit(image=stroke(x), output_type="pt")
        finally:
            handle.remove()
        assert editor.current.version == 0 and editor.history == []
        assert torch.equal(editor.edit(image=x, output_type="pt").images, before)  # nothing changed: the capture
        # An edit elsewhere: what a fresh editor makes, bit for bit (no step half-committed).
        assert torch.equal(editor.edit(image=stroke(x, 40, 36, 0.1), output_type="pt").images, want)
    finally:
        editor.remove()


def test_a_failure_between_committed_steps_rolls_all_of_them_back(pipe):
    config = SparseConfig(input_dilation=1)
    x = photo()
    want = fresh_edit(pipe, config, x, stroke(x, 40, 36, 0.1))
    editor = SparseEditor(pipe, config)
    step = pipe.scheduler.step
    calls = [0]

    def failing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # steps 0 and 1 have committed their UNet caches
            raise Boom("injected")
        return step(*args, **kwargs)

    try:
        editor.capture(image=x, generator=gen(), **KW)
        pipe.scheduler.step = failing_step
        try:
            with pytest.raises(Boom):
                editor.edit(image=stroke(x), output_type="pt")
        finally:
            del pipe.scheduler.step
        assert torch.equal(editor.edit(image=stroke(x, 40, 36, 0.1), output_type="pt").images, want)
    finally:
        editor.remove()


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failed_capture_keeps_the_previous_one(pipe, error):
    config = SparseConfig(input_dilation=1)
    x = photo()
    want = fresh_edit(pipe, config, x, stroke(x, 40, 36, 0.1))
    editor = SparseEditor(pipe, config)
    try:
        editor.capture(image=x, generator=gen(), **KW)
        handle = fail_at(pipe.unet.up_blocks[1], 4, error)
        try:
            with pytest.raises(error):
                editor.capture(image=stroke(x, 30, 30, 0.5), generator=gen(), **KW)
        finally:
            handle.remove()
        assert torch.equal(editor.current.image, editor.loop.adapter.preprocess(x))
        assert torch.equal(editor.edit(image=stroke(x, 40, 36, 0.1), output_type="pt").images, want)
    finally:
        editor.remove()


def test_a_failed_committing_gan_edit_leaves_the_editor_as_it_was():
    gen_model = tiny_spade()
    labels = blob_labels(1, 32, 64, 5, 0)
    edited = labels.clone()
    edited[:, 10:16, 20:34] = 2
    other = labels.clone()
    other[:, 20:28, 4:14] = 1
    fresh = GANEditor(gen_model, SparseConfig(exact=True))
    fresh.capture(labels)
    want = fresh.edit(other)
    fresh.remove()
    editor = GANEditor(gen_model, SparseConfig(exact=True))
    editor.capture(labels)
    first_conv = next(m for m in gen_model.modules() if isinstance(m, nn.Conv2d))
    for error in (Boom, KeyboardInterrupt):
        handle = fail_at(first_conv, 1, error)
        try:
            with pytest.raises(error):
                editor.edit(edited)
        finally:
            handle.remove()
    assert torch.equal(editor.edit(other), want)
    editor.remove()


def test_model_level_committed_edit_rolls_back_on_failure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 3, 3, padding=1)).eval()  # fmt: skip
    sparsedit.sparsify_(model, SparseConfig(exact=True, tile_size=2, measured_fallback=False))
    x = torch.randn(1, 3, 20, 20)
    a, b = x.clone(), x.clone()
    a[..., 2:6, 2:6] += 1
    b[..., 12:16, 12:16] -= 1
    with sparsedit.capturing(model), torch.no_grad():
        model(x)
    conv2d, calls = torch.nn.functional.conv2d, [0]

    def failing_conv2d(*args, **kwargs):  # the third convolution call: after two layers wrote into the cache
        calls[0] += 1
        if calls[0] == 3:
            raise Boom("injected")
        return conv2d(*args, **kwargs)

    torch.nn.functional.conv2d = failing_conv2d
    try:
        with pytest.raises(Boom), torch.no_grad(), sparsedit.editing(model, region=(a != x).any(1), commit=True):
            model(a)
    finally:
        torch.nn.functional.conv2d = conv2d
    assert calls[0] == 3
    with torch.no_grad(), sparsedit.editing(model):
        got = model(b)
    with torch.no_grad():
        torch.testing.assert_close(got, model(b), rtol=0, atol=1e-6)  # against the dense model on b
    sparsedit.unsparsify_(model)


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
def test_committed_steps_of_a_converting_cache_keep_no_working_copies(cache_dtype):
    """A converting cache's committed runs write their working copies back at their end and journal what that
    changes; before, each run's undo log kept its whole working copy alive until the transaction ended (a 20-step SD3
    edit held its cache again in float32 and was killed for memory). A failure after some committed steps still
    restores every step, and int8 entries keep their scales where the commit stays within them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    sparsedit.sparsify_(model, SparseConfig(cache_dtype=cache_dtype, measured_fallback=False, tile_size=4))
    x = torch.randn(1, 3, 24, 24)
    a = x.clone()
    a[..., 4:8, 4:8] += 0.1
    att = sparsedit.spatial.attachment_of(model)
    with sparsedit.capturing(model), torch.no_grad():
        for step in range(3):
            with sparsedit.scope(model, step):
                model(x)
    stored = {k: {n: t.clone() for n, t in e.items()} for k, e in att.state.cache._entries.items()}
    with pytest.raises(Boom), torch.no_grad(), sparsedit.transaction(model):
        for step in range(3):
            with sparsedit.editing(model, commit=True), sparsedit.scope(model, step):
                model(a)
            assert att.state.txn_undo == []  # nothing holds the working copies
        raise Boom("after every step committed")
    for key, entry in att.state.cache._entries.items():
        for name, t in entry.items():
            assert torch.equal(t, stored[key][name]), (key, name)
