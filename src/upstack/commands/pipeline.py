"""`upstack run RECIPE`, `upstack demo`, `upstack report`.

`upstack.pipeline` and `upstack.report` are imported inside the command functions: importing them loads
the stage configs behind them (about 0.2 s), which every `upstack --help` would otherwise pay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from upstack.commands.output import format_table, human_bytes, print_json
from upstack.errors import ConfigError, UpstackError

ORDER = 5

RUN_HELP = """\
Run a recipe: named stages (synth-data, base, upscale, pretrain, sft, dpo, merge, eval, contamination,
decontaminate, synth-math) whose options are those of the matching command, chained by naming earlier
stages (`model: sft_math`, `data: [data/sft_math.jsonl]`). The whole recipe is validated first (unknown
keys, missing inputs, cycles, wrong types: all reported at once with line numbers). Each stage writes to
RUN_DIR/<stage>/ with its resolved config (upstack_stage.json); a stage whose config and inputs are
unchanged since it completed is skipped, so an interrupted run continues where it stopped. report.md,
PNG plots and results.json are written in RUN_DIR after each stage.

Built-in recipes (found from any folder): recipes/tiny-solar.yaml (the demo), recipes/tiny-dus.yaml (the
DUS question: DUS vs stacking vs interleaving vs training the base on, at equal extra tokens, ~7 min on 2
CPU cores; --profile quick: ~40 s), recipes/solar-10.7b.yaml (the paper at full scale).

examples:
  upstack run recipes/tiny-solar.yaml
  upstack run recipes/tiny-dus.yaml
  upstack run recipes/solar-10.7b.yaml --dry-run
  upstack run my.yaml --from sft        # re-run sft and everything after it
  upstack run my.yaml --only eval_dpo   # re-run one stage (its inputs must be done)
  upstack run my.yaml --set sft.max_steps=10 --set dpo.beta=0.2   # override options (checked as in the file)
"""


def register(sub, common) -> None:
    p = sub.add_parser("run", parents=[common], help="run a recipe (the SOLAR chain) end to end",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file; built-in (found from any folder): recipes/tiny-solar.yaml, "
                                  "recipes/tiny-dus.yaml, recipes/solar-10.7b.yaml")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--profile", default=None, help="apply a profile of the recipe (e.g. quick)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one option of a stage (repeatable; after --profile; VALUE is YAML: 10, true, "
                        "[a.jsonl]; nested keys with dots: base.train.max_steps=5); checked as in the file; "
                        "vars.NAME=VALUE sets one of the recipe's vars: (docs/recipes.md)")
    p.add_argument("--from", dest="from_stage", default=None, help="re-run this stage and every later one")
    p.add_argument("--only", default=None, help="run only this stage (its inputs must have completed)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan: stages, parameters, disk, memory estimates, launch commands; "
                        "then list the input files still missing (exit 2 if any)")
    p.add_argument("--json", action="store_true", help="print the plan or summary as JSON")
    p.set_defaults(func=run_run)

    p = sub.add_parser("demo", parents=[common], help="run the built-in tiny SOLAR recipe on CPU (no data, no network)",
                       description="Run recipes/tiny-solar.yaml: synthetic data, a tokenizer, a small Mistral "
                                   "pretrained from scratch, DUS, continued pretraining, decontamination of the "
                                   "training sets, two SFT variants, DPO, merges, evaluation of every model "
                                   "(held-out preference accuracy included), report.md. About 9 minutes on 2 CPU cores; "
                                   "--quick runs the same chain smaller in under 2 minutes.\n\n"
                                   "examples:\n  upstack demo\n  upstack demo --quick --out /tmp/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the same chain at a smaller scale (< 2 minutes)")
    p.add_argument("--out", default=None, help="run folder (default runs/tiny-solar or runs/tiny-solar-quick)")
    p.add_argument("--from", dest="from_stage", default=None, help="re-run this stage and every later one")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=run_demo)

    p = sub.add_parser("report", parents=[common], help="(re)write report.md, plots and results.json of a run folder",
                       description="Rebuild report.md, the PNG plots and results.json of a run folder.\n\n"
                                   "example: upstack report runs/tiny-solar",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (runs/<recipe>)")
    p.set_defaults(func=run_report)


def _print_plan(recipe, rows, as_json: bool) -> None:
    if as_json:
        print_json({"recipe": str(recipe.path), "run_dir": str(recipe.run_dir), "stages": rows,
                    "missing_inputs": recipe.missing})
        return
    print(f"recipe {recipe.name}: {len(rows)} stages -> {recipe.run_dir}")
    table = []
    for r in rows:
        table.append([
            r["stage"], r["type"], ",".join(r["deps"]) or "-",
            r.get("num_hidden_layers", "-"),
            f"{r['num_parameters']:,}" if "num_parameters" in r else "-",
            human_bytes(r["disk_bytes"]) if r.get("disk_bytes") else "-",
            human_bytes(r["train_memory_bytes"]) if r.get("train_memory_bytes")
            else (human_bytes(r["inference_memory_bytes"]) if r.get("inference_memory_bytes") else "-"),
            "done" if r["done"] else "to run",
        ])
    print(format_table(["stage", "type", "inputs", "layers", "params", "disk", "GPU memory", "status"], table))
    trained = [r for r in rows if r.get("memory")]
    if trained:
        print("\ntraining memory per process (docs/training.md: the memory plan), and GPUs needed under FSDP on "
              "24 GB / 80 GB cards (-: does not fit):")
        mem_rows = [[r["stage"], r["train_method"], *(
            f"{human_bytes(m['total'])} ({m['gpus_24gb'] or '-'} / {m['gpus_80gb'] or '-'})"
            for m in (r["memory"][k] for k in ("full", "lora", "qlora")))] for r in trained]
        print(format_table(["stage", "method", "full", "LoRA", "QLoRA"], mem_rows))
    print("\nGPU memory: the training stage's own method (full, LoRA or QLoRA) per process at its batch and length, "
          "activations included; inference: bf16 weights (contamination holds two models).")
    if any((r.get("memory") or {}).get(r.get("train_method"), {}).get("gpus_80gb") != 1 for r in trained):
        print("\ntraining stages need more than one GPU's memory: run the recipe under accelerate, e.g.\n"
              "  accelerate launch --config_file configs/accelerate/fsdp.yaml -m upstack.cli run "
              f"{recipe.path}\n(multi-node: add --num_machines N --machine_rank R --main_process_ip HOST; "
              "see docs/training.md)")
    elif recipe.raw.get("launch"):
        print(f"\nlaunch: {recipe.raw.get('launch')}")


def run_run(args) -> int:
    from upstack.pipeline import (  # lazy: see the module docstring
        load_recipe,
        plan_recipe,
    )
    from upstack.pipeline.run import check_stage_names

    # A dry run plans a recipe whose input files are not there yet (the paper's, before any download) and
    # then lists them; a real run refuses them in load_recipe, before any stage starts.
    recipe = load_recipe(args.recipe, args.out, profile=args.profile, sets=args.sets, missing_ok=args.dry_run)
    if args.dry_run:
        check_stage_names(recipe, args.from_stage, args.only)
        _print_plan(recipe, plan_recipe(recipe), args.json)
        if recipe.missing:
            sys.stdout.flush()
            raise ConfigError(f"{recipe.path}: {len(recipe.missing)} input(s) to provide before the real run "
                              f"(each neither exists nor is made by a stage):\n  " + "\n  ".join(recipe.missing))
        return 0
    return _execute(recipe, args, only=args.only)


def _execute(recipe, args, only: str | None = None) -> int:
    """Run a loaded recipe with the shared flags (--from, --quiet, --json) and say where the report is."""
    from upstack.pipeline import run_recipe

    summary = run_recipe(recipe, from_stage=args.from_stage, only=only, quiet=args.quiet,
                         log=(lambda *a: None) if args.quiet else (lambda m: print(m, file=sys.stderr)))
    if args.json:
        print_json(summary)
    else:
        print(f"done: {recipe.run_dir / 'report.md'} (and results.json beside it)")
    return 0


def run_demo(args) -> int:
    from upstack.pipeline import BUILTIN_RECIPES, load_recipe

    name = "tiny-solar"
    out = args.out or f"runs/{name}{'-quick' if args.quick else ''}"
    recipe = load_recipe(BUILTIN_RECIPES / f"{name}.yaml", out, profile="quick" if args.quick else None)
    return _execute(recipe, args)


def run_report(args) -> int:
    from upstack.pipeline import load_recipe
    from upstack.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UpstackError(f"{run_dir}: no such run folder")
    recipe = None
    if (run_dir / "recipe.yaml").is_file():  # the run's own copy: stage order and comparison tables
        try:
            recipe = load_recipe(run_dir / "recipe.yaml", run_dir)
        except UpstackError:
            recipe = None
    print(write_report(run_dir, recipe))
    return 0
