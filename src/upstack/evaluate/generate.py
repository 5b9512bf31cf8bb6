"""Talking to a model: prompts (plain text, or chat messages) -> replies, greedy or sampled, streamed or not.

`upstack generate` runs `generate(cfg)`; the eval stage's `samples:` uses `generate_replies` with the
model it already holds, so a recipe's report can show what each stage did to the model's answers. It
lives with evaluation because both need it and stages do not import each other.

A prompt is rendered with the tokenizer's chat template (as one user turn, or the row's `messages`)
when the tokenizer has one and `chat` is on, else tokenized as raw text. Temperature 0 is greedy
decoding; above 0, sampling with `top_p`, seeded per prompt (`torch.manual_seed(seed)` before each
prompt), so the same seed gives the same text. Settings not given here (top_k, repetition penalty, EOS
ids) come from the model's generation_config.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from upstack.data.jsonl import read_json_rows
from upstack.errors import CheckpointError, ConfigError, DataError
from upstack.lm import check_model_path, load_adapter, load_for_inference, pad_token_id
from upstack.outputs import check_output_free, write_text_atomic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass
class GenerateConfig:
    """Options of `upstack generate` (CLI flags are the same names)."""

    model: str
    prompt: list[str] = dataclasses.field(default_factory=list)  # --prompt TEXT (repeatable)
    prompts: str | None = None          # JSONL rows {"prompt": ...} or {"messages": [...]}
    chat: bool = True                   # apply the tokenizer's chat template when it has one
    max_new_tokens: int = 256
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    adapter: str | None = None          # a PEFT LoRA adapter folder, run unmerged
    output: str | None = None           # JSONL of the replies (written atomically)
    overwrite: bool = False
    device: str | None = None
    dtype: str = "auto"
    allow_pickle: bool = False


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def check_prompt(row: Any, where: str) -> dict:
    """A prompt row: a string, {"prompt": TEXT} or {"messages": [{"role", "content"}, ...]} -> a dict with
    one of the two keys. DataError naming `where` otherwise."""
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a prompt text or a mapping with 'prompt' or 'messages', got "
                        f"{type(row).__name__}")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        return {"prompt": row["prompt"]}
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: needs 'prompt' (a string) or 'messages' (a non-empty list of "
                        f"{{role, content}}); found keys {', '.join(sorted(row)) or 'none'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}, got "
                            f"{json.dumps(m)[:80]}")
    return {"messages": messages}


def read_prompts(path: str) -> list[dict]:
    """The prompt rows of a JSONL (or JSON array) file; a bad row is one DataError naming file and row."""
    rows = [check_prompt(row, f"{path}: {where}") for where, row in read_json_rows(path)]
    if not rows:
        raise DataError(f"{path}: no prompts in the file")
    return rows


def check_config(cfg: GenerateConfig) -> None:
    """Values only (no file read)."""
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if not cfg.prompt and not cfg.prompts:
        raise ConfigError("nothing to say: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")


def check_tokenizer_files(model: str) -> None:
    """A local checkpoint folder without a tokenizer cannot turn text into tokens: one line, before loading."""
    p = Path(model)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{model}: no tokenizer in the folder ({' / '.join(TOKENIZER_FILES[:2])}): generate "
                              "needs one; copy the tokenizer files of the model this checkpoint was made from")


def render(tokenizer, row: dict, chat: bool, where: str = "prompt") -> list[int]:
    """Token ids of one prompt row: through the chat template (with the assistant's turn opened) when
    `chat` and the tokenizer has one, else the raw text as the tokenizer encodes it."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if "messages" in row:
        why = "--no-chat was given" if not chat else "the tokenizer has no chat template"
        raise DataError(f"{where}: a 'messages' row needs a chat template ({why}); give 'prompt' text instead")
    return tokenizer(row["prompt"])["input_ids"]


def generation_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    """The model's generation config with this run's length and decoding: greedy at temperature 0."""
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens, gc.max_length = max_new_tokens, None
    if temperature > 0:
        gc.do_sample, gc.temperature, gc.top_p = True, temperature, top_p
    else:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    if gc.eos_token_id is None:
        gc.eos_token_id = tokenizer.eos_token_id
    if gc.pad_token_id is None:
        gc.pad_token_id = pad_token_id(tokenizer)
    return gc


def generate_replies(model, tokenizer, rows: list[dict], *, chat: bool = True, max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stream=None,
                     where: str = "prompt") -> list[dict]:
    """A reply per prompt row: {"reply", "new_tokens", "finish_reason" ("stop" at an EOS, else "length")} with
    the row's prompt or messages. `stream(row)` may return a transformers streamer for that row's reply."""
    import torch

    gc = generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    device = next(model.parameters()).device
    out = []
    for i, row in enumerate(rows):
        ids = torch.tensor([render(tokenizer, row, chat, f"{where} {i + 1}")], device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                                 streamer=stream(row) if stream else None)
        new = seq[0, ids.shape[1]:].tolist()
        stopped = bool(new) and new[-1] in eos
        out.append({**row, "reply": tokenizer.decode(new, skip_special_tokens=True).strip(),
                    "new_tokens": len(new), "finish_reason": "stop" if stopped else "length"})
    return out


def _terminal_stream(tokenizer, show: bool):
    """A streamer printing each reply as it is generated, under a '>>> prompt' line."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(text, flush=True, end="\n\n" if stream_end else "")  # a blank line after each reply

    def stream(row):
        text = row.get("prompt") or row["messages"][-1]["content"]
        print(f">>> {text}", flush=True)
        return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    return stream if show else None


def generate(cfg: GenerateConfig, *, stream_to_terminal: bool = False) -> list[dict]:
    """Run `upstack generate`: check everything that can be checked, load the model (and adapter), reply to
    every prompt, write `cfg.output` when given. Returns the rows."""
    check_config(cfg)
    if cfg.output:
        check_output_free(cfg.output, cfg.overwrite)
    rows = [check_prompt(p, f"--prompt {k + 1}") for k, p in enumerate(cfg.prompt)]
    if cfg.prompts:
        rows += read_prompts(cfg.prompts)
    check_model_path(cfg.model, allow_pickle=cfg.allow_pickle)
    check_tokenizer_files(cfg.model)
    model, tokenizer = load_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                          allow_pickle=cfg.allow_pickle)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter, cfg.model)
    replies = generate_replies(model, tokenizer, rows, chat=cfg.chat, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                               stream=_terminal_stream(tokenizer, stream_to_terminal))
    settings = {"model": cfg.model, "adapter": cfg.adapter, "chat": cfg.chat and bool(tokenizer.chat_template),
                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "seed": cfg.seed}
    replies = [{**r, **settings} for r in replies]
    if cfg.output:
        write_text_atomic(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies))
    return replies


def replies_table(replies: dict[str, list[dict]]) -> list[str]:
    """Markdown: for each prompt, a row per model with its reply (each model's replies to the same prompts,
    side by side)."""
    if not replies:
        return []
    prompts: list[str] = []
    for rows in replies.values():
        for r in rows:
            text = r.get("prompt") or (r.get("messages") or [{}])[-1].get("content", "")
            if text not in prompts:
                prompts.append(text)

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"

    lines = ["## Replies", "",
             "Each evaluated model's greedy reply to the recipe's `samples:` prompts (chat template applied when "
             "the tokenizer has one; `…` = stopped at the token limit).", ""]
    for text in prompts:
        lines += [f"**{cell(text)}**", "", "| model | reply |", "|---|---|"]
        for model, rows in replies.items():
            r = next((r for r in rows if (r.get("prompt") or (r.get("messages") or [{}])[-1].get("content")) == text),
                     None)
            if r is not None:
                lines.append(f"| {model} | {cell(r['reply'])}{' …' if r.get('finish_reason') == 'length' else ''} |")
        lines.append("")
    return lines


def write_stdout(rows: list[dict]) -> None:
    for r in rows:
        text = r.get("prompt") or r["messages"][-1]["content"]
        sys.stdout.write(f">>> {text}\n{r['reply']}\n\n")
