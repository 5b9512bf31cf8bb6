"""The seam study recipe (recipes/smollm2-seam.yaml, issue 25) validates, and compares like with like: every
trained model gets the same text, length, batch, steps and learning rate, its curve starts at step 0 and is
measured on WikiText-2 test, which no stage trains on. Cheap: the recipe is loaded, not run."""

import pytest

from upstack.pipeline.recipe import load_recipe

TRAINED = ["solar44_cpt", "auto44_cpt", "solar38_cpt", "auto38_cpt", "base_cpt"]
SAME = ["data", "max_length", "batch_size", "max_steps", "learning_rate", "warmup_steps", "eval_data",
        "eval_steps", "eval_on_start"]


@pytest.mark.parametrize("profile", [None, "quick"])
def test_seam_study_recipe_compares_like_with_like(shared_data, tmp_path, monkeypatch, profile):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)   # the recipe names ../shared/data
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "m.gguf").write_bytes(b"")                    # validation checks the file exists, no more
    recipe = load_recipe("recipes/smollm2-seam.yaml", run_dir=tmp_path / "run", profile=profile,
                         sets=[f"base.source={tmp_path / 'm.gguf'}"])
    st = recipe.stages
    assert st["base"].type == "import"
    for depth, m in ((44, 8), (38, 11)):
        assert 2 * (30 - m) == depth
        solar, auto = st[f"solar{depth}"].options, st[f"auto{depth}"].options
        assert (solar["source"], solar["m"], solar.get("seam", "solar")) == ("base", m, "solar")
        assert (auto["source"], auto["m"], auto["seam"]) == ("base", m, "auto")
        assert auto["calibration"].endswith("wikipedia/wiki_demo.txt")
    opts = [st[s].options for s in TRAINED]
    assert [o["model"] for o in opts] == ["solar44", "auto44", "solar38", "auto38", "base"]
    for key in SAME:
        assert all(o[key] == opts[0][key] for o in opts), key
    first = opts[0]
    assert first["eval_on_start"] is True and first["eval_fraction"] == 0.0
    assert all("wikitext2/wiki.test.raw" in e for e in first["eval_data"])
    assert not any("wikitext2" in d for d in first["data"])
    evals = [s for s in st if s.startswith("eval_")]
    assert sorted(evals) == sorted(f"eval_{s}" for s in TRAINED)
