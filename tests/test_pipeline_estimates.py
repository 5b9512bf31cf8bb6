"""--dry-run estimates: base, upscale and training stages, against the counts the stages themselves use."""

import pytest

from upstack.arch import get_arch, remap_config
from upstack.base import BaseConfig, model_config_dict
from upstack.config import config_from_dict
from upstack.pipeline import load_recipe, plan_recipe
from upstack.pipeline.plan import BASE_VOCAB_SIZE
from upstack.upscale import count_parameters_from_config, make_layer_plan


def _base_config(recipe) -> dict:
    return model_config_dict(config_from_dict(BaseConfig, recipe.stages["base"].resolved), BASE_VOCAB_SIZE)


def _upscaled(cfg: dict, **opts) -> dict:
    plan = make_layer_plan(cfg["num_hidden_layers"], opts.get("method", "dus"), opts.get("m"), None, opts.get("every"))
    return remap_config(cfg, get_arch(cfg), plan.layer_map)[0]


@pytest.mark.parametrize("name, profile", [("tiny-solar", None), ("tiny-solar", "quick"), ("tiny-dus", None)])
def test_base_and_upscale_estimates_match_the_remapped_config(tmp_path, name, profile):
    recipe = load_recipe(name, tmp_path / "run", profile=profile)
    rows = {r["stage"]: r for r in plan_recipe(recipe)}
    base = _base_config(recipe)
    p = count_parameters_from_config(base)
    assert rows["base"]["num_hidden_layers"] == 8
    assert rows["base"]["num_parameters"] == p and rows["base"]["disk_bytes"] == 4 * p
    upscales = {s.name: s.options for s in recipe.stages.values() if s.type == "upscale"}
    assert upscales
    for sname, opts in upscales.items():
        new = _upscaled(base, **opts)
        assert rows[sname]["num_hidden_layers"] == new["num_hidden_layers"]
        assert rows[sname]["num_parameters"] == count_parameters_from_config(new)
        assert rows[sname]["disk_bytes"] == 4 * rows[sname]["num_parameters"]
    if name == "tiny-dus":
        assert {s: rows[s]["num_hidden_layers"] for s in upscales} == {"dus": 12, "stack": 16, "interleaved": 12}
    assert not (tmp_path / "run").exists()


def test_training_and_eval_estimates_follow_their_input(tmp_path):
    recipe = load_recipe("tiny-solar", tmp_path / "run", profile="quick")
    rows = {r["stage"]: r for r in plan_recipe(recipe)}
    p = rows["upscale"]["num_parameters"]
    for stage in ("pretrain", "sft_math", "dpo"):  # dpo precomputes reference log-probs: no reference model
        assert rows[stage]["num_parameters"] == p
        memory = rows[stage]["memory"]
        assert rows[stage]["train_method"] == "full" and rows[stage]["train_memory_bytes"] == memory["full"]["total"]
        assert memory["full"]["total"] > 16 * p  # fp32 weights, gradients, two moments, plus activations
        assert memory["qlora"]["total"] < memory["lora"]["total"]  # bf16 activations (at this size LoRA's dropout
        # copies outweigh the full model's optimizer state, so LoRA is not below full here)
        assert memory["lora"]["gpus_24gb"] == 1
    assert rows["sft_lora"]["train_method"] == "lora"
    assert rows["sft_lora"]["train_memory_bytes"] == rows["sft_lora"]["memory"]["lora"]["total"]
    assert rows["base_more"]["train_memory_bytes"] < rows["pretrain"]["train_memory_bytes"]  # 8 vs 12 layers
    assert rows["merge_avg"]["num_parameters"] == p and "train_memory_bytes" not in rows["merge_avg"]
    assert rows["eval_dpo"]["inference_memory_bytes"] == 2 * p
    assert rows["contamination"]["inference_memory_bytes"] == 4 * p
    assert "num_parameters" not in rows["data"] and not any(r["done"] for r in rows.values())


def test_upscale_of_a_hub_model_uses_its_known_config(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  upscale:\n    source: mistralai/Mistral-7B-v0.1\n    m: 8\n")
    row = plan_recipe(load_recipe(p, tmp_path / "run"))[0]
    assert row["num_hidden_layers"] == 48 and row["num_parameters"] == 10_731_524_096  # SOLAR-10.7B
