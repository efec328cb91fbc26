"""Captions of the procedural scenes and prompt edits with their true regions (groundwork for issue 21)."""

import torch

from sparsedit.data import captions, scenes


def test_captions_say_what_the_render_shows():
    seen = set()
    for i in range(40):
        scene = scenes.describe(1_000_000, i)
        _, labels = scenes.render(scene, (64, 64))
        text = captions.caption(labels)
        seen.add(text.split(",")[0].split(" below ")[0])
        has = lambda c: bool((labels == c).float().mean() > 0.004)  # noqa: E731
        assert ("trees" in text) == has(scenes.TREES)
        assert ("rocks" in text) == has(scenes.ROCKS)
        assert ("snowy" in text) == has(scenes.SNOW)
        assert (("lake" in text) or ("sea" in text)) == has(scenes.WATER)
    assert {"a lake", "the sea", "a meadow", "a desert"} <= seen


def test_prompt_edits_have_true_regions_where_the_render_changed():
    kinds = set()
    for i in range(20):
        scene = scenes.describe(1_000_000, i)
        image, labels = scenes.render(scene, (64, 64))
        for e in captions.prompt_edits(scene, (64, 64)):
            kinds.add(e["kind"])
            assert e["prompt"] == captions.caption(labels) and e["edited_prompt"] != e["prompt"]
            region = e["region"]
            assert 0 < region.float().mean() < 0.5
            # Outside the true region the two renders agree (to the colour threshold).
            diff = (e["edited_image"] - image).abs().amax(0)
            assert float(diff[~region].max()) <= 2 / 255 + 1e-6
            assert torch.equal(e["image"], image)
    assert {"delete", "insert", "swap"} <= kinds
