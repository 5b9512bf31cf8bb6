"""arch.py directly: per-layer config fields remapped after a layer map, embed/head names and tying,
layer ranges parsed and printed."""

from __future__ import annotations

import pytest

from upstack.arch import (
    ARCHS,
    GENERIC,
    ArchSpec,
    LayerField,
    embed_name,
    format_layer_ranges,
    is_head,
    layer_runs,
    parse_layer_ranges,
    remap_config,
    tied,
)
from upstack.errors import ConfigError, UpstackError

# DUS of a 4-layer model with m=1: output layers [0, 1, 2] + [1, 2, 3]
DUS_4_1 = [0, 1, 2, 1, 2, 3]


def spec(*fields: LayerField) -> ArchSpec:
    return ArchSpec("test", layer_fields=fields)


def remap(field: LayerField, value, layer_map=DUS_4_1, **extra):
    config = {"model_type": "test", "num_hidden_layers": 4, field.name: value, **extra}
    return remap_config(config, spec(field), layer_map)


def test_layer_count_is_the_map_length_and_the_source_is_untouched():
    config = {"model_type": "test", "num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"]}
    new, notes = remap_config(config, spec(LayerField("layer_types", "list")), DUS_4_1)
    assert new["num_hidden_layers"] == 6 and config["num_hidden_layers"] == 4
    assert config["layer_types"] == ["a", "b", "c", "d"] and notes == []


def test_list_follows_the_map():
    new, notes = remap(LayerField("layer_types", "list"), ["a", "b", "c", "d"])
    assert new["layer_types"] == ["a", "b", "c", "b", "c", "d"] and notes == []


def test_list_of_the_wrong_length_is_refused():
    with pytest.raises(UpstackError, match="must be a list of 4 entries"):
        remap(LayerField("layer_types", "list"), ["a", "b"])


def test_index_set_keeps_the_layers_whose_source_had_the_property():
    new, _ = remap(LayerField("mlp_only_layers", "index_set"), [1, 3])
    assert new["mlp_only_layers"] == [1, 3, 5]
    with pytest.raises(UpstackError, match="list of layer indices"):
        remap(LayerField("mlp_only_layers", "index_set"), 2)


@pytest.mark.parametrize("kind,value,expected,note", [
    ("from_k", 0, 0, None),              # every layer: still every layer
    ("from_k", 4, 6, "f: 4 -> 6"),       # no layer: still no layer
    ("below_k", 1, 1, None),             # layer 0 only
    ("below_k", 3, 5, "f: 3 -> 5"),      # [0..2] -> output [0..4]
    ("period", 2, 2, None),              # odd layers 1, 3 -> outputs 1, 3, 5
    ("period", 4, 6, "f: 4 -> 6"),       # layer 3 only -> output 5 only
])
def test_scalar_kinds_re_encoded(kind, value, expected, note):
    new, notes = remap(LayerField("f", kind), value)
    assert new["f"] == expected
    assert notes == ([note] if note else [])


@pytest.mark.parametrize("kind,value", [("from_k", 2), ("period", 3)])
def test_scalar_kind_that_cannot_describe_the_new_order_is_refused(kind, value):
    with pytest.raises(UpstackError, match="cannot describe the new layer order faithfully"):
        remap(LayerField("f", kind), value)


def test_bad_scalar_values_are_refused():
    with pytest.raises(UpstackError, match="must be a positive integer"):
        remap(LayerField("f", "period"), 0)
    with pytest.raises(UpstackError, match="must be an integer"):
        remap(LayerField("f", "from_k"), "2")


def test_inert_field_is_set_to_no_layer_with_a_note():
    field = LayerField("max_window_layers", "from_k", inert_unless="use_sliding_window")
    new, notes = remap(field, 2, use_sliding_window=False)
    assert new["max_window_layers"] == 6
    assert notes == ["max_window_layers: has no effect while use_sliding_window is off; set to 6"]
    with pytest.raises(UpstackError):
        remap(field, 2, use_sliding_window=True)


def test_field_superseded_by_layer_types_is_dropped():
    field = LayerField("sliding_window_pattern", "period", superseded_by_layer_types=True)
    config = {"model_type": "test", "num_hidden_layers": 4, "sliding_window_pattern": 3,
              "layer_types": ["s", "s", "f", "s"]}
    new, notes = remap_config(config, spec(LayerField("layer_types", "list"), field), DUS_4_1)
    assert "sliding_window_pattern" not in new and new["layer_types"] == ["s", "s", "f", "s", "f", "s"]
    assert notes == ["sliding_window_pattern: dropped (the remapped layer_types says per layer what it encoded)"]


def test_real_table_rows_remap():
    qwen = {"model_type": "qwen2", "num_hidden_layers": 4, "max_window_layers": 4, "use_sliding_window": False,
            "layer_types": ["full_attention"] * 4}
    new, _ = remap_config(qwen, ARCHS["qwen2"], DUS_4_1)
    assert new["max_window_layers"] == 6 and new["layer_types"] == ["full_attention"] * 6


# -- embed / head names and tying -------------------------------------------------------------------

def test_embed_and_head_names_are_table_data():
    for arch in [*ARCHS.values(), GENERIC]:
        assert arch.embed_suffix == "embed_tokens.weight" and arch.head_name == "lm_head.weight"
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert embed_name(names) == "model.embed_tokens.weight"
    assert embed_name(["model.norm.weight"]) is None
    assert is_head("lm_head.weight") and is_head("base_model.lm_head.weight") and not is_head("model.norm.weight")


def test_tied():
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    assert not tied({"tie_word_embeddings": False}, names)
    assert not tied({}, names)
    assert tied({"tie_word_embeddings": True}, names)
    assert tied({"tie_word_embeddings": False}, names[:1])  # no head stored: transformers ties it


# -- layer ranges -----------------------------------------------------------------------------------

def test_layer_ranges_parse_and_print():
    layers = parse_layer_ranges("0-23,8-31", 32)
    assert layers == list(range(24)) + list(range(8, 32))
    assert format_layer_ranges(layers) == "0-23,8-31"
    assert parse_layer_ranges("0-3,3,4-7", 8) == [0, 1, 2, 3, 3, 4, 5, 6, 7]
    assert format_layer_ranges([0, 1, 2, 3, 8, 9, 11]) == "0-3,8-9,11"
    assert format_layer_ranges([]) == ""
    assert layer_runs(DUS_4_1) == [(0, 2, 0, 2), (3, 5, 1, 3)]
    assert layer_runs([0, 0, 1]) == [(0, 0, 0, 0), (1, 2, 0, 1)] and layer_runs([]) == []
    # the syntax train_layers accepts: indices and ranges, spaces allowed; no model size needed
    assert parse_layer_ranges(" 0 - 3 , 8 ") == [0, 1, 2, 3, 8]
    assert parse_layer_ranges("40-41") == [40, 41]


@pytest.mark.parametrize("text,msg", [
    ("0-3,", "empty range"), ("a-3", "cannot read 'a-3'"), ("0-4", "out of range in '0-4'; the source has 4"),
    ("3-1", "runs backwards"),
])
def test_layer_ranges_errors(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_layer_ranges(text, 4)
    assert str(e.value).startswith(f"--layers {text!r}: ")
    with pytest.raises(ConfigError, match="^train_layers "):
        parse_layer_ranges("x", flag="train_layers")
