"""Issue 13, the data and recipe side: hostile or broken inputs end in one line and exit 2, quickly and in
bounded memory (YAML alias bombs, huge SFT/DPO rows, deep filters, truncated gzip files, NUL lines,
deeply nested JSON, bad CSV)."""

import gzip
import json
import time
from pathlib import Path

import pytest
from tiny import build_tiny_model, build_tiny_tokenizer

from upstack.cli import main
from upstack.data.benchmarks import read_mmlu_csv
from upstack.data.filters import compile_filter
from upstack.data.jsonl import read_json_rows
from upstack.data.loading import (
    DataSpec,
    iter_text_documents,
    load_sft_rows,
    parse_data_spec,
)
from upstack.errors import ConfigError, DataError
from upstack.pipeline import load_recipe


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ALPACA = [{"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue"}]


# --- 6. YAML alias bombs ----------------------------------------------------------------------------

def alias_bomb(levels: int = 9, width: int = 9) -> str:
    names = "abcdefghijklmnop"
    out = [f"{names[0]}: &{names[0]} [{','.join(['x'] * width)}]"]
    for i in range(1, levels):
        out.append(f"{names[i]}: &{names[i]} [{','.join(['*' + names[i - 1]] * width)}]")
    return "\n".join(out) + "\nstages:\n  up:\n    type: upscale\n    source: *" + names[levels - 1] + "\n"


def test_yaml_alias_bomb_is_refused_fast_with_one_line(tmp_path, capsys):
    p = tmp_path / "bomb.yaml"
    p.write_text(alias_bomb())
    assert len(p.read_bytes()) < 500
    t0 = time.perf_counter()
    assert main(["run", str(p), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(p) in err and "alias" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_yaml_self_referencing_alias_and_deep_nesting_are_one_line(tmp_path, capsys):
    p = tmp_path / "loop.yaml"
    p.write_text("stages: &s\n  up:\n    type: upscale\n    source: x\n    again: *s\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_recipe(p, tmp_path / "run")
    p.write_text("stages:\n  up:\n    type: upscale\n    source: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nest deeper than 100 levels"):
        load_recipe(p, tmp_path / "run")
    assert main(["run", str(p), "--dry-run"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "src", "mistral", num_hidden_layers=4)


def test_yaml_anchors_and_merge_keys_still_work(tmp_path, model):
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"stages:\n  a:\n    type: upscale\n    source: {model}\n    m: 1\n"
                     f"  b:\n    type: upscale\n    source: {model}\n    m: 1\n")
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(f"defaults: &defaults\n  type: upscale\n  source: {model}\n  m: 1\n"
                        "stages:\n  a: *defaults\n  b:\n    <<: *defaults\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'defaults'"):
        load_recipe(anchored, tmp_path / "run")  # the anchor itself loads; only the extra key is flagged
    anchored.write_text(f"stages:\n  a: &defaults\n    type: upscale\n    source: {model}\n    m: 1\n"
                        "  b:\n    <<: *defaults\n")
    want = load_recipe(plain, tmp_path / "run")
    got = load_recipe(anchored, tmp_path / "run")
    assert {k: s.resolved for k, s in got.stages.items()} == {k: s.resolved for k, s in want.stages.items()}


# --- 7. huge rows in SFT / DPO data -----------------------------------------------------------------

MISTRAL = Path("/work/shared/data/tokenizers/mistral-7b-v0.1-hf")


@pytest.fixture(scope="module", params=["tiny", "mistral"])
def tok(request, tmp_path_factory):
    """The tests' byte-level BPE, and a real SentencePiece-style tokenizer (no whitespace pre-split) when
    the shared samples are there."""
    from transformers import AutoTokenizer

    from upstack.data.chat import resolve_template
    if request.param == "tiny":
        t = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    elif MISTRAL.is_dir():
        t = AutoTokenizer.from_pretrained(MISTRAL)
    else:
        pytest.skip(f"{MISTRAL} is not here")
    resolve_template(t, "alpaca", request.param)
    return t


def conv(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def encode(tok, convs, max_length, train_from=None):
    from upstack.data.chat import encode_conversations
    enc = encode_conversations(tok, convs, train_from or [0] * len(convs), max_length)
    return [(enc.get(i)[0].tolist(), enc.get(i)[1].tolist()) for i in range(len(enc))], enc.stats


def test_rows_under_the_bound_encode_exactly_as_untruncated(tok):
    convs = [conv("Add the numbers 1 and 2 please. " * 20, "The answer is 3. " * 30),
             conv("Say hi.", "Hi!"), conv("word " * 200, "reply " * 200),
             [m for i in range(40) for m in conv(f"q{i}", f"a{i}")]]  # more turns than max_length 16 keeps
    full, _ = encode(tok, convs, 10**9)
    for max_length in (16, 64, 10_000):
        got, stats = encode(tok, convs, max_length)
        assert got == [(ids[:max_length], mask[:max_length]) for ids, mask in full]
        assert stats["truncated"] == sum(len(ids) > max_length for ids, _ in full)


@pytest.mark.parametrize("filler", ["lorem ipsum dolor sit amet ", "x", "ab1 ", "\u00e9\u4e2d "])
def test_a_row_far_over_the_bound_keeps_the_same_first_tokens(tok, filler):
    big = filler * (200_000 // len(filler))
    for c in (conv(big, "ok"), conv("Q?", big), conv("Q?", "short") + [conv(big, big)[0], conv(big, big)[1]]):
        full, _ = encode(tok, [c], 10**9)
        got, stats = encode(tok, [c], 16)
        assert got == [(full[0][0][:16], full[0][1][:16])]
        assert stats["truncated"] == 1


def test_huge_row_is_tokenized_in_bounded_work(tok, monkeypatch):
    from upstack.data import chat
    seen = []
    real = type(tok).__call__

    def spy(self, text, *a, **kw):
        seen.extend(len(t) for t in (text if isinstance(text, list) else [text]))
        return real(self, text, *a, **kw)
    monkeypatch.setattr(type(tok), "__call__", spy)
    huge = "lorem ipsum " * 500_000  # 6 MB
    many_turns = [m for _ in range(5000) for m in conv("q " * 50, "a " * 50)]
    t0 = time.perf_counter()
    got, stats = encode(tok, [conv("Q?", huge), many_turns], 64)
    assert time.perf_counter() - t0 < 2.0
    assert max(seen) <= 2 * 64 * chat.MAX_CHARS_PER_TOKEN  # content bound plus the template's markup
    assert [len(ids) for ids, _ in got] == [64, 64] and stats["truncated"] == 2


def test_dpo_pairs_with_a_huge_prompt_are_dropped_not_tokenized_whole(tok):
    from upstack.data.chat import encode_pairs
    rows = [{"prompt": [{"role": "user", "content": "x " * 1_000_000}],
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            {"prompt": [{"role": "user", "content": "Q?"}],
             "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}]
    t0 = time.perf_counter()
    enc, kept, stats = encode_pairs(tok, rows, 32)
    assert time.perf_counter() - t0 < 2.0
    assert len(kept) == 1 and stats["pairs_dropped"] == 1


# --- 8. deeply nested filters -----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["-" * 1990 + "1", "not " * 499 + "x", "+" * 1990 + "1",
                                  "~" * 1990 + "1"])
def test_deep_filters_are_a_config_error(text):
    with pytest.raises(ConfigError, match="filter"):
        compile_filter(text)


def test_deep_filter_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "f.jsonl", ALPACA)
    with pytest.raises(ConfigError, match="nests deeper than 100 levels"):
        parse_data_spec(f"{data}:filter=" + "not " * 150 + "x")
    with pytest.raises(ConfigError, match="nests deeper than 100 levels"):
        parse_data_spec(f"{data}:filter=" + "-" * 1990 + "1")
    assert compile_filter("not " * 50 + "instruction")({"instruction": "a"}, 1) is True


# --- 12. truncated / corrupt compressed files --------------------------------------------------------

def truncated_gz(path, text):
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jsonl_gz_is_one_line_naming_the_file(tmp_path):
    text = "".join(json.dumps({**ALPACA[0], "output": f"{i} " * 50}) + "\n" for i in range(2000))
    p = truncated_gz(tmp_path / "sft.jsonl.gz", text)
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        load_sft_rows([DataSpec(path=str(p))])
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_sft_rows([DataSpec(path=str(p))], skip_bad_rows=True)  # a broken file is not a bad row


@pytest.mark.parametrize("name", ["docs.txt.gz", "docs.jsonl.gz", "docs.json.gz", "docs.csv.gz"])
def test_truncated_gz_text_and_row_files(tmp_path, name):
    if name.endswith(".txt.gz"):
        text = "".join(f"line {i} of some text\n" for i in range(20000))
    elif name.endswith(".csv.gz"):
        text = "text\n" + "".join(f"row {i} of some text\n" for i in range(20000))
    elif name.endswith(".json.gz"):
        text = json.dumps([{"text": f"row {i}"} for i in range(20000)])
    else:
        text = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20000))
    p = truncated_gz(tmp_path / name, text)
    with pytest.raises(DataError, match="gzip file is truncated or corrupt") as e:
        list(iter_text_documents([DataSpec(path=str(p))]))
    assert str(p) in str(e.value)


def test_not_gzip_at_all(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(b"this is not gzip data\n" * 10)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_sft_rows([DataSpec(path=str(p))])


# --- NUL bytes, deep JSON, bad CSV ------------------------------------------------------------------

def test_a_line_of_nul_bytes_says_so(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_bytes(json.dumps(ALPACA[0]).encode() + b"\n" + json.dumps(ALPACA[1]).encode() + b"\n"
                  + b"\x00" * 64 + b"\n")
    with pytest.raises(DataError, match=r"row 3: is NUL bytes \(0x00\): a binary or corrupt file\?"):
        load_sft_rows([DataSpec(path=str(p))])
    with pytest.raises(DataError, match=r"line 3: is NUL bytes \(0x00\)"):
        read_json_rows(p)


def test_deeply_nested_json_is_one_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ALPACA[0]) + "\n" + '{"a": ' + deep + "}\n")
    with pytest.raises(DataError, match="row 2: .*nests too deeply"):
        load_sft_rows([DataSpec(path=str(p))])
    with pytest.raises(DataError, match="line 2: .*nests too deeply"):
        read_json_rows(p)
    arr = tmp_path / "d.json"
    arr.write_text("[" + json.dumps(ALPACA[0]) + ", " + deep + "]")
    with pytest.raises(DataError, match="nests too deeply"):
        load_sft_rows([DataSpec(path=str(arr))])
    with pytest.raises(DataError, match="nests too deeply"):
        read_json_rows(arr)


def test_csv_errors_are_one_line(tmp_path):
    import csv
    old = csv.field_size_limit(131072)  # the default, whatever ran before
    try:
        p = tmp_path / "big.csv"
        p.write_text("instruction,input,output\n" + "a,b," + "x" * 200_000 + "\n")
        rows, _ = load_sft_rows([DataSpec(path=str(p))])  # a long field is data, not an error
        assert rows[0]["messages"][1]["content"] == "x" * 200_000
        bad = tmp_path / "bad.csv"
        bad.write_bytes(b"instruction,input,output\n" + b"a,b,c\n" * 10 + b"a,\xff\xfe,c\n")
        with pytest.raises(DataError, match="not valid UTF-8"):
            load_sft_rows([DataSpec(path=str(bad))])
        csv.field_size_limit(131072)
        mmlu = tmp_path / "x_dev.csv"
        mmlu.write_bytes(b'"' + b"q" * 200_000 + b'",a,b,c,d,A\n')
        assert read_mmlu_csv(mmlu)[0]["answer"] == 0
    finally:
        csv.field_size_limit(old)
