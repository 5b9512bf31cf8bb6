"""`eval --model-args`: what may be passed to lm-eval's model class, and the gate for the ones naming files.

lm-eval's HF model hands unknown keys on to `from_pretrained`, which reads files by many of them
(`subfolder`, `variant`, `gguf_file`, `use_safetensors=false`, `weights_only=false`, `config`, `cache_dir`,
...), and loads `peft=`, `delta=` and `tokenizer=` folders itself. So the keys are an allow-list: settings
that name no file pass; `peft`, `delta`, `tokenizer` (and vLLM's `lora_local_path`) pass through the same
checkpoint gate as MODEL; everything else is refused in one line, before anything is loaded.
"""

from __future__ import annotations

from upstack.errors import ConfigError

# Keys of lm-eval's HFLM (lm_eval/models/huggingface.py) and from_pretrained settings that name no file
# to read. `offload_folder` names where accelerate writes offloaded weights (with parallelize=True).
HF_SETTINGS = frozenset({
    "backend", "truncation", "logits_cache", "max_length", "device", "dtype", "softmax_dtype",
    "mixed_precision_dtype", "batch_size", "max_batch_size", "use_fast_tokenizer", "add_bos_token",
    "prefix_token_id", "parallelize", "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan",
    "think_end_token", "enable_thinking", "chat_template_args",
    "attn_implementation", "device_map", "max_memory", "low_cpu_mem_usage", "offload_buffers", "disable_mmap",
    "load_in_4bit", "load_in_8bit", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
})
# Keys of lm-eval's VLLM (lm_eval/models/vllm_causallms.py) and vLLM engine settings that name no file.
VLLM_SETTINGS = frozenset({
    "dtype", "tokenizer_mode", "add_bos_token", "prefix_token_id", "tensor_parallel_size", "quantization",
    "max_gen_toks", "swap_space", "batch_size", "max_batch_size", "max_length", "max_model_len", "seed",
    "data_parallel_size", "enable_thinking", "chat_template_args", "think_end_token", "max_lora_rank",
    "truncation_side", "device", "gpu_memory_utilization", "enforce_eager", "max_num_seqs",
    "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill", "kv_cache_dtype", "block_size",
    "pipeline_parallel_size", "distributed_executor_backend", "cpu_offload_gb", "disable_custom_all_reduce",
    "enable_expert_parallel", "disable_log_stats", "max_seq_len_to_capture", "calculate_kv_scales",
})
# Keys naming a folder that is read: what it must be.
GATED = {
    "hf": {"peft": "adapter", "delta": "model", "tokenizer": "tokenizer"},
    "vllm": {"tokenizer": "tokenizer", "lora_local_path": "adapter"},
}
# Boolean switches that are harmless off and load other code or files on.
OFF_ONLY = {"trust_remote_code": "upstack never runs a checkpoint's own code",
            "autogptq": "AutoGPTQ loads its own (possibly pickled) files past the checkpoint gate",
            "gptqmodel": "GPTQModel loads its own files past the checkpoint gate"}
REASONS = {
    "pretrained": "give the model as MODEL (it is checked before loading)",
    "subfolder": "give the subfolder itself as MODEL",
    "revision": "download that revision to a folder and give it as MODEL",
    "tokenizer_revision": "download that revision to a folder and give it as tokenizer=DIR",
    "gguf_file": "upstack loads safetensors checkpoints; convert the GGUF file first",
    "variant": "it loads weight files the checkpoint gate has not checked",
    "use_safetensors": "it can load pickled .bin files past the checkpoint gate (use --allow-pickle)",
    "weights_only": "it can load pickles that run code",
    "load_format": "it can load pickled or other files past the checkpoint gate",
}
_FALSE = (None, False, "false", "False", 0)


def _accepted(backend: str) -> list[str]:
    return sorted((HF_SETTINGS if backend == "hf" else VLLM_SETTINGS) | set(GATED.get(backend, {})))


def check_model_args(model_args: dict, backend: str = "hf") -> None:
    """The keys and switches of --model-args (values only, no file is read: a recipe's check)."""
    settings = HF_SETTINGS if backend == "hf" else VLLM_SETTINGS
    for key, value in model_args.items():
        if key in OFF_ONLY:
            if value not in _FALSE:
                raise ConfigError(f"--model-args {key}={value}: refused ({OFF_ONLY[key]})")
            continue
        if key in settings or key in GATED.get(backend, {}):
            continue
        why = REASONS.get(key, "it is not a setting upstack passes on: unknown keys reach the loader, which "
                               "may read files past the checkpoint gate")
        raise ConfigError(f"--model-args {key}: refused for --backend {backend} ({why}); accepted: "
                          + ", ".join(_accepted(backend)))


def check_model_arg_paths(model_args: dict, backend: str = "hf", *, allow_pickle: bool = False) -> None:
    """The folders named by --model-args pass the checkpoint gate as MODEL does (lm.check_model_path for a
    model; checkpoint's adapter and tokenizer gates)."""
    from upstack.checkpoint import check_adapter_folder, check_tokenizer_folder
    from upstack.errors import CheckpointError
    from upstack.lm import check_model_path, local_or_cached

    for key, kind in GATED.get(backend, {}).items():
        value = model_args.get(key)
        if value is None or value is False:
            continue
        what = f"--model-args {key}"
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{what}={value!r}: expected a folder")
        if kind == "model":
            check_model_path(value, what, allow_pickle=allow_pickle)
            continue
        folder = local_or_cached(value, what, "adapter_config.json" if kind == "adapter" else "tokenizer_config.json")
        if folder is None:  # a Hub id, online: fetched as MODEL would be
            continue
        try:
            if kind == "adapter":
                check_adapter_folder(folder, allow_pickle=allow_pickle)
            else:
                check_tokenizer_folder(folder)
        except CheckpointError as e:
            raise CheckpointError(f"{what}={value}: {str(e).removeprefix(f'{folder}: ')}") from None
