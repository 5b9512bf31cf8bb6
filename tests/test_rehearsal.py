"""The paper recipe's `rehearsal` profile: the same stages and options as recipes/solar-10.7b.yaml at tiny
size, offline (upstack.data.rehearsal writes the model, datasets and benchmarks). The fast tests keep the
profile and the real recipe from drifting apart; the slow ones run it, in one process and under FSDP."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from upstack.pipeline import BUILTIN_RECIPES, load_recipe

RECIPE = BUILTIN_RECIPES / "solar-10.7b.yaml"
REPO = Path(__file__).resolve().parents[1]
DATA_STAGE = "rehearsal_data"
# The real recipe's "models" and "data" name hub ids; everything else (steps, lengths, batch sizes, data
# paths, models) is a size or a source. These are the options the profile may not change.
SIZE_OR_SOURCE = {"source", "model", "data", "seed_data", "max_new_tokens", "max_length", "batch_size",
                  "grad_accum", "max_steps", "warmup_steps", "eval_fraction", "save_steps", "logging_steps",
                  "benchmarks", "num_examples", "num_neighbours", "limit", "max_gen_toks", "data_dir"}
# The one option the profile changes that is neither (README says so): synth-math generates with vLLM in the
# real recipe, which needs a GPU; the rehearsal's stub generator runs in transformers on a CPU.
OTHER_CHANGES = {("synth_math", "backend"): ("vllm", "transformers")}
# Options the real recipe leaves at their defaults and the profile sets, for size (a CPU's context, batch
# and few-shot budget): checked so that the list stays short and deliberate.
ADDED = {"data_dir", "num_fewshot", "limit", "max_gen_toks", "max_length"}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real recipe, loaded where its local inputs (MATH seeds, benchmark folders) exist as placeholders."""
    here = tmp_path_factory.mktemp("solar")
    (here / "data").mkdir()
    (here / "data/metamath_math.jsonl").write_text("")
    for name in ("arc_challenge", "hellaswag", "mmlu", "truthfulqa", "winogrande", "gsm8k"):
        (here / "benchmarks" / name).mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(here)
    try:
        return load_recipe(RECIPE, "/tmp/solar")
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def rehearsal():
    return load_recipe(RECIPE, "/tmp/solar", profile="rehearsal")


def test_same_stages_and_types(real, rehearsal):
    assert set(rehearsal.stages) - set(real.stages) == {DATA_STAGE}
    for name, st in real.stages.items():
        assert rehearsal.stages[name].type == st.type, name
    assert rehearsal.stages[DATA_STAGE].type == "rehearsal-data"


def test_same_dependencies_but_the_data_stage(real, rehearsal):
    for name, st in real.stages.items():
        assert set(rehearsal.stages[name].deps) - {DATA_STAGE} == set(st.deps), name


def test_every_option_of_the_real_recipe_is_exercised(real, rehearsal):
    """Each option key the real recipe sets (and each key of its data sources) is set in the rehearsal."""
    for name, st in real.stages.items():
        got = rehearsal.stages[name].resolved
        missing = sorted(set(st.resolved) - set(got))
        assert not missing, f"{name}: {missing}"
        for key, value in st.options.items():
            if key in ("data",) and isinstance(value, list):
                assert len(got[key]) == len(value), f"{name}.{key}: sources"
                for src, ours in zip(value, got[key]):
                    src_keys = set(src) if isinstance(src, dict) else {"path"}
                    ours_keys = set(ours) if isinstance(ours, dict) else {"path"}
                    assert src_keys <= ours_keys, f"{name}.{key}: {src_keys - ours_keys}"
                    if isinstance(src, dict) and "format" in src:
                        assert ours["format"] == src["format"] and ours.get("filter") == src.get("filter")


def test_only_sizes_and_sources_change(real, rehearsal):
    for name, st in real.stages.items():
        for key, value in st.options.items():
            if (name, key) in OTHER_CHANGES:
                assert (value, rehearsal.stages[name].options[key]) == OTHER_CHANGES[name, key]
            elif key not in SIZE_OR_SOURCE:
                assert rehearsal.stages[name].options[key] == value, f"{name}.{key} changed"
    assert rehearsal.stages["upscale"].options["m"] == 8
    # no hub id is left: every model and data source is a stage's output
    for name, st in rehearsal.stages.items():
        for key in ("source", "model", "reference"):
            v = st.options.get(key)
            if isinstance(v, str):
                assert v.split("/")[0] in rehearsal.stages, f"{name}.{key} = {v}"
        for src in st.options.get("data") or []:
            path = src["path"] if isinstance(src, dict) else src
            assert path.split("/")[0] in rehearsal.stages, f"{name}.data = {path}"


def test_added_options_are_sizes(real, rehearsal):
    for name, st in real.stages.items():
        added = set(rehearsal.stages[name].options) - set(st.options)
        assert added <= ADDED, f"{name}: {added - ADDED}"


def test_the_profile_overlays_only_known_stages():
    raw = yaml.safe_load(RECIPE.read_text())
    assert set(raw["profiles"]["rehearsal"]["stages"]) - set(raw["stages"]) == {DATA_STAGE}


def test_the_base_config_is_mistral_7b():
    from upstack.data.rehearsal import MISTRAL_7B, RehearsalDataConfig, base_config
    from upstack.pipeline import KNOWN_CONFIGS

    assert MISTRAL_7B == KNOWN_CONFIGS["mistralai/Mistral-7B-v0.1"]
    cfg = base_config(RehearsalDataConfig(out="x"))
    assert cfg["vocab_size"] == 32000 and cfg["num_hidden_layers"] == 32 and cfg["hidden_size"] == 64
    same = {k: v for k, v in MISTRAL_7B.items() if k not in ("hidden_size", "intermediate_size",
                                                                 "num_attention_heads", "num_key_value_heads")}
    assert {k: cfg[k] for k in same} == same


def test_generated_files_are_read_by_the_real_formats(tmp_path):
    """Each stand-in dataset loads through the format the real recipe names; the OpenOrca filter drops rows;
    the stub generator's reply passes synth-math's checks for the seeds that end in 4; the benchmark folders
    read as their benchmarks; same seed, same bytes."""
    from upstack.data.benchmarks import benchmark_examples
    from upstack.data.rehearsal import RehearsalDataConfig, run_rehearsal_data
    from upstack.data.synth_math import (
        read_seed_rows,
        synthesize,
        transformers_generate_fn,
    )

    out = tmp_path / "d"
    run_rehearsal_data(RehearsalDataConfig(out=str(out)))
    orca = [json.loads(x) for x in (out / "OpenOrca/train.jsonl").read_text().splitlines()]
    assert {r["id"].split(".")[0] for r in orca} == {"flan", "niv", "t0", "cot"}
    fmt, seeds = read_seed_rows(out / "metamath_math.jsonl", "metamath")
    gen = transformers_generate_fn(str(out / "generator"), max_new_tokens=16)
    instruct, alignment, stats, dropped = synthesize(seeds, gen, fmt)
    assert stats["kept"] == len(seeds) // 2 and stats["dropped_answer_mismatch"] == len(seeds) - len(seeds) // 2
    for name in ("arc_challenge", "hellaswag", "mmlu", "truthfulqa", "winogrande", "gsm8k"):
        fmt, texts = benchmark_examples(out / "benchmarks" / name)
        assert len(texts) >= 27, name
    cfg = json.loads((out / "base/config.json").read_text())
    assert cfg["vocab_size"] == 32000 and cfg["num_hidden_layers"] == 32 and cfg["model_type"] == "mistral"
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    again = tmp_path / "e"
    run_rehearsal_data(RehearsalDataConfig(out=str(again)))
    for f in ("OpenOrca/train.jsonl", "base/model.safetensors", "generator/model.safetensors", "tokenizer/tokenizer.json",
              "benchmarks/mmlu/test/miscellaneous_test.csv"):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f



# --------------------------------------------------------------------------------------------------
# The rehearsal itself (slow)
# --------------------------------------------------------------------------------------------------

# No time bound is asserted: on the shared 2-core CI machine the one-process rehearsal's wall time follows
# the other processes' load (measured 1475 s at a load average of 9-11), so a bound that never fails by
# noise is the subprocess's own timeout (1800 s). The test prints the time it took.


def _check_run(out: Path) -> None:
    from upstack.pipeline import MARKER

    rehearsal = load_recipe(RECIPE, out, profile="rehearsal")
    for name in rehearsal.stages:
        assert (out / name / MARKER).is_file(), f"stage {name} did not complete"
    base_layers = json.loads((out / DATA_STAGE / "base/config.json").read_text())["num_hidden_layers"]
    dus_layers = 2 * (base_layers - 8)
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("upscale", "pretrain", "sft", "dpo", "dpo_b", "merge_avg", "merge_slerp"):
        assert AutoConfig.from_pretrained(out / name).num_hidden_layers == dus_layers, name
    AutoModelForCausalLM.from_pretrained(out / "merge_slerp")  # a plain HF checkpoint that loads
    stats = json.loads((out / "synth_math/stats.json").read_text())
    assert stats["kept"] > 0 and stats["dropped_answer_mismatch"] > 0
    contamination = json.loads((out / "contamination/contamination.json").read_text())
    assert contamination
    for model in ("upscale", "merge_avg"):
        results = json.loads((out / f"eval_{model}/results.json").read_text())
        assert "h6" in results, model
    report = (out / "report.md").read_text()
    assert "Layer map" in report and "merge_slerp" in report


@pytest.mark.slow
def test_rehearsal_one_process(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "upstack.cli", "run", "recipes/solar-10.7b.yaml", "--profile",
                           "rehearsal", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(out)
    print(f"rehearsal (one process): {took:.0f} s")


@pytest.mark.slow
def test_rehearsal_two_processes_under_fsdp(tmp_path):
    """The paper's recipe rehearsed under `accelerate launch` with two CPU processes and FSDP2: every stage
    completes, the training stages really shard (rank 0 holds about half of the parameters), one report."""
    import shutil

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    out = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/fsdp-cpu2.yaml"),
                           "-m", "upstack.cli", "run", "recipes/solar-10.7b.yaml", "--profile", "rehearsal",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(out)
    for stage in ("pretrain", "sft", "dpo", "dpo_b"):
        start = json.loads((out / stage / "metrics.jsonl").read_text().splitlines()[0])
        assert start["sharding"] == "fsdp" and start["processes"] == 2, stage
        assert 0.4 < start["params_local"] / start["total"] < 0.6, stage
    assert proc.stderr.count("[sft] running sft") == 1  # one copy of each line per launch
