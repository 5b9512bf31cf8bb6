"""`upstack decontaminate`: n-gram overlap removal, per-benchmark counts, side file, streaming, bad input."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import upstack.data.decontaminate as dc
from upstack.cli import main
from upstack.data.decontaminate import DecontaminateConfig, decontaminate, words

Q1 = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
      "How many clips did Natalia sell altogether in April and May?")
A1 = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
Q2 = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?"
A2 = "Weng earns 12/60 = $0.2 per minute.\n#### 10"
ARC = {"id": "a1", "question": {"stem": "Which gas do green plants take in from the air and use during the process "
                                        "of photosynthesis to make their food?",
                                "choices": [{"text": "carbon dioxide", "label": "A"}, {"text": "oxygen", "label": "B"}]},
       "answerKey": "A"}


@pytest.fixture
def benches(tmp_path):
    gsm = tmp_path / "gsm8k_test.jsonl"
    gsm.write_text(json.dumps({"question": Q1, "answer": A1}) + "\n" + json.dumps({"question": Q2, "answer": A2}) + "\n")
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps(ARC) + "\n")
    return gsm, arc


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_words_normalisation():
    assert words("Hello, WORLD! It's “quoted” — 3.5%") == ["hello", "world", "its", "quoted", "35"]


def test_removes_overlapping_rows_and_reports_per_benchmark(tmp_path, benches):
    gsm, arc = benches
    q1_words = Q1.split()
    rows = [
        {"instruction": "Write a poem about the sea.", "output": "The sea is wide and deep and blue."},  # clean
        {"instruction": Q1.upper().replace(",", ";"), "output": "72"},  # case + punctuation changed: removed
        {"instruction": " ".join(q1_words[:12]), "output": "no"},  # only 12 words of overlap: kept
        # 6 + 7 words split over two fields: n-grams never cross fields, kept
        {"instruction": " ".join(q1_words[:6]), "output": " ".join(q1_words[6:13])},
        {"messages": [{"role": "user", "content": "Please help: " + ARC["question"]["stem"]}]},  # nested: removed
        {"text": "Answer this. " + Q2 + " Also " + ARC["question"]["stem"]},  # both benchmarks
    ]
    data = _write(tmp_path / "train.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    rep = decontaminate(DecontaminateConfig(data=str(data), against=[str(gsm), f"arc={arc}"], out=str(out)))
    assert rep["rows"] == 6 and rep["removed"] == 3 and rep["kept"] == 3
    assert rep["benchmarks"]["gsm8k_test"]["rows_removed"] == 2
    assert rep["benchmarks"]["arc"]["rows_removed"] == 2
    assert rep["benchmarks"]["gsm8k_test"]["examples"] == 2 and rep["benchmarks"]["gsm8k_test"]["format"] == "gsm8k"
    # kept rows are the input lines, byte for byte
    lines = data.read_text().splitlines(keepends=True)
    assert out.read_text() == "".join(lines[i] for i in (0, 2, 3))
    removed = [json.loads(line) for line in (tmp_path / "clean.removed.jsonl").read_text().splitlines()]
    assert [r["line"] for r in removed] == [2, 5, 6]
    assert removed[0]["row"] == rows[1] and removed[0]["benchmarks"] == ["gsm8k_test"]
    assert removed[2]["benchmarks"] == ["gsm8k_test", "arc"]
    assert len(removed[0]["ngram"].split()) == 13 and removed[0]["ngram"].startswith("natalia sold clips")


def test_fields_option_and_shorter_ngrams(tmp_path, benches):
    gsm, _ = benches
    data = _write(tmp_path / "t.jsonl", [{"prompt": "hi", "response": Q1}, {"prompt": Q1, "response": "hi"}])
    rep = decontaminate(DecontaminateConfig(data=str(data), against=[str(gsm)], out=str(tmp_path / "o.jsonl"),
                                            fields=["prompt"]))
    assert rep["removed"] == 1
    # 12 words of overlap match with --ngram 8
    data2 = _write(tmp_path / "t2.jsonl", [{"text": " ".join(Q1.split()[:12])}])
    rep = decontaminate(DecontaminateConfig(data=str(data2), against=[str(gsm)], out=str(tmp_path / "o2.jsonl"),
                                            ngram=8))
    assert rep["removed"] == 1


def test_streaming_across_chunks_matches_single_chunk(tmp_path, benches, monkeypatch):
    gsm, arc = benches
    rows = []
    for i in range(50):
        rows.append({"text": f"row {i} " + (Q1 if i % 7 == 3 else "plain words that match nothing at all here")})
    data = _write(tmp_path / "t.jsonl", rows)
    a = decontaminate(DecontaminateConfig(data=str(data), against=[str(gsm), str(arc)], out=str(tmp_path / "a.jsonl")))
    monkeypatch.setattr(dc, "CHUNK_ROWS", 3)
    b = decontaminate(DecontaminateConfig(data=str(data), against=[str(gsm), str(arc)], out=str(tmp_path / "b.jsonl")))
    assert a["removed"] == b["removed"] == 7
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.removed.jsonl").read_bytes() == (tmp_path / "b.removed.jsonl").read_bytes()


def test_real_benchmarks_catch_copied_rows(tmp_path, shared_data):
    alpaca = (shared_data / "alpaca_gpt4" / "alpaca_en_demo.jsonl").read_text().splitlines()[:200]
    gsm = [json.loads(line) for line in (shared_data / "gsm8k" / "train_first500.jsonl").read_text().splitlines()[:3]]
    mmlu_q = "Which of these branches of the trigeminal nerve contain somatic motor processes?"  # 12 words
    extra = [json.dumps({"instruction": g["question"], "input": "", "output": g["answer"]}) for g in gsm]
    # the question and its gold answer in one field: 16 words, caught
    extra.append(json.dumps({"instruction": "Anatomy quiz. " + mmlu_q + " None of the above.", "output": "ok"}))
    # the 12-word question with a wrong answer: no 13-gram in common, kept
    extra.append(json.dumps({"instruction": mmlu_q + " The mental nerve.", "output": "ok"}))
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(alpaca + extra) + "\n")
    rep = decontaminate(DecontaminateConfig(
        data=str(data), out=str(tmp_path / "clean.jsonl"),
        against=[str(shared_data / "gsm8k"), f"mmlu={shared_data / 'mmlu'}", str(shared_data / "arc_challenge")]))
    assert rep["benchmarks"]["gsm8k"]["rows_removed"] == 3
    assert rep["benchmarks"]["mmlu"]["rows_removed"] == 1
    assert rep["removed"] == 4 and rep["kept"] == 201


def _naive(rows, bench_texts, n, fields=()):
    """The straightforward implementation: a set of n-gram tuples per benchmark, one per row."""
    grams = set()
    for t in bench_texts:
        w = words(t)
        grams |= {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    removed = []
    for r, row in enumerate(rows):
        hit = False
        for s in row.values():
            w = words(s)
            if any(tuple(w[i:i + n]) in grams for i in range(len(w) - n + 1)):
                hit = True
        if hit:
            removed.append(r)
    return removed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bench=st.lists(st.lists(st.sampled_from("abcde"), min_size=1, max_size=8).map(" ".join), min_size=1, max_size=4),
    rows=st.lists(st.dictionaries(st.sampled_from(["x", "y"]),
                                  st.lists(st.sampled_from(list("abcde") + [",", "A."]), max_size=12).map(" ".join),
                                  min_size=1), min_size=1, max_size=12),
    n=st.integers(2, 4),
)
def test_matches_naive_implementation(tmp_path_factory, bench, rows, n):
    d = tmp_path_factory.mktemp("prop")
    b = d / "bench.txt"
    b.write_text("\n".join(bench) + "\n")
    data = _write(d / "t.jsonl", rows)
    rep = decontaminate(DecontaminateConfig(data=str(data), against=[str(b)], out=str(d / "o.jsonl"), ngram=n,
                                            overwrite=True))
    removed = [json.loads(line)["line"] - 1 for line in (d / "o.removed.jsonl").read_text().splitlines()]
    bench_lines = [t for t in bench if t.strip()]
    assert removed == _naive(rows, bench_lines, n)
    assert rep["removed"] == len(removed)


# ------------------------------------------------------------------------------------------- errors
def _err(capsys, argv):
    assert main(argv) == 2
    e = capsys.readouterr().err
    assert e.startswith("error: ") and "Traceback" not in e and e.count("\n") == 1, e
    return e


def test_bad_row_leaves_no_output(tmp_path, benches, capsys, monkeypatch):
    gsm, _ = benches
    monkeypatch.setattr(dc, "CHUNK_ROWS", 2)
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{oops}\n')
    e = _err(capsys, ["decontaminate", str(data), "--against", str(gsm), "--out", str(tmp_path / "o.jsonl")])
    assert "t.jsonl: line 4: not valid JSON" in e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc.jsonl", "gsm8k_test.jsonl", "t.jsonl"]


def test_cli_errors_and_report(tmp_path, benches, capsys):
    gsm, _ = benches
    data = _write(tmp_path / "t.jsonl", [{"text": Q1}, {"text": "fine"}])
    out = tmp_path / "o.jsonl"
    assert main(["decontaminate", str(data), "--against", f"gsm={gsm}", "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["benchmarks"]["gsm"]["rows_removed"] == 1 and rep["rows_per_second"] > 0
    assert "exists" in _err(capsys, ["decontaminate", str(data), "--against", str(gsm), "--out", str(out)])
    assert main(["decontaminate", str(data), "--against", str(gsm), "--out", str(out), "--overwrite"]) == 0
    assert "gsm8k_test: 1 rows removed" in capsys.readouterr().out
    assert "file not found" in _err(capsys, ["decontaminate", str(tmp_path / "none.jsonl"), "--against", str(gsm),
                                             "--out", str(tmp_path / "x.jsonl")])
    assert "no such file or folder" in _err(capsys, ["decontaminate", str(data), "--against", "missing.jsonl",
                                                     "--out", str(tmp_path / "x.jsonl")])
    assert "none of the fields" in _err(capsys, ["decontaminate", str(data), "--against", str(gsm), "--fields",
                                                 "prompt", "--out", str(tmp_path / "x.jsonl")])
    assert "must differ" in _err(capsys, ["decontaminate", str(data), "--against", str(gsm), "--out", str(data)])
    bad = tmp_path / "badbench.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    assert "badbench.jsonl: line 2: missing field 'answer'" in _err(
        capsys, ["decontaminate", str(data), "--against", str(bad), "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("aBcÉé ,.'\"-\n\t\x00\x1c\xa0\u2003\u2019\u201cİß\U0001f600")),
                        max_size=30), min_size=1, max_size=5))
def test_word_hashes_follow_words(texts):
    """The numpy byte path splits exactly like words(), and equal words hash equally."""
    import numpy as np

    h, owner = dc.word_hashes(texts)
    for k, t in enumerate(texts):
        assert int((owner == k).sum()) == len(words(t))
    rejoined = [" ".join(words(t)) for t in texts]
    h2, _ = dc.word_hashes(rejoined)
    assert np.array_equal(h, h2)


def test_word_hashes_distinct():
    import itertools

    import numpy as np

    vocab = ["".join(p) for k in (1, 2, 3) for p in itertools.product("abcdefghijklmnopqrstuvwxyz0", repeat=k)]
    vocab += [w * 40 for w in vocab[:500]]  # long words too
    h, _ = dc.word_hashes([" ".join(vocab)])
    assert len(h) == len(vocab) == len(np.unique(h))


def test_punctuation_table_covers_ascii():
    assert all(c not in "".join(words(string.punctuation + " a")) for c in string.punctuation)
