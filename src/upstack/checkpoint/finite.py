"""Non-finite values (NaN, inf) in floating tensors: a cheap check for the tensors a stage computes anyway,
a count for scans (verify), and the one message that refuses them."""

from __future__ import annotations

from upstack.errors import CheckpointError

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")
NONFINITE_FLAG = "--allow-nonfinite"


def _reducible(t):
    """`t` in a dtype torch's reductions and isfinite take (fp8 types are widened; floats as they are)."""
    import torch

    return t if t.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16) else t.float()


def all_finite(t) -> bool:
    """True when every element of `t` is finite (non-float tensors always are): one min/max reduction, which
    propagates NaN and meets +-inf at the ends, so no per-element mask is allocated."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    import torch

    lo, hi = torch.aminmax(_reducible(t).reshape(-1))
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def count_nonfinite(t) -> int:
    """How many elements of `t` are NaN or +-inf (0 for non-float tensors)."""
    if t.numel() == 0 or not t.is_floating_point():
        return 0
    import torch

    return int(t.numel() - torch.isfinite(_reducible(t)).sum())


def nonfinite_error(name: str) -> CheckpointError:
    """Refusing to write output tensor `name` because a computed value is NaN or inf."""
    return CheckpointError(
        f"output tensor {name!r} has non-finite values (NaN or inf: a non-finite input, or a value beyond the "
        f"output dtype's range); check the inputs with `upstack verify`, or pass {NONFINITE_FLAG} to write it anyway")
