"""Functions the local task templates (`*_local.yaml`) name with `!function`.

`*_dataset` are lm-eval `custom_dataset` hooks: the harness calls them with the task's
`dataset_kwargs` (here `eval_file` and `fewshot_file`, written by `upstack.evaluate.tasks.local`) and
gets a DatasetDict with a `test` split (scored) and, when few-shot examples come from another file,
a `train` split.
"""

from __future__ import annotations

from upstack.data.benchmarks import load_docs


def _dataset(fmt: str, eval_file: str, fewshot_file: str | None = None):
    import datasets

    splits = {"test": datasets.Dataset.from_list(load_docs(fmt, eval_file))}
    if fewshot_file and fewshot_file != eval_file:
        splits["train"] = datasets.Dataset.from_list(load_docs(fmt, fewshot_file))
    return datasets.DatasetDict(splits)


def arc_dataset(eval_file: str, fewshot_file: str | None = None, **_):
    return _dataset("arc", eval_file, fewshot_file)


def hellaswag_dataset(eval_file: str, fewshot_file: str | None = None, **_):
    return _dataset("hellaswag", eval_file, fewshot_file)


def mmlu_dataset(eval_file: str, fewshot_file: str | None = None, **_):
    return _dataset("mmlu", eval_file, fewshot_file)


def truthfulqa_dataset(eval_file: str, fewshot_file: str | None = None, **_):
    return _dataset("truthfulqa", eval_file, fewshot_file)


def winogrande_dataset(eval_file: str, fewshot_file: str | None = None, **_):
    return _dataset("winogrande", eval_file, fewshot_file)


def gsm8k_dataset(eval_file: str, fewshot_file: str | None = None, **_):
    return _dataset("gsm8k", eval_file, fewshot_file)


def process_results_mc2(doc: dict, results) -> dict:
    """TruthfulQA MC2: normalised probability mass on the true answers (as lm_eval's truthfulqa/utils.py)."""
    import numpy as np

    ll = np.array([r[0] for r in results], dtype=np.float64)
    probs = np.exp(ll - ll.max())  # shifting by the max changes nothing after normalising, avoids underflow
    probs = probs / probs.sum()
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(probs[labels == 1].sum())}


def winogrande_doc_to_text(doc: dict) -> int:
    """Partial scoring: the context is chosen per option, so doc_to_text returns the gold index."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
