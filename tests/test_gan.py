"""Conditional GANs: SPADE (GauGAN) and pix2pix generators, exact sparse label edits, checkpoints, bad inputs."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedit
from sparsedit import GANEditor, SparseConfig
from sparsedit.models import Pix2PixGenerator, SPADEGenerator, encode_labels, fold_spectral_norm, instance_edges


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics (and affines), so BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
    return model.eval()


def tiny_spade(num_upsampling_layers="normal", use_instance=True, size=(32, 64), classes=5, norm="batch", seed=0):
    torch.manual_seed(seed)
    g = SPADEGenerator(label_nc=classes, size=size, ngf=4, num_upsampling_layers=num_upsampling_layers,
                       use_instance=use_instance, hidden=8, param_free_norm=norm)  # fmt: skip
    return randomize_norms(g, seed)


def blob_labels(b, h, w, classes, seed):
    """Label maps made of a few rectangles of random classes (layouts like a scene's, not per-pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (b, 1, 1), generator=g).expand(b, h, w).clone()
    for _ in range(6):
        y, x = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
        dy, dx = int(torch.randint(1, h // 2, (1,), generator=g)), int(torch.randint(1, w // 2, (1,), generator=g))
        labels[:, y : y + dy, x : x + dx] = int(torch.randint(0, classes, (1,), generator=g))
    return labels


@st.composite
def label_edits(draw, labels: torch.Tensor, classes: int):
    """An edited copy of `labels`: a few blobs repainted with another class, possibly on the border."""
    b, h, w = labels.shape
    new = labels.clone()
    for _ in range(draw(st.integers(1, 3))):
        bi = draw(st.integers(0, b - 1))
        where = draw(st.sampled_from(["inside", "top", "left", "bottom-right"]))
        dy, dx = draw(st.integers(1, max(1, h // 4))), draw(st.integers(1, max(1, w // 4)))
        if where == "top":
            y, x = 0, draw(st.integers(0, w - 1))
        elif where == "left":
            y, x = draw(st.integers(0, h - 1)), 0
        elif where == "bottom-right":
            y, x = h - dy, w - dx
        else:
            y, x = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        new[bi, y : y + dy, x : x + dx] = draw(st.integers(0, classes - 1))
    return new


def influence(model, x, region):
    """Output pixels an input change in `region` can reach (NaN in, see where NaN comes out)."""
    probe = x.clone()
    probe.masked_fill_(region[:, None].expand_as(x), float("nan"))
    with torch.no_grad():
        return torch.isnan(model(probe)).any(dim=1)


def check_exact(model, editor, labels, edited, instance=None, new_instance=None, atol=2e-5):
    """Sparse edit == dense generator (float tolerance); pixels the change cannot reach == the capture, bit for bit."""
    with torch.no_grad():
        x0, x1 = model.encode(labels, instance), model.encode(edited, new_instance)
    captured = editor.capture(labels, instance)
    out = editor.edit(edited, new_instance, commit=False)
    sparsedit.unsparsify_(model)
    with torch.no_grad():
        dense = model(x1)
        assert torch.equal(model(x0), captured)
    changed = (x0 != x1).any(1)
    reach = influence(model, x0, changed)
    sparsedit.sparsify_(model, editor.config)  # leave the editor usable for the caller
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=atol)
    outside = ~reach[:, None].expand_as(out)
    assert torch.equal(out[outside], captured[outside])
    return editor.last_stats


@settings(max_examples=20)
@given(data=st.data())
def test_spade_exact_random_edits(data):
    ups = data.draw(st.sampled_from(["normal", "more", "most"]), label="upsampling")
    use_instance = data.draw(st.booleans(), label="instance")
    b = data.draw(st.integers(1, 2), label="batch")
    size = (32, 64) if ups == "normal" else (64, 128) if ups == "more" else (128, 128)
    model = tiny_spade(ups, use_instance, size=size, seed=data.draw(st.integers(0, 100), label="seed"))
    labels = blob_labels(b, *size, 5, seed=data.draw(st.integers(0, 1000), label="labels"))
    edited = data.draw(label_edits(labels, 5), label="edit")
    instance = labels * 3 if use_instance else None  # instances follow classes: edges where the label changes
    new_instance = edited * 3 if use_instance else None
    tile = data.draw(st.sampled_from([2, 4, 8]), label="tile")
    editor = GANEditor(model, SparseConfig(exact=True, tile_size=tile, poison_scratch=True))
    stats = check_exact(model, editor, labels, edited, instance, new_instance)
    if stats["macs_sparse"]:
        assert stats["macs_sparse"] <= stats["macs_dense"]
    editor.remove()


def test_spade_small_edit_saves_work_and_commits():
    model = tiny_spade("more", size=(64, 128))
    labels = blob_labels(1, 64, 128, 5, seed=1)
    editor = GANEditor(model)
    assert editor.exact
    editor.capture(labels)
    first = labels.clone()
    first[:, 20:26, 30:38] = (labels[:, 20:26, 30:38] + 1) % 5
    editor.edit(first)
    stats = editor.last_stats
    assert 0 < stats["region_fraction"] < 0.01
    assert stats["macs_sparse"] < stats["macs_dense"] / 2, stats
    second = first.clone()
    second[:, 40:44, 100:110] = 2
    out = editor.edit(second)  # incremental against the committed first edit
    editor.remove()
    with torch.no_grad():
        torch.testing.assert_close(out, model(second), rtol=1e-5, atol=2e-5)
    # an unchanged label map returns the current image without computing anything
    editor = GANEditor(model)
    image = editor.capture(second)
    assert torch.equal(editor.edit(second), image) and editor.last_stats["macs_sparse"] == 0


def test_spade_uncommitted_edit_leaves_the_cache():
    model = tiny_spade()
    labels = blob_labels(1, 32, 64, 5, seed=2)
    editor = GANEditor(model)
    captured = editor.capture(labels)
    edited = labels.clone()
    edited[:, :8, :8] = 4
    editor.edit(edited, commit=False)
    again = labels.clone()
    again[:, -5:, -9:] = 1
    out = editor.edit(again)
    editor.remove()
    with torch.no_grad():
        torch.testing.assert_close(out, model(again), rtol=1e-5, atol=2e-5)
        assert torch.equal(model(labels), captured)


def test_spade_bf16():
    model = tiny_spade().to(torch.bfloat16)
    labels = blob_labels(1, 32, 64, 5, seed=3)
    edited = labels.clone()
    edited[:, 10:16, 20:30] = 0
    editor = GANEditor(model)
    editor.capture(labels)
    out = editor.edit(edited)
    editor.remove()
    with torch.no_grad():
        dense = model(edited)
    assert out.dtype == torch.bfloat16
    # tiles and the full map sum in different orders: a few bf16 ulps of the [-1, 1] output
    assert (out.float() - dense.float()).abs().max() < 0.05


def test_spade_instance_norm_is_approximate_and_bounded():
    model = tiny_spade(norm="instance")
    editor = GANEditor(model)
    assert not editor.exact and not editor.last_stats.get("exact", False)
    labels = blob_labels(1, 32, 64, 5, seed=4)
    edited = labels.clone()
    edited[:, 12:18, 20:28] = (labels[:, 12:18, 20:28] + 2) % 5
    editor.capture(labels)
    out = editor.edit(edited)
    assert editor.last_stats["exact"] is False
    editor.remove()
    with torch.no_grad():
        dense = model(edited)
    err = (out - dense).abs()
    assert err.max() < 0.5 and err.mean() < 0.05, (err.max(), err.mean())


def test_remove_restores_bit_identical_outputs():
    model = tiny_spade()
    labels = blob_labels(2, 32, 64, 5, seed=5)
    with torch.no_grad():
        before = model(labels)
    editor = GANEditor(model)
    editor.capture(labels)
    editor.edit(torch.zeros_like(labels))
    editor.remove()
    with torch.no_grad():
        assert torch.equal(model(labels), before)


# -- pix2pix -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,size", [("unet_128", 128), ("unet_256", 256), ("resnet_6blocks", 128), ("resnet_9blocks", 48)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_pix2pix_batchnorm_exact(kind, size, seed):
    torch.manual_seed(seed)
    model = randomize_norms(Pix2PixGenerator(kind, input_nc=4, ngf=2, num_classes=4), seed)
    labels = blob_labels(1, size, size, 4, seed=seed)
    edited = labels.clone()
    edited[:, 5:9, size - 11 : size - 3] = (labels[:, 5:9, size - 11 : size - 3] + 1) % 4
    editor = GANEditor(model, SparseConfig(exact=True, tile_size=4, poison_scratch=True))
    stats = check_exact(model, editor, labels, edited)
    assert stats["macs_sparse"] <= stats["macs_dense"]
    if kind == "resnet_6blocks":  # a local receptive field (about 60 px here): a small edit is cheaper
        assert stats["macs_sparse"] < 0.6 * stats["macs_dense"], stats
    editor.remove()


def test_pix2pix_instance_norm_is_approximate_and_bounded():
    torch.manual_seed(0)
    model = Pix2PixGenerator("resnet_6blocks", ngf=4, norm="instance", use_dropout=False).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    edited = x.clone()
    edited[:, :, 20:28, 30:40] = 0.8
    editor = GANEditor(model)
    assert not editor.exact
    captured = editor.capture(x)
    out = editor.edit(edited)
    stats = editor.last_stats
    editor.remove()
    with torch.no_grad():
        dense = model(edited)
    assert stats["macs_sparse"] < stats["macs_dense"] and stats["exact"] is False
    # With random weights a local change moves the instance statistics, and so the whole image, a little: the
    # frozen-statistics edit gets the edited region mostly right and leaves the far field as captured.
    err, stale = (out - dense).abs().amax(1)[0], (captured - dense).abs().amax(1)[0]
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[20:28, 30:40] = True
    assert err[inside].mean() < 0.5 * stale[inside].mean(), (err[inside].mean(), stale[inside].mean())
    assert err.mean() < stale.mean() and err.max() < 0.6, (err.mean(), stale.mean(), err.max())


# -- checkpoints ---------------------------------------------------------------------------------------------------------
def _official_spade(model: SPADEGenerator) -> nn.Module:
    """The model as the SPADE project builds it: spectral norm on every block's conv_0, conv_1 and conv_s."""
    official = copy.deepcopy(model)
    for block in official.modules():
        if type(block).__name__ == "SPADEResnetBlock":
            for name in ("conv_0", "conv_1", "conv_s"):
                if hasattr(block, name):
                    setattr(block, name, nn.utils.spectral_norm(getattr(block, name)))
    return official.eval()


def test_spade_loads_official_checkpoint_keys():
    model = tiny_spade("more", size=(64, 128))
    official = _official_spade(model)
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = official.state_dict()
    assert "head_0.conv_0.weight_orig" in state and "head_0.conv_0.weight_u" in state
    assert "up_0.conv_s.weight_orig" in state and "up_0.conv_s.bias" not in state
    assert "head_0.norm_0.param_free_norm.running_mean" in state
    assert "up_3.norm_1.mlp_shared.0.weight" in state and "up_3.norm_1.mlp_gamma.weight" in state
    state = {"module." + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    fresh = SPADEGenerator(label_nc=5, size=(64, 128), ngf=4, num_upsampling_layers="more", hidden=8).eval()
    fresh.load_state_dict(state)
    labels = blob_labels(1, 64, 128, 5, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(labels), official(labels), rtol=1e-5, atol=1e-6)


def test_fold_spectral_norm_parametrizations_form():
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
    conv.eval()
    state = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    folded = fold_spectral_norm(state)
    assert set(folded) == {"conv.weight", "conv.bias"}
    torch.testing.assert_close(folded["conv.weight"], conv.weight, rtol=1e-6, atol=1e-7)


def test_spade_vae_checkpoint_is_refused():
    model = tiny_spade()
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(16, 8)
    with pytest.raises(ValueError, match="VAE"):
        model.load_state_dict(state)


def test_spade_cityscapes_configuration():
    g = SPADEGenerator.cityscapes()
    assert (g.semantic_nc, g.size, (g.sh, g.sw)) == (36, (256, 512), (4, 8))
    assert g.fc.weight.shape == (1024, 36, 3, 3)
    assert g.up_3.conv_1.weight.shape == (64, 64, 3, 3) and g.conv_img.weight.shape == (3, 64, 3, 3)
    assert g.head_0.norm_0.mlp_shared[0].weight.shape == (128, 36, 3, 3)
    assert not hasattr(g, "up_4")
    assert SPADEGenerator.cityscapes(use_instance=False).semantic_nc == 35


def test_pix2pix_official_key_names():
    unet = Pix2PixGenerator("unet_256", ngf=8).state_dict()
    assert unet["model.model.0.weight"].shape == (8, 3, 4, 4) and "model.model.0.bias" not in unet
    assert unet["model.model.3.weight"].shape == (16, 3, 4, 4) and "model.model.3.bias" in unet
    inner = "model.model.1" + ".model.3" * 6 + ".model"  # the innermost of the 8 levels
    assert unet[inner + ".1.weight"].shape == (64, 64, 4, 4)  # innermost downconv
    assert unet[inner + ".3.weight"].shape == (64, 64, 4, 4)  # innermost upconv
    assert unet[inner + ".4.running_var"].shape == (64,)
    res = Pix2PixGenerator("resnet_9blocks", ngf=8).state_dict()
    assert res["model.1.weight"].shape == (8, 3, 7, 7)
    assert res["model.10.conv_block.1.weight"].shape == (32, 32, 3, 3)
    assert res["model.10.conv_block.6.weight"].shape == (32, 32, 3, 3)  # after the dropout
    assert res["model.19.weight"].shape == (32, 16, 3, 3) and res["model.26.weight"].shape == (3, 8, 7, 7)
    inst = Pix2PixGenerator("resnet_6blocks", ngf=8, norm="instance", use_dropout=False)
    state = inst.state_dict()
    assert "model.1.bias" in state and "model.2.running_mean" not in state
    # checkpoints from torch < 0.4 carry InstanceNorm running statistics: dropped on load
    old = dict(state, **{"module.model.2.running_mean": torch.zeros(8)})
    old = {k if k.startswith("module.") else "module." + k: v for k, v in old.items()}
    inst.load_state_dict(old)


def test_checkpoint_round_trip_from_file(tmp_path):
    official = _official_spade(tiny_spade())
    torch.save(official.state_dict(), tmp_path / "latest_net_G.pth")
    config = {"label_nc": 5, "size": (32, 64), "ngf": 4, "num_upsampling_layers": "normal", "hidden": 8}
    loaded = SPADEGenerator.from_checkpoint(tmp_path / "latest_net_G.pth", config=config)
    labels = blob_labels(1, 32, 64, 5, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(labels), official(labels), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="download"):
        SPADEGenerator.from_checkpoint(tmp_path / "missing.pth", config=config)


# -- inputs ------------------------------------------------------------------------------------------------------------
def test_encode_labels_and_edges():
    labels = torch.tensor([[0, 0, 2], [1, 1, 2]])
    x = encode_labels(labels, 3, instance=labels, instance_channel=True)
    assert x.shape == (1, 4, 2, 3) and torch.equal(x[0, :3].argmax(0), labels)
    assert instance_edges(labels)[0, 0].tolist() == [[1, 1, 1], [1, 1, 1]]
    corner = torch.tensor([[0, 0, 0], [0, 0, 1]])
    assert instance_edges(corner)[0, 0].tolist() == [[0, 0, 1], [0, 1, 1]]  # both sides of each boundary
    flat = torch.zeros(1, 4, 4, dtype=torch.long)
    assert instance_edges(flat).sum() == 0


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.full((1, 32, 64), 5), ValueError, "class id 5"),
        (torch.full((1, 32, 64), -1), ValueError, "class id -1"),
        (torch.zeros(1, 16, 64, dtype=torch.long), ValueError, "16x64"),
        (torch.zeros(1, 32, 64, dtype=torch.bool), TypeError, "integer class ids"),
        (torch.zeros(1, 5, 32, 64), ValueError, "one-hot"),
        (torch.zeros(1, 1, 32, 64, dtype=torch.long), ValueError, r"\[B, H, W\]"),
    ],
)
def test_bad_label_maps(bad, error, match):
    model = tiny_spade()
    with pytest.raises(error, match=match):
        model(bad)
    editor = GANEditor(model)
    with pytest.raises(error, match=match):
        editor.capture(bad)


def test_editor_errors():
    model = tiny_spade()
    editor = GANEditor(model)
    labels = blob_labels(1, 32, 64, 5, seed=0)
    with pytest.raises(RuntimeError, match="capture"):
        editor.edit(labels)
    editor.capture(labels)
    with pytest.raises(ValueError, match="batch size"):
        editor.edit(blob_labels(2, 32, 64, 5, seed=0))
    edited = labels.clone()
    edited[:, 0, 0] = (labels[:, 0, 0] + 1) % 5
    with pytest.raises(ValueError, match="outside `region`"):
        editor.edit(edited, region=torch.zeros(32, 64, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="already has a GANEditor"):
        GANEditor(model)
    with pytest.raises(TypeError, match="float images"):
        Pix2PixGenerator("unet_128", ngf=2)(torch.zeros(1, 128, 128, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by 128"):
        Pix2PixGenerator("unet_128", ngf=2)(torch.zeros(1, 3, 100, 128))
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        editor.edit(edited)
