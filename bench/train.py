"""Benchmark `upstack pretrain | sft | dpo` against a plain PyTorch training loop on the same model.

A ~10M-parameter Llama (hidden 256, 8 layers, intermediate 688, vocab 8000) is built from its config;
a byte-level BPE tokenizer (8000 tokens) is trained on synthetic text; every measurement runs in its own
process (so peak RSS is its own), one after another:

  plain     model(input_ids, labels=input_ids); backward; AdamW step -- batches of 8 x 256 tokens cut
            from the same token stream `pretrain` trains on
  pretrain  upstack's pretrain (packed 256-token blocks, document-masked), batch 8
  sft       upstack's sft on alpaca rows (~120 tokens each, packed into rows of <= 256), batch 8
  dpo       upstack's dpo, 4 pairs (8 sequences of ~256 tokens) per step, reference log-probs
            precomputed (their scoring time is charged to the steps)
  dpo-ref   the same with the reference model kept in memory (--no-precompute-ref)
  trl-dpo   TRL's DPOTrainer on the same pairs, batch 4, fp32 on CPU, ref_model=None
Every path runs --rounds times, interleaved (plain, pretrain, ..., plain, pretrain, ...); the best run of
each is kept, since other load on a shared machine only ever slows a run down.

Tokens/s counts non-pad input tokens (chosen + rejected for DPO); each run reports the median of its
per-step rates over steps 2..N (the first step pays one-off costs; the median shrugs off load spikes). Targets
(issue 3): sft and pretrain >= 0.9x plain; dpo >= 0.7x plain and >= TRL's DPOTrainer.
Appends the table to bench/RESULTS.md. `--preset gpu1b` runs a ~1.1B Llama (TinyLlama shape) in bf16 on
one GPU and adds model FLOPs utilisation (see bench/gpu.sh); `--preset smoke` checks those bf16 code paths
on a 1M-parameter model in under a minute on any machine.

usage: python bench/train.py [--steps 8] [--rounds 2] [--threads N] [--only plain,sft,...] [--preset cpu10m|gpu1b|smoke] [--attn IMPL]
                             [--work DIR] [--no-record]
BENCH_PROFILE=FILE writes a torch.profiler table of the dpo path's reference scoring to FILE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRESETS = {
    # the CPU model: ~10.4M parameters
    "cpu10m": {"model": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=8000),
               "seq": 256, "batch": 8, "dtype": "fp32"},
    # TinyLlama-1.1B's shape: ~1.1B parameters
    "gpu1b": {"model": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                            num_key_value_heads=4, vocab_size=32000),
              "seq": 1024, "batch": 8, "dtype": "bf16"},
    # a seconds-long check of the bf16 / GPU-preset code paths on any machine
    "smoke": {"model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=8000),
              "seq": 128, "batch": 4, "dtype": "bf16"},
}
# Peak dense bf16 tensor-core FLOP/s, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


# ------------------------------------------------------------------------------------------------
# Data and model (the "prepare" worker)

def _lexicon(rng: random.Random, n: int = 12000) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "be", "da", "gu", "fi", "zo", "ve", "qua", "xen"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _sentence(rng: random.Random, lex: list[str], n_words: int) -> str:
    # Zipf-like word frequencies so the BPE has frequent merges to learn
    words = [lex[min(len(lex) - 1, int(rng.paretovariate(1.1)) - 1)] for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def prepare(work: Path, preset: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from upstack.data.tokenizer import train_tokenizer

    spec = PRESETS[preset]
    if (work / "model" / "config.json").is_file():
        cfg = json.loads((work / "model" / "config.json").read_text())
        m = spec["model"]
        n = (2 * m["vocab_size"] * m["hidden_size"] + m["hidden_size"]
             + m["num_hidden_layers"] * (2 * m["hidden_size"] + 3 * m["hidden_size"] * m["intermediate_size"]
                                         + m["hidden_size"] * m["hidden_size"] * 2
                                         + 2 * m["hidden_size"] * m["hidden_size"] * m["num_key_value_heads"]
                                         // m["num_attention_heads"]))
        assert cfg["hidden_size"] == m["hidden_size"]
        print(json.dumps({"parameters": n}))
        return
    rng = random.Random(0)
    lex = _lexicon(rng)
    docs = [" ".join(_sentence(rng, lex, rng.randint(8, 20)) for _ in range(rng.randint(8, 30))) for _ in range(1500)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.txt").write_text("\n".join(docs) + "\n")
    tok = train_tokenizer(docs, work / "model", vocab_size=8000)
    # SFT rows of ~seq/2 tokens (two per packed row); DPO pairs of ~seq tokens per side
    k = spec["seq"] / 256
    with open(work / "sft.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"instruction": _sentence(rng, lex, int(25 * k)), "input": "",
                                "output": _sentence(rng, lex, int(55 * k))}) + "\n")
    with open(work / "dpo.jsonl", "w") as f:
        for _ in range(200):
            prompt = _sentence(rng, lex, int(60 * k))
            f.write(json.dumps({"prompt": prompt, "chosen": _sentence(rng, lex, int(130 * k)),
                                "rejected": _sentence(rng, lex, int(130 * k))}) + "\n")
    cfg = LlamaConfig(**spec["model"], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if spec["dtype"] == "bf16":
        model = model.to(torch.bfloat16)  # saved (and so trained and written back) in bf16
    model.save_pretrained(work / "model")
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


# ------------------------------------------------------------------------------------------------
# Workers: each prints one JSON line

def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def worker_plain(work: Path, preset: str, steps: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PRESETS[preset]
    seq, batch = spec["seq"], spec["batch"]
    tok = AutoTokenizer.from_pretrained(work / "model")
    ids = []
    for doc in (work / "corpus.txt").read_text().splitlines():
        ids += tok(doc)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= seq * batch * (steps + 1):
            break
    blocks = torch.tensor(np.asarray(ids[:len(ids) // seq * seq]).reshape(-1, seq))
    dev = _device()
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    attn = {"attn_implementation": os.environ["BENCH_ATTN"]} if os.environ.get("BENCH_ATTN") else {}
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype, **attn).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(steps):
        x = blocks[(step * batch) % len(blocks):][:batch].to(dev)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": _median([batch * seq / t for t in times[1:]]), "loss": float(loss)}


def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def _stage_step_rates(out: Path) -> list[float]:
    """Per-step tokens/s of a stage run, from its metrics.jsonl (logged every step), steps 2..N."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    rates = []
    for a, b in zip(train, train[1:]):
        rates.append((b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]))
    return rates


def worker_stage(work: Path, preset: str, steps: int, stage: str) -> dict:
    spec = PRESETS[preset]
    common = dict(model=str(work / "model"), out=str(work / f"out-{stage}"), max_steps=steps, save_steps=0,
                  logging_steps=1, tensorboard=False, progress=False, overwrite=True, learning_rate=1e-4,
                  dtype=spec["dtype"], max_length=spec["seq"], attn_implementation=os.environ.get("BENCH_ATTN") or None)
    if stage == "pretrain":
        from upstack.train.pretrain import PretrainConfig, pretrain

        s = pretrain(PretrainConfig(data=[str(work / "corpus.txt")], batch_size=spec["batch"], eval_fraction=0.0,
                                    **common))
    elif stage in ("sft", "sft-lora", "sft-qlora"):
        from upstack.train.sft import SFTConfig, sft

        adapters = {"sft": {}, "sft-lora": {"lora": True},
                    # QLoRA computes in bf16 on its 4-bit base
                    "sft-qlora": {"qlora": True, "dtype": "bf16" if spec["dtype"] == "fp32" else spec["dtype"]}}
        s = sft(SFTConfig(data=[f"{work / 'sft.jsonl'}:format=alpaca"], batch_size=spec["batch"],
                          **{**common, **adapters[stage]}))
    else:
        from upstack.train.dpo import DPOConfig, dpo

        common.update(max_length=spec["seq"] * 2, data=[f"{work / 'dpo.jsonl'}:format=preference"],
                      batch_size=spec["batch"] // 2, precompute_ref=(stage == "dpo"))
        # Two untimed steps first, in this process: the reference scoring runs before step 1, so it would
        # otherwise carry the one-off start-up costs (CUDA context, kernel selection) that every other path
        # leaves out by skipping its first step.
        dpo(DPOConfig(**{**common, "max_steps": 2, "out": common["out"] + "-warmup"}))
        if os.environ.get("BENCH_PROFILE") and stage == "dpo":
            _profile_reference_scoring(Path(os.environ["BENCH_PROFILE"]))
        s = dpo(DPOConfig(**common))
    tps = _median(_stage_step_rates(Path(s["out"])))
    steady = tps
    if s.get("ref_logps_seconds"):
        # charge the one-off reference scoring to the training steps
        per_step_tokens = s["tokens"] / s["steps"]
        tps = per_step_tokens / (per_step_tokens / tps + s["ref_logps_seconds"] / s["steps"])
    return {"tokens_per_s": tps, "loss": s["final_loss"], "steady_tokens_per_s": steady,
            "ref_logps_seconds": s.get("ref_logps_seconds")}


def _profile_reference_scoring(path: Path) -> None:
    """Wrap dpo's reference scoring in torch.profiler; write the op tables to `path` (BENCH_PROFILE=FILE)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import upstack.train.dpo as dpo_module

    inner = dpo_module._reference_logps

    def profiled(*a, **kw):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        t0 = time.perf_counter()
        with profile(activities=acts, record_shapes=True) as prof:
            out = inner(*a, **kw)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        ka = prof.key_averages()
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        path.write_text(f"reference scoring wall {wall:.3f} s (profiled)\n"
                        + ka.table(sort_by=sort, row_limit=25) + "\n"
                        + ka.table(sort_by="cpu_time_total", row_limit=25) + "\n"
                        + prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=15))
        return out

    dpo_module._reference_logps = profiled


def worker_trl_dpo(work: Path, preset: str, steps: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    spec = PRESETS[preset]
    tok = AutoTokenizer.from_pretrained(work / "model")
    rows = [json.loads(x) for x in (work / "dpo.jsonl").read_text().splitlines()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    batch = spec["batch"] // 2
    # tokens per step, counted the way upstack counts them (same template, same pairs)
    from upstack.data.chat import encode_pairs

    enc, pairs, _ = encode_pairs(tok, conv[:batch * steps], spec["seq"] * 2)
    per_pair = sum(enc.length(c) + enc.length(r) for c, r in pairs) / len(pairs)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(["b", time.perf_counter()])

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(["e", time.perf_counter()])

    bf16 = spec["dtype"] == "bf16"
    args = DPOConfig(output_dir=str(work / "trl-out"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], bf16=bf16,
                     use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, max_length=spec["seq"] * 2,
                     dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16 if bf16 else torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(conv),
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    begins = [t for k, t in stamps if k == "b"]
    ends = [t for k, t in stamps if k == "e"]
    step_times = [e - b for b, e in zip(begins, ends)][1:]
    return {"tokens_per_s": _median([per_pair * batch / t for t in step_times])}


def run_worker(name: str, work: Path, preset: str, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if name == "plain":
        result = worker_plain(work, preset, steps)
    elif name == "trl-dpo":
        result = worker_trl_dpo(work, preset, steps)
    else:
        result = worker_stage(work, preset, steps, name)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["threads"] = torch.get_num_threads()
    return result


# ------------------------------------------------------------------------------------------------
# Driver

def call(args: list[str], env: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def model_flops_per_token(n_params: int, spec: dict) -> float:
    """6N for the weights plus the attention score/value matmuls (6 * 2 * layers * seq * hidden)."""
    m = spec["model"]
    return 6 * n_params + 12 * m["num_hidden_layers"] * spec["seq"] * m["hidden_size"]


def gpu_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return name, flops
    return name, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu10m", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="run every path this many times, interleaved; keep the best")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: torch's default)")
    ap.add_argument("--only", help="comma-separated subset of plain,pretrain,sft,sft-lora,sft-qlora,dpo,dpo-ref,trl-dpo")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "train"))
    ap.add_argument("--attn", help="attention implementation for every path (sdpa, flex_attention, ...; "
                                   "default: transformers' own choice)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work) / args.preset
    if args.worker == "prepare":
        prepare(work, args.preset)
        return
    if args.worker:
        print(json.dumps(run_worker(args.worker, work, args.preset, args.steps, args.threads)))
        return

    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.attn:
        env["BENCH_ATTN"] = args.attn
    base = ["--preset", args.preset, "--steps", str(args.steps), "--work", args.work]
    if args.threads:
        base += ["--threads", str(args.threads)]
    if not (work / "model" / "config.json").is_file():
        print(f"preparing model and data in {work} ...", flush=True)
    info = call(["--worker", "prepare", *base], env)
    spec = PRESETS[args.preset]
    order = ["plain", "pretrain", "sft", "sft-lora", "sft-qlora", "dpo", "dpo-ref", "trl-dpo"]
    if args.only:
        wanted = set(args.only.split(","))
        order = [w for w in order if w in wanted]
    results: dict[str, list[dict]] = {}
    failed: list[str] = []
    for r in range(args.rounds):
        for name in order:
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            try:
                results.setdefault(name, []).append(call(["--worker", name, *base], env))
            except SystemExit as e:  # one broken path must not lose the others' numbers
                print(e, file=sys.stderr, flush=True)
                failed.append(name)
    # best of the rounds: the machine may be shared, and other load only ever slows a run down
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in results.items()}
    if not best:
        raise SystemExit("every benchmark path failed")
    plain = best.get("plain", {}).get("tokens_per_s")
    device, peak = ("cpu", None)
    if args.preset != "cpu10m":
        device, peak = gpu_peak()
    fpt = model_flops_per_token(info["parameters"], spec)
    rows = []
    for name in ("plain", "pretrain", "sft", "sft-lora", "sft-qlora", "dpo", "dpo-ref", "trl-dpo"):
        if name not in best:
            continue
        r = best[name]
        ratio = r["tokens_per_s"] / plain if plain else None
        mfu = r["tokens_per_s"] * fpt / peak if peak else None
        rows.append((name, r["tokens_per_s"], ratio, r["peak_rss_mb"], mfu, r.get("peak_gpu_mb")))
    print(f"\n{info['parameters'] / 1e6:.1f}M-parameter Llama, seq {spec['seq']}, batch {spec['batch']}, "
          f"{spec['dtype']}, {args.steps} steps, best of {args.rounds}, device {device}, attention {args.attn or 'default'}, "
          f"threads {next(iter(best.values()))['threads']}")
    print(f"{'path':10} {'tokens/s':>10} {'vs plain':>9} {'peak RSS':>10} {'MFU':>6} {'peak GPU mem':>13}")
    for name, tps, ratio, rss, mfu, gpu in rows:
        print(f"{name:10} {tps:10,.0f} {f'{ratio:.2f}x' if ratio else '-':>9} {rss:8,.0f} MB "
              f"{f'{mfu:.1%}' if mfu else '-':>6} {f'{gpu:,.0f} MiB' if gpu else '-':>13}")
    if "dpo" in best and best["dpo"].get("ref_logps_seconds"):
        print(f"dpo: {best['dpo']['steady_tokens_per_s']:,.0f} tokens/s in its steps, plus "
              f"{best['dpo']['ref_logps_seconds']:.2f} s of reference scoring (charged above)")
    if failed:
        print("failed paths: " + ", ".join(failed))
    for name, runs in results.items():
        if len(runs) > 1:
            print(f"{name} runs: " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs) + " tokens/s")
    if not args.no_record:
        record(rows, info, spec, args, device, results, failed)


def record(rows, info, spec, args, device, results, failed) -> None:
    def status(name, ratio):
        target = {"pretrain": 0.9, "sft": 0.9, "dpo": 0.7, "dpo-ref": 0.7}.get(name)
        return "" if target is None or ratio is None else (" (ok)" if ratio >= target else f" (< {target})")

    trl = next((t for n, t, *_ in rows if n == "trl-dpo"), None)
    gpu = device != "cpu"
    lines = [
        "",
        f"## training throughput vs a plain PyTorch loop ({args.preset}) — {datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} cores, {device}, python {platform.python_version()}",
        "",
        f"`python bench/train.py --preset {args.preset} --steps {args.steps} --rounds {args.rounds}"
        f"{' --threads ' + str(args.threads) if args.threads else ''}{' --attn ' + args.attn if args.attn else ''}`: "
        f"{info['parameters'] / 1e6:.1f}M-parameter Llama, seq {spec['seq']}, batch {spec['batch']} "
        f"(DPO: {spec['batch'] // 2} pairs), {spec['dtype']}; tokens/s = median per-step rate over steps 2..{args.steps}, "
        "chosen + rejected for DPO; the precomputed reference scoring is charged to the dpo steps; "
        f"best of {args.rounds} interleaved rounds per path. Targets: pretrain, sft >= 0.9x; "
        "dpo >= 0.7x and >= TRL's DPOTrainer.",
        "",
        "| path | tokens/s | vs plain | peak RSS |" + (" MFU | peak GPU memory |" if gpu else ""),
        "|---|---|---|---|" + ("---|---|" if gpu else ""),
    ]
    for name, tps, ratio, rss, mfu, gmem in rows:
        extra = ""
        if name.startswith("dpo") and trl:
            extra = f", {tps / trl:.2f}x TRL"
        mfu_col = ""
        if gpu:
            mfu_col = (f" {mfu:.1%} |" if mfu else " - |") + (f" {gmem:,.0f} MiB |" if gmem else " - |")
        lines.append(f"| {name} | {tps:,.0f} | {f'{ratio:.2f}x' if ratio else '-'}{status(name, ratio)}{extra} | "
                     f"{rss:,.0f} MB |{mfu_col}")
    if failed:
        lines.append(f"\nFailed (see the run's output): {', '.join(failed)}.")
    if args.rounds > 1:
        lines.append("\nAll runs (tokens/s; the machine is shared with other jobs, so the best run of each path is "
                     "used): " + "; ".join(f"{n} " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
                                          for n, runs in results.items()) + ".")
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
