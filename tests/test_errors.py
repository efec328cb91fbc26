"""Bad input gets a clear error that says what to do."""

import pytest
import torch
import torch.nn as nn

import sparsedit
from sparsedit import SparseConfig, StaleCacheError, UnsupportedLayerError


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()


def _captured():
    m = _model()
    sparsedit.sparsify_(m, SparseConfig(exact=True))
    x = torch.randn(1, 3, 16, 16)
    with sparsedit.capturing(m):
        m(x)
    return m, x


def test_editing_before_capturing():
    m = _model()
    sparsedit.sparsify_(m)
    with pytest.raises(RuntimeError, match="capturing"):
        with sparsedit.editing(m, region=torch.zeros(16, 16, dtype=torch.bool)):
            pass


def test_not_sparsified():
    with pytest.raises(RuntimeError, match="sparsify_"):
        with sparsedit.capturing(_model()):
            pass


def test_double_sparsify():
    m = _model()
    sparsedit.sparsify_(m)
    with pytest.raises(RuntimeError, match="unsparsify_"):
        sparsedit.sparsify_(m)


def test_input_shape_differs_from_capture():
    m, x = _captured()
    with pytest.raises(StaleCacheError, match="input shape"):
        with sparsedit.editing(m):
            m(torch.randn(1, 3, 16, 17))


def test_weights_changed_since_capture():
    m, x = _captured()
    with torch.no_grad():
        m[0].weight.add_(1)
    with pytest.raises(StaleCacheError, match="weights"):
        with sparsedit.editing(m):
            m(x)


def test_changed_weights_and_an_edit_that_runs_as_the_plain_model():
    """A run that reads cached activations (sparse) or writes them (a committing edit) refuses changed weights; an
    uncommitted edit that runs as the plain model (here: the whole input changed) reads none, and its result is the
    model's output with the weights as they are now."""
    m, x = _captured()
    with torch.no_grad():
        m[0].weight.add_(1)
        x2 = x + 1  # every pixel: over max_region_fraction, one plain dense forward
        with sparsedit.editing(m, commit=False):
            got = m(x2)
        assert sparsedit.last_stats(m)["dense_run"]
        sparsedit.unsparsify_(m)
        want = m(x2)
        assert torch.equal(got, want)
    m, x = _captured()
    with torch.no_grad():
        m[0].weight.add_(1)
        with pytest.raises(StaleCacheError, match="weights"), sparsedit.editing(m, commit=True):
            m(x + 1)
        x3 = x.clone()
        x3[0, :, 3, 3] += 1  # one pixel: sparse
        with pytest.raises(StaleCacheError, match="weights"), sparsedit.editing(m, commit=False):
            m(x3)


def test_region_wrong_shape_dtype_device():
    m, x = _captured()
    with pytest.raises(ValueError, match="region has shape"):
        with sparsedit.editing(m, region=torch.zeros(8, 8, dtype=torch.bool)):
            m(x)
    with pytest.raises(TypeError, match="torch.bool"):
        with sparsedit.editing(m, region=torch.zeros(16, 16)):
            m(x)
    with pytest.raises(ValueError, match="region is on meta"):
        with sparsedit.editing(m, region=torch.zeros(16, 16, dtype=torch.bool, device="meta")):
            m(x)


def test_region_that_misses_a_change():
    m, x = _captured()
    x2 = x.clone()
    x2[0, :, 3, 3] += 1
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[10, 10] = True
    with pytest.raises(ValueError, match="outside `region`"):
        with sparsedit.editing(m, region=region):
            m(x2)


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.AdaptiveAvgPool2d(1), "AdaptiveAvgPool2d has no sparse implementation"),
        (nn.ConvTranspose2d(3, 3, 1, stride=2), "larger than its kernel's reach"),
        (nn.Conv2d(3, 3, 2, padding="same", padding_mode="reflect"), "pads asymmetrically"),
        (nn.Upsample(scale_factor=2, mode="trilinear"), "mode='trilinear'"),
        (nn.MaxPool2d(3, padding=1), "padding=0"),
    ],
)
def test_unsupported_layers(layer, match):
    m = nn.Sequential(nn.Conv2d(3, 3, 1), layer)
    with pytest.raises(UnsupportedLayerError, match=match) as e:
        sparsedit.sparsify_(m)
    assert "strict=False" in str(e.value)
    assert not sparsedit.is_sparsified(m)


def test_unsupported_layer_runs_densely_when_not_strict():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ConvTranspose2d(3, 3, 2, stride=2), nn.Conv2d(3, 3, 1))
    x = torch.randn(1, 3, 8, 8)
    sparsedit.sparsify_(m, SparseConfig(exact=True, strict=False))
    with sparsedit.capturing(m):
        m(x)
    x2 = x.clone()
    x2[0, :, 1, 1] = 5
    with sparsedit.editing(m):
        out = m(x2)
    sparsedit.unsparsify_(m)
    with torch.no_grad():
        torch.testing.assert_close(out, m(x2), rtol=1e-5, atol=1e-6)


def test_batchnorm_in_training_mode():
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))
    m.eval()
    sparsedit.sparsify_(m, SparseConfig(exact=True))
    x = torch.randn(1, 3, 8, 8)
    with sparsedit.capturing(m):
        m(x)
    m.train()
    with pytest.raises(StaleCacheError, match="training"):
        with sparsedit.editing(m):
            m(x)


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="norm_stats"):
        SparseConfig(norm_stats="live")
    with pytest.raises(ValueError, match="tile_size"):
        SparseConfig(tile_size=0)
    cfg = SparseConfig(exact=True, tile_size={64: 8, 0: 4})
    assert SparseConfig.from_json(cfg.to_json()) == cfg
    assert cfg.tile_for(64) == 8 and cfg.tile_for(7) == 4
    with pytest.raises(ValueError, match="unknown fields"):
        SparseConfig.from_dict({"exactly": True})
    with pytest.raises(ValueError, match="newer"):
        SparseConfig.from_dict({"version": 99})


def test_failed_capture_leaves_no_cache():
    m = _model()
    sparsedit.sparsify_(m)
    with pytest.raises(RuntimeError, match="boom"):
        with sparsedit.capturing(m):
            m(torch.randn(1, 3, 16, 16))
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="Nothing has been captured"):
        with sparsedit.editing(m):
            pass


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_a_diffusion_transformer_without_a_handler_is_refused_by_name(family):
    """Before: `sparsify_` accepted an SD3 transformer, ran its blocks densely and reported fewer MACs than it
    computed (the records skip what no handler ran). SD3, FLUX.1 and FLUX.2 have their handlers now (tests/adapters/); families
    without one are refused."""
    diffusers = pytest.importorskip("diffusers")
    if family == "pixart":
        model = diffusers.PixArtTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8,
                                                   num_attention_heads=2, in_channels=4, out_channels=8,
                                                   cross_attention_dim=16, caption_channels=16)  # fmt: skip
        name = "PixArtTransformer2DModel"
    else:
        model = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                                                 cross_attention_head_dim=8, cross_attention_dim=16,
                                                 caption_channels=16, sample_size=8)  # fmt: skip
        name = "SanaTransformer2DModel"
    with pytest.raises(UnsupportedLayerError, match=f"<root>: {name} .* no token-sparse handler registered"):
        sparsedit.sparsify_(model)
    with pytest.raises(UnsupportedLayerError, match=name):
        sparsedit.sparsify_(model, SparseConfig(strict=False))
    assert not sparsedit.is_sparsified(model)
