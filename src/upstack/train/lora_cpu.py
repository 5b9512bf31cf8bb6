"""LoRA training on CPU: a faster dropout, and each adapter's branch as one autograd function.

PEFT drops out each adapted module's input before `lora_A` with `nn.Dropout`. On CPU, torch's dropout
draws one Bernoulli number per element, which costs more than the base layer's bf16 matmul (measured here:
9.4 ms for a 1024 x 1728 bf16 input against 6.3 ms for its 1024 x 1728 x 640 product), so with the default
--lora-dropout 0.05 the dropout alone made LoRA slower than full training. `CpuDropout` draws the same
distribution (each element dropped independently with probability p, the rest scaled by 1 / (1 - p)) by
skip sampling: the gaps between dropped elements of an i.i.d. Bernoulli(p) sequence are i.i.d.
Geometric(p), so p x n geometric draws place the dropped elements, and only their positions are kept for
the backward pass (8 bytes for each dropped element instead of a mask of n). A gap is drawn as
1 + floor(log(U) / log(1 - p)) from one float64 uniform U in (0, 1] (P(gap > k) = (1 - p)^k exactly; half
the time of torch's `geometric_`). Above p = 0.25 it compares one 31-bit integer draw per element with p
(still exact to 2^-31). Both use torch's default generator: `torch.manual_seed`, resumes and the
recomputation under gradient checkpointing (which restores the RNG state) give the same masks.

PEFT computes an adapted module's output as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the
two small matmuls, that is a scaling pass and an addition over the (tokens x out_features) output, and a
scaling pass over the input for the dropout, each again in the backward pass. `LoraBranch` computes the
same sum with the dropout's 1 / (1 - p) and the LoRA scaling applied to the (tokens x r) product instead,
and adds the adapter's output into the base output in place with one `addmm_`. On the bench model
(hidden 640) the branch made LoRA training about 5% faster, and adding in place (no copy of the base
output inside `addmm`) more again; the value equals PEFT's up to rounding (the tests compare loss and
gradients). Only a plain LoRA adapter on an `nn.Linear` or a 4-bit (QLoRA) linear layer takes this path
(not DoRA, not several active adapters); every other case, and every other device, runs PEFT's own code.
"""

from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

SKIP_SAMPLING_MAX_P = 0.25


def _gaps(k: int, p: float) -> torch.Tensor:
    """k i.i.d. Geometric(p) gaps on {1, 2, ...} as float64: 1 + floor(log(U) / log(1 - p)), U in (0, 1]."""
    u = torch.empty(k, dtype=torch.float64).uniform_()          # [0, 1)
    return u.neg_().log1p_().mul_(1.0 / math.log1p(-p)).floor_().add_(1.0)   # log(1 - u), 1 - u in (0, 1]


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Sorted int64 indices in [0, n) of the elements a Bernoulli(p) dropout drops."""
    if p <= SKIP_SAMPLING_MAX_P:
        parts, last = [], -1.0                 # position of the previous drop
        while True:
            k = int(n * p + 6 * math.sqrt(n * p) + 16)   # enough gaps to pass n but for ~1e-9 of draws
            pos = _gaps(k, p).cumsum_(0).add_(last)
            if pos[-1] >= n:
                parts.append(pos[:int(torch.searchsorted(pos, float(n)))])
                break
            parts.append(pos)
            last = float(pos[-1])
        return torch.cat(parts).long() if len(parts) > 1 else parts[0].long()
    keep = torch.empty(n, dtype=torch.int32).random_() >= round(p * 2**31)  # random_: uniform in [0, 2^31)
    return (~keep).nonzero().reshape(-1)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        x = x.contiguous()
        pos = dropped_positions(x.numel(), p)
        out = x * (1.0 / (1.0 - p))
        out.view(-1)[pos] = 0
        ctx.save_for_backward(pos)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        g = grad.contiguous() * (1.0 / (1.0 - ctx.p))
        g.view(-1)[pos] = 0
        return g, None


class CpuDropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same switch) with skip sampling on CPU. A subclass, so that whatever turns
    every `nn.Dropout` off by setting `p = 0` (upstack's `lm.disable_dropout` for DPO, TRL's
    `disable_dropout_in_model`) turns this one off too."""

    def __init__(self, p: float):
        super().__init__(float(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or x.numel() == 0:
            return F.dropout(x, self.p, self.training)
        return _Dropout.apply(x, self.p)


class LoraBranch(torch.autograd.Function):
    """`result + (dropout(x) @ A^T * scaling) @ B^T`, with the dropout's and the LoRA scaling on the
    (tokens x r) product, added into `result` (the base layer's output) in place. Computes in `dtype`
    (bf16 under autocast)."""

    @staticmethod
    def forward(ctx, result, x, a, b, scaling: float, p: float, dtype: torch.dtype):
        a16, b16 = a.to(dtype), b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        pos = None
        if p > 0:
            pos = dropped_positions(flat.numel(), p)
            xd = flat.to(dtype, copy=True)        # the input is also the base layer's: zero a copy
            xd.view(-1)[pos] = 0
            scaling = scaling / (1.0 - p)
        else:
            xd = flat.to(dtype)
        h = (xd @ a16.t()).mul_(scaling)
        ctx.save_for_backward(xd, a16, b16, h, pos)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.dtypes = scaling, x.shape, x.dtype, (a.dtype, b.dtype)
        if not result.is_contiguous():
            return torch.addmm(result.reshape(-1, result.shape[-1]), h, b16.t()).view(result.shape)
        flat_out = result.view(-1, result.shape[-1])   # the base layer's fresh output, which nothing saved
        if result.dtype == dtype:
            flat_out.addmm_(h, b16.t())
        else:   # a 4-bit base returns its input's dtype (fp32 under autocast): add the bf16 product to it
            flat_out.add_(h @ b16.t())
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        xd, a16, b16, h, pos = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_b = (g.t() @ h).to(ctx.dtypes[1]) if need_b else None
        gh = (g @ b16).mul_(ctx.scaling) if (need_x or need_a) else None
        grad_a = (gh.t() @ xd).to(ctx.dtypes[0]) if need_a else None
        grad_x = None
        if need_x:
            grad_x = gh @ a16
            if pos is not None:
                grad_x.view(-1)[pos] = 0
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad if need_result else None, grad_x, grad_a, grad_b, None, None, None


def _lora_linear_forward(self, x, *args, **kwargs):
    """PEFT's LoRA `Linear.forward` (or its 4-bit `Linear4bit.forward`), through `LoraBranch` where that
    applies (bound to each plain LoRA layer by `tune_lora_layers`; a bound method, so a deep copy of the
    model binds its copy)."""
    peft_forward = type(self).forward
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or x.device.type != "cpu":
        return peft_forward(self, x, *args, **kwargs)
    name = adapters[0]
    if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
        return peft_forward(self, x, *args, **kwargs)
    a, b, drop = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_dropout[name]
    if isinstance(drop, CpuDropout):
        p = drop.p if self.training else 0.0
    elif isinstance(drop, nn.Identity):
        p = 0.0
    else:
        return peft_forward(self, x, *args, **kwargs)
    if not torch.is_autocast_enabled("cpu"):
        if not x.dtype == a.dtype == b.dtype == self.base_layer.weight.dtype:
            return peft_forward(self, x, *args, **kwargs)   # PEFT's mixed-dtype rules: not a path training takes
        dtype = x.dtype
    else:
        dtype = torch.get_autocast_dtype("cpu")
    result = self.base_layer(x)
    return LoraBranch.apply(result, x, a, b, self.scaling[name], p, dtype)


def tune_lora_layers(model, autocast: bool) -> int:
    """Swap PEFT's `nn.Dropout` in every LoRA layer for `CpuDropout`; under bf16 autocast also stop PEFT
    casting each module's bf16 input up to the fp32 adapter's dtype (the adapter's matmul casts it back to
    bf16 under autocast, so the copy changes nothing but the time); route each plain LoRA `Linear` through
    `LoraBranch` on CPU. Returns the number of layers changed (0 when called again on the same model)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    bnb = sys.modules.get("peft.tuners.lora.bnb")   # loaded with a 4-bit base; not imported for others
    branch_types = {Linear, getattr(bnb, "Linear4bit", Linear)}
    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        changed = False
        for name, drop in module.lora_dropout.items():
            if type(drop) is nn.Dropout and drop.p > 0:
                module.lora_dropout[name] = CpuDropout(drop.p)
                changed = True
        if autocast and getattr(module, "cast_input_dtype_enabled", True):
            module.cast_input_dtype_enabled = False
            changed = True
        if type(module) in branch_types and "forward" not in vars(module):
            module.forward = types.MethodType(_lora_linear_forward, module)
            changed = True
        n += changed
    return n
