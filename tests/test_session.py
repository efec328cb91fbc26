"""Caches that fit and sessions that outlive the process (issue 17): what a capture keeps, the budget, disk offload,
and save → load → edit."""

import os

import pytest
import torch

from sparsedit import CacheBudgetError, GANEditor, SparseConfig, SparseEditor, StaleCacheError
from sparsedit.cache import ActivationCache, CacheBytes
from sparsedit.config import parse_bytes
from sparsedit.spatial import attachment_of

from .sd_fixtures import tiny_sd_img2img
from .test_gan import blob_labels, tiny_spade


pytest.importorskip("diffusers")
KW = {"prompt": "a red house", "strength": 0.7, "num_inference_steps": 6, "output_type": "pt"}


@pytest.fixture
def pipe(tmp_path):
    return tiny_sd_img2img(tmp_path / "tok")


def photo(h=64, w=64):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def stroke(x, y0=10, x0=12):
    y = x.clone()
    y[:, :, y0 : y0 + 10, x0 : x0 + 16] = 0.9
    return y


def capture(editor, x):
    return editor.capture(image=x, generator=torch.Generator().manual_seed(3), **KW).images


def test_parse_bytes():
    assert parse_bytes("3GiB") == 3 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("2.5GB") == 2_500_000_000
    assert parse_bytes(1000) == 1000 and parse_bytes(None) is None
    for bad in ("3 parsecs", "GiB", "-1GiB", 0):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="cache_budget"):
        SparseConfig(cache_budget="lots")
    assert SparseConfig(cache_budget="1KiB").budget_bytes == 1024


def test_cache_bytes_by_part_and_what_is_kept(pipe):
    editor = SparseEditor(pipe)
    capture(editor, photo())
    total = editor.last_stats["cache_bytes"]
    assert isinstance(total, CacheBytes) and int(total) == sum(total.parts.values()) > 0
    assert set(total.keys()) == {"unet", "vae_encoder", "vae_decoder", "text", "latents"}
    assert total["unet"] == attachment_of(pipe.unet).state.cache.nbytes
    assert editor.last_stats["peak_bytes"] > 0
    # The UNet's per-step feature maps are bfloat16 by default ("auto"); its inputs stay in their own dtype.
    entries = attachment_of(pipe.unet).state.cache._entries
    dtypes = {t.dtype for key, e in entries.items() if key[0] != "__input__" for t in e.values() if t.dim() >= 3}
    assert dtypes == {torch.bfloat16}
    assert all(e["x"].dtype == torch.float32 for key, e in entries.items() if key[0] == "__input__")
    # Recomputed, never read: the transformers' GroupNorm and proj_in/proj_out outputs, the VAE resnets' norms and
    # activations (folded into the next conv's gather).
    names = {key[0] for key in entries}
    assert not any(n.endswith(("attentions.0.proj_in", "attentions.0.proj_out")) for n in names)
    assert all("out" not in e for key, e in entries.items() if key[0].endswith("attentions.0.norm"))
    dec = attachment_of(pipe.vae.decoder).state.cache._entries
    resnet_norms = [e for key, e in dec.items() if ".resnets." in key[0] and key[0].endswith(("norm1", "norm2"))]
    assert resnet_norms and all(set(e) == {"mean", "rstd"} for e in resnet_norms)  # statistics only
    assert not any(".resnets." in key[0] and key[0].endswith("nonlinearity") for key in dec)


def test_bf16_default_stays_close_to_a_full_precision_cache(pipe):
    x = photo(96, 96)
    full = SparseEditor(pipe, SparseConfig(input_dilation=2, cache_dtype=None))
    capture(full, x)
    want = full.edit(image=stroke(x), commit=False, output_type="pt").images
    full_bytes = full.cache_bytes["unet"]
    full.remove()
    auto = SparseEditor(pipe, SparseConfig(input_dilation=2))
    capture(auto, x)
    got = auto.edit(image=stroke(x), commit=False, output_type="pt").images
    assert auto.cache_bytes["unet"] < 0.6 * full_bytes
    assert (got - want).abs().max() < 0.02


def test_budget_too_small_raises_before_capturing(pipe):
    editor = SparseEditor(pipe, SparseConfig(cache_budget="64KiB"))
    with pytest.raises(CacheBudgetError, match=r"cache_budget=.*as configured: .*(GiB|MiB)"):
        capture(editor, photo())
    assert editor.current is None and attachment_of(pipe.unet).state.cache.nbytes == 0


def test_budget_fits_by_precision_then_int8_then_disk(pipe):
    x = photo()
    free = SparseEditor(pipe, SparseConfig(cache_dtype=None))
    out = capture(free, x)
    want = free.edit(image=stroke(x), commit=False, output_type="pt").images
    need = int(free.cache_bytes)
    free.remove()
    probe = SparseEditor(pipe, SparseConfig(cache_dtype=None, cache_budget=1))
    with pytest.raises(CacheBudgetError, match="editor.remove") as refused:  # each option's need, by the dry run
        capture(probe, x)
    probe.remove()
    needs = refused.value.needs
    assert needs["as configured"] >= 0.9 * need  # the estimate is close to what the capture then holds
    names = list(needs)
    assert [needs[n] for n in names] == sorted((needs[n] for n in names), reverse=True)  # each rung is smaller
    assert "int8" in names[3] and "disk" in names[4]
    for rung, name in enumerate(names[1:], start=1):
        budget = needs[name] + 1024
        editor = SparseEditor(pipe, SparseConfig(cache_dtype=None, cache_budget=budget))
        assert torch.equal(capture(editor, x), out)  # the capture is still the pipeline's own result
        assert editor.last_stats["budget"]["choice"] == name, (rung, editor.last_stats["budget"])
        resident = int(editor.cache_bytes) - editor.cache_bytes.offloaded
        assert resident <= budget
        got = editor.edit(image=stroke(x), output_type="pt").images  # committed (disk: written back to the files)
        assert (got - want).abs().max() < 0.05
        assert torch.equal(editor.edit(image=stroke(x), output_type="pt").images, got)  # now the committed result
        path = attachment_of(pipe.unet).state.cache._dir
        if "disk" in name:
            assert editor.cache_bytes.offloaded > 0 and path is not None
        editor.remove()
        assert path is None or not os.path.exists(path)


def test_model_level_budget_raises_during_capture():
    import sparsedit
    from sparsedit.demo import UNetLevel

    model = UNetLevel(c=16, groups=4).eval()
    sparsedit.sparsify_(model, SparseConfig(cache_budget=4096))
    with pytest.raises(CacheBudgetError, match="cache_budget"), torch.no_grad(), sparsedit.capturing(model):
        model(torch.randn(1, 3, 32, 32))
    assert attachment_of(model).state.cache.nbytes == 0  # a half-filled cache is dropped


def test_disk_cache_round_trip(tmp_path):
    cache = ActivationCache(storage_device="disk")
    x = torch.randn(2, 5, 7, 3)
    cache.put(("a", 0), out=x)
    assert cache.disk_bytes == x.numel() * 4 and cache.resident_bytes() == 0
    working = cache.get(("a", 0))["out"]
    assert torch.equal(working, x) and working.is_contiguous(memory_format=torch.channels_last)
    working.add_(1)
    cache.flush(commit=False)
    assert torch.equal(cache.get(("a", 0))["out"], x)  # dropped, the file unchanged
    cache.get(("a", 0))["out"].add_(1)
    cache.flush(commit=True)
    assert torch.equal(cache.get(("a", 0))["out"], x + 1)
    cache.clear()


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_edit_is_bit_identical(pipe, tmp_path, mmap):
    x = photo()
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    capture(editor, x)
    editor.edit(image=stroke(x))  # history: one committed edit
    editor.save(tmp_path / "session")
    want = editor.edit(image=stroke(stroke(x), 40, 30), output_type="pt").images
    stats = editor.last_stats
    editor.remove()
    loaded = SparseEditor.load(pipe, tmp_path / "session", mmap=mmap)
    got = loaded.edit(image=stroke(stroke(x), 40, 30), output_type="pt").images
    assert torch.equal(got, want)
    assert loaded.last_stats["macs_sparse"] == stats["macs_sparse"]
    # The file is never written by the edits of a memory-mapped session: load it again, same result.
    loaded.remove()
    again = SparseEditor.load(pipe, tmp_path / "session", mmap=mmap)
    assert torch.equal(again.edit(image=stroke(stroke(x), 40, 30), output_type="pt").images, want)
    again.remove()


def test_load_refuses_a_different_pipeline(pipe, tmp_path):
    x = photo()
    editor = SparseEditor(pipe)
    capture(editor, x)
    editor.save(tmp_path / "s")
    editor.remove()
    weight = next(pipe.text_encoder.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.data.add_(1e-3)  # slips past version counters
    with pytest.raises(StaleCacheError, match="text_encoder"):
        SparseEditor.load(pipe, tmp_path / "s")
    with torch.no_grad():
        weight.data.copy_(saved)
    from diffusers import DDPMScheduler

    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(StaleCacheError, match="scheduler"):
        SparseEditor.load(pipe, tmp_path / "s")
    pipe.scheduler = original
    with pytest.raises(FileNotFoundError, match="editor.save"):
        SparseEditor.load(pipe, tmp_path / "nothing-here")
    # After refusals the pipeline is untouched: a load on the right pipeline works.
    SparseEditor.load(pipe, tmp_path / "s").remove()


def test_gan_save_load(tmp_path):
    model = tiny_spade()
    labels = blob_labels(1, 32, 64, 5, seed=4)
    editor = GANEditor(model)
    editor.capture(labels)
    edited = labels.clone()
    edited[:, 4:10, 8:20] = (labels[:, 4:10, 8:20] + 1) % 5
    editor.save(tmp_path / "gan")
    want = editor.edit(edited)
    editor.remove()
    loaded = GANEditor.load(model, tmp_path / "gan")
    assert torch.equal(loaded.edit(edited), want)
    loaded.remove()
    with torch.no_grad():
        next(model.parameters()).data.mul_(1.01)
    with pytest.raises(StaleCacheError, match="generator"):
        GANEditor.load(model, tmp_path / "gan")


def test_int8_cache_quantizes_maps_and_tokens_per_channel():
    cache = ActivationCache(storage_dtype=torch.int8)
    x = torch.randn(2, 6, 5, 7) * torch.arange(1, 7).float()[None, :, None, None]  # channels of different ranges
    kv = torch.randn(2, 35, 6) * torch.arange(1, 7).float()
    cache.put(("a", 0), out=x, k=kv, mean=torch.randn(2, 3))
    stored = cache._entries[("a", 0)]
    assert stored["out"].dtype == torch.int8 and stored["k"].dtype == torch.int8
    assert stored["mean"].dtype == torch.float32  # statistics keep full precision
    got = cache.get(("a", 0))
    k_err = (got["k"] - kv).abs().amax(dim=(0, 1))
    assert torch.all(k_err <= kv.abs().amax(dim=(0, 1)) / 254 + 1e-6)
    assert got["out"].dtype == torch.float32 and got["out"].is_contiguous(memory_format=torch.channels_last)
    err = (got["out"] - x).abs().amax(dim=(0, 2, 3))
    assert torch.all(err <= x.abs().amax(dim=(0, 2, 3)) / 254 + 1e-6)  # half a step of each channel's scale
    got["out"][:, :, 0, 0] = 100.0  # a committed edit beyond the old range: re-quantized with a new scale
    cache.flush(commit=True)
    assert torch.allclose(cache.get(("a", 0))["out"][:, :, 0, 0], torch.full((2, 6), 100.0), rtol=1e-2)
    with pytest.raises(ValueError, match="exact"):
        SparseConfig(exact=True, cache_dtype="int8")


def test_int8_editor_cache_is_smaller_and_close(pipe, tmp_path):
    x = photo(96, 96)
    auto = SparseEditor(pipe, SparseConfig(input_dilation=2))
    capture(auto, x)
    want = auto.edit(image=stroke(x), commit=False, output_type="pt").images
    auto_bytes = auto.cache_bytes["unet"]
    auto.remove()
    small = SparseEditor(pipe, SparseConfig(input_dilation=2, cache_dtype="int8"))
    capture(small, x)
    got = small.edit(image=stroke(x), commit=False, output_type="pt").images
    assert small.cache_bytes["unet"] < 0.8 * auto_bytes
    assert (got - want).abs().max() < 0.05
    small.save(tmp_path / "int8")  # the scales travel with the session
    small.remove()
    loaded = SparseEditor.load(pipe, tmp_path / "int8")
    assert torch.equal(loaded.edit(image=stroke(x), commit=False, output_type="pt").images, got)


def test_prefetch_gives_the_same_working_copies():
    cache = ActivationCache(storage_dtype=torch.bfloat16)
    maps = {s: torch.randn(1, 4, 6, 6) for s in range(3)}
    for s, x in maps.items():
        cache.put(("conv", 0, s), out=x)
        cache.put(("norm", 0, s), mean=torch.randn(1, 2))
    assert cache.scope_keys((1,)) == [("conv", 0, 1), ("norm", 0, 1)]
    assert cache.prefetch(cache.scope_keys((1,))) == 2
    got = cache.get(("conv", 0, 1))["out"]
    assert torch.equal(got, maps[1].to(torch.bfloat16).float())
    cache.prefetch([("conv", 0, 2)])
    cache.put(("conv", 0, 2), out=maps[0])  # rewritten after the prefetch: the stale copy is never handed out
    assert torch.equal(cache.get(("conv", 0, 2))["out"], maps[0].to(torch.bfloat16).float())
    assert ActivationCache().prefetch([("conv", 0, 1)]) == 0  # nothing to copy for a cache used in place


def test_prefetching_editor_is_bit_identical(pipe):
    x = photo()
    plain = SparseEditor(pipe, SparseConfig(input_dilation=1, prefetch=False))
    capture(plain, x)
    want = plain.edit(image=stroke(x), output_type="pt").images
    plain.remove()
    ahead = SparseEditor(pipe, SparseConfig(input_dilation=1, prefetch=True))
    capture(ahead, x)
    assert torch.equal(ahead.edit(image=stroke(x), output_type="pt").images, want)


def test_a_temporal_session_saves_and_resumes_bit_identically(pipe, tmp_path):
    """Temporal reuse keeps no state between runs, so a session with it saves its config beside the caches; the
    resumed editor reuses features the same way and its next edit is the original editor's, bit for bit."""
    from sparsedit import TemporalConfig, temporal

    x = photo()
    cfg = TemporalConfig(key_steps=[0, 1, 3])
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1), temporal=cfg)
    capture(editor, x)
    editor.edit(image=stroke(x))
    editor.save(tmp_path / "session")
    want = editor.edit(image=stroke(stroke(x), 40, 30), output_type="pt").images
    stats = editor.last_stats
    editor.remove()
    loaded = SparseEditor.load(pipe, tmp_path / "session")
    assert loaded.temporal == cfg
    got = loaded.edit(image=stroke(stroke(x), 40, 30), output_type="pt").images
    assert torch.equal(got, want)
    assert loaded.last_stats["macs_sparse"] == stats["macs_sparse"] < stats["macs_dense"]
    assert temporal.stats(pipe.unet)["reuse_calls"] > 0  # the resumed editor reuses features
    loaded.remove()


# -- all-or-nothing sessions (issue 34) --------------------------------------------------------------------------------
def _saved(pipe, tmp_path, edits=1):
    x = photo()
    editor = SparseEditor(pipe, SparseConfig(input_dilation=1))
    capture(editor, x)
    for i in range(edits):
        editor.edit(image=stroke(x, 10 + 20 * i))
    editor.save(tmp_path / "s")
    return editor, x


def _tensors_file(path):
    (f,) = path.glob("tensors-*.safetensors")
    return f


def test_a_save_killed_before_its_commit_leaves_the_previous_session(pipe, tmp_path, monkeypatch):
    """A save killed between writing the tensors and committing the manifest (fault injection at each step) leaves
    the previous session on disk, loading and editing exactly as before; nothing half-written is ever used."""
    import sparsedit.editors.sessions as session

    editor, x = _saved(pipe, tmp_path)

    def preview(ed):
        return ed.edit(image=stroke(stroke(x), 40, 30), commit=False, output_type="pt").images

    want = preview(editor)
    real_replace = os.replace
    for step in ("tensors", "manifest"):
        editor.edit(image=stroke(stroke(x), 40, 40))  # a committed edit the killed save would have kept

        def killed(src, dst, step=step):
            if (step == "tensors") == str(dst).endswith(".safetensors"):
                raise KeyboardInterrupt(f"killed while committing the {step}")
            return real_replace(src, dst)

        monkeypatch.setattr(session.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            editor.save(tmp_path / "s")
        monkeypatch.setattr(session.os, "replace", real_replace)
        editor.remove()
        editor = SparseEditor.load(pipe, tmp_path / "s")
        assert len(editor.history) == 1  # the previous save's
        assert torch.equal(preview(editor), want)
    editor.edit(image=stroke(stroke(x), 40, 40))
    editor.save(tmp_path / "s")  # a save that completes replaces it and removes the old files
    assert len(list((tmp_path / "s").iterdir())) == 2
    editor.remove()
    assert len(SparseEditor.load(pipe, tmp_path / "s").history) == 2


@pytest.mark.parametrize("damage", ["truncate", "zero_bytes", "edit_guidance", "edit_prompt", "swap_files", "header"])
def test_a_damaged_or_edited_session_is_refused(pipe, tmp_path, damage):
    import json

    from sparsedit.editors.sessions import CorruptSessionError

    editor, x = _saved(pipe, tmp_path)
    path = tmp_path / "s"
    f = _tensors_file(path)
    if damage == "truncate":
        os.truncate(f, f.stat().st_size - 100)
    elif damage == "zero_bytes":  # zeroed bytes in the middle of the data (the decoded image, embeddings, ...)
        with open(f, "r+b") as fh:
            fh.seek(f.stat().st_size // 2)
            fh.write(bytes(64))
    elif damage in ("edit_guidance", "edit_prompt"):
        manifest = json.loads((path / "session.json").read_text())
        if damage == "edit_guidance":
            manifest["capture"]["call"]["guidance_scale"] = 9.0
        else:
            manifest["capture"]["call"]["prompt"] = "a blue house"
        (path / "session.json").write_text(json.dumps(manifest))
    elif damage == "swap_files":  # another session's tensors under this one's name
        editor.edit(image=stroke(stroke(x), 40, 30))
        editor.save(tmp_path / "other")
        os.replace(_tensors_file(tmp_path / "other"), f)
    elif damage == "header":
        with open(f, "r+b") as fh:
            fh.seek(9)
            fh.write(b"#")
    editor.remove()
    with pytest.raises(CorruptSessionError, match=r"corrupt|modified|truncated"):
        SparseEditor.load(pipe, path)
    # The refused load left the pipeline untouched and free for a new editor.
    SparseEditor(pipe).remove()


def test_the_safetensors_header_is_checked_against_the_file(tmp_path):
    import json

    from safetensors.torch import save_file

    from sparsedit.editors.sessions import CorruptSessionError, read_tensors

    f = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(f))
    assert torch.equal(read_tensors(f)["a"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(read_tensors(f, use_mmap=False)["b"], torch.ones(4, dtype=torch.int64))
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for name, change, why in [
        ("shape", {"a": {**header["a"], "shape": [3, 3]}}, "not of its size"),
        ("offsets", {"b": {**header["b"], "data_offsets": [16, 48]}}, "overlap"),
        ("dtype", {"a": {**header["a"], "dtype": "F99"}}, "malformed"),
        ("beyond", {"b": {**header["b"], "data_offsets": [24, 9999]}}, "outside"),
    ]:
        text = json.dumps({**header, **change}).encode()
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
        with pytest.raises(CorruptSessionError, match=why):
            read_tensors(bad)
    (tmp_path / "short").write_bytes(raw[:5])
    with pytest.raises(CorruptSessionError, match="shorter than a header"):
        read_tensors(tmp_path / "short")


def test_a_session_keeps_its_calibration(pipe, tmp_path):
    import sparsedit

    editor, x = _saved(pipe, tmp_path)
    cal = sparsedit.calibration_of(pipe.unet)
    assert cal is not None
    editor.remove()
    sparsedit.calibration.clear()
    loaded = SparseEditor.load(pipe, tmp_path / "s")
    assert sparsedit.calibration_of(pipe.unet) == cal
    loaded.remove()


def test_a_damaged_gan_session_is_refused(tmp_path):
    from sparsedit.editors.sessions import CorruptSessionError

    model = tiny_spade()
    editor = GANEditor(model)
    editor.capture(blob_labels(1, 32, 64, 5, seed=4))
    editor.save(tmp_path / "gan")
    editor.remove()
    f = _tensors_file(tmp_path / "gan")
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size - 10)
        fh.write(b"\x7f" * 4)
    with pytest.raises(CorruptSessionError, match="SHA-256"):
        GANEditor.load(model, tmp_path / "gan")
