"""Typed configs: sizes, every kind of type error (all at once), and the dict round trip."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Union

import pytest

from upstack.config import config_errors, config_from_dict, config_to_dict, parse_bytes
from upstack.errors import ConfigError


@dataclasses.dataclass
class Inner:
    path: str
    weight: float = 1.0


@dataclasses.dataclass
class Outer:
    name: str
    steps: int = 10
    rate: float = 0.1
    flag: bool = False
    note: Optional[str] = None
    size: Union[int, str] = 1
    tags: list[str] = dataclasses.field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    inner: Inner | None = None
    items: list[Inner] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize("text, value", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20),
    ("1000000", 1000000), (1000, 1000), (" 1.5 kb ", 1500), ("7B", 7),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", 0, True])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="shard"):
        parse_bytes(text, "shard")


def test_unknown_and_missing_keys():
    errors = config_errors(Outer, {"steps": 3, "colour": "red", "shape": 1}, where="stage 'x'")
    assert errors[0].startswith("stage 'x': unknown option(s) colour, shape (known: ")
    assert "stage 'x': missing required option 'name'" in errors
    assert len(errors) == 2


@pytest.mark.parametrize("key, value, words", [
    ("steps", "ten", ["c.steps", "expected an integer"]),
    ("steps", True, ["expected an integer"]),
    ("steps", 1.5, ["expected an integer"]),
    ("rate", "fast", ["c.rate", "expected a number"]),
    ("flag", "yes", ["expected true or false"]),
    ("name", 3, ["c.name", "expected a string"]),
    ("note", 3, ["c.note", "is not a valid value"]),
    ("size", 1.5, ["c.size", "is not a valid value"]),
    ("tags", "a", ["c.tags", "expected a list"]),
    ("tags", ["a", 2], ["c.tags[1]", "expected a string"]),
    ("mode", "c", ["c.mode", "is not one of 'a', 'b'"]),
    ("extra", [1], ["c.extra", "expected a mapping"]),
    ("inner", {"weight": 2}, ["c.inner", "is not a valid value (expected"]),  # under a Union: one line
    ("items", [{"path": "p"}, {"path": "q", "weight": "heavy"}], ["c.items[1].weight", "expected a number"]),
    ("items", [{"weight": 2}], ["c.items[0]", "missing required option 'path'"]),
])
def test_wrong_types(key, value, words):
    errors = config_errors(Outer, {"name": "n", key: value}, where="c")
    assert len(errors) == 1 and all(w in errors[0] for w in words), errors
    with pytest.raises(ConfigError):
        config_from_dict(Outer, {"name": "n", key: value}, where="c")


def test_all_problems_in_one_error():
    with pytest.raises(ConfigError) as e:
        config_from_dict(Outer, {"steps": "x", "rate": "y", "bogus": 1}, where="c")
    msg = str(e.value)
    assert "unknown option(s) bogus" in msg and "missing required option 'name'" in msg
    assert "c.steps" in msg and "c.rate" in msg and msg.count("; ") == 3


def test_not_a_mapping():
    assert config_errors(Outer, ["name"], where="c") == ["c: expected a mapping of options, got list"]


def test_values_are_converted_and_round_trip():
    data = {"name": "n", "steps": 3, "rate": 2, "note": None, "size": "big", "tags": ("a", "b"),
            "inner": {"path": "p"}, "items": [{"path": "q", "weight": 3}], "extra": {"k": [1]}}
    cfg = config_from_dict(Outer, data)
    assert cfg.rate == 2.0 and isinstance(cfg.rate, float) and cfg.tags == ["a", "b"]
    assert cfg.inner == Inner("p") and cfg.items == [Inner("q", 3.0)]
    d = config_to_dict(cfg)
    assert d["inner"] == {"path": "p", "weight": 1.0} and d["items"] == [{"path": "q", "weight": 3.0}]
    assert config_from_dict(Outer, d) == cfg
    assert config_to_dict(config_from_dict(Outer, d)) == d
