"""Local versions of the six Open LLM Leaderboard v1 ("H6") tasks for lm-evaluation-harness.

`formats` reads each benchmark's own file format (ARC JSONL, HellaSwag JSONL, MMLU header-less CSVs,
TruthfulQA `mc_task` JSON, Winogrande JSONL, GSM8K JSONL) into the documents the harness's task
templates expect, validating every row. The `*_local.yaml` files next to this module are those
templates: harness task configs identical to the leaderboard tasks except that their data come from
`hooks.*_dataset` (a `custom_dataset` function) instead of the Hugging Face Hub. `upstack.evaluate.
harness` writes, per run, a small YAML that `include`s a template and names the actual files.
"""
