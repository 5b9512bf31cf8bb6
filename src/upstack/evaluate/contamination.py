"""The data-contamination test SOLAR reports, and Min-K% Prob.

Neighbour test (`method="neighbours"`, the public detect-pretrain-code-contamination procedure the
SOLAR authors used): for each of N sampled benchmark examples, text = question + " " + gold answer;
target_loss = the target model's mean token NLL on the text. The reference model (for SOLAR-10.7B-
Instruct: the base SOLAR-10.7B) writes K neighbours by sampling a continuation of the text's first
40% of words. score = fraction of neighbours whose loss under the target is below target_loss.
A model that saw the example finds it easier than almost all of its neighbours, so its score is
near 0. result = fraction of examples with score < 0.1: below 0.1 means no sign of contamination,
above 0.9 likely contamination.

Min-K% Prob (`method="min-k"`, Shi et al. 2023): the mean log-probability of the k% least likely
tokens of the text; higher means more likely seen in training. It is a score, not a verdict: with a
reference model we report how often the target finds an example more likely than the reference does.

When target and reference have different tokenizers, neighbours pass between them as text: the
reference generates with its tokenizer and the target scores with its own.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Literal

from upstack.data.benchmarks import benchmark_examples, parse_benchmark
from upstack.errors import ConfigError
from upstack.lm import (
    check_model_path,
    check_token_ids,
    load_for_inference,
    model_max_positions,
    same_tokenizer,
)
from upstack.outputs import check_output_free, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class ContaminationConfig:
    model: str  # the model under test (e.g. the instruct/merged model)
    benchmarks: list[str]  # files or folders, optionally NAME=PATH
    reference: str | None = None  # the model it was trained from (e.g. the base); required for neighbours
    method: Literal["neighbours", "min-k"] = "neighbours"
    num_examples: int = 100  # N benchmark examples, sampled with `seed`
    num_neighbours: int = 100  # K neighbours per example
    prefix_fraction: float = 0.4  # neighbours continue this fraction of the text's words
    threshold: float = 0.1  # an example counts when its score is below this
    min_k_percent: float = 20.0  # Min-K%: the share of least likely tokens averaged
    temperature: float = 1.0  # neighbour sampling
    top_k: int = 50  # neighbour sampling (0 = no top-k cut; 50 is transformers' default)
    max_length: int | None = None  # tokens per text (default: the model's context)
    batch_size: int = 16
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    output: str | None = None  # results JSON
    overwrite: bool = False  # replace an existing `output` (refused otherwise, before any work)
    allow_pickle: bool = False  # models stored as pickled .bin (loaded with torch.load(weights_only=True))


def check_config(cfg: ContaminationConfig) -> None:
    """The values of a contamination run (no file is read: benchmarks and models may come from earlier stages)."""
    if cfg.method == "neighbours" and not cfg.reference:
        raise ConfigError("the neighbour test needs --reference (the model the target was trained from, e.g. its base)")
    if not cfg.benchmarks:
        raise ConfigError("give at least one --benchmark FILE")
    for name, value, ok in (("--num-examples", cfg.num_examples, cfg.num_examples > 0),
                            ("--num-neighbours", cfg.num_neighbours, cfg.num_neighbours > 0),
                            ("--prefix-fraction", cfg.prefix_fraction, 0 < cfg.prefix_fraction < 1),
                            ("--threshold", cfg.threshold, 0 < cfg.threshold <= 1),
                            ("--min-k-percent", cfg.min_k_percent, 0 < cfg.min_k_percent <= 100),
                            ("--temperature", cfg.temperature, cfg.temperature > 0)):
        if not ok:
            raise ConfigError(f"{name}: invalid value {value}")


def verdict(result: float) -> str:
    if result < 0.1:
        return "clean"
    if result > 0.9:
        return "contaminated"
    return "inconclusive"


VERDICT_TEXT = {"clean": "no sign of contamination (< 0.1)", "contaminated": "likely contaminated (> 0.9)",
                "inconclusive": "inconclusive (between 0.1 and 0.9)"}


def token_logprobs(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int) -> list:
    """Per text, the log-probabilities of its tokens after the first (a float tensor on CPU)."""
    import torch

    encoded = []
    for t in texts:
        ids = tokenizer(t)["input_ids"][:max_length]
        if ids:
            check_token_ids(model, max(ids), "contamination text")
        encoded.append(ids)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out: list = [None] * len(texts)
    dev = next(model.parameters()).device
    with torch.no_grad():
        for b in range(0, len(order), max(1, batch_size)):
            idx = order[b:b + max(1, batch_size)]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            attn = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                attn[r, :len(encoded[i])] = 1
            ids, attn = ids.to(dev), attn.to(dev)
            logits = model(input_ids=ids, attention_mask=attn).logits
            for r, i in enumerate(idx):
                n = len(encoded[i])
                lp = torch.log_softmax(logits[r, : n - 1].float(), dim=-1)
                out[i] = lp.gather(1, ids[r, 1:n, None])[:, 0].cpu()
    return out


def mean_nll(lps: list) -> list[float]:
    return [float(-lp.mean()) if len(lp) else float("nan") for lp in lps]


def min_k(lp, percent: float) -> float:
    k = max(1, int(len(lp) * percent / 100))
    return float(lp.sort().values[:k].mean())


def _prefix(text: str, fraction: float) -> str:
    """The text up to the end of its first `fraction` of words (at least one word), spacing kept."""
    words = list(re.finditer(r"\S+", text))
    n = max(1, int(len(words) * fraction))
    return text[: words[n - 1].end()]


def neighbours(ref, ref_tok, text: str, *, k: int, fraction: float, temperature: float, top_k: int,
               max_length: int, batch_size: int, seed: int) -> list[str]:
    """K texts that start like `text` (its first `fraction` of words) and continue as `ref` samples."""
    import torch

    prefix = _prefix(text, fraction)
    p_ids = ref_tok(prefix)["input_ids"][: max_length - 1]
    n_full = len(ref_tok(text)["input_ids"])
    new = max(1, min(n_full - len(p_ids), max_length - len(p_ids)))
    dev = next(ref.parameters()).device
    pad = ref_tok.pad_token_id if ref_tok.pad_token_id is not None else ref_tok.eos_token_id
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        while len(out) < k:
            b = min(max(1, batch_size), k - len(out))
            inp = torch.tensor([p_ids] * b, device=dev)
            gen = ref.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=True,
                               temperature=temperature, top_k=top_k, top_p=1.0, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=pad)
            out += ref_tok.batch_decode(gen, skip_special_tokens=True)
    return out


def _fit(text: str, tokenizer, max_tokens: int) -> str:
    """`text` cut to at most `max_tokens` tokens (one kept free for BOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens:
        return text
    return tokenizer.decode(ids[: max_tokens - 1], skip_special_tokens=True)


def contamination(cfg: ContaminationConfig) -> dict:
    """Run the contamination test on every benchmark; return (and write to `cfg.output`) the results."""
    check_config(cfg)
    if cfg.output:
        check_output_free(cfg.output, cfg.overwrite)
    benches = []
    for spec in cfg.benchmarks:
        name, path = parse_benchmark(spec)
        fmt, texts = benchmark_examples(path)
        benches.append((name, path, fmt, texts))
    if len({b[0] for b in benches}) < len(benches):
        raise ConfigError("two benchmarks have the same name; name them: --benchmark NAME=PATH")
    check_model_path(cfg.model, "model", allow_pickle=cfg.allow_pickle)
    if cfg.reference:
        check_model_path(cfg.reference, "reference", allow_pickle=cfg.allow_pickle)

    target, tok = load_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype, what="model",
                                     allow_pickle=cfg.allow_pickle)
    ref = ref_tok = None
    if cfg.reference:
        if os.path.realpath(cfg.reference) == os.path.realpath(cfg.model):
            ref, ref_tok = target, tok
        else:
            ref, ref_tok = load_for_inference(cfg.reference, device=cfg.device, dtype=cfg.dtype, what="reference",
                                              allow_pickle=cfg.allow_pickle)
    same_tok = ref_tok is None or same_tokenizer(tok, ref_tok)
    if not same_tok:
        log.warning("model and reference use different tokenizers: allowed, but each scores with its own "
                    "(neighbours pass from the reference to the model as text); losses are per token of each tokenizer")
    t_len = min(cfg.max_length or model_max_positions(target), model_max_positions(target))
    r_len = min(cfg.max_length or model_max_positions(ref), model_max_positions(ref)) if ref is not None else None

    out = {"format": "upstack-contamination/1", "method": cfg.method, "model": cfg.model, "reference": cfg.reference,
           "same_tokenizer": same_tok, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "config": dataclasses.asdict(cfg), "benchmarks": {}}
    for name, path, fmt, texts in benches:
        idx = sorted(random.Random(cfg.seed).sample(range(len(texts)), min(cfg.num_examples, len(texts))))
        sample = [texts[i] for i in idx]
        # Texts longer than a model's context are cut to fit it first, so that the text and its
        # neighbours are scored on the same span.
        sample = [_fit(t, tok, t_len) for t in sample]
        if ref_tok is not None:
            sample = [_fit(t, ref_tok, r_len) for t in sample]
        t_lps = token_logprobs(target, tok, sample, max_length=t_len, batch_size=cfg.batch_size)
        entry = {"path": path, "format": fmt, "examples": len(idx), "available": len(texts)}
        if cfg.method == "neighbours":
            entry.update(_neighbour_test(cfg, target, tok, ref, ref_tok, sample, idx, t_lps, t_len, r_len))
        else:
            entry.update(_min_k_test(cfg, ref, ref_tok, sample, idx, t_lps, r_len))
        out["benchmarks"][name] = entry
        log.info("%s: %s", name, format_line(name, entry))
    if cfg.output:
        write_text_atomic(cfg.output, json.dumps(out, indent=2) + "\n")
    return out


def _neighbour_test(cfg, target, tok, ref, ref_tok, sample, idx, t_lps, t_len, r_len) -> dict:
    from tqdm.auto import tqdm

    target_losses = mean_nll(t_lps)
    per_example = []
    for j, (text, i) in enumerate(tqdm(list(zip(sample, idx)), desc="neighbours", unit="example")):
        texts = neighbours(ref, ref_tok, text, k=cfg.num_neighbours, fraction=cfg.prefix_fraction,
                           temperature=cfg.temperature, top_k=cfg.top_k, max_length=r_len,
                           batch_size=cfg.batch_size, seed=cfg.seed * 1_000_003 + i)
        n_losses = mean_nll(token_logprobs(target, tok, texts, max_length=t_len, batch_size=cfg.batch_size))
        valid = [x for x in n_losses if not math.isnan(x)]
        score = sum(x < target_losses[j] for x in valid) / max(1, len(valid))
        per_example.append({"index": i, "target_loss": target_losses[j], "score": score,
                            "neighbour_loss": sum(valid) / max(1, len(valid))})
    result = sum(e["score"] < cfg.threshold for e in per_example) / len(per_example)
    return {"result": result, "verdict": verdict(result), "neighbours": cfg.num_neighbours,
            "mean_score": sum(e["score"] for e in per_example) / len(per_example),
            "target_loss": sum(e["target_loss"] for e in per_example) / len(per_example),
            "neighbour_loss": sum(e["neighbour_loss"] for e in per_example) / len(per_example),
            "per_example": per_example}


def _min_k_test(cfg, ref, ref_tok, sample, idx, t_lps, r_len) -> dict:
    t_scores = [min_k(lp, cfg.min_k_percent) if len(lp) else float("nan") for lp in t_lps]
    per_example = [{"index": i, "min_k": s} for i, s in zip(idx, t_scores)]
    entry = {"min_k_percent": cfg.min_k_percent, "target_min_k": _nanmean(t_scores)}
    if ref is not None:
        r_lps = token_logprobs(ref, ref_tok, sample, max_length=r_len, batch_size=cfg.batch_size)
        r_scores = [min_k(lp, cfg.min_k_percent) if len(lp) else float("nan") for lp in r_lps]
        for e, r in zip(per_example, r_scores):
            e["reference_min_k"] = r
        pairs = [(t, r) for t, r in zip(t_scores, r_scores) if not (math.isnan(t) or math.isnan(r))]
        entry["reference_min_k"] = _nanmean(r_scores)
        entry["result"] = sum(t > r for t, r in pairs) / max(1, len(pairs))
    entry["per_example"] = per_example
    return entry


def _nanmean(xs: list[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


def format_line(name: str, entry: dict) -> str:
    if "verdict" in entry:
        return f"result {entry['result']:.3f} over {entry['examples']} examples: {VERDICT_TEXT[entry['verdict']]}"
    line = f"Min-{entry['min_k_percent']:g}% log-prob {entry['target_min_k']:.4f}"
    if "reference_min_k" in entry:
        line += (f" (reference {entry['reference_min_k']:.4f}; higher under the model for "
                 f"{entry['result']:.0%} of {entry['examples']} examples)")
    return line


def format_report(out: dict) -> str:
    lines = [f"contamination test ({out['method']}) of {out['model']}"
             + (f" against reference {out['reference']}" if out.get("reference") else "")]
    if not out.get("same_tokenizer", True):
        lines.append("note: model and reference use different tokenizers; each scores with its own")
    for name, entry in out["benchmarks"].items():
        lines.append(f"  {name}: {format_line(name, entry)}")
    if out["method"] == "min-k":
        lines.append("  (Min-K% is a membership score, not a verdict: compare models on the same texts)")
    return "\n".join(lines)
