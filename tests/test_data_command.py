"""`upstack data SPEC...`: checks data specs as the training stages read them (rows, format, fields, what is
dropped and why), without training."""

import json

import pytest

from upstack.cli import main
from upstack.data.check import check_data
from upstack.data.loading import load_dpo_rows, load_sft_rows, parse_data_spec

ALPACA = [{"instruction": "Add.", "input": "1 + 2", "output": "3"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue"},
          {"instruction": "Broken.", "input": "", "output": None},                       # malformed
          {"instruction": "Long one.", "input": "", "output": "x" * 50, "system": "S"},   # filtered
          {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."}]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def run_json(capsys, *argv):
    assert main(["data", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sft_file_rows_format_fields_and_what_is_dropped_and_why(tmp_path, capsys):
    f = write_jsonl(tmp_path / "a.jsonl", ALPACA, ["not json\n"])
    spec = f"{f}:filter='len(instruction) < 12'"
    got = run_json(capsys, spec)
    assert got["stage"] == "sft" and got["used"] == 3
    (src,) = got["sources"]
    assert src["format"] == "alpaca" and src["format_detected"] is True
    assert src["fields"] == {"instruction": 5, "input": 5, "output": 5, "system": 2} and src["objects"] == 5
    assert (src["read"], src["filtered"], src["skipped"], src["kept"], src["used"]) == (6, 1, 2, 3, 3)
    assert sorted(src["skip_reasons"].values()) == [1, 1]
    assert any("'output' must be a string, got null" in r for r in src["skip_reasons"])
    assert any("not valid JSON" in r for r in src["skip_reasons"])
    assert got["example"] == {"messages": [{"role": "user", "content": "Add.\n\n1 + 2"},
                                           {"role": "assistant", "content": "3"}]}
    # the same counts as the training loader's own report
    _, report = load_sft_rows([parse_data_spec(spec)], skip_bad_rows=True)
    s = report.sources[0]
    assert (s.read, s.filtered, s.skipped, s.kept, s.used, s.format) == (6, 1, 2, 3, 3, "alpaca")

    assert main(["data", spec]) == 0
    out = capsys.readouterr().out
    assert "SFT data for `upstack sft`: 3 rows would be used from 1 source(s)" in out
    assert "format:   alpaca (detected from the first row's keys)" in out
    assert "fields:   instruction, input, output (every row), system (2 rows)" in out
    assert "rows:     6 read, 3 kept, 3 used" in out and "dropped:  3" in out
    assert "1 x dropped by the filter 'len(instruction) < 12'" in out
    assert "1 x field 'output' must be a string, got null" in out
    assert f"without --skip-bad-rows, training stops at {f} row 3: field 'output'" in out
    assert "user: Add. 1 + 2" in out and "assistant: 3" in out


def test_preference_pairs_are_dpo_data_and_samples_are_counted(tmp_path, capsys):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    # UltraFeedback-style rows also carry `messages` (an SFT format): a pair is DPO data
    rows = [{**r, "messages": [{"role": "user", "content": r["prompt"]},
                               {"role": "assistant", "content": r["chosen"]}]} for r in rows]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    got = run_json(capsys, f"{f}:samples=2,seed=3")
    assert got["stage"] == "dpo" and got["used"] == 2
    (src,) = got["sources"]
    assert src["format"] == "preference" and (src["kept"], src["used"], src["not_sampled"]) == (5, 2, 3)
    rows_, _ = load_dpo_rows([parse_data_spec(f"{f}:samples=2,seed=3")])
    assert got["example"] == rows_[0]
    # --for sft reads the same file as conversations
    got = run_json(capsys, str(f), "--for", "sft")
    assert got["stage"] == "sft" and got["sources"][0]["format"] == "messages" and got["used"] == 5


def test_plain_text_is_pretraining_data(tmp_path, capsys):
    f = tmp_path / "corpus.txt"
    f.write_text("First paragraph.\nstill first.\n\nSecond.\n\n\n\nThird.\n")
    got = run_json(capsys, str(f))
    assert got["stage"] == "pretrain" and got["used"] == 3 and got["sources"][0]["fields"] == {}
    assert got["example"] == "First paragraph.\nstill first."
    assert main(["data", f"{f}:text_unit=line"]) == 0
    out = capsys.readouterr().out
    assert "pretraining data for `upstack pretrain`: 4 documents would be used" in out
    # blank lines are skipped as they are read (docs/data.md: a run of blank lines costs nothing), not counted
    # as empty documents that a filter drops
    assert "documents: 4 read, 4 kept, 4 used" in out and "dropped:  0 (none)" in out


def test_weighted_mixture_counts_each_source(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA[:2] * 5)       # 10 rows
    b = write_jsonl(tmp_path / "b.jsonl", ALPACA[:2] * 3)       # 6 rows
    got = run_json(capsys, f"{a}:weight=1", f"{b}:weight=1", "--seed", "4")
    assert [s["used"] for s in got["sources"]] == [6, 6] and got["used"] == 12 and got["seed"] == 4
    assert [s["sampling"] for s in got["sources"]] == ["weight", "weight"]


@pytest.mark.parametrize("argv, words", [
    (["missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["{tmp}/a.jsonl", "{tmp}/p.jsonl"], "the sources are for different stages"),
    (["{tmp}/a.jsonl:samples=50"], "samples=50 but only 4 rows are usable"),
    (["{tmp}/odd.jsonl"], "are no SFT or DPO format and have no 'text' field; pass --for"),
    (["{tmp}/a.jsonl:fromat=alpaca"], "unknown key fromat (did you mean format?)"),
])
def test_what_would_stop_training_is_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", ALPACA[:2] + ALPACA[3:])
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    assert main(["data", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: upstack data ") and all(w in out for w in ("--for", "--seed", "--json", "SPEC"))


def test_check_data_reads_a_real_sample(shared_data):
    got = check_data([str(shared_data / "hh_rlhf/harmless-base_test_first1000.jsonl")])
    (src,) = got["sources"]
    assert got["stage"] == "dpo" and src["format"] == "hh_rlhf"
    assert (src["read"], src["skipped"], src["used"]) == (1000, 5, 995)  # docs/data.md: 995 of 1000
    assert src["skip_examples"][0].endswith("row 87: field 'chosen' has an empty final Assistant reply")
