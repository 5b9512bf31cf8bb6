"""The stage types a recipe may name: for each, its function, its typed config, and what the pipeline fills.

Stages are named by "module:name" strings and imported on first use, so that `upstack --help` never
loads a stage module (nor torch behind it).
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class StageType:
    target: str                          # "module:function" taking the config
    config: str                          # "module:ConfigClass"
    output_field: str = "out"            # option the pipeline fills with the stage folder
    output_file: str | None = None       # when set, the option gets <stage folder>/<output_file>
    checkpoint: bool = False             # writes a model checkpoint into the stage folder
    pipeline_fields: dict = dataclasses.field(default_factory=dict)  # options the pipeline sets
    # "module:function" taking the built config and raising ConfigError for a bad value. It must read no
    # file: the pipeline calls it for every stage when the recipe is loaded, before any stage has run.
    check: str | None = None


STAGE_TYPES: dict[str, StageType] = {
    "synth-data": StageType("upstack.data.synthetic:run_synth_data", "upstack.data.synthetic:SynthDataConfig",
                            pipeline_fields={"overwrite": True}, check="upstack.data.synthetic:check_config"),
    "synth-math": StageType("upstack.data.synth_math:run_synth_math", "upstack.data.synth_math:SynthMathConfig",
                            pipeline_fields={"overwrite": True}, check="upstack.data.synth_math:check_config"),
    "rehearsal-data": StageType("upstack.data.rehearsal:run_rehearsal_data",
                                "upstack.data.rehearsal:RehearsalDataConfig", pipeline_fields={"overwrite": True},
                                check="upstack.data.rehearsal:check_config"),
    "base": StageType("upstack.base:build_base", "upstack.base:BaseConfig", checkpoint=True,
                      pipeline_fields={"overwrite": True}, check="upstack.base:check_base_config"),
    "import": StageType("upstack.gguf:import_gguf", "upstack.gguf:ImportConfig", checkpoint=True,
                        pipeline_fields={"overwrite": True, "quiet": True}, check="upstack.gguf:check_import_config"),
    "upscale": StageType("upstack.upscale:upscale", "upstack.upscale:UpscaleConfig", checkpoint=True,
                         pipeline_fields={"overwrite": True, "quiet": True},
                         check="upstack.upscale:check_upscale_config"),
    "pretrain": StageType("upstack.train.pretrain:pretrain", "upstack.train.pretrain:PretrainConfig",
                          checkpoint=True, pipeline_fields={"overwrite": True, "resume": True},
                          check="upstack.train.config:check_config"),
    "sft": StageType("upstack.train.sft:sft", "upstack.train.sft:SFTConfig", checkpoint=True,
                     pipeline_fields={"overwrite": True, "resume": True}, check="upstack.train.sft:check_sft_config"),
    "dpo": StageType("upstack.train.dpo:dpo", "upstack.train.dpo:DPOConfig", checkpoint=True,
                     pipeline_fields={"overwrite": True, "resume": True}, check="upstack.train.dpo:check_dpo_config"),
    "merge": StageType("upstack.merge:merge", "upstack.merge:MergeConfig", checkpoint=True,
                       pipeline_fields={"overwrite": True}, check="upstack.merge:validate_config"),
    "merge-adapter": StageType("upstack.merge:merge_adapter", "upstack.merge:MergeAdapterConfig", checkpoint=True,
                               pipeline_fields={"overwrite": True, "quiet": True},
                               check="upstack.merge.adapter:check_config"),
    "eval": StageType("upstack.evaluate.harness:evaluate", "upstack.evaluate.harness:EvalConfig",
                      output_field="output", output_file="results.json", pipeline_fields={"overwrite": True},
                      check="upstack.evaluate.config:check_config"),
    "contamination": StageType("upstack.evaluate.contamination:contamination",
                               "upstack.evaluate.contamination:ContaminationConfig",
                               output_field="output", output_file="contamination.json",
                               pipeline_fields={"overwrite": True},
                               check="upstack.evaluate.contamination:check_config"),
    "decontaminate": StageType("upstack.data.decontaminate:decontaminate",
                               "upstack.data.decontaminate:DecontaminateConfig",
                               output_file="clean.jsonl", pipeline_fields={"overwrite": True},
                               check="upstack.data.decontaminate:check_config"),
}

# Stages that run on every process under `accelerate launch` (they shard work themselves); the others run
# on the main process while the rest wait.
DISTRIBUTED_STAGES = {"base", "pretrain", "sft", "dpo", "eval"}


def load_ref(ref: str):
    """The object a "module:name" reference names (imports the module)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
