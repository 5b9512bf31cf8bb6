"""Data loading: spec syntax, file types, real samples, filters, errors, mixing and text streaming."""

import argparse
import gzip
import inspect
import itertools
import json
import tracemalloc

import pytest

from upstack.config import config_from_dict
from upstack.data import files
from upstack.data.loading import (
    SKIP_HINT,
    DataSpec,
    LoadReport,
    compile_filter,
    format_data_spec,
    iter_text_documents,
    load_dpo_rows,
    load_sft_rows,
    parse_data_spec,
)
from upstack.errors import ConfigError, DataError, UpstackError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
ALPACA_MESSAGES = [
    [{"role": "user", "content": "Add the numbers.\n\n1 and 2"}, {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def messages(rows):
    return [r["messages"] for r in rows]


def spec(path, **kw):
    return DataSpec(path=str(path), **kw)


# --- spec syntax ----------------------------------------------------------------------------------

def test_parse_data_spec_options_and_types():
    s = parse_data_spec("data/alpaca.jsonl:format=alpaca,samples=1000,seed=1")
    assert s == DataSpec(path="data/alpaca.jsonl", format="alpaca", samples=1000, seed=1)
    s = parse_data_spec("HuggingFaceH4/ultrafeedback_binarized:split=train_prefs, weight=0.5")
    assert (s.path, s.split, s.weight) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", 0.5)
    assert parse_data_spec("plain.jsonl") == DataSpec(path="plain.jsonl")


def test_parse_data_spec_paths_with_colons(tmp_path):
    assert parse_data_spec("C:/data/x.jsonl:format=alpaca") == DataSpec(path="C:/data/x.jsonl", format="alpaca")
    assert parse_data_spec("run:2/x.jsonl").path == "run:2/x.jsonl"  # ':' not followed by key= stays in the path
    odd = write_jsonl(tmp_path / "a:format=b.jsonl", ALPACA)  # an existing file wins over option parsing
    assert parse_data_spec(str(odd)) == DataSpec(path=str(odd))


def test_parse_data_spec_filter_with_commas_and_quotes():
    s = parse_data_spec("x.jsonl:filter=type in ('a', 'b'),samples=2")
    assert (s.filter, s.samples) == ("type in ('a', 'b')", 2)
    s = parse_data_spec("x.jsonl:filter=\"len(output) < 2000\",seed=3")
    assert (s.filter, s.seed) == ("len(output) < 2000", 3)
    assert parse_data_spec("x.jsonl:filter=type=GSM_Rephrased").filter == "type=GSM_Rephrased"


@pytest.mark.parametrize("text, message", [
    ("x.jsonl:format=alpaca,bogus=1", "'bogus=1' is not key=value with a known key"),
    ("x.jsonl:samples=ten", "samples must be an integer, got 'ten'"),
    ("x.jsonl:weight=heavy", "weight must be a number"),
    ("x.jsonl:seed=1,seed=2", "seed given twice"),
    ("x.jsonl:samples=0", "samples must be a positive integer"),
    ("x.jsonl:samples=5,weight=1", "give samples or weight, not both"),
    ("x.jsonl:format=alpacca", "unknown format 'alpacca'"),
    ("x.jsonl:filter=__import__('os').system('rm')", "is not allowed"),
    ("x.jsonl:text_unit=sentence", "text_unit must be one of paragraph, line, file"),
    ("", "data spec is empty"),
])
def test_parse_data_spec_errors(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_data_spec(text)


@pytest.mark.parametrize("s", [
    DataSpec(path="a.jsonl"),
    DataSpec(path="dir/a.parquet", format="messages", samples=10, seed=7, filter="len(messages) >= 2"),
    DataSpec(path="o/n", split="train", weight=2.5, subset="main", filter="type in ('a', 'b')"),
    DataSpec(path="t.txt", text_unit="line", field="body"),
])
def test_format_data_spec_round_trips(s):
    assert parse_data_spec(format_data_spec(s)) == s


def test_dataspec_from_recipe_mapping():
    s = config_from_dict(DataSpec, {"path": "x.jsonl", "format": "alpaca", "samples": 5, "weight": None}, "sft.data[0]")
    assert s == DataSpec(path="x.jsonl", format="alpaca", samples=5)
    with pytest.raises(ConfigError, match="sft.data.0.*samples"):
        config_from_dict(DataSpec, {"path": "x.jsonl", "samples": "5"}, "sft.data.0")
    with pytest.raises(ConfigError, match="weight must be a positive number"):
        config_from_dict(DataSpec, {"path": "x.jsonl", "weight": -1}, "sft.data.0")


# --- filters --------------------------------------------------------------------------------------

def test_filter_expressions():
    row = {"output": "abcdef", "type": "GSM_AnsAug", "score": 7.5, "input": "", "flag": True}
    cases = {
        "len(output) < 10": True, "len(output) >= 10": False, "type=GSM_AnsAug": True, "type='GSM_AnsAug'": True,
        "type=MATH_FOBAR": False, "type in ('GSM_AnsAug', 'MATH_FOBAR')": True, "'cd' in output": True,
        "score > 5 and not input": True, "score > 8 or input": False, "lower(type) == 'gsm_ansaug'": True,
        "flag=true": True, "score=7.5": True, "_row <= 3": True, "_row > 3": False, "1 < len(output) < 7": True,
        "score > -1": True,
    }
    for text, expected in cases.items():
        assert compile_filter(text)(row, 3) is expected, text


@pytest.mark.parametrize("text", [
    "output.upper()", "__import__('os')", "open('x')", "output[0] == 'a'", "(lambda: 1)()", "x := 1",
    "len(output) + 1 > 2", "[c for c in output]", "eval('1')", "len(*output)", "f'{output}'",
])
def test_filter_rejects_code(text):
    with pytest.raises(ConfigError, match="filter"):
        compile_filter(text)


def test_filter_runtime_errors_name_row(tmp_path):
    rows = ALPACA[:1] + [{"instruction": "x", "output": "y"}]  # row 2 lacks 'input'
    p = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"a.jsonl row 2: filter 'len\(input\) > 0': field 'input' is missing"):
        load_sft_rows([spec(p, filter="len(input) > 0")])
    with pytest.raises(DataError, match=r"row 1: filter 'output > 3': cannot apply '>' to a string and a number"):
        load_sft_rows([spec(p, filter="output > 3")])
    rows, report = load_sft_rows([spec(p, filter="len(input) > 0")], skip_bad_rows=True)
    assert messages(rows) == ALPACA_MESSAGES[:1]
    assert report.sources[0].skipped == 1


def test_filter_and_samples_on_rows(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    rows, report = load_sft_rows([spec(p, filter="input=''")])
    assert messages(rows) == ALPACA_MESSAGES[1:]
    src = report.sources[0]
    assert (src.read, src.filtered, src.kept, src.used) == (3, 1, 2, 2)
    with pytest.raises(DataError, match=r"a.jsonl:filter=.*: no usable rows \(read 3, filtered 3"):
        load_sft_rows([spec(p, filter="len(output) > 100")])


# --- file types -----------------------------------------------------------------------------------

def _write_all_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(tmp_path / "a.jsonl", ALPACA)}
    paths["json"] = tmp_path / "a.json"
    paths["json"].write_text(json.dumps(ALPACA, indent=2))
    paths["json_lines_in_json"] = write_jsonl(tmp_path / "lines.json", ALPACA)
    paths["parquet"] = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), paths["parquet"], row_group_size=2)
    paths["csv"] = tmp_path / "a.csv"
    paths["csv"].write_text('instruction,input,output\n"Add the numbers.","1 and 2",3\nName a colour.,,Blue\nSay hi.,,Hi!\n')
    paths["tsv"] = tmp_path / "a.tsv"
    paths["tsv"].write_text("instruction\tinput\toutput\n" + "".join(
        f"{r['instruction']}\t{r['input']}\t{r['output']}\n" for r in ALPACA))
    paths["gz"] = tmp_path / "a.jsonl.gz"
    with gzip.open(paths["gz"], "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ALPACA))
    return paths


def test_every_file_type_gives_the_same_rows(tmp_path):
    for kind, path in _write_all_types(tmp_path).items():
        rows, report = load_sft_rows([parse_data_spec(str(path))])
        assert messages(rows) == ALPACA_MESSAGES, kind
        assert report.sources[0].format == "alpaca"


def test_json_array_is_parsed_incrementally(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_CHUNK", 7)  # rows and numbers straddle every chunk boundary
    rows = [{"instruction": f"Q{i} " + "x" * (i % 13), "input": "", "output": str(10 ** (i % 9))} for i in range(50)]
    p = tmp_path / "a.json"
    p.write_text(" [\n" + ",\n  ".join(json.dumps(r) for r in rows) + "\n ]\n")
    got, _ = load_sft_rows([spec(p)])
    assert [m[1]["content"] for m in messages(got)] == [r["output"] for r in rows]
    p.write_text(json.dumps(rows[:3])[:-1] + ", {\"instruction\": \"x\", \"output\": }]")
    with pytest.raises(DataError, match=r"a.json row 4: not valid JSON"):
        load_sft_rows([spec(p)])


def test_folder_with_split_files(tmp_path):
    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    write_jsonl(d / "data" / "train-00000-of-00002.jsonl", ALPACA[:2])
    write_jsonl(d / "data" / "train-00001-of-00002.jsonl", ALPACA[2:])
    write_jsonl(d / "data" / "test.jsonl", [{"instruction": "T", "input": "", "output": "t"}])
    (d / "README.md").write_text("# card")
    rows, _ = load_sft_rows([spec(d)])  # default: the train files, in name order
    assert messages(rows) == ALPACA_MESSAGES
    rows, _ = load_sft_rows([spec(d, split="test")])
    assert messages(rows)[0][0]["content"] == "T"
    with pytest.raises(DataError, match="no files for split 'validation'"):
        load_sft_rows([spec(d, split="validation")])
    with pytest.raises(ConfigError, match="split= applies to folders and hub datasets"):
        load_sft_rows([spec(d / "data" / "test.jsonl", split="train")])


def test_text_file_is_not_sft_data(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello\n")
    with pytest.raises(DataError, match="a plain-text file holds documents, not rows"):
        load_sft_rows([spec(p)])


# --- real samples (../shared/data) ----------------------------------------------------------------

def test_real_alpaca_gpt4_and_alpaca(shared_data):
    raw = [json.loads(line) for line in open(shared_data / "alpaca_gpt4" / "alpaca_en_demo.jsonl")]
    rows, report = load_sft_rows([spec(shared_data / "alpaca_gpt4" / "alpaca_en_demo.jsonl")])
    assert len(rows) == len(raw) == 999 and report.sources[0].format == "alpaca"
    for r, m in zip(raw, messages(rows)):
        assert [t["role"] for t in m] == ["user", "assistant"]
        assert m[1]["content"] == r["output"]
        assert m[0]["content"] == (r["instruction"] + "\n\n" + r["input"] if r["input"] else r["instruction"])
    assert sum("\n\n" + r["input"] in m[0]["content"] for r, m in zip(raw, messages(rows)) if r["input"]) == 412
    rows, report = load_sft_rows([parse_data_spec(f"{shared_data}/alpaca/alpaca_data_first200.jsonl:samples=50,seed=3")])
    again, _ = load_sft_rows([parse_data_spec(f"{shared_data}/alpaca/alpaca_data_first200.jsonl:samples=50,seed=3")])
    assert len(rows) == 50 and rows == again and report.sources[0].read == 200


def test_real_gsm8k_as_sft(shared_data):
    rows, report = load_sft_rows([spec(shared_data / "gsm8k" / "train_first500.jsonl", filter="'####' in answer")])
    assert report.sources[0].format == "gsm8k" and len(rows) == 500
    assert all(m[0]["role"] == "user" and m[1]["content"].rsplit("#### ", 1)[1].strip().lstrip("-").replace(",", "").isdigit()
               for m in messages(rows))


def test_real_dpo_mix_sharegpt_ranking(shared_data):
    path = shared_data / "dpo_mix_en" / "dpo_en_demo.jsonl"
    raw = [json.loads(line) for line in open(path)]
    rows, report = load_dpo_rows([spec(path)])
    assert report.sources[0].format == "sharegpt_ranking" and len(rows) == 300
    for r, d in zip(raw, rows):
        assert d["prompt"][-1]["role"] == "user"
        assert [m["content"] for m in d["prompt"]] == [t["value"] for t in r["conversations"]]
        assert d["chosen"] == [{"role": "assistant", "content": r["chosen"]["value"]}]
        assert d["rejected"] == [{"role": "assistant", "content": r["rejected"]["value"]}]
        assert d["chosen"] != d["rejected"]
    assert sum(d["prompt"][0]["role"] == "system" for d in rows) == 80
    assert sum(len(d["prompt"]) > 1 and d["prompt"][0]["role"] == "user" for d in rows) == 106
    # the same file read as SFT: sharegpt conversations end with the user's turn -> a row error
    with pytest.raises(DataError, match=r"dpo_en_demo.jsonl row 1: field 'conversations' must end with an assistant turn"):
        load_sft_rows([spec(path)])


def _hh_text(msgs):
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs)


def test_real_hh_rlhf(shared_data):
    path = shared_data / "hh_rlhf" / "harmless-base_test_first1000.jsonl"
    # real defects: row 87's chosen transcript ends with an empty Assistant turn
    with pytest.raises(DataError) as e:
        load_dpo_rows([spec(path)])
    assert str(e.value) == f"{path} row 87: field 'chosen' has an empty final Assistant reply" + SKIP_HINT
    rows, report = load_dpo_rows([spec(path)], skip_bad_rows=True)
    src = report.sources[0]
    assert src.format == "hh_rlhf" and (src.read, src.skipped, src.used) == (1000, 5, 995) and len(rows) == 995
    assert src.skip_examples[0].endswith("row 87: field 'chosen' has an empty final Assistant reply")
    raw = [json.loads(line) for i, line in enumerate(open(path), 1) if i not in {87, 517, 668, 764, 926}]
    norm = lambda s: " ".join(s.split())  # noqa: E731  (turn contents are stripped)
    for r, d in zip(raw, rows):
        assert d["prompt"][-1]["role"] == "user" and d["chosen"] != d["rejected"]
        prompt = _hh_text(d["prompt"])
        assert norm(r["chosen"]).startswith(norm(prompt)) and norm(r["rejected"]).startswith(norm(prompt))
        assert norm(prompt + _hh_text(d["chosen"])) == norm(r["chosen"])
        assert norm(prompt + _hh_text(d["rejected"])) == norm(r["rejected"])
    json.dumps(report.to_dict())
    assert "skipped 3 x field 'chosen' has an empty final Assistant reply" in str(report)


def test_real_text_corpora(shared_data):
    report = LoadReport("text")
    docs = list(iter_text_documents([spec(shared_data / "c4" / "c4_demo.jsonl")], report=report))
    assert len(docs) == 300 and report.sources[0].used == 300 and all(d == d.strip() and d for d in docs)
    wiki = list(iter_text_documents([spec(shared_data / "wikitext2" / "wiki.test.raw")]))
    assert wiki[0] == "= Robert Boulter =" and len(wiki) == 2891 and not any("\r" in d for d in wiki)
    shakes = iter_text_documents([spec(shared_data / "tinyshakespeare" / "input.txt")])
    first = list(itertools.islice(shakes, 3))
    assert first == ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.",
                     "First Citizen:\nYou are all resolved rather to die than to famish?"]
    lines = list(iter_text_documents([spec(shared_data / "tinyshakespeare" / "input.txt", text_unit="line",
                                           filter="len(text) > 0", samples=10)]))
    assert lines[:2] == ["First Citizen:", "Before we proceed any further, hear me speak."] and len(lines) == 10
    articles = list(iter_text_documents([spec(shared_data / "wikipedia" / "wiki_demo.txt")]))
    assert len(articles) == 30 and articles[0].startswith("Anarchism")


# --- errors ---------------------------------------------------------------------------------------

def test_row_errors_name_file_row_and_field(tmp_path):
    p = tmp_path / "x.jsonl"
    lines = [json.dumps(ALPACA[1])] * 15 + [""] + [json.dumps({**ALPACA[1], "output": None})]  # row 17
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_sft_rows([spec(p)])
    assert str(e.value) == f"{p} row 17: field 'output' must be a string, got null" + SKIP_HINT
    assert isinstance(e.value, UpstackError) and e.value.exit_code == 2
    p.write_text(json.dumps(ALPACA[0]) + "\n{not json\n[1, 2]\n" + json.dumps(ALPACA[1]) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl row 2: is not valid JSON"):
        load_sft_rows([spec(p)])
    rows, report = load_sft_rows([spec(p)], skip_bad_rows=True)
    assert messages(rows) == ALPACA_MESSAGES[:2]
    src = report.sources[0]
    assert (src.read, src.skipped, src.used) == (4, 2, 2)
    assert src.skip_examples[1] == f"{p} row 3: must be a JSON object, got list"
    p.write_text(json.dumps({**ALPACA[0], "output": 5}) + "\n")
    with pytest.raises(DataError, match=r"no usable rows \(read 1, filtered 0, skipped 1.*first skipped: .*row 1: field 'output'"):
        load_sft_rows([spec(p)], skip_bad_rows=True)


def test_csv_errors(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("instruction,input,output\nA,,B\nC,,D,extra\n")
    with pytest.raises(DataError, match=r"a.csv row 2: has more values than the header has columns \(3\)"):
        load_sft_rows([spec(p)])
    p.write_text("instruction,input,output\nA,,\n")
    with pytest.raises(DataError, match=r"a.csv row 1: field 'output' must not be empty"):
        load_sft_rows([spec(p)])


def test_source_errors(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"a.jsonl: cannot tell the format .*\(foo\).*pass format=NAME"):
        load_sft_rows([spec(p)])
    with pytest.raises(DataError, match=r"format 'hh_rlhf' is a DPO format; SFT formats: alpaca"):
        load_sft_rows([spec(p, format="hh_rlhf")])
    with pytest.raises(DataError, match="no such file or folder"):
        load_sft_rows([spec(tmp_path / "missing.jsonl")])
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_sft_rows([spec(tmp_path / "a.xlsx")])
    with pytest.raises(ConfigError, match="no SFT data given"):
        load_sft_rows([])
    with pytest.raises(DataError, match=r"samples=5 but only 3 rows are usable"):
        load_sft_rows([spec(write_jsonl(tmp_path / "b.jsonl", ALPACA), samples=5)])


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_sft_rows([parse_data_spec("someone/some-dataset:split=train")])
    msg = str(e.value)
    assert msg.startswith("someone/some-dataset: not a local file or folder, so it was read as a Hugging Face Hub")
    assert "offline" in msg and "download" in msg and "local" in msg
    with pytest.raises(DataError, match="offline"):
        iter_text_documents([spec("someone/some-corpus")])


def test_cli_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    import upstack.cli as cli

    p = write_jsonl(tmp_path / "x.jsonl", [{**ALPACA[0], "output": None}])

    def build_parser():
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=lambda args: load_sft_rows([parse_data_spec(args.data)]), debug=False, quiet=True)
        parser.add_argument("data")
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    assert cli.main([f"{p}:format=alpaca"]) == 2
    assert capsys.readouterr().err == f"error: {p} row 1: field 'output' must be a string, got null{SKIP_HINT}\n"


# --- mixing ---------------------------------------------------------------------------------------

def _numbered(tmp_path, name, n):
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name}{i}", "completion": "ok"} for i in range(n)])


def _sources(rows):
    return [r["messages"][0]["content"].rstrip("0123456789") for r in rows]


def test_mix_with_samples_is_exact_and_deterministic(tmp_path):
    a, b = _numbered(tmp_path, "a", 100), _numbered(tmp_path, "b", 40)
    specs = [spec(a, samples=30, seed=1), spec(b, samples=10, seed=2)]
    rows, report = load_sft_rows(specs, seed=5)
    assert sorted(_sources(rows)) == ["a"] * 30 + ["b"] * 10
    assert [s.used for s in report.sources] == [30, 10] and report.used == 40
    assert load_sft_rows(specs, seed=5)[0] == rows  # same seed, same rows, same order
    other = load_sft_rows(specs, seed=6)[0]
    assert other != rows and sorted(map(str, other)) == sorted(map(str, rows))  # seed only reorders the mixture
    resampled = load_sft_rows([spec(a, samples=30, seed=9), specs[1]], seed=5)[0]
    assert {str(r) for r in resampled} != {str(r) for r in rows}  # the source seed picks the rows
    assert len({r["messages"][0]["content"] for r in rows}) == 40  # no repeats
    assert _sources(rows[:10]) != ["a"] * 10  # sources interleave


def test_mix_with_weights_is_proportional(tmp_path):
    a, b, c = _numbered(tmp_path, "a", 100), _numbered(tmp_path, "b", 30), _numbered(tmp_path, "c", 7)
    rows, report = load_sft_rows([spec(a, weight=3), spec(b, weight=1), spec(c)], seed=0)
    # b is the bottleneck: 30 rows at 1/4 of the weighted total -> 120 weighted rows, 90 of them from a
    assert [s.used for s in report.sources] == [90, 30, 7]
    assert sorted(_sources(rows)) == ["a"] * 90 + ["b"] * 30 + ["c"] * 7
    assert load_sft_rows([spec(a, weight=3), spec(b, weight=1), spec(c)], seed=0)[0] == rows


def test_load_dpo_rows_mixes_formats(tmp_path):
    orca = write_jsonl(tmp_path / "orca.jsonl", [
        {"system": "", "question": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)])
    uf = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": f"p{i}", "chosen": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": "b"}]} for i in range(6)])
    rows, report = load_dpo_rows([spec(orca), spec(uf, samples=3)], seed=1)
    assert [s.format for s in report.sources] == ["orca_dpo", "preference"] and len(rows) == 7
    assert all(r["prompt"][-1]["role"] == "user" and len(r["chosen"]) == 1 for r in rows)
    assert sum(r["chosen"][0]["content"] == "a" for r in rows) == 3


# --- text streaming -------------------------------------------------------------------------------

def test_text_documents_stream_a_large_file(tmp_path):
    para = ("word " * 200).strip()
    p = tmp_path / "big.txt"
    with open(p, "w") as fh:
        for i in range(8000):
            fh.write(f"doc {i} {para}\n\n")
    size = p.stat().st_size
    assert size > 8_000_000
    docs = iter_text_documents([spec(p)])
    assert inspect.isgenerator(docs)
    assert next(docs).startswith("doc 0 word")
    tracemalloc.start()
    count = 1 + sum(1 for _ in docs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 8000 and peak < size / 20  # nowhere near the whole file in memory


def test_text_documents_from_rows_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": f"text {i}", "lang": "en" if i % 2 else "de"} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=500)
    docs = list(iter_text_documents([spec(tmp_path / "c.parquet", field="body")]))
    assert docs == [r["body"] for r in rows]
    docs = list(iter_text_documents([spec(tmp_path / "c.parquet", field="body", filter="lang=en", samples=5)]))
    assert docs == ["text 1", "text 3", "text 5", "text 7", "text 9"]
    with pytest.raises(DataError, match=r"c.parquet: no column 'text' \(columns: id, body, lang\); pass field=NAME"):
        list(iter_text_documents([spec(tmp_path / "c.parquet")]))
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"text": ""}, {"text": 3}, {"text": "b"}]))
    with pytest.raises(DataError, match=r"d.json row 3: field 'text' must be a string, got number"):
        list(iter_text_documents([spec(tmp_path / "d.json")]))
    report = LoadReport("text")
    assert list(iter_text_documents([spec(tmp_path / "d.json")], skip_bad_rows=True, report=report)) == ["a", "b"]
    src = report.sources[0]
    assert (src.read, src.filtered, src.skipped, src.used) == (4, 1, 1, 2)


def test_text_mixing_by_weight(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("".join(f"a{i}\n" for i in range(1000)))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(200)])
    specs = [spec(a, weight=3), spec(b, weight=1)]
    report = LoadReport("text")
    docs = list(iter_text_documents(specs, seed=4, report=report))
    assert docs == list(iter_text_documents(specs, seed=4))  # deterministic
    assert docs != list(iter_text_documents(specs, seed=5))
    n_a, n_b = sum(d[0] == "a" for d in docs), sum(d[0] == "b" for d in docs)
    assert n_b == 200 and 597 <= n_a <= 603  # stops when b runs out; 3:1
    assert all(abs(sum(d[0] == "a" for d in docs[:k]) - 0.75 * k) <= 2 for k in range(1, len(docs)))  # evenly spread
    assert [s.used for s in report.sources] == [n_a, n_b]
    assert [d for d in docs if d[0] == "a"] == [f"a{i}" for i in range(n_a)]  # each source in its own order
    chained = list(iter_text_documents([spec(a, samples=2), spec(b, samples=2)]))
    assert chained == ["a0", "a1", "b0", "b1"]
    with pytest.raises(ConfigError, match="give weight= to every source or to none"):
        iter_text_documents([spec(a, weight=1), spec(b)])


def test_text_checks_happen_before_streaming(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        iter_text_documents([spec(tmp_path / "nope.txt")])  # raised at the call, not at the first next()
    with pytest.raises(ConfigError, match="format 'alpaca' is for SFT data"):
        iter_text_documents([spec(tmp_path / "nope.txt", format="alpaca")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"empty.txt.*no usable documents"):
        list(iter_text_documents([spec(empty)]))


def test_text_units_and_bad_utf8(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert list(iter_text_documents([spec(p)])) == ["one\ntwo", "three"]
    assert list(iter_text_documents([spec(p, text_unit="line")])) == ["one", "two", "three"]
    assert list(iter_text_documents([spec(p, text_unit="file")])) == ["one\ntwo\n\nthree"]
    p.write_bytes(b"good\nbad \xff\nfine\n")
    with pytest.raises(DataError, match=r"t.txt line 2: is not valid UTF-8"):
        list(iter_text_documents([spec(p)]))
    assert list(iter_text_documents([spec(p)], skip_bad_rows=True)) == ["good", "fine"]
