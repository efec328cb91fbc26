"""Options are `(str, Enum)` types that still accept today's strings (issue 18)."""

import json

import pytest

from sparsedit import AttentionMode, Injection, NormStats, OnStale, RegionMethod, SparseConfig, TextEditConfig


def test_strings_and_enums_are_interchangeable():
    a = SparseConfig(norm_stats="recompute", attention="dense")
    b = SparseConfig(norm_stats=NormStats.RECOMPUTE, attention=AttentionMode.DENSE)
    assert a == b and a.norm_stats is NormStats.RECOMPUTE and a.norm_stats == "recompute"
    assert a.to_json() == b.to_json() and json.loads(a.to_json())["norm_stats"] == "recompute"
    assert SparseConfig.from_json(a.to_json()) == a
    t = TextEditConfig(region="mask", injection=Injection.REPLACE)
    assert t.region is RegionMethod.MASK and t.injection == "replace" and str(t.region) == "mask"
    assert OnStale("recapture") is OnStale.RECAPTURE


def test_a_bad_option_names_the_choices():
    with pytest.raises(ValueError, match=r"SparseConfig.norm_stats must be one of \['frozen', 'recompute'\]"):
        SparseConfig(norm_stats="fresh")
    with pytest.raises(ValueError, match="TextEditConfig.region must be one of"):
        TextEditConfig(region="everywhere")


def test_edit_stats_is_a_dataclass_that_reads_like_a_dict():
    from sparsedit import EditStats

    s = EditStats.of({"macs_dense": 10, "macs_sparse": 2, "dense_run": None, "custom": 1})
    assert s.macs_dense == 10 and s["macs_sparse"] == 2 and s["dense_run"] is None  # None is a value
    assert "seconds" not in s and s.get("seconds", 0.5) == 0.5  # unset fields are absent
    with pytest.raises(KeyError):
        s["seconds"]
    s["seconds"] = 1.5
    s.update({"peak_bytes": 7})
    assert dict(s) == {"macs_dense": 10, "macs_sparse": 2, "seconds": 1.5, "peak_bytes": 7, "dense_run": None,
                       "custom": 1}  # fmt: skip
    assert json.loads(json.dumps(dict(s)))["custom"] == 1


def test_default_tiles_are_pixels_on_deep_wide_maps_only():
    cfg = SparseConfig()
    # SD 1.5's 32x32 (640 ch), 16x16 and 8x8 (1280 ch) stages gather single pixels; its 64x64 stage and thin maps tile
    assert [cfg.tile_for(h, c) for h, c in [(32, 640), (16, 1280), (8, 1280), (64, 320), (32, 128), (128, 512)]] == [
        1, 1, 1, 8, 8, 8,
    ]  # fmt: skip
    assert SparseConfig(tile_size={32: 4, 0: 2}).tile_for(32, 640) == 4 and SparseConfig(tile_size=4).tile_for(8) == 4


def test_config_json_follows_every_change_of_a_field():
    """`to_json` keeps its text between calls (the fingerprint asks before every forward); a changed field, a dict
    field changed in place included, makes it again."""
    import json

    from sparsedit import SparseConfig

    c = SparseConfig(tile_size={8: 4})
    first = c.to_json()
    assert c.to_json() is first
    c.tile_size[8] = 2
    assert json.loads(c.to_json())["tile_size"] == {"8": 2}
    c.exact = True
    assert json.loads(c.to_json())["exact"] is True
    assert SparseConfig.from_json(c.to_json()) == c
