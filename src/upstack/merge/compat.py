"""Checking the models of a merge against each other: architecture, vocabulary, tensors, heads."""

from __future__ import annotations

from upstack.arch import GENERIC, ArchSpec, embed_name, tied
from upstack.checkpoint import Checkpoint, check_same_tokenizer_files
from upstack.errors import UpstackError


def check_compatible(ref: Checkpoint, ref_label: str, other: Checkpoint, other_label: str,
                     arch: ArchSpec = GENERIC) -> None:
    """Refuse to merge `other` with `ref` unless they are variants of one model: same architecture,
    vocabulary and tokenizer, tensor names and shapes, and output heads of one shape (the embedding
    standing in for a tied head)."""
    a, b = ref.config, other.config
    if a.get("model_type") != b.get("model_type") or (a.get("architectures") and b.get("architectures")
                                                      and a.get("architectures") != b.get("architectures")):
        raise UpstackError(
            f"models have different architectures: {ref_label} is {a.get('model_type')} {a.get('architectures')}, "
            f"{other_label} is {b.get('model_type')} {b.get('architectures')}; only variants of one model can be merged")
    ea, eb = embed_name(ref.tensors, arch), embed_name(other.tensors, arch)
    va = ref.tensors[ea].shape[0] if ea else a.get("vocab_size")
    vb = other.tensors[eb].shape[0] if eb else b.get("vocab_size")
    if va != vb or (a.get("vocab_size") is not None and b.get("vocab_size") is not None
                    and a.get("vocab_size") != b.get("vocab_size")):
        raise UpstackError(
            f"vocabularies differ: {ref_label} has {va} tokens (vocab_size {a.get('vocab_size')}), {other_label} has "
            f"{vb} (vocab_size {b.get('vocab_size')}); upstack does not resize embeddings: merge models that share "
            "one tokenizer")
    check_same_tokenizer_files(ref.folder, ref_label, other.folder, other_label)
    head = arch.head_name
    ta = {n: r for n, r in ref.tensors.items() if n != head}
    tb = {n: r for n, r in other.tensors.items() if n != head}
    hint = ""
    if a.get("num_hidden_layers") != b.get("num_hidden_layers"):
        hint = f" ({ref_label} has {a.get('num_hidden_layers')} layers, {other_label} {b.get('num_hidden_layers')})"
    for name, r in ta.items():
        if name not in tb:
            raise UpstackError(f"models differ at tensor {name!r}: {ref_label} has it, {other_label} does not{hint}")
        if tuple(tb[name].shape) != tuple(r.shape):
            raise UpstackError(f"models differ at tensor {name!r}: shape {list(r.shape)} in {ref_label}, "
                               f"{list(tb[name].shape)} in {other_label}")
    for name in tb:
        if name not in ta:
            raise UpstackError(f"models differ at tensor {name!r}: {other_label} has it, {ref_label} does not{hint}")
    tied_a, tied_b = tied(a, ref.tensors, arch), tied(b, other.tensors, arch)
    if tied_a != tied_b and not (ea and eb):
        raise UpstackError(f"{ref_label if not ea else other_label}: no *{arch.embed_suffix} tensor to stand in for the "
                           "missing lm_head")
    if not (tied_a and tied_b):
        head_a = ref.tensors[ea if tied_a else head]
        head_b = other.tensors[eb if tied_b else head]
        if tuple(head_a.shape) != tuple(head_b.shape):
            raise UpstackError(f"models differ at tensor {head!r} (the embedding where tied): shape "
                               f"{list(head_a.shape)} in {ref_label}, {list(head_b.shape)} in {other_label}")
