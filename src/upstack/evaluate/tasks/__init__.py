"""Local versions of the six Open LLM Leaderboard v1 ("H6") tasks for lm-evaluation-harness.

`registry` names the tasks (H6, the local tasks and their file layout, presets); `local` finds a local
task's files and writes, per run, a small YAML that `include`s a template and names those files. The
`*_local.yaml` files next to this module are those templates: harness task configs identical to the
leaderboard tasks except that their data come from `hooks.*_dataset` (a `custom_dataset` function over
`upstack.data.benchmarks`, which reads and validates each benchmark's own file format) instead of the
Hugging Face Hub.
"""
