"""dare_linear / dare_ties: drop task-vector entries at random (keep prob. density), rescale by 1/density.

The keep mask of element i of a tensor depends only on (seed, tensor name, model index, i), drawn in
fixed BLOCK-aligned blocks, so chunking never changes the bytes.
"""

from __future__ import annotations

import hashlib

from upstack.merge import blocks
from upstack.merge.blocks import Scratch
from upstack.merge.spec import MethodSpec

LINEAR_SPEC = MethodSpec(True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": False,
                               "rescale": True}, ("weight", "density"), trim="random",
                         doc="random drop (keep prob. density), rescale 1/density, task arithmetic")
TIES_SPEC = MethodSpec(True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True,
                             "rescale": True}, ("weight", "density"), consensus=True, trim="random",
                       doc="random drop and rescale, then TIES sign election")


def derive_seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def dare_keep_mask(seed: int, start: int, end: int, density: float, sc: Scratch | None = None):
    """The DARE keep mask (True with probability density) of flat elements [start, end) of a tensor.

    Element i's draw comes from block i // BLOCK, seeded by (seed, block), so the mask does not depend
    on how a caller chunks the tensor. [start, end) must lie in one block.
    """
    import torch

    sc = sc or Scratch()
    size = blocks.BLOCK
    block = start // size
    if (end - 1) // size != block:
        raise ValueError("dare_keep_mask: range must lie within one block")
    g = torch.Generator().manual_seed(derive_seed(seed, block))
    u = torch.rand(end - block * size, generator=g, out=sc.get("rand", end - block * size))
    return torch.lt(u[start - block * size:], density, out=sc.get("keep", end - start, torch.bool))


def dare_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The DARE seed of one model's task vector for one tensor (model_index counts the non-base models)."""
    return derive_seed(seed, tensor_name, model_index)
