"""What upstack knows about the Hugging Face Hub: whether it may be reached, and what a hub id looks like."""

from __future__ import annotations

import os
import re

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_offline() -> bool:
    """True when any of the Hugging Face offline switches is set (the Hub must not be contacted)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub (HF_ENDPOINT, default huggingface.co:443), or to the proxy the
    environment names for it (HTTPS_PROXY, NO_PROXY honoured), opens within `timeout` seconds; asked once
    per process. Libraries that find the Hub unreachable retry for tens of seconds before they fail, so
    callers check this first and fail (or use the cache) at once."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
        proxy = urllib.request.getproxies().get(url.scheme or "https")
        if proxy and not urllib.request.proxy_bypass(host):  # behind a proxy, the proxy is what must answer
            purl = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            host, port = purl.hostname or host, purl.port or (443 if purl.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def go_offline() -> None:
    """Make the Hugging Face libraries already imported behave as under HF_HUB_OFFLINE=1 (cache only, no
    retries), and any imported later: for a process that found the Hub unreachable."""
    import sys

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[v] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def offline_reason() -> str:
    """Which variable made us offline, for messages."""
    on = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    return f"{'/'.join(on) or 'HF_HUB_OFFLINE'} is set"


def is_hub_id(text: str) -> bool:
    """`org/name` or `name`, as the Hub spells repository ids (never a path starting with . / ~)."""
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "/", "~"))


def hide_hub_progress_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars from transformers and huggingface_hub: for --quiet
    and inside recipes, where a stage's own lines say what runs. Works before or after their import."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# Public config.json of models recipes name by hub id, so that plans and rehearsals work offline without
# the checkpoint (a real run needs the downloaded folder).
KNOWN_CONFIGS = {
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    },
}
