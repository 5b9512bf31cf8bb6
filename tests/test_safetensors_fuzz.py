"""The strict safetensors header reader never crashes or hangs on mutated files: it parses or errors cleanly."""

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upstack.checkpoint import TensorPlan, read_safetensors_header, write_checkpoint
from upstack.errors import CheckpointError


def _valid_file_bytes() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(range(32))


VALID = _valid_file_bytes()


def check(tmp_path, data: bytes):
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    try:
        tensors = read_safetensors_header(p)
    except CheckpointError as e:
        assert "x.safetensors" in str(e)
        return None
    # Anything accepted must be internally consistent.
    size = len(data)
    for ref in tensors.values():
        assert 0 <= ref.offset and ref.offset + ref.nbytes <= size
    return tensors


def test_valid_file_parses(tmp_path):
    tensors = check(tmp_path, VALID)
    assert set(tensors) == {"a", "b"} and tensors["a"].shape == (2, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_mutations(tmp_path, edits):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    check(tmp_path, bytes(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(VALID)))
def test_truncations(tmp_path, n):
    result = check(tmp_path, VALID[:n])
    assert n == len(VALID) or result is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), st.binary(max_size=64))
def test_random_headers(tmp_path, header, payload):
    raw = json.dumps(header).encode()
    check(tmp_path, struct.pack("<Q", len(raw)) + raw + payload)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**64 - 1))
def test_huge_header_lengths(tmp_path, n):
    check(tmp_path, struct.pack("<Q", n) + VALID[8:])


def test_writer_output_roundtrips_through_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    from upstack.checkpoint import tensor_to_bytes

    plans = [TensorPlan("w", "F32", (3, 4), compute=lambda: [tensor_to_bytes(t)]),
             TensorPlan("z", "BF16", (5,), compute=lambda: [bytes(10)])]
    write_checkpoint(plans, tmp_path / "o", config={"model_type": "llama"}, progress=False)
    loaded = load_file(tmp_path / "o" / "model.safetensors")
    assert torch.equal(loaded["w"], t) and loaded["z"].dtype == torch.bfloat16 and not loaded["z"].any()
    assert set(read_safetensors_header(tmp_path / "o" / "model.safetensors")) == {"w", "z"}
