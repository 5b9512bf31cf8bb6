"""Read benchmark files in their own formats into validated documents (no torch, no lm_eval here).

Each reader returns canonical documents, the same fields the Hugging Face versions of the datasets
have, so the harness's own prompt templates apply unchanged:

    arc         {"id", "question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}
    hellaswag   {"query", "choices": [...], "label": int, "ctx"}   (the harness's preprocessing)
    mmlu        {"question", "choices": [4], "answer": int, "subject"}
    truthfulqa  {"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": {"choices", "labels"}}
    winogrande  {"sentence", "option1", "option2", "answer": "1" | "2"}
    gsm8k       {"question", "answer"}                            (answer ends "#### n")

A malformed file raises DataError naming the file, the row (line for JSONL, item for a JSON array,
record for CSV) and the field.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from upstack.data.files import allow_long_csv_fields, special_file_error
from upstack.data.jsonl import loads, read_json_rows
from upstack.data.spec import split_named
from upstack.errors import DataError

FORMATS = ("arc", "hellaswag", "mmlu", "truthfulqa", "winogrande", "gsm8k")

_MMLU_LETTERS = "ABCD"
_CACHE: dict[tuple, list[dict]] = {}


def _field(path, where, row: dict, dotted: str, types=str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{path}: {where}: missing field {dotted!r} (fields: {', '.join(sorted(row))})")
        value = value[part]
    if not isinstance(value, types):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{path}: {where}: field {dotted!r} should be {want}, got {type(value).__name__} {value!r:.60}")
    return value


# ------------------------------------------------------------------------------------- per format
def _arc(path, where, row):
    q = row.get("question")
    if isinstance(q, dict):  # the official ARC JSONL: question.stem, question.choices[{text,label}]
        stem = _field(path, where, row, "question.stem")
        choices = _field(path, where, row, "question.choices", list)
        texts, labels = [], []
        for j, c in enumerate(choices):
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not isinstance(c.get("label"), str):
                raise DataError(f"{path}: {where}: field 'question.choices[{j}]' should be {{'text': str, 'label': str}}")
            texts.append(c["text"])
            labels.append(c["label"])
    else:  # the Hugging Face layout: question str, choices {text: [...], label: [...]}
        stem = _field(path, where, row, "question")
        texts = _field(path, where, row, "choices.text", list)
        labels = [str(x) for x in _field(path, where, row, "choices.label", list)]
    key = _field(path, where, row, "answerKey", (str, int))
    key = str(key)
    if len(texts) < 2 or len(texts) != len(labels):
        raise DataError(f"{path}: {where}: field 'question.choices' needs at least 2 choices with labels")
    if key not in labels:
        raise DataError(f"{path}: {where}: field 'answerKey' is {key!r}, not one of the choice labels {labels}")
    return {"id": str(row.get("id", where)), "question": stem, "choices": {"text": texts, "label": labels},
            "answerKey": key}


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag cleanup (lm_eval/tasks/hellaswag/utils.py)."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(path, where, row):
    endings = _field(path, where, row, "endings", list)
    if len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{path}: {where}: field 'endings' should be a list of at least 2 strings")
    label = _field(path, where, row, "label", (int, str))
    try:
        label = int(label)
    except ValueError:
        raise DataError(f"{path}: {where}: field 'label' should be an index into 'endings', got {label!r}") from None
    if not 0 <= label < len(endings):
        raise DataError(f"{path}: {where}: field 'label' is {label}, outside 0..{len(endings) - 1}")
    activity = _field(path, where, row, "activity_label")
    if "ctx_a" in row or "ctx" not in row:
        ctx = _field(path, where, row, "ctx_a") + " " + _field(path, where, row, "ctx_b").capitalize()
    else:
        ctx = _field(path, where, row, "ctx")
    return {"query": hellaswag_preprocess(activity + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in endings], "label": label,
            "ctx": hellaswag_preprocess(ctx)}


def _mmlu_json(path, where, row, subject):
    question = _field(path, where, row, "question")
    choices = _field(path, where, row, "choices", list)
    answer = _field(path, where, row, "answer", (int, str))
    if isinstance(answer, str):
        if answer not in _MMLU_LETTERS[: len(choices)]:
            raise DataError(f"{path}: {where}: field 'answer' is {answer!r}, expected one of A-D")
        answer = _MMLU_LETTERS.index(answer)
    if len(choices) != 4 or not 0 <= answer < 4:
        raise DataError(f"{path}: {where}: expected 4 choices and an answer 0-3")
    return {"question": question, "choices": [str(c) for c in choices], "answer": answer,
            "subject": str(row.get("subject", subject))}


def mmlu_subject(path: str | Path) -> str:
    """'college_biology_dev.csv' -> 'college_biology'."""
    return re.sub(r"_(dev|val|test|train|auxiliary_train)$", "", Path(path).stem)


def read_mmlu_csv(path: str | Path) -> list[dict]:
    """A header-less MMLU CSV (question, A, B, C, D, answer letter); quoted newlines allowed."""
    path = Path(path)
    subject = mmlu_subject(path)
    docs = []
    allow_long_csv_fields()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for i, rec in enumerate(csv.reader(fh), 1):
                if not rec:
                    continue
                where = f"record {i}"
                if len(rec) != 6:
                    raise DataError(f"{path}: {where}: expected 6 columns (question, A, B, C, D, answer), got {len(rec)}")
                if rec[5].strip() not in _MMLU_LETTERS:
                    raise DataError(f"{path}: {where}: column 6 (answer) is {rec[5]!r}, expected A, B, C or D")
                docs.append({"question": rec[0], "choices": rec[1:5], "answer": _MMLU_LETTERS.index(rec[5].strip()),
                             "subject": subject})
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV file ({e})") from None
    return docs


def _targets(path, where, row, name):
    value = _field(path, where, row, name, dict)
    if "choices" in value and "labels" in value:  # the Hugging Face layout
        choices, labels = value["choices"], value["labels"]
    else:  # mc_task.json: {answer text: 0/1}
        choices, labels = list(value), list(value.values())
    if (not choices or len(choices) != len(labels) or not all(isinstance(c, str) for c in choices)
            or not all(x in (0, 1) for x in labels)):
        raise DataError(f"{path}: {where}: field {name!r} should map answer texts to 0/1")
    if 1 not in labels:
        raise DataError(f"{path}: {where}: field {name!r} has no correct answer (no label 1)")
    return {"choices": choices, "labels": [int(x) for x in labels]}


def _truthfulqa(path, where, row):
    doc = {"question": _field(path, where, row, "question"),
           "mc2_targets": _targets(path, where, row, "mc2_targets")}
    doc["mc1_targets"] = _targets(path, where, row, "mc1_targets") if "mc1_targets" in row else doc["mc2_targets"]
    return doc


def _winogrande(path, where, row):
    sentence = _field(path, where, row, "sentence")
    if sentence.count("_") != 1:
        raise DataError(f"{path}: {where}: field 'sentence' should contain exactly one '_' blank")
    answer = str(_field(path, where, row, "answer", (str, int)))
    if answer not in ("1", "2"):
        raise DataError(f"{path}: {where}: field 'answer' is {answer!r}, expected '1' or '2'"
                        + (" (a test split without labels?)" if answer == "" else ""))
    return {"sentence": sentence, "option1": _field(path, where, row, "option1"),
            "option2": _field(path, where, row, "option2"), "answer": answer}


def _gsm8k(path, where, row):
    answer = _field(path, where, row, "answer")
    if "#### " not in answer:
        raise DataError(f"{path}: {where}: field 'answer' should end with '#### <number>' (GSM8K format)")
    return {"question": _field(path, where, row, "question"), "answer": answer}


_READERS = {"arc": _arc, "hellaswag": _hellaswag, "truthfulqa": _truthfulqa, "winogrande": _winogrande,
            "gsm8k": _gsm8k}


def load_docs(fmt: str, path: str | Path) -> list[dict]:
    """Validated canonical documents of one benchmark file (cached by path, size and mtime)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown benchmark format {fmt!r} (known: {', '.join(FORMATS)})")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    st = path.stat()
    key = (fmt, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    if fmt == "mmlu":
        if path.suffix.lower() == ".csv":
            docs = read_mmlu_csv(path)
        else:
            docs = [_mmlu_json(path, w, r, mmlu_subject(path)) for w, r in read_json_rows(path)]
    else:
        docs = [_READERS[fmt](path, w, r) for w, r in read_json_rows(path)]
    if not docs:
        raise DataError(f"{path}: no rows")
    _CACHE[key] = docs
    return docs


def detect_benchmark_format(path: str | Path) -> str | None:
    """Which benchmark format a file is in, from its extension and the fields of its first row."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return "mmlu"
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        head = fh.read(1 << 16)
    try:
        if head.lstrip().startswith("["):
            first = loads(Path(path).read_text(encoding="utf-8-sig"))[0]
        else:
            first = loads(head.splitlines()[0]) if head.strip() else {}
    except (ValueError, IndexError, KeyError, TypeError):  # not JSON / not UTF-8 / not an array of rows
        return None
    if not isinstance(first, dict):
        return None
    keys = set(first)
    if "mc2_targets" in keys:
        return "truthfulqa"
    if "endings" in keys:
        return "hellaswag"
    if {"sentence", "option1", "option2"} <= keys:
        return "winogrande"
    if "answerKey" in keys:
        return "arc"
    if {"question", "choices", "answer"} <= keys:
        return "mmlu"
    if {"question", "answer"} <= keys and isinstance(first["answer"], str) and "####" in first["answer"]:
        return "gsm8k"
    return None


# ----------------------------------------------------------------------- text of an example
def example_text(fmt: str, doc: dict) -> str:
    """Question + " " + gold answer, the text a contaminated model would have seen."""
    if fmt == "arc":
        return doc["question"] + " " + doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
    if fmt == "hellaswag":
        return doc["ctx"] + " " + doc["choices"][doc["label"]]
    if fmt == "mmlu":
        return doc["question"] + " " + doc["choices"][doc["answer"]]
    if fmt == "truthfulqa":
        t = doc["mc1_targets"]
        return doc["question"] + " " + t["choices"][t["labels"].index(1)]
    if fmt == "winogrande":
        return doc["sentence"].replace("_", doc["option" + doc["answer"]], 1)
    if fmt == "gsm8k":
        return doc["question"] + " " + doc["answer"]
    raise ValueError(fmt)


def strings_in(value) -> list[str]:
    """Every string in a JSON value (nested lists and objects included), depth first."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def parse_benchmark(spec: str) -> tuple[str, str]:
    """'gsm8k=path' -> ('gsm8k', 'path'); 'path' -> (name from the file or folder, 'path')."""
    named = split_named(spec)
    if named and not Path(spec).exists() and re.fullmatch(r"[\w.-]+", named[0]):
        return named
    p = Path(spec)
    return (p.name if p.is_dir() else p.stem), spec


def benchmark_files(path: str | Path) -> list[Path]:
    """A benchmark given as a file, or a folder searched recursively for .jsonl/.json/.csv/.txt files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".csv", ".txt"))
        if files:
            return files
        raise DataError(f"{path}: folder has no .jsonl, .json, .csv or .txt files")
    raise special_file_error(path) or DataError(f"{path}: no such file or folder")


def benchmark_examples(path: str | Path) -> tuple[str, list[str]]:
    """(format, example texts) of a benchmark file or folder.

    Known formats give question + " " + gold answer per example; other JSONL files give the string
    fields of each row joined by spaces (or its `text` field), plain text files one example per line.
    A folder's files are concatenated; its format is the common one, or 'mixed'.
    """
    fmts, texts = set(), []
    for f in benchmark_files(path):
        fmt = detect_benchmark_format(f)
        if fmt is not None:
            texts += [example_text(fmt, d) for d in load_docs(fmt, f)]
        elif f.suffix.lower() == ".txt":
            fmt = "text"
            texts += [line.strip() for line in f.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        else:
            fmt = "jsonl"
            for where, row in read_json_rows(f):
                if isinstance(row.get("text"), str):
                    texts.append(row["text"])
                else:
                    strings = strings_in(row)
                    if not strings:
                        raise DataError(f"{f}: {where}: row has no string fields")
                    texts.append(" ".join(strings))
        fmts.add(fmt)
    if not texts:
        raise DataError(f"{path}: no examples")
    return (fmts.pop() if len(fmts) == 1 else "mixed"), texts


__all__ = ["FORMATS", "load_docs", "detect_benchmark_format", "example_text", "benchmark_examples", "benchmark_files",
           "read_json_rows", "read_mmlu_csv", "mmlu_subject", "hellaswag_preprocess"]
