"""Where to put the duplicated block: the seam of every depth up-scaling placement, scored on data.

An n-layer base up-scaled to s = n + k layers by duplicating the k-layer block that starts at layer j
has the layer order [0, j+k) + [j, n) (j = 0..n-k). SOLAR's cut (arXiv 2312.15166) is the placement
j = m for s = 2(n-m), i.e. k = n - 2m: [0, n-m) + [m, n).

Hidden-state convention: h_i is the residual stream that enters layer i (i = 0..n-1) and h_n is what the
last layer returns, before the final norm. h_i equals transformers' `output_hidden_states[i]` for
i < n (hidden_states[0] is the embeddings' output); transformers' hidden_states[n] is taken after the
final norm, so h_n is not it.

At the seam of placement j, layer j receives h_{j+k} where it was trained on h_j. Its score is the
angular distance of Gromov et al. (arXiv 2403.17887), averaged over every calibration token t:

    d_j = mean_t arccos(cos(h_j[t], h_{j+k}[t])) / pi          (0: same direction, 1: opposite)

(the paper takes the last token of each sequence; every token is used here). The per-layer block
influence of ShortGPT (arXiv 2403.03853) is BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t]).

With a held-out text, each placement's step-0 perplexity is measured on the base's own layer modules
put in the placement's order (a view: no weight is copied or written), which computes what the written
checkpoint computes. Memory: one copy of the base plus one batch's hidden states of all layers
((n+1) x batch x length x hidden in the model's dtype); per-placement sums are accumulated batch by batch.

Sits between data/ and the stages: `upstack seam` and `upscale --seam auto` both call it.
torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

from upstack.arch import get_arch, num_layers, remap_config
from upstack.data.loading import iter_text_documents
from upstack.data.spec import parse_data_spec
from upstack.errors import ConfigError, DataError
from upstack.lm import (
    DTYPES,
    check_model_path,
    check_token_ids,
    load_for_inference,
    load_tokenizer,
    model_config,
)
from upstack.outputs import atomic_file

SCORES = ("angle", "perplexity")
CONVENTION = ("h_i = input of layer i = transformers output_hidden_states[i] for i < n; "
              "h_n = output of the last layer before the final norm")


@dataclasses.dataclass
class SeamOptions:
    """How the seams are scored (flags of `upstack seam`; `upstack upscale --seam auto` fills the same)."""

    calibration: str                 # text data spec (PATH[:field=...]) the angles are measured on
    perplexity: str | None = None    # held-out text data spec: step-0 perplexity of every placement
    score: str = "angle"             # angle | perplexity: which column picks and sorts
    batch_size: int = 4
    max_length: int = 256            # tokens per row
    batches: int = 8                 # at most this many batches of each text
    device: str | None = None
    dtype: str = "auto"
    allow_pickle: bool = False
    quiet: bool = False


def check_seam_options(opts: SeamOptions, flag_prefix: str = "--") -> None:
    """Values only (no file is read)."""
    if opts.score not in SCORES:
        raise ConfigError(f"{flag_prefix}score {opts.score!r}: choose from {', '.join(SCORES)}")
    if opts.score == "perplexity" and not opts.perplexity:
        raise ConfigError(f"{flag_prefix}score perplexity needs --perplexity HELDOUT (a held-out text)")
    for name in ("batch_size", "max_length", "batches"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag_prefix}{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if opts.max_length < 2:
        raise ConfigError(f"{flag_prefix}max-length must be at least 2 tokens, got {opts.max_length}")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"{flag_prefix}dtype {opts.dtype!r}: choose from {', '.join(DTYPES)}")
    for what, spec in (("calibration", opts.calibration), ("perplexity", opts.perplexity)):
        if spec is not None:
            parse_data_spec(spec)


# ------------------------------------------------------------------------------------------------
# Placements

def block_length(n: int, depth: int | None = None, m: int | None = None) -> int:
    """k, the length of the duplicated block, for an output depth (or SOLAR's m: depth 2(n-m); default
    m = n // 4 as `upscale`). Refuses a depth that no placement of one duplicated block gives."""
    if depth is not None and m is not None:
        raise ConfigError("give the depth (--layers N) or --m M, not both")
    if depth is None:
        m = n // 4 if m is None else m
        if m < 0:
            raise ConfigError(f"--m {m} is out of range (need m >= 0)")
        depth, how = 2 * (n - m), f"--m {m} (depth 2(n-m) = {2 * (n - m)})"
    else:
        how = f"--layers {depth}"
    k = depth - n
    if not 1 <= k <= n:
        raise ConfigError(f"{how}: no placement of a duplicated block gives {depth} layers from the {n}-layer "
                          f"model (a block of k = 1..{n} layers gives {n + 1}..{2 * n} layers)")
    return k


def seam_layer_map(n: int, k: int, start: int) -> list[int]:
    """Layers [0, start+k) + [start, n): the k-layer block from `start` twice."""
    return list(range(start + k)) + list(range(start, n))


def slices_text(n: int, k: int, start: int) -> str:
    """The same order in `upstack upscale --layers` syntax (end-inclusive ranges)."""
    def rng(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"
    return f"{rng(0, start + k - 1)},{rng(start, n - 1)}"


def solar_start(n: int, k: int) -> int | None:
    """The block start of SOLAR's cut for this depth (m = (n - k) / 2), or None when n - k is odd."""
    return (n - k) // 2 if (n - k) % 2 == 0 else None


# ------------------------------------------------------------------------------------------------
# Text -> rows of tokens

def token_rows(tokenizer, spec: str, rows: int, max_length: int, batch_size: int, what: str):
    """The first `rows` rows of `max_length` tokens of the text `spec` names: its documents tokenized as
    the tokenizer does by default, eos after each, concatenated and cut into rows (a LongTensor). Refuses
    text too short for one batch."""
    import torch

    data = parse_data_spec(spec)
    eos = tokenizer.eos_token_id
    need = rows * max_length
    ids: list[int] = []
    try:
        for doc in iter_text_documents([data]):
            left = need - len(ids)
            cut = max(4096, 16 * left)  # characters: far more than `left` tokens need, so the cut is never read
            piece = tokenizer(doc[:cut], verbose=False)["input_ids"]
            ids += piece + ([eos] if eos is not None and len(doc) <= cut else [])
            if len(ids) >= need:
                break
    except DataError as e:
        raise DataError(f"{what} text {e}") from None
    full = min(rows, len(ids) // max_length)
    if full < batch_size:
        raise DataError(f"{what} text {data.path}: {len(ids)} tokens, too short for one batch of {batch_size} x "
                        f"{max_length} tokens (need {batch_size * max_length}: give more text, or fewer rows "
                        "per batch or tokens per row)")
    return torch.tensor(ids[:full * max_length], dtype=torch.long).view(full, max_length)


# ------------------------------------------------------------------------------------------------
# The model's layers

def _layer_list(model):
    """(module holding the decoder layers, attribute name) from the architecture table's layer prefix."""
    arch = get_arch(model.config.to_dict(), allow_unknown=True)
    path = arch.layer_prefix.rstrip(".")
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextlib.contextmanager
def layer_view(model, layer_map: list[int], config: dict):
    """Within the block, `model` runs the base's own layer modules in the order `layer_map` with the
    per-layer config fields the written checkpoint would have (arch.remap_config of `config`). Run it
    without a KV cache: each module keeps its layer_idx, so a repeated layer would share a cache slot."""
    import torch.nn as nn

    holder, attr = _layer_list(model)
    layers = getattr(holder, attr)
    new_config, _ = remap_config(config, get_arch(config, allow_unknown=True), layer_map)
    configs = {id(c): c for c in (model.config, getattr(holder, "config", model.config))}.values()
    changed = [k for k, v in new_config.items() if config.get(k) != v]
    saved = [(c, k, getattr(c, k)) for c in configs for k in changed if hasattr(c, k)]
    setattr(holder, attr, nn.ModuleList([layers[i] for i in layer_map]))
    try:
        for c, k, _ in saved:
            setattr(c, k, new_config[k])
        yield model
    finally:
        setattr(holder, attr, layers)
        for c, k, v in saved:
            setattr(c, k, v)


@contextlib.contextmanager
def _recording(model, states: list):
    """Append h_0..h_n of every forward pass to `states` (hooks on the decoder layers)."""
    holder, attr = _layer_list(model)
    layers = list(getattr(holder, attr))

    def first_input(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def output(module, args, out):
        states.append((out[0] if isinstance(out, tuple) else out).detach())

    hooks = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    hooks += [layer.register_forward_hook(output) for layer in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _cosines(a, b):
    """Per-token cosine of two [batch, length, hidden] states, in float32."""
    import torch.nn.functional as F

    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)


def hidden_state_scores(model, rows, k: int, batch_size: int, progress: bool = False) -> dict:
    """{"angular_distance": [d_j for j = 0..n-k], "block_influence": [BI_i for i = 0..n-1], "tokens": T}
    over `rows` (see the module docstring), one batch at a time."""
    import torch
    from tqdm.auto import tqdm

    n = len(getattr(*_layer_list(model)))
    device = next(model.parameters()).device
    angle = torch.zeros(n - k + 1, dtype=torch.float64)
    cos_next = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    starts = range(0, rows.shape[0], batch_size)
    with torch.no_grad():
        for a in tqdm(starts, desc="calibration", unit="batch", disable=not progress):
            states: list = []
            with _recording(model, states):
                model.base_model(input_ids=rows[a:a + batch_size].to(device), use_cache=False)
            if len(states) != n + 1:
                raise ConfigError(f"recorded {len(states)} hidden states, expected {n + 1}: this architecture's "
                                  "layers do not run once each in order")
            for j in range(n - k + 1):
                angle[j] += (torch.arccos(_cosines(states[j], states[j + k])) / math.pi).double().sum().cpu()
            for i in range(n):
                cos_next[i] += _cosines(states[i], states[i + 1]).double().sum().cpu()
            tokens += states[0].shape[0] * states[0].shape[1]
            del states
    return {"angular_distance": (angle / tokens).tolist(), "block_influence": (1 - cos_next / tokens).tolist(),
            "tokens": tokens}


def heldout_nll(model, rows, batch_size: int, bar=None) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) over `rows`: each row predicts its tokens 1..len-1."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, rows.shape[0], batch_size):
            ids = rows[a:a + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            for r in range(ids.shape[0]):  # one row at a time keeps the float32 copy of the logits small
                total += float(F.cross_entropy(logits[r, :-1].float(), ids[r, 1:], reduction="sum"))
                count += ids.shape[1] - 1
            if bar is not None:
                bar.update(1)
    return total, count


# ------------------------------------------------------------------------------------------------
# The analysis

def analyse_seams(model_path: str, *, depth: int | None = None, m: int | None = None,
                  opts: SeamOptions) -> dict:
    """Score every placement of the duplicated block that gives the requested depth (see the module
    docstring); return the table (by block start), the per-layer block influence and the chosen one."""
    from tqdm.auto import tqdm

    check_seam_options(opts)
    check_model_path(model_path, allow_pickle=opts.allow_pickle)
    config = model_config(model_path)  # None for a Hub id: its config comes with the model
    if config is not None:  # a depth no placement gives fails before the model loads
        block_length(num_layers(config, get_arch(config, allow_unknown=True)), depth, m)
    tokenizer = load_tokenizer(model_path)  # the texts are read before the model loads: a short one fails fast
    rows_wanted = opts.batch_size * opts.batches
    calib = token_rows(tokenizer, opts.calibration, rows_wanted, opts.max_length, opts.batch_size, "calibration")
    held = None
    if opts.perplexity:
        held = token_rows(tokenizer, opts.perplexity, rows_wanted, opts.max_length, opts.batch_size, "held-out")
    model, _ = load_for_inference(model_path, device=opts.device, dtype=opts.dtype, allow_pickle=opts.allow_pickle)
    config = config or model.config.to_dict()
    n = num_layers(config, get_arch(config, allow_unknown=True))
    k = block_length(n, depth, m)
    check_token_ids(model, int(calib.max()), f"calibration {opts.calibration}")
    scores = hidden_state_scores(model, calib, k, opts.batch_size, progress=not opts.quiet)
    solar = solar_start(n, k)
    candidates = [{"start": j, "block": [j, j + k - 1], "slices": slices_text(n, k, j),
                   "angular_distance": d, "perplexity": None, "solar": j == solar}
                  for j, d in enumerate(scores["angular_distance"])]
    heldout = None
    if held is not None:
        check_token_ids(model, int(held.max()), f"held-out {opts.perplexity}")
        per_pass = -(-held.shape[0] // opts.batch_size)
        with tqdm(total=per_pass * (len(candidates) + 1), desc="held-out perplexity", unit="batch",
                  disable=opts.quiet) as bar:
            nll, count = heldout_nll(model, held, opts.batch_size, bar)
            for c in candidates:
                with layer_view(model, seam_layer_map(n, k, c["start"]), config):
                    c_nll, _ = heldout_nll(model, held, opts.batch_size, bar)
                c["perplexity"] = _exp(c_nll / count)
        heldout = {"data": opts.perplexity, "rows": held.shape[0], "tokens": count,
                   "base_perplexity": _exp(nll / count)}
    key = "angular_distance" if opts.score == "angle" else "perplexity"
    ranked = sorted(candidates, key=lambda c: (c[key], c["start"]))
    return {
        "model": str(model_path), "model_type": config.get("model_type"), "source_num_hidden_layers": n,
        "num_hidden_layers": n + k, "block_length": k, "score": opts.score, "solar_start": solar,
        "hidden_states": CONVENTION,
        "calibration": {"data": opts.calibration, "rows": calib.shape[0], "tokens": scores["tokens"],
                        "max_length": opts.max_length, "batch_size": opts.batch_size},
        "heldout": heldout, "candidates": candidates, "order": [c["start"] for c in ranked],
        "chosen": ranked[0], "solar": next((c for c in candidates if c["solar"]), None),
        "block_influence": [{"layer": i, "block_influence": b} for i, b in enumerate(scores["block_influence"])],
    }


def seam_record(result: dict) -> dict:
    """What upstack.json keeps of an analysis: the choice, the options and the table by block start."""
    chosen = result["chosen"]
    return {
        "mode": "auto", "score": result["score"], "start": chosen["start"], "block": chosen["block"],
        "slices": chosen["slices"], "block_length": result["block_length"], "solar_start": result["solar_start"],
        "hidden_states": result["hidden_states"], "calibration": result["calibration"], "heldout": result["heldout"],
        "table": [{k: c[k] for k in ("start", "angular_distance", "perplexity")} for c in result["candidates"]],
        "block_influence": [b["block_influence"] for b in result["block_influence"]],
    }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def plot_seams(result: dict, png: str | Path) -> None:
    """Angular distance (and perplexity, log scale, when measured) by block start; SOLAR's cut and the
    chosen placement marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cands = result["candidates"]
    xs = [c["start"] for c in cands]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [c["angular_distance"] for c in cands], "o-", color="C0", label="angular distance at the seam")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"start of the duplicated {result['block_length']}-layer block")
    ax.set_ylabel("angular distance", color="C0")
    handles = ax.get_lines()[:]
    if any(c["perplexity"] is not None for c in cands):
        ax2 = ax.twinx()
        handles += ax2.plot(xs, [c["perplexity"] for c in cands], "s--", color="C1", label="step-0 perplexity")
        ax2.set_yscale("log")
        ax2.set_ylabel("held-out perplexity", color="C1")
    if result["solar_start"] is not None:
        handles.append(ax.axvline(result["solar_start"], color="gray", linestyle=":", label="SOLAR's cut"))
    handles.append(ax.axvline(result["chosen"]["start"], color="C2", linestyle="-", alpha=0.5, label="chosen"))
    ax.legend(handles=handles, loc="upper center", fontsize=8)
    ax.set_title(f"{Path(result['model']).name}: {result['source_num_hidden_layers']} -> "
                 f"{result['num_hidden_layers']} layers")
    fig.tight_layout()
    try:
        with atomic_file(png) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
