"""Recipes: a YAML file of named stages -> validated plan -> stages run in order, skip-if-done, report.

A recipe:

    name: tiny-solar                 # run folder: runs/<name>/ (or --out DIR)
    stages:
      data:    {type: synth-data, scale: quick}
      base:    {type: base, tokenizer: data/tokenizer, data: [data/pretrain.jsonl], max_steps: 300}
      upscale: {source: base, m: 2}  # type defaults to the stage name when that is a stage type
      ...
    evaluate:                        # optional: one eval stage per listed model (eval_<model>)
      models: [base, upscale]
      tasks: gsm8k_local

Any string option equal to a stage name, or starting with `<stage>/`, refers to that stage's output
folder (and makes the stage depend on it); so does the PATH of a `NAME=PATH` option (benchmarks). The
pipeline fills each stage's output option (`out`, or `output` for eval) with runs/<name>/<stage>/ and
builds the stage's own typed config from the options, exactly as the CLI does. Stages know nothing of
recipes.

    stages.py       the stage types: function, config class, output option, value check
    recipe.py       load + validate a recipe (line numbers, profiles, references, every stage's checks)
    fingerprint.py  skip-if-done: stage fingerprints against the markers
    plan.py         the --dry-run plan and its estimates, one function per stage type
    run.py          execution: stages in order, markers, disk check, report after each
"""

from upstack.pipeline.fingerprint import stage_done, stage_fingerprint
from upstack.pipeline.plan import KNOWN_CONFIGS, estimate_stage, plan_recipe
from upstack.pipeline.recipe import (
    BUILTIN_RECIPES,
    Recipe,
    Stage,
    builtin_recipe_path,
    load_recipe,
)
from upstack.pipeline.run import run_recipe
from upstack.pipeline.stages import DISTRIBUTED_STAGES, STAGE_TYPES, StageType
from upstack.report import MARKER

__all__ = [
    "BUILTIN_RECIPES", "DISTRIBUTED_STAGES", "KNOWN_CONFIGS", "MARKER", "STAGE_TYPES", "Recipe", "Stage",
    "StageType", "builtin_recipe_path", "estimate_stage", "load_recipe", "plan_recipe", "run_recipe",
    "stage_done", "stage_fingerprint",
]
