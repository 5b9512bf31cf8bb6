"""`upstack import FILE.gguf OUT` on tiny GGUF files the tests write with the gguf package: the imported
folder equals transformers' own GGUF load, a lossless file gives back its model, tied embeddings stay tied,
bad files are one line, and a recipe imports a .gguf model source once."""

import json
from pathlib import Path

import pytest
from tiny import build_tiny_model

pytest.importorskip("gguf")
from tiny_gguf import write_gguf_from_model  # noqa: E402

from upstack.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 320  # large enough for the tiny BPE to have merges (a GGUF byte-level vocabulary needs them)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tied = build_tiny_model(root / "tied", "llama", num_hidden_layers=2, vocab_size=VOCAB, tie_word_embeddings=True)
    untied = build_tiny_model(root / "untied", "llama", num_hidden_layers=2, vocab_size=VOCAB, seed=1)
    return {"root": root, "tied": tied, "untied": untied,
            "q8": write_gguf_from_model(tied, root / "tied.Q8_0.gguf", "Q8_0"),
            "f32": write_gguf_from_model(untied, root / "untied.F32.gguf", "F32")}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _transformers_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=dtype).eval()


def test_import_equals_transformers_gguf_load(tiny_dirs, tmp_path):
    """The imported bf16 folder holds exactly the tensors transformers' own GGUF load gives in bf16, so the
    logits are equal; tied embeddings stay tied with no lm_head written; tokenizer, chat template and
    generation config come along; upstack.json and README.md name the quantization."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "imported"
    assert main(["import", str(tiny_dirs["q8"]), str(out), "--quiet"]) == 0
    mine = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = _transformers_gguf(tiny_dirs["q8"], torch.bfloat16)
    assert mine.dtype == torch.bfloat16
    ref_sd = ref.state_dict()
    for k, v in mine.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    ids = torch.tensor([[1, 40, 90, 200, 7, 300, 12]])
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, ref(ids).logits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert mine.lm_head.weight.data_ptr() == mine.model.embed_tokens.weight.data_ptr()
    src_tok = AutoTokenizer.from_pretrained(tiny_dirs["tied"])
    tok = AutoTokenizer.from_pretrained(out)
    text = "Question: what is 12 plus 30? Answer: 42."
    assert tok(text).input_ids == src_tok(text).input_ids
    assert tok.chat_template == src_tok.chat_template and (out / "chat_template.jinja").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    prov = json.loads((out / "upstack.json").read_text())["import"]
    assert prov["quantization"] == "Q8_0" and prov["dequantized"] is True
    assert prov["tensor_types"] == {"Q8_0": 15, "F32": 5}
    card = (out / "README.md").read_text()
    assert "**These are not the original weights.**" in card and "**Q8_0**" in card


def test_lossless_gguf_gives_back_the_model(tiny_dirs, tmp_path):
    """An F32 GGUF of an untied model, imported as float32, is the model it was written from, bit for bit
    (q/k rows unpermuted, lm_head kept since the file has output.weight)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "f32"
    assert main(["import", str(tiny_dirs["f32"]), str(out), "--dtype", "float32", "--quiet"]) == 0
    mine = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    orig = AutoModelForCausalLM.from_pretrained(tiny_dirs["untied"], dtype=torch.float32).state_dict()
    assert mine.keys() == orig.keys() and "lm_head.weight" in mine
    for k in orig:
        assert torch.equal(mine[k], orig[k]), k
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    prov = json.loads((out / "upstack.json").read_text())["import"]
    assert prov["dequantized"] is False and prov["quantization"] == "ALL_F32"


def test_dry_run_and_existing_output(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["import", str(tiny_dirs["q8"]), str(out), "--dry-run", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["architecture"] == "llama" and rep["quantization"] == "Q8_0" and rep["dry_run"] is True
    assert not out.exists()
    out.mkdir()
    assert main(["import", str(tiny_dirs["q8"]), str(out)]) == 2
    assert "already exists" in _error_line(capsys)


@pytest.mark.parametrize("keep", [100, 2000, -1000])
def test_truncated_gguf_is_one_line(tiny_dirs, tmp_path, capsys, keep):
    """Cut in the header, in the tensor table and in the tensor data: one line, exit 2, nothing written."""
    data = tiny_dirs["q8"].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    out = tmp_path / "out"
    assert main(["import", str(bad), str(out)]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and "truncated" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_not_a_gguf_file(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello")
    assert main(["import", str(bad), str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in _error_line(capsys)
    assert main(["import", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "no such file" in _error_line(capsys)


def test_unsupported_architecture(tiny_dirs, tmp_path, capsys):
    bad = write_gguf_from_model(tiny_dirs["tied"], tmp_path / "rwkv.gguf", "F32", architecture="rwkv6")
    assert main(["import", str(bad), str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "architecture 'rwkv6' is not one transformers can load" in line and "llama" in line
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_type(tiny_dirs, tmp_path, capsys):
    """Q8_1 is a ggml type the gguf package cannot dequantize (transformers' llama path uses it)."""
    bad = write_gguf_from_model(tiny_dirs["tied"], tmp_path / "q81.gguf", "Q8_0",
                                raw_types={"blk.0.ffn_down.weight": "Q8_1", "blk.1.ffn_down.weight": "Q8_1"})
    assert main(["import", str(bad), str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "quantization type Q8_1 (2 tensors) cannot be dequantized by transformers" in line
    assert not (tmp_path / "out").exists()


def test_without_gguf_package(tiny_dirs, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    assert main(["import", str(tiny_dirs["q8"]), str(tmp_path / "out")]) == 2
    assert "pip install upstack[gguf]" in _error_line(capsys)


def test_recipe_imports_a_gguf_source_once(tiny_dirs, tmp_path, capsys):
    """A .gguf model source becomes an `import_<stem>` stage in the run folder, shared by the stages that
    name it; a second run skips it (its marker)."""
    from upstack.pipeline import load_recipe, run_recipe

    gguf_path = tiny_dirs["q8"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: g\nstages:\n  upscale:\n    source: {gguf_path}\n    m: 1\n"
                      f"  stacked:\n    type: upscale\n    source: {gguf_path}\n    method: stack\n")
    rec = load_recipe(recipe, run_dir=tmp_path / "run")
    name = "import_tied.Q8_0"
    assert list(rec.stages) == [name, "upscale", "stacked"]
    assert rec.stages["upscale"].deps == [name] and rec.stages["upscale"].resolved["source"] == str(tmp_path / "run" / name)
    first = run_recipe(rec, quiet=True, report=False, log=lambda *_: None)
    assert first["stages"] == {name: "ran", "upscale": "ran", "stacked": "ran"}
    marker = json.loads((tmp_path / "run" / name / "upstack_stage.json").read_text())
    assert marker["type"] == "import" and marker["config"]["source"] == str(gguf_path)
    assert json.loads((tmp_path / "run" / "upscale" / "config.json").read_text())["num_hidden_layers"] == 2
    again = run_recipe(load_recipe(recipe, run_dir=tmp_path / "run"), quiet=True, report=False, log=lambda *_: None)
    assert set(again["stages"].values()) == {"skipped"}


def test_recipe_missing_gguf_is_reported_with_its_line(tmp_path, capsys):
    from upstack.errors import ConfigError
    from upstack.pipeline import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: g\nstages:\n  upscale:\n    source: ./nope.gguf\n    m: 1\n")
    with pytest.raises(ConfigError, match=r"line 4: stage 'import_nope': input source='./nope.gguf': no such file \(a GGUF model source\)"):
        load_recipe(recipe, run_dir=tmp_path / "run")
