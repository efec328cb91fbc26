"""Prompt edits (FISEdit) on tiny offline Stable Diffusion pipelines: txt2img and img2img."""

import pytest
import torch

from sparsedit import SparseConfig, SparseEditor, StaleCacheError, TextEditConfig, textedit

from .sd_fixtures import tiny_sd


pytest.importorskip("diffusers")
SIZE = {"height": 128, "width": 128}
STEPS = 6
ENGINE = SparseConfig(input_dilation=1, tile_size=4)


def seed(n=1):
    return torch.Generator().manual_seed(n)


@pytest.fixture
def txt2img(tmp_path):
    return tiny_sd(tmp_path, "txt2img", unet_channels=(32, 64, 64))


@pytest.fixture
def img2img(tmp_path):
    return tiny_sd(tmp_path, "img2img", unet_channels=(32, 64, 64))


def photo():
    return torch.rand(1, 3, 128, 128, generator=seed(0))


def capture_txt2img(pipe, prompt="a red house", guidance_scale=7.5, text_config=None, **kw):
    editor = SparseEditor(pipe, ENGINE, text_config=text_config)
    out = editor.capture(prompt=prompt, num_inference_steps=STEPS, guidance_scale=guidance_scale, generator=seed(),
                         output_type="pt", **SIZE, **kw).images  # fmt: skip
    return editor, out


def outside_is_kept(editor, out, before):
    region = editor.last_region[0]
    return torch.equal(out[..., ~region], before[..., ~region])


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_txt2img_capture_is_the_pipelines_own_result(txt2img, guidance_scale):
    want = txt2img("a red house", num_inference_steps=STEPS, guidance_scale=guidance_scale, generator=seed(),
                   output_type="pt", **SIZE).images  # fmt: skip
    editor, got = capture_txt2img(txt2img, guidance_scale=guidance_scale)
    assert torch.equal(got, want)
    editor.remove()
    again = txt2img("a red house", num_inference_steps=STEPS, guidance_scale=guidance_scale, generator=seed(),
                    output_type="pt", **SIZE).images  # fmt: skip
    assert torch.equal(again, want)


def test_same_prompt_gives_an_empty_region_and_the_same_image(txt2img):
    editor, out0 = capture_txt2img(txt2img)
    out1 = editor.edit(prompt="a red house", output_type="pt").images
    assert torch.equal(out1, out0)
    assert editor.last_stats["region_fraction"] == 0.0
    assert editor.last_stats["macs_sparse"] == 0 < editor.last_stats["macs_dense"]
    assert not editor.last_region.any()


@pytest.mark.parametrize("method", ["latent_diff", "cross_attention"])
def test_a_changed_word_regenerates_a_region(txt2img, method):
    editor, out0 = capture_txt2img(txt2img)
    steps_before = [z.clone() for z in editor.current.trajectory]
    out1 = editor.edit(prompt="a blue house", text_config=TextEditConfig(region=method, opening=0),
                       output_type="pt").images  # fmt: skip
    stats = editor.last_stats
    assert stats["region_method"] == method
    assert stats["detect_steps"] == 1  # 20% of 6 steps
    assert stats["detect_seconds"] > 0
    if method == "latent_diff":  # with random weights the attention maps are near uniform: no claim on their extent
        assert 0.0 < stats["region_fraction"] < 1.0
    assert not torch.equal(out1, out0)
    assert outside_is_kept(editor, out1, out0)
    # Outside the region the latents of every step are the capture's; the first (dense) step's are kept too.
    keep = torch.nn.functional.adaptive_max_pool2d(editor.last_region[:, None].float(), (16, 16))[:, 0] > 0
    for before, after in zip(steps_before, editor.current.trajectory, strict=True):
        assert torch.equal(after[..., ~keep[0]], before[..., ~keep[0]])


def test_a_prompt_edit_approximates_the_dense_regeneration(txt2img):
    editor, out0 = capture_txt2img(txt2img)
    dense = txt2img("a blue house", num_inference_steps=STEPS, generator=seed(), output_type="pt", **SIZE).images
    out1 = editor.edit(prompt="a blue house", region=torch.ones(128, 128, dtype=torch.bool), output_type="pt").images
    # The whole image as the region: the run falls back to dense and must equal the pipeline's own regeneration.
    assert torch.allclose(out1, dense, atol=1e-5)


def test_prompts_of_different_token_lengths(txt2img):
    editor, out0 = capture_txt2img(txt2img)
    for prompt in ["a red house by the lake", "a house"]:
        for method in ("latent_diff", "cross_attention"):
            out = editor.edit(prompt=prompt, text_config=TextEditConfig(region=method), commit=False,
                              output_type="pt").images  # fmt: skip
            assert editor.last_stats["region_fraction"] > 0
            assert outside_is_kept(editor, out, out0)
    # Nothing was committed: the original prompt is still the current one.
    assert torch.equal(editor.edit(prompt="a red house", output_type="pt").images, out0)


def test_negative_prompts(txt2img):
    editor, out0 = capture_txt2img(txt2img, negative_prompt="blurry")
    out = editor.edit(negative_prompt="dark lake", output_type="pt").images
    assert 0 < editor.last_stats["region_fraction"]
    assert not torch.equal(out, out0) and outside_is_kept(editor, out, out0)
    # The new negative prompt is now the current one.
    assert torch.equal(editor.edit(negative_prompt="dark lake", output_type="pt").images, out)
    assert editor.last_stats["region_fraction"] == 0.0


def test_without_guidance(txt2img):
    editor, out0 = capture_txt2img(txt2img, guidance_scale=1.0)
    # Without guidance the negative prompt is not used: no change.
    assert torch.equal(editor.edit(negative_prompt="dark", output_type="pt").images, out0)
    assert editor.last_stats["region_fraction"] == 0.0
    out = editor.edit(prompt="a blue house", output_type="pt").images
    assert 0 < editor.last_stats["region_fraction"] < 1
    assert outside_is_kept(editor, out, out0)


def test_noise_diff_and_mask_regions(txt2img):
    editor, out0 = capture_txt2img(txt2img)
    editor.edit(prompt="a blue house", text_config=TextEditConfig(region="noise_diff", noise_threshold=1.0, opening=0),
                commit=False, output_type="pt")  # fmt: skip
    assert 0 < editor.last_stats["region_fraction"] < 1
    assert editor.last_stats["detect_steps"] == 0
    region = torch.zeros(128, 128, dtype=torch.bool)
    region[32:64, 40:88] = True
    out = editor.edit(prompt="a blue house", region=region, output_type="pt").images
    stats = editor.last_stats
    assert stats["region_method"] == "mask" and stats["detect_steps"] == 0
    assert stats["macs_sparse"] < 0.9 * stats["macs_dense"]
    # The region is dilated by TextEditConfig.dilation (1 latent pixel = 8 px) and nothing changes beyond it.
    grown = torch.zeros_like(region)
    grown[24:72, 32:96] = True
    assert torch.equal(editor.last_region[0], grown)
    assert torch.equal(out[..., ~grown], out0[..., ~grown]) and not torch.equal(out, out0)
    with pytest.raises(ValueError, match="region you pass"):
        editor.edit(prompt="a green house", text_config=TextEditConfig(region="mask"))


def test_stale_cache_raises(txt2img):
    editor, out0 = capture_txt2img(txt2img)
    with pytest.raises(StaleCacheError, match="generator"):
        editor.edit(prompt="a blue house", generator=seed(2))
    with pytest.raises(StaleCacheError, match="num_inference_steps"):
        editor.edit(prompt="a blue house", num_inference_steps=STEPS + 2)
    editor.edit(prompt="a blue house", generator=seed(1), num_inference_steps=STEPS)  # the captured values: fine
    txt2img.scheduler.register_to_config(steps_offset=0)
    with pytest.raises(StaleCacheError, match="scheduler"):
        editor.edit(prompt="a red house")


def test_recapture_on_a_new_seed(txt2img):
    editor = SparseEditor(txt2img, ENGINE, on_stale="recapture")
    editor.capture(prompt="a red house", num_inference_steps=STEPS, generator=seed(), output_type="pt", **SIZE)
    out = editor.edit(prompt="a blue house", generator=seed(2), output_type="pt").images
    assert "recaptured_seconds" in editor.last_stats
    original = txt2img("a red house", num_inference_steps=STEPS, generator=seed(2), output_type="pt", **SIZE).images
    assert outside_is_kept(editor, out, original)


def test_image_and_prompt_edits_interleave(img2img):
    editor = SparseEditor(img2img, ENGINE)
    x = photo()
    out0 = editor.capture(image=x, prompt="a red house", num_inference_steps=STEPS, strength=0.8, generator=seed(),
                          output_type="pt").images  # fmt: skip
    stroke = x.clone()
    stroke[:, :, 80:100, 20:50] = 0.9
    out1 = editor.edit(image=stroke, output_type="pt").images
    assert outside_is_kept(editor, out1, out0)
    out2 = editor.edit(prompt="a blue house", output_type="pt").images
    assert editor.last_stats["region_fraction"] > 0 and outside_is_kept(editor, out2, out1)
    out3 = editor.edit(image=x, output_type="pt").images  # the stroke taken back, under the new prompt
    assert outside_is_kept(editor, out3, out2)
    assert torch.equal(editor.edit(prompt="a blue house", output_type="pt").images, out3)
    out4 = editor.edit(prompt="a red house", output_type="pt").images
    assert outside_is_kept(editor, out4, out3)


def test_attention_records_are_recomputed_exactly_after_a_commit(txt2img):
    editor, _ = capture_txt2img(txt2img, text_config=TextEditConfig(inject_attention=0.5))
    cap = editor.current
    recorded = cap.attention
    assert len({step for _, step in recorded["probs"]}) == 3
    cap.version += 1  # as after a committed edit: the records no longer count
    again = editor.loop.prompt.attention(cap, editor.text_config, range(STEPS), range(3))
    assert again is not recorded
    for i in range(STEPS):
        assert torch.equal(again["maps"][i], recorded["maps"][i])
    assert recorded["probs"].keys() == again["probs"].keys()
    for key, probs in recorded["probs"].items():
        assert torch.equal(again["probs"][key], probs)


def test_attention_injection(txt2img):
    editor, out0 = capture_txt2img(txt2img, text_config=TextEditConfig(inject_attention=1.0))
    region = torch.zeros(128, 128, dtype=torch.bool)
    region[48:80, 48:80] = True
    for prompt, mode in (("a blue house", "refine"), ("a red lake", "replace")):  # "replace": a one-token swap
        plain = editor.edit(prompt=prompt, region=region, commit=False, output_type="pt",
                            text_config=TextEditConfig(inject_attention=0.0)).images  # fmt: skip
        injected = editor.edit(prompt=prompt, region=region, commit=False, output_type="pt",
                               text_config=TextEditConfig(inject_attention=1.0, injection=mode)).images  # fmt: skip
        assert editor.last_stats["macs_sparse"] < 0.9 * editor.last_stats["macs_dense"]  # the sparse path injects
        assert torch.isfinite(injected).all()
        assert not torch.equal(injected, plain)
        assert outside_is_kept(editor, injected, out0)
    with pytest.raises(ValueError, match="refine"):
        editor.edit(prompt="a red house by the lake", region=region,
                    text_config=TextEditConfig(inject_attention=1.0, injection="replace"))  # fmt: skip


def test_injecting_a_layers_own_attention_changes_nothing(txt2img):
    """The processor's explicit path (probabilities, injection, values) against diffusers' own attention."""
    attn = txt2img.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    control = textedit.AttentionControl()
    proc = textedit.ControlledCrossAttention(control, "layer", attn.processor)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=seed())
    ctx = torch.randn(2, 16, attn.to_k.in_features, generator=seed(2))
    want = attn.processor(attn, x, ctx)
    control.step, control.record_probs = 0, {0}
    assert torch.equal(proc(attn, x, ctx), want)  # recording keeps the exact result
    control.record_probs = set()
    control.inject = ({0}, torch.arange(16).expand(2, 16), control.probs)
    assert torch.allclose(proc(attn, x, ctx), want, atol=1e-5)
    active = torch.tensor([3, 10, 40])
    sparse = proc.sparse_attend(attn, x[:, active], ctx, active, plain=None)
    assert torch.allclose(sparse, want[:, active], atol=1e-5)


def test_bfloat16_prompt_edit(tmp_path):
    pipe = tiny_sd(tmp_path, "txt2img", dtype=torch.bfloat16, unet_channels=(32, 64, 64))
    editor, out0 = capture_txt2img(pipe)
    out = editor.edit(prompt="a blue house", output_type="pt").images
    assert 0 < editor.last_stats["region_fraction"] < 1
    assert outside_is_kept(editor, out, out0) and not torch.equal(out, out0)


def test_prompt_edits_need_a_text_pipeline(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=16, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)  # fmt: skip
    editor = SparseEditor(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()))
    editor.capture(image=torch.zeros(1, 3, 16, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match="unconditional"):
        editor.edit(prompt="a house")


# -- the pieces -----------------------------------------------------------------------------------------------------


def test_align_tokens():
    mapping, changed_s, changed_t = textedit.align_tokens([0, 5, 6, 7, 1, 1], [0, 5, 8, 9, 7, 1], special={0, 1})
    assert mapping == [0, 1, -1, -1, 3, 4]
    assert changed_s == [False, False, True, False, False, False]  # the dropped padding token is not a word
    assert changed_t == [False, False, True, True, False, False]


def test_otsu_and_opening():
    values = torch.cat([torch.full((100,), 0.1), torch.full((30,), 0.9)]) + 0.01 * torch.rand(130)
    cut = textedit.otsu_threshold(values)
    assert torch.equal(values > cut, torch.arange(130) >= 100)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:4, 2:4] = True  # a 2x2 block survives a 2x2 opening
    mask[0, 6, 6] = True  # a speck does not
    mask[0, 0:3, 5] = True  # a 1-wide line does not either
    opened = textedit.opening(mask, 2)
    want = torch.zeros_like(mask)
    want[0, 2:4, 2:4] = True
    assert torch.equal(opened, want)


def test_text_edit_config_validates_and_round_trips():
    cfg = TextEditConfig(region="cross_attention", detect_steps=3, inject_attention=0.8)
    assert TextEditConfig.from_json(cfg.to_json()) == cfg
    assert cfg.steps_for(20) == 3 and TextEditConfig().steps_for(20) == 4 and TextEditConfig().steps_for(3) == 1
    with pytest.raises(ValueError, match="region"):
        TextEditConfig(region="otsu")
    with pytest.raises(ValueError, match="injection"):
        TextEditConfig(injection="swap")


def test_find_region_previews_the_edit(txt2img):
    editor, out0 = capture_txt2img(txt2img)
    region = editor.find_region(prompt="a blue house")
    assert editor.last_stats["detect_seconds"] > 0 and editor.last_stats["macs_detect"] > 0
    assert region.shape == (1, 128, 128) and 0 < region.float().mean() < 1
    out = editor.edit(prompt="a blue house", output_type="pt").images
    assert torch.equal(editor.last_region, region)
    assert not editor.find_region(prompt="a blue house").any()  # committed: now the current prompt
    assert torch.equal(editor.edit(prompt="a blue house", output_type="pt").images, out)


@pytest.mark.parametrize("method", ["latent_diff", "cross_attention"])
def test_a_batch_of_prompts_edits_only_the_changed_one(txt2img, method):
    editor, out0 = capture_txt2img(txt2img, prompt=["a red house", "a lake"])
    out = editor.edit(prompt=["a blue house", "a lake"], text_config=TextEditConfig(region=method),
                      output_type="pt").images  # fmt: skip
    region = editor.last_region
    assert region[0].any() and not region[1].any()
    assert torch.equal(out[1], out0[1]) and not torch.equal(out[0], out0[0])
