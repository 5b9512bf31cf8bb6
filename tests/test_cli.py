"""The command line itself: a misspelled flag gets the subcommand's usage and a suggestion."""

import pytest

from upstack.cli import main


def test_misspelled_flag_prints_the_subcommand_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "m", "--data", "d.jsonl", "--out", "o", "--lerning-rate", "1e-4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: upstack sft ")
    assert "unrecognized arguments: --lerning-rate 1e-4" in err and "did you mean --learning-rate?" in err


def test_unknown_flag_without_a_close_match_still_names_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "a", "b", "--method", "linear", "--out", "o", "--zzz"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: upstack merge ") and "unrecognized arguments: --zzz" in err
    assert "did you mean" not in err
