"""Temporal reuse (Faster Diffusion's encoder propagation, DeepCache's deep reuse) on tiny offline models."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor, TemporalConfig, temporal
from sparsedit.config import PAPER_KEY_STEPS

from .sd_fixtures import tiny_sd


diffusers = pytest.importorskip("diffusers")
SCHEDULERS = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
]


# -- the schedule -----------------------------------------------------------------------------------------------------
def test_presets_are_the_papers_at_their_step_counts():
    assert TemporalConfig(key_steps="ddim50").key_steps_for(50) == list(PAPER_KEY_STEPS["ddim50"][1])
    assert TemporalConfig(key_steps="dpm20").key_steps_for(20) == [0, 1, 2, 3, 5, 10, 15]
    assert TemporalConfig().key_steps_for(50) == [0, 1, 2, 3, 5, 10, 15, 25, 35]  # auto
    assert TemporalConfig().key_steps_for(20) == [0, 1, 2, 3, 5, 10, 15]
    assert TemporalConfig().key_steps_for(10) == [0, 1, 2, 3, 5, 8]  # rescaled, the first four kept
    assert TemporalConfig(key_steps="ddim50").key_steps_for(100) == [0, 1, 2, 3, 10, 20, 30, 50, 70]
    assert TemporalConfig(every=3).key_steps_for(10) == [0, 3, 6, 9]
    assert TemporalConfig(key_steps=[4, 0, 2, 2]).key_steps_for(3) == [0, 2]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"key_steps": [1, 2]}, "step 0"),
        ({"key_steps": "ddim"}, "auto"),
        ({"reuse": "shallow"}, "reuse"),
        ({"reuse": "deep", "parallel": True}, "latent"),
        ({"every": 0}, "every"),
        ({"skip_level": -1}, "skip_level"),
        ({"prior_noise": -1.0}, "prior_noise"),
    ],
)
def test_bad_configs_say_what_is_wrong(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TemporalConfig(**kwargs)


def test_config_round_trips_through_json():
    cfg = TemporalConfig(key_steps=[0, 4, 8], reuse="encoder+deep", skip_level=2, parallel=True, prior_noise=0.0)
    assert TemporalConfig.from_json(cfg.to_json()) == cfg


# -- pipelines ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok"), "txt2img")


def _generate(pipe, steps, guidance, **kw):
    return pipe("a red house", num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip


class Counter:
    """Counts real executions of a module (its own forward, not a reuse hook's)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


def _counters(unet):
    return {
        "encoder": Counter(unet.down_blocks[0].resnets[0].conv1),
        "mid": Counter(unet.mid_block.resnets[0].conv1),
        "decoder": Counter(unet.up_blocks[-1].resnets[-1].conv1),
        "deep decoder": Counter(unet.up_blocks[0].resnets[0].conv1),
    }


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_schedulers_and_guidance(sd, scheduler, guidance):
    pipe = sd
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    steps = 10
    dense = _generate(pipe, steps, guidance)
    # Every step a key step: bit-identical to dense.
    temporal.enable(pipe, TemporalConfig(every=1))
    assert torch.equal(_generate(pipe, steps, guidance), dense)
    temporal.disable(pipe)
    # The paper's schedule: the encoder runs on the key steps only, the decoder on every step.
    cfg = TemporalConfig()
    keys = cfg.key_steps_for(steps)
    temporal.enable(pipe, cfg)
    count = _counters(pipe.unet)
    sequential = _generate(pipe, steps, guidance)
    assert (count["encoder"].n, count["mid"].n, count["decoder"].n) == (len(keys), len(keys), steps)
    assert temporal.stats(pipe.unet)["key_steps"] == keys
    assert not torch.equal(sequential, dense)
    assert (sequential - dense).abs().max() < 0.2
    temporal.disable(pipe)
    # Parallel decoding: the same predictions, batched (decoder calls: key steps + one per run of non-key steps).
    temporal.enable(pipe, TemporalConfig(parallel=True))
    for c in count.values():
        c.n = 0
    parallel = _generate(pipe, steps, guidance)
    runs = sum(1 for i in range(1, steps) if i not in keys and i - 1 in keys)
    assert count["encoder"].n == len(keys) and count["decoder"].n == len(keys) + runs
    torch.testing.assert_close(parallel, sequential, atol=1e-5, rtol=1e-5)
    temporal.disable(pipe)
    for c in count.values():
        c.handle.remove()
    assert torch.equal(_generate(pipe, steps, guidance), dense)  # disable restores the pipeline exactly
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_bfloat16(tmp_path):
    pipe = tiny_sd(tmp_path, "txt2img", dtype=torch.bfloat16)
    dense = _generate(pipe, 10, 7.5)
    temporal.enable(pipe, TemporalConfig(every=1))
    assert torch.equal(_generate(pipe, 10, 7.5), dense)
    temporal.disable(pipe)
    temporal.enable(pipe, TemporalConfig())
    sequential = _generate(pipe, 10, 7.5)
    temporal.disable(pipe)
    temporal.enable(pipe, TemporalConfig(parallel=True))
    parallel = _generate(pipe, 10, 7.5)
    temporal.disable(pipe)
    assert sequential.dtype == torch.bfloat16 and not torch.equal(sequential, dense)
    torch.testing.assert_close(parallel.float(), sequential.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("steps", [20, 50])
def test_step_counts(sd, steps):
    pipe = sd
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    dense = _generate(pipe, steps, 7.5)
    temporal.enable(pipe, TemporalConfig(every=1))
    assert torch.equal(_generate(pipe, steps, 7.5), dense)
    temporal.disable(pipe)
    temporal.enable(pipe, TemporalConfig())
    count = _counters(pipe.unet)
    _generate(pipe, steps, 7.5)
    assert count["encoder"].n == len(PAPER_KEY_STEPS["ddim50" if steps == 50 else "dpm20"][1])
    temporal.disable(pipe)
    for c in count.values():
        c.handle.remove()


@pytest.mark.parametrize("reuse", ["deep", "encoder+deep"])
def test_deep_reuse_runs_only_the_shallow_branch(sd, reuse):
    pipe = sd
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    dense = _generate(pipe, 9, 7.5)
    cfg = TemporalConfig(every=3, reuse=reuse, skip_level=0)
    temporal.enable(pipe, cfg)
    count = _counters(pipe.unet)
    out = _generate(pipe, 9, 7.5)
    # Skip level 0: only conv_in's branch (conv_in and the last decoder layer) runs at non-key steps.
    assert count["decoder"].n == 9 and count["deep decoder"].n == 3 and count["mid"].n == 3
    assert count["encoder"].n == 3  # down block 0's first layer makes skip connection 1: reused
    assert 0 < (out - dense).abs().max() < 0.5
    if reuse == "encoder+deep":
        temporal.disable(pipe)
        temporal.enable(pipe, TemporalConfig(every=3, reuse=reuse, skip_level=0, parallel=True))
        torch.testing.assert_close(_generate(pipe, 9, 7.5), out, atol=1e-5, rtol=1e-5)
    temporal.disable(pipe)
    for c in count.values():
        c.handle.remove()
    assert torch.equal(_generate(pipe, 9, 7.5), dense)


def test_prior_noise_injection(sd):
    pipe = sd
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    temporal.enable(pipe, TemporalConfig(prior_noise=0.0))
    plain = _generate(pipe, 10, 7.5)
    temporal.disable(pipe)
    temporal.enable(pipe, TemporalConfig(prior_noise=0.5, prior_noise_below=1001))
    injected = _generate(pipe, 10, 7.5)
    temporal.disable(pipe)
    assert (injected - plain).abs().max() > 1e-3


def test_the_step_comes_from_the_pipelines_loop(tmp_path):
    pipe = tiny_sd(tmp_path, "img2img")
    temporal.enable(pipe, TemporalConfig())
    pipe("a red house", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=10, output_type="pt")
    s = temporal.stats(pipe.unet)
    assert s["total_steps"] == 5 and s["key_steps"] == TemporalConfig().key_steps_for(5)
    assert s["key_calls"] + s["reuse_calls"] == 5
    # the kept features: the mid block's output and the encoder's skip connections, at least one latent-sized map
    assert s["kept_bytes"] >= 4 * 2 * 8 * 8 * 4
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(RuntimeError, match="scheduler was replaced"):
        pipe("a red house", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=10)
    temporal.disable(pipe)


def test_apply_twice_and_misuse_say_how_to_fix(sd):
    temporal.apply_encoder_propagation(sd.unet, TemporalConfig(every=2))
    with pytest.raises(RuntimeError, match="remove_encoder_propagation"):
        temporal.apply_encoder_propagation(sd.unet)
    temporal.remove_encoder_propagation(sd.unet)
    with pytest.raises(RuntimeError, match="not applied"):
        temporal.remove_encoder_propagation(sd.unet)
    with pytest.raises(NotImplementedError, match="supports"):
        temporal.apply_encoder_propagation(torch.nn.Conv2d(3, 3, 3))


# -- model level: DDPM UNet2DModel, DiT-family transformers ---------------------------------------------------------
def _model_loop(model, x, ts, **kw):
    out = []
    for t in ts:
        y = model(x, timestep=torch.tensor([t] * x.shape[0]), **kw)
        out.append(y.sample)
    return torch.stack(out)


def test_unet2d_ddpm():
    from sparsedit.demo import sdedit_pipeline

    torch.manual_seed(0)
    pipe = sdedit_pipeline(32)
    pipe.set_progress_bar_config(disable=True)
    dense = pipe(num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(0)).images
    temporal.enable(pipe, TemporalConfig(every=1))
    same = pipe(num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(0)).images
    temporal.disable(pipe)
    assert (same == dense).all()
    # Model level: the step from the timestep argument, every 2nd a key step.
    unet, x = pipe.unet, torch.randn(2, 3, 32, 32)
    ts = [900, 700, 500, 300, 100, 50]
    ref = _model_loop(unet, x, ts)
    temporal.apply_encoder_propagation(unet, TemporalConfig(every=2))
    count = Counter(unet.down_blocks[0].resnets[0].conv1)
    got = _model_loop(unet, x, ts)
    got_again = _model_loop(unet, x, ts)  # a larger timestep starts a new generation
    temporal.remove_encoder_propagation(unet)
    assert count.n == 6
    assert torch.equal(got[0::2], ref[0::2]) and not torch.equal(got[1::2], ref[1::2])
    assert torch.equal(got_again, got)
    assert torch.equal(_model_loop(unet, x, ts), ref)


def test_model_level_preset_needs_the_step_count(sd):
    temporal.apply_encoder_propagation(sd.unet, TemporalConfig())
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with pytest.raises(RuntimeError, match="num_inference_steps"):
        sd.unet(x, 900, encoder_hidden_states=emb)
    temporal.remove_encoder_propagation(sd.unet)
    temporal.apply_encoder_propagation(sd.unet, TemporalConfig(), num_inference_steps=10)
    for t in [900, 800, 700, 600, 500]:
        sd.unet(x, t, encoder_hidden_states=emb)
    assert temporal.stats(sd.unet)["reuse_calls"] == 1  # step 4 of 10 is not a key step
    temporal.remove_encoder_propagation(sd.unet)


def _dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=7, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8,
    ).eval()  # fmt: skip


def _pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=7, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("family", ["dit", "pixart"])
@pytest.mark.parametrize("reuse", ["encoder", "deep"])
def test_dit_family(family, reuse):
    model = _dit() if family == "dit" else _pixart()
    x = torch.randn(2, 4, 8, 8)
    kw = {"class_labels": torch.tensor([1, 2])} if family == "dit" else {
        "encoder_hidden_states": torch.randn(2, 5, 12), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}
    }  # fmt: skip
    ts = [900, 700, 500, 300]
    with torch.no_grad():
        ref = _model_loop(model, x, ts, **kw)
        temporal.apply_encoder_propagation(model, TemporalConfig(every=1, reuse=reuse))
        assert torch.equal(_model_loop(model, x, ts, **kw), ref)
        temporal.remove_encoder_propagation(model)
        temporal.apply_encoder_propagation(model, TemporalConfig(every=2, reuse=reuse, skip_level=0))
        # 7 blocks: encoder = the first round(7 * 18 / 28) = 4; deep, skip level 0: blocks 1..5 reuse their residual.
        first, encoder_last = Counter(model.transformer_blocks[0].attn1), Counter(model.transformer_blocks[3].attn1)
        last = Counter(model.transformer_blocks[6].attn1)
        got = _model_loop(model, x, ts, **kw)
        temporal.remove_encoder_propagation(model)
    assert (first.n, encoder_last.n, last.n) == ((2, 2, 4) if reuse == "encoder" else (4, 2, 4))
    assert torch.equal(got[0::2], ref[0::2])
    assert 0 < (got[1::2] - ref[1::2]).abs().max() < 1.0
    with torch.no_grad():
        assert torch.equal(_model_loop(model, x, ts, **kw), ref)


def test_dit_rejects_encoder_plus_deep():
    with pytest.raises(ValueError, match="skip connections"):
        temporal.apply_encoder_propagation(_dit(), TemporalConfig(reuse="encoder+deep"))


def test_parallel_needs_the_coming_timesteps():
    model = _dit()
    temporal.apply_encoder_propagation(model, TemporalConfig(every=3, parallel=True))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="enable"):
        _model_loop(model, x, [900, 800], class_labels=torch.tensor([1]))
    temporal.remove_encoder_propagation(model)


# -- composition with sparse edits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TemporalConfig(), TemporalConfig(every=3, reuse="deep", skip_level=1)])
def test_sparse_edits_reuse_across_steps(tmp_path, cfg):
    pipe = tiny_sd(tmp_path, "img2img")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 128, 128, generator=g)
    x_edit = x.clone()
    x_edit[..., 16:40, 72:104] = 0.9
    kw = {"prompt": "a red house", "num_inference_steps": 10, "strength": 0.8, "output_type": "pt"}
    dense0 = pipe(image=x, generator=torch.Generator().manual_seed(3), **kw).images
    temporal.enable(pipe, cfg)
    want0 = pipe(image=x, generator=torch.Generator().manual_seed(3), **kw).images
    want1 = pipe(image=x_edit, generator=torch.Generator().manual_seed(3), **kw).images
    temporal.disable(pipe)
    plain = SparseEditor(pipe, SparseConfig(input_dilation=1))
    plain.capture(image=x, generator=torch.Generator().manual_seed(3), **kw)
    plain.edit(image=x_edit, output_type="pt", commit=False)
    plain_macs = plain.last_stats["macs_sparse"]
    plain.remove()

    editor = SparseEditor(pipe, SparseConfig(input_dilation=1), temporal=cfg)
    got0 = editor.capture(image=x, generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(got0, want0)  # the capture is the pipeline's own result with the same reuse
    got1 = editor.edit(image=x_edit, output_type="pt").images
    stats = editor.last_stats
    assert temporal.stats(pipe.unet)["reuse_calls"] > 0
    outside = ~editor.last_region[0]
    assert torch.equal(got1[..., outside], got0[..., outside])  # the background is the capture's, bit for bit
    assert (got1 - want1).abs().max() < 0.05  # against the dense generation with the same reuse
    assert stats["macs_sparse"] < plain_macs  # the two savings multiply
    assert stats["macs_sparse"] < 0.6 * stats["macs_dense"]
    editor.remove()
    assert torch.equal(pipe(image=x, generator=torch.Generator().manual_seed(3), **kw).images, dense0)


def test_editor_rejects_parallel_and_a_second_attachment(tmp_path):
    pipe = tiny_sd(tmp_path, "img2img")
    with pytest.raises(ValueError, match="parallel=False"):
        SparseEditor(pipe, temporal=TemporalConfig(parallel=True))
    temporal.enable(pipe, TemporalConfig())
    with pytest.raises(RuntimeError, match="temporal.disable"):
        SparseEditor(pipe, temporal=TemporalConfig())
    temporal.disable(pipe)
