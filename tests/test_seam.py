"""`upstack seam` and `upscale --seam auto`: the seam scores against a direct computation from transformers'
output_hidden_states, the perplexity column against the written checkpoint, and the written checkpoint
against `upscale --layers` byte for byte."""

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from upstack.cli import main
from upstack.pipeline import load_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 6            # base layers
M = 1            # SOLAR's m: depth 2(N - M) = 10, a block of k = 4 layers, placements j = 0..2
K = N - 2 * M
LENGTH, BATCH, BATCHES = 16, 2, 2
MODELS = {"llama": ("llama", {}), "mistral": ("mistral", {}), "qwen2": ("qwen2", {}),
          "qwen2-tied": ("qwen2", {"tie_word_embeddings": True})}
DOCS = [f"Document {i}: the quick brown fox number {i * 7} jumps over {i} lazy dogs; depth up-scaling "
        f"stacks layers and the seam is where two copies meet." for i in range(40)]
HELD = [f"Held-out {i}: question, what is {i} plus {2 * i}? Answer: {3 * i}. Instruction tuning follows." for i in range(40)]
SIZE = ["--max-length", str(LENGTH), "--batch-size", str(BATCH), "--batches", str(BATCHES)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model_type, kwargs = MODELS[request.param]
    src = build_tiny_model(d / "src", model_type, num_hidden_layers=N, **kwargs)
    return {"src": src, "dir": d, "cal": write_jsonl(d / "cal.jsonl", DOCS), "held": write_jsonl(d / "held.jsonl", HELD)}


def rows_of(src: Path, docs: list[str]) -> torch.Tensor:
    """Documents tokenized, eos after each, joined and cut into BATCH * BATCHES rows of LENGTH (as documented)."""
    tok = AutoTokenizer.from_pretrained(src)
    ids = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    return torch.tensor(ids[:BATCH * BATCHES * LENGTH]).view(BATCH * BATCHES, LENGTH)


def run_json(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert main(args + ["--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def seam_result(case, capsys) -> dict:
    if "result" not in case:
        case["result"] = run_json(capsys, ["seam", str(case["src"]), "--calibration", str(case["cal"]), "--m", str(M),
                                           "--perplexity", str(case["held"]), *SIZE])
    return case["result"]


def test_angles_and_block_influence_equal_output_hidden_states(case, capsys):
    result = seam_result(case, capsys)
    model = AutoModelForCausalLM.from_pretrained(case["src"]).eval()
    model.model.norm = torch.nn.Identity()  # hidden_states[N] is then the last layer's output before the norm
    rows = rows_of(case["src"], DOCS)
    with torch.no_grad():
        hs = [torch.cat(t) for t in zip(*(model(input_ids=rows[a:a + BATCH], output_hidden_states=True).hidden_states
                                          for a in range(0, len(rows), BATCH)))]
    assert len(hs) == N + 1

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)

    angles = [float((torch.arccos(cos(hs[j], hs[j + K]).clamp(-1, 1)) / math.pi).mean()) for j in range(N - K + 1)]
    influence = [float(1 - cos(hs[i], hs[i + 1]).mean()) for i in range(N)]
    assert [c["start"] for c in result["candidates"]] == list(range(N - K + 1))
    assert [c["angular_distance"] for c in result["candidates"]] == pytest.approx(angles, abs=2e-6)
    assert [b["block_influence"] for b in result["block_influence"]] == pytest.approx(influence, abs=2e-6)
    assert result["calibration"]["tokens"] == rows.numel()
    best = min(range(len(angles)), key=lambda j: (angles[j], j))
    assert result["chosen"]["start"] == best == result["order"][0]
    assert sorted(result["order"], key=lambda j: angles[j]) == result["order"]
    assert result["solar"]["start"] == M and [c["start"] for c in result["candidates"] if c["solar"]] == [M]
    assert result["chosen"]["slices"] == f"0-{best + K - 1},{best}-{N - 1}"


def test_perplexity_column_equals_the_written_checkpoint(case, capsys):
    result = seam_result(case, capsys)
    rows = rows_of(case["src"], HELD)

    def ppl(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            losses = [model(input_ids=rows[a:a + BATCH], labels=rows[a:a + BATCH]).loss for a in range(0, len(rows), BATCH)]
        return math.exp(float(torch.stack(losses).mean()))  # every batch predicts the same number of tokens

    assert result["heldout"]["base_perplexity"] == pytest.approx(ppl(case["src"]), rel=1e-5)
    for c in result["candidates"]:
        out = case["dir"] / f"layers-{c['start']}"
        assert main(["upscale", str(case["src"]), str(out), "--layers", c["slices"], "--quiet"]) == 0
        assert c["perplexity"] == pytest.approx(ppl(out), rel=1e-5), c


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_seam_auto_writes_what_upscale_layers_writes(case, capsys):
    result = seam_result(case, capsys)
    auto = case["dir"] / "a" / "out"
    report = run_json(capsys, ["upscale", str(case["src"]), str(auto), "--m", str(M), "--seam", "auto",
                               "--calibration", str(case["cal"]), "--perplexity", str(case["held"]),
                               *[f"--seam-{a[2:]}" if a.startswith("--") else a for a in SIZE]])
    chosen = result["chosen"]
    assert report["seam"]["chosen"]["start"] == chosen["start"]
    assert report["layer_map"] == list(range(chosen["start"] + K)) + list(range(chosen["start"], N))
    explicit = case["dir"] / "b" / "out"
    assert main(["upscale", str(case["src"]), str(explicit), "--layers", chosen["slices"], "--quiet"]) == 0
    a, b = files_of(auto), files_of(explicit)
    assert set(a) == set(b)
    differ = {name for name in a if a[name] != b[name]}
    assert differ == {"upstack.json", "README.md"}  # provenance: method, seam table; the model card says how
    seam = json.loads(a["upstack.json"])["upscale"]["seam"]
    assert seam["start"] == chosen["start"] and seam["slices"] == chosen["slices"]
    assert [r["angular_distance"] for r in seam["table"]] == [c["angular_distance"] for c in result["candidates"]]
    assert [r["perplexity"] for r in seam["table"]] == [c["perplexity"] for c in result["candidates"]]


def test_seam_perplexity_score_picks_the_lowest_perplexity(case, capsys):
    result = seam_result(case, capsys)
    out = case["dir"] / "p" / "out"
    report = run_json(capsys, ["upscale", str(case["src"]), str(out), "--m", str(M), "--seam", "auto",
                               "--seam-score", "perplexity", "--calibration", str(case["cal"]),
                               "--perplexity", str(case["held"]),
                               *[f"--seam-{a[2:]}" if a.startswith("--") else a for a in SIZE]])
    best = min(result["candidates"], key=lambda c: (c["perplexity"], c["start"]))
    assert report["seam"]["chosen"]["start"] == best["start"]
    assert json.loads((out / "upstack.json").read_text())["upscale"]["seam"]["score"] == "perplexity"


def test_seam_solar_writes_the_same_bytes_as_no_flag(tmp_path):
    src = build_tiny_model(tmp_path / "src", "llama", num_hidden_layers=N)
    assert main(["upscale", str(src), str(tmp_path / "a" / "out"), "--m", str(M), "--quiet"]) == 0
    assert main(["upscale", str(src), str(tmp_path / "b" / "out"), "--m", str(M), "--seam", "solar", "--quiet"]) == 0
    assert files_of(tmp_path / "a" / "out") == files_of(tmp_path / "b" / "out")
    prov = json.loads((tmp_path / "a" / "out" / "upstack.json").read_text())["upscale"]
    assert set(prov) == {"source", "method", "m", "layers", "every", "layer_map", "new_layers",
                         "source_num_hidden_layers", "upstack_version"}


def test_text_table_and_plot(tmp_path, capsys):
    src = build_tiny_model(tmp_path / "src", "llama", num_hidden_layers=N)
    cal = write_jsonl(tmp_path / "cal.jsonl", DOCS)
    png = tmp_path / "plots" / "seam.png"
    assert main(["seam", str(src), "--calibration", str(cal), "--layers", str(N + K), "--plot", str(png),
                 "--quiet", *SIZE]) == 0
    out = capsys.readouterr().out
    assert "SOLAR m=1" in out and "chosen" in out and "block influence" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an odd n - k has no SOLAR cut
    assert main(["seam", str(src), "--calibration", str(cal), "--layers", str(N + 3), "--quiet", *SIZE]) == 0
    assert "no SOLAR cut gives 9 layers" in capsys.readouterr().out


def test_recipe_seam_auto_reaches_upstack_json_and_the_report(tmp_path):
    src = build_tiny_model(tmp_path / "src", "mistral", num_hidden_layers=N)
    cal = write_jsonl(tmp_path / "cal.jsonl", DOCS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: seam\nstages:\n  upscale:\n    source: {src}\n    m: {M}\n    seam: auto\n"
                      f"    calibration: {cal}\n    seam_max_length: {LENGTH}\n    seam_batch_size: {BATCH}\n"
                      f"    seam_batches: {BATCHES}\n")
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(recipe, run_dir), quiet=True, log=lambda *a: None)
    seam = json.loads((run_dir / "upscale" / "upstack.json").read_text())["upscale"]["seam"]
    report = (run_dir / "report.md").read_text()
    j = seam["start"]
    assert f"chosen by its angular distance at the seam (`--seam auto`): layers {j}-{j + K - 1}" in report
    mark = "chosen, SOLAR" if j == M else "chosen"
    assert f"| {j}-{j + K - 1} | {seam['table'][j]['angular_distance']:.3g} | - | {mark} |" in report


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    return build_tiny_model(d / "src", "llama", num_hidden_layers=N), d


@pytest.mark.parametrize("args, needle", [
    (["--layers", str(2 * N + 1)], "no placement of a duplicated block gives 13 layers"),
    (["--layers", str(N)], "no placement of a duplicated block gives 6 layers"),
    (["--m", "3"], "--m 3 (depth 2(n-m) = 6): no placement"),
])
def test_depth_no_placement_gives(small, capsys, args, needle):
    src, d = small
    cal = write_jsonl(d / "cal.jsonl", DOCS)
    assert main(["seam", str(src), "--calibration", str(cal), *args, "--quiet"]) == 2
    assert needle in one_error_line(capsys)


def test_short_and_empty_calibration(small, capsys):
    src, d = small
    short = write_jsonl(d / "short.jsonl", ["a few words"])
    assert main(["seam", str(src), "--calibration", str(short), "--m", "1", "--quiet", *SIZE]) == 2
    assert "too short for one batch of 2 x 16 tokens" in one_error_line(capsys)
    empty = d / "empty.txt"
    empty.write_text("")
    assert main(["seam", str(src), "--calibration", str(empty), "--m", "1", "--quiet"]) == 2
    assert "empty.txt" in one_error_line(capsys)
    held = d / "held-empty.txt"
    held.write_text("\n\n")
    cal = write_jsonl(d / "cal.jsonl", DOCS)
    assert main(["seam", str(src), "--calibration", str(cal), "--perplexity", str(held), "--quiet", *SIZE]) == 2
    assert "held-empty.txt" in one_error_line(capsys)
    # upscale --seam auto: the same one line, and no output folder
    out = d / "out"
    assert main(["upscale", str(src), str(out), "--seam", "auto", "--calibration", str(short), "--quiet"]) == 2
    assert "too short for one batch" in one_error_line(capsys)
    assert not out.exists() and not list(d.glob(".out*"))
    assert main(["upscale", str(src), str(out), "--seam", "auto", "--m", "3", "--calibration", str(cal), "--quiet"]) == 2
    assert "no placement" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--seam", "auto"], "--seam auto needs --calibration"),
    (["--calibration", "x.txt"], "--calibration without --seam auto would be ignored"),
    (["--seam", "auto", "--method", "stack", "--calibration", "x.txt"], "--method stack gives the layer order"),
    (["--seam", "auto", "--layers", "0-3,1-5", "--calibration", "x.txt"], "--layers gives the layer order"),
    (["--seam", "auto", "--seam-score", "perplexity", "--calibration", "x.txt"], "needs --perplexity"),
    (["--seam", "auto", "--seam-batches", "0", "--calibration", "x.txt"], "--seam-batches must be a positive"),
])
def test_upscale_seam_option_mistakes(small, capsys, args, needle):
    src, d = small
    assert main(["upscale", str(src), str(d / "never"), *args, "--quiet"]) == 2
    assert needle in one_error_line(capsys)
    assert not (d / "never").exists()
