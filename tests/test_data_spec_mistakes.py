"""A misspelled data-spec key is named as such (with a suggestion), not reported as a missing file."""

import pytest

from upstack.data.spec import parse_data_spec
from upstack.errors import ConfigError


def test_a_misspelled_first_key_is_not_a_file_name():
    with pytest.raises(ConfigError, match=r"unknown key fromat \(did you mean format\?\)"):
        parse_data_spec("my.jsonl:fromat=alpaca")


def test_a_misspelled_later_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"'samplez=3' is not key=value with a known key \(did you mean samples\?\)"):
        parse_data_spec("x.jsonl:format=alpaca,samplez=3")


def test_paths_with_colons_stay_paths():
    assert parse_data_spec("a:b.jsonl").path == "a:b.jsonl"
    assert parse_data_spec("org/ds:split=train").split == "train"


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    from upstack.cli import main

    assert main(["sft", str(tmp_path), "--data", "my.jsonl:fromat=alpaca", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean format?" in err and "no such file" not in err
