"""Synth. Math-Instruct and Synth. Math-Alignment (SOLAR paper, section 2.2).

A generator model rephrases each seed question and each seed answer. A rephrased pair is kept only if
the rephrased answer states the same final answer as the original (normalised numeric comparison).
The kept pairs become two datasets, exactly as the paper defines them:

    instruct.jsonl   {"messages": [{"role": "user", "content": rephrased question},
                                   {"role": "assistant", "content": rephrased answer}]}
    alignment.jsonl  {"prompt": rephrased question, "chosen": rephrased answer, "rejected": original answer}

plus stats.json (counts that add up: read = dropped_seed_unparseable + generated; generated = kept +
dropped_empty_question + dropped_unparseable + dropped_answer_mismatch) and dropped.jsonl (each dropped
generation with its reason, to tune the prompts).

`synthesize` is the pure core: it takes the seed rows and any `generate_fn(prompts) -> texts`, so
tests drive it with controlled outputs; `run_synth_math` wires it to transformers or vLLM and writes
the output folder atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal

from upstack.data.jsonl import json_lines, loads
from upstack.errors import ConfigError, DataError, UpstackError
from upstack.outputs import atomic_output_dir

log = logging.getLogger(__name__)

# format -> (question field, answer field)
FORMATS: dict[str, tuple[str, str]] = {
    "metamath": ("query", "response"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
}
# What the answer prompt's {final_answer_instruction} says, per format.
FINAL_ANSWER_INSTRUCTIONS = {
    "gsm8k": 'End with a last line "#### <final answer>", with the same final answer.',
    "metamath": 'End with "The answer is: <final answer>", with the same final answer.',
    "math": "Put the same final answer in \\boxed{} at the end.",
}
PROMPTS_DIR = Path(__file__).parent / "prompts"
PROMPT_FILES = {"question": "rephrase_question.txt", "answer": "rephrase_answer.txt"}
# placeholders each prompt must contain / may contain
PROMPT_REQUIRED = {"question": ("{question}",), "answer": ("{answer}",)}
PROMPT_FIELDS = ("{question}", "{answer}", "{final_answer_instruction}")

GenerateFn = Callable[[list[str]], list[str]]


@dataclasses.dataclass(frozen=True)
class SeedRow:
    line: int  # 1-based line (JSONL) or item (JSON array) number, for messages
    question: str
    answer: str


# --------------------------------------------------------------------------------------------------
# Reading seed data
# --------------------------------------------------------------------------------------------------


def _detect_seed_format(keys: Sequence[str], where: str) -> str:
    for fmt, (q, a) in FORMATS.items():
        if q in keys and a in keys:
            return fmt
    expected = "; ".join(f"{fmt}: {q!r}+{a!r}" for fmt, (q, a) in FORMATS.items())
    raise DataError(f"{where}: cannot tell the format from fields {sorted(keys)} (expected {expected}); "
                    "pass --format")


def _iter_json_rows(path: Path):
    """(line number, parsed object) of a JSONL file, or of a .json file holding an array."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if path.suffix == ".json":
        try:
            data = loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json seed file must hold an array of objects (or use .jsonl)")
        yield from enumerate(data, 1)
        return
    for lineno, obj, error in json_lines(text.splitlines()):
        if error is not None:
            where = f" at column {error.colno}" if isinstance(error, json.JSONDecodeError) and error.doc else ""
            raise DataError(f"{path}:{lineno}: not valid JSON ({getattr(error, 'msg', error)}{where})") from None
        yield lineno, obj


def read_seed_rows(path: str | Path, fmt: str = "auto", limit: int | None = None) -> tuple[str, list[SeedRow]]:
    """Read (question, answer) seed rows; return (format, rows). Errors name the file, line and field."""
    path = Path(path)
    _check_format(fmt)
    rows: list[SeedRow] = []
    for lineno, obj in _iter_json_rows(path):
        if limit is not None and len(rows) >= limit:
            break
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if fmt == "auto":
            fmt = _detect_seed_format(list(obj), where)
        fields = FORMATS[fmt]
        values = []
        for field in fields:
            if field not in obj:
                raise DataError(f"{where}: missing field {field!r} (format {fmt} needs {fields[0]!r} and "
                                f"{fields[1]!r}; row has {sorted(obj)})")
            value = obj[field]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r:.60}")
            values.append(value)
        rows.append(SeedRow(lineno, values[0], values[1]))
    if not rows:
        raise DataError(f"{path}: no rows")
    return fmt, rows


# --------------------------------------------------------------------------------------------------
# Final answers
# --------------------------------------------------------------------------------------------------

_GSM8K_FINAL = re.compile(r"####\s*(.*?)\s*$", re.M)
_METAMATH_FINAL = re.compile(r"The answer is\s*:?\s*(.*?)\s*$", re.M | re.I)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; '\\boxed 5' also works."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] == " ":  # \boxed 5
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip() or None
    return None  # unbalanced


def extract_final_answer(text: str, fmt: str) -> str | None:
    """The final answer as `fmt` writes it: gsm8k '#### n', metamath 'The answer is: n', math \\boxed{n}.

    Returns the last such answer in the text, or None when there is none (or it is empty).
    """
    if fmt == "gsm8k":
        found = _GSM8K_FINAL.findall(text)
    elif fmt == "metamath":
        found = _METAMATH_FINAL.findall(text)
    elif fmt == "math":
        boxed = _last_boxed(text)
        found = [boxed] if boxed else []
    else:
        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    answer = found[-1].strip() if found else ""
    if fmt == "metamath":
        answer = answer.rstrip(".").strip()
    return answer or None


_REMOVE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$", "^{\\circ}", "^\\circ",
           "\\%", "%", "\\displaystyle")


def _as_number(s: str) -> Fraction | None:
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return Fraction(s)
    m = (re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
         or re.fullmatch(r"(-?)(\d+)/(\d+)", s))
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    return None


def normalize_answer(answer: str) -> str:
    """A canonical form for comparing final answers: '1,000' == '1000.0' == '$1000'; '\\dfrac{1}{2}' ==
    '0.5' == '1/2'; '90^\\circ' == '90'; otherwise LaTeX with spacing, \\text{} wrappers and a
    trailing period removed."""
    s = answer.strip()
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    number = _as_number(s)
    return str(number) if number is not None else s


def answers_match(a: str, b: str) -> bool:
    """Whether two final answers are the same after `normalize_answer` (numbers compared by value)."""
    return normalize_answer(a) == normalize_answer(b)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def load_prompts(prompts_dir: str | Path | None = None) -> dict[str, str]:
    """The two rephrasing prompts, {'question': ..., 'answer': ...}: the package's, or those in
    `prompts_dir` (a file missing there falls back to the package's). Trailing whitespace is removed."""
    if prompts_dir is not None and not Path(prompts_dir).is_dir():
        raise ConfigError(f"--prompts: {prompts_dir} is not a folder")
    prompts = {}
    for kind, name in PROMPT_FILES.items():
        path = PROMPTS_DIR / name
        if prompts_dir is not None and (Path(prompts_dir) / name).is_file():
            path = Path(prompts_dir) / name
        text = path.read_text(encoding="utf-8").rstrip()
        for placeholder in PROMPT_REQUIRED[kind]:
            if placeholder not in text:
                raise ConfigError(f"{path}: the {kind} prompt must contain the placeholder {placeholder} "
                                  f"(available: {', '.join(PROMPT_FIELDS)})")
        prompts[kind] = text
    return prompts


def render_prompt(template: str, question: str, answer: str, fmt: str) -> str:
    """Fill the placeholders by plain replacement (math text is full of braces, so no str.format)."""
    return (template.replace("{final_answer_instruction}", FINAL_ANSWER_INSTRUCTIONS[fmt])
            .replace("{question}", question).replace("{answer}", answer))


# --------------------------------------------------------------------------------------------------
# The core
# --------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    return text.strip()


def synthesize(rows: Sequence[SeedRow], generate_fn: GenerateFn, fmt: str, prompts: dict[str, str] | None = None,
               batch_size: int = 8, progress: bool = False) -> tuple[list[dict], list[dict], dict, list[dict]]:
    """Rephrase, check and split into (instruct rows, alignment rows, stats, dropped rows).

    `generate_fn` gets a list of rendered prompts (at most `batch_size` of them) and returns one
    generated text per prompt.
    """
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    prompts = prompts or load_prompts()
    stats = {"format": fmt, "read": len(rows), "dropped_seed_unparseable": 0, "generated": 0,
             "dropped_empty_question": 0, "dropped_unparseable": 0, "dropped_answer_mismatch": 0, "kept": 0}
    work = []
    for row in rows:
        final = extract_final_answer(row.answer, fmt)
        if final is None:
            stats["dropped_seed_unparseable"] += 1
        else:
            work.append((row, final))
    if stats["dropped_seed_unparseable"]:
        log.warning("%d seed rows have no final answer in %s style and are skipped",
                    stats["dropped_seed_unparseable"], fmt)

    instruct, alignment, dropped = [], [], []
    bar = tqdm(total=len(work), desc="synth-math", unit="row", disable=not progress)
    for start in range(0, len(work), batch_size):
        batch = work[start:start + batch_size]
        outputs = {}
        for kind in ("question", "answer"):
            batch_prompts = [render_prompt(prompts[kind], r.question, r.answer, fmt) for r, _ in batch]
            texts = list(generate_fn(batch_prompts))
            if len(texts) != len(batch_prompts):
                raise UpstackError(f"generator returned {len(texts)} texts for {len(batch_prompts)} prompts")
            outputs[kind] = [_clean(t) for t in texts]
        for (row, final), question, answer in zip(batch, outputs["question"], outputs["answer"]):
            stats["generated"] += 1
            got = extract_final_answer(answer, fmt)
            if not question:
                reason = "empty_question"
            elif got is None:
                reason = "unparseable"
            elif not answers_match(got, final):
                reason = "answer_mismatch"
            else:
                stats["kept"] += 1
                instruct.append({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]})
                alignment.append({"prompt": question, "chosen": answer, "rejected": row.answer})
                continue
            stats[f"dropped_{reason}"] += 1
            dropped.append({"line": row.line, "reason": reason, "expected": final, "got": got,
                            "rephrased_question": question, "rephrased_answer": answer})
        bar.update(len(batch))
    bar.close()
    return instruct, alignment, stats, dropped


# --------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------


def _chat_or_raw(tokenizer, use_template: bool, prompt: str) -> list[int]:
    if use_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True, return_dict=True)["input_ids"]
        return list(ids)
    return tokenizer(prompt)["input_ids"]


def transformers_generate_fn(model: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                             top_p: float = 1.0, seed: int = 0, dtype: str = "auto", device: str | None = None,
                             chat_template: bool = True) -> GenerateFn:
    """Batched generation with a transformers causal LM (left padding; greedy, or seeded sampling)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise UpstackError(f"cannot load generator model {model!r}: {str(e).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{model}: tokenizer has neither a pad nor an eos token; cannot batch")
        tokenizer.pad_token = tokenizer.eos_token
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm.to(device).eval()
    torch.manual_seed(seed)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)

    def generate(prompts: list[str]) -> list[str]:
        ids = [_chat_or_raw(tokenizer, use_template, p) for p in prompts]
        enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with torch.no_grad():
            out = lm.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    return generate


def vllm_generate_fn(model: str, *, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, dtype: str = "auto", chat_template: bool = True) -> GenerateFn:
    """Generation with vLLM (prompts passed as token ids, so the chat template's BOS is not doubled)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError("--backend vllm needs the vllm package (pip install vllm, or "
                          "pip install 'upstack[vllm]'); or use --backend transformers") from None
    llm = LLM(model=model, seed=seed, dtype=dtype)
    tokenizer = llm.get_tokenizer()
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            max_tokens=max_new_tokens, seed=seed)

    def generate(prompts: list[str]) -> list[str]:
        inputs = [{"prompt_token_ids": _chat_or_raw(tokenizer, use_template, p)} for p in prompts]
        return [o.outputs[0].text for o in llm.generate(inputs, params, use_tqdm=False)]

    return generate


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SynthMathConfig:
    """`upstack synth-math` / a recipe's synth-math stage."""

    seed_data: str
    model: str
    out: str
    format: Literal["auto", "metamath", "gsm8k", "math"] = "auto"
    limit: int | None = None
    batch_size: int | None = None  # default 8 (transformers) or 256 (vllm)
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    backend: Literal["transformers", "vllm"] = "transformers"
    prompts: str | None = None
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None
    chat_template: bool = True
    overwrite: bool = False
    quiet: bool = False  # no progress bar


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def check_config(cfg: SynthMathConfig) -> None:
    """The values of a synth-math run (no file is read: the seed data may come from an earlier stage)."""
    for name in ("max_new_tokens", "batch_size", "limit"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
    _check_format(cfg.format)


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")


def run_synth_math(cfg: SynthMathConfig, generate_fn: GenerateFn | None = None) -> dict:
    """Read, validate, generate, check, write `cfg.out` atomically; return the stats.

    `generate_fn` replaces the model backend (tests, or a custom generator).
    """
    check_config(cfg)
    if generate_fn is None and not Path(cfg.model).exists() and (
            cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1):
        raise ConfigError(f"--model: {cfg.model} does not exist (give a model folder or a hub id)")
    fmt, rows = read_seed_rows(cfg.seed_data, cfg.format, cfg.limit)
    prompts = load_prompts(cfg.prompts)
    batch_size = cfg.batch_size or (256 if cfg.backend == "vllm" else 8)
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        if generate_fn is None:
            common = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=cfg.seed, dtype=cfg.dtype, chat_template=cfg.chat_template)
            if cfg.backend == "vllm":
                generate_fn = vllm_generate_fn(cfg.model, **common)
            else:
                generate_fn = transformers_generate_fn(cfg.model, device=cfg.device, **common)
        instruct, alignment, stats, dropped = synthesize(rows, generate_fn, fmt, prompts, batch_size,
                                                     progress=not cfg.quiet)
        stats.update(seed_data=str(cfg.seed_data), model=cfg.model, backend=cfg.backend, seed=cfg.seed,
                     temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                     prompts=dict(prompts))
        _write_jsonl(tmp / "instruct.jsonl", instruct)
        _write_jsonl(tmp / "alignment.jsonl", alignment)
        _write_jsonl(tmp / "dropped.jsonl", dropped)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("synth-math: %d read, %d generated, %d kept (%d answer mismatch, %d unparseable) -> %s",
             stats["read"], stats["generated"], stats["kept"], stats["dropped_answer_mismatch"],
             stats["dropped_unparseable"], cfg.out)
    return stats
