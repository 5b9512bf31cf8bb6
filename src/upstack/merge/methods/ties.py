"""ties: trim each task vector to its top density by magnitude, elect signs, average the agreeing entries.

The top-k is exact without holding the tensor: two histogram passes over the fp32 bit patterns of
|delta| (radix select on the high, then the low 16 bits) find the k-th largest magnitude.
"""

from __future__ import annotations

from upstack.merge.blocks import Scratch
from upstack.merge.spec import MethodSpec

SPEC = MethodSpec(True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True},
                  ("weight", "density"), consensus=True, trim="magnitude",
                  doc="trim to top density by magnitude, elect signs, average agreeing deltas")


def delta_bits(x, base32, sc: Scratch, key: str = "bits"):
    """fp32 bit patterns of |x - base| (monotonic in the magnitude: radix-selectable)."""
    import torch

    return sc.f32(key, x).sub_(base32).abs_().view(torch.int32)


class TopK:
    """Exact top-k of |delta| over a stream of blocks, with memory independent of the tensor size.

    Pass 1 histograms the high 16 bits of the fp32 magnitudes, pass 2 the low 16 bits inside the bin
    that holds the k-th largest (histograms add up, so blocks may be counted in any order); `keep`
    (pass 3) then keeps magnitudes above that threshold plus the first ones equal to it in flat
    order, so exactly k entries survive, as a stable sort would pick.
    """

    def __init__(self, numel: int, density: float):
        self.k = int(density * numel)
        self.mode = "all" if density >= 1 or self.k >= numel else "none" if self.k <= 0 else "select"

    def start(self, pass_no: int) -> None:
        import torch

        self.pass_no = pass_no
        self.hist = torch.zeros(1 << (15 if pass_no == 1 else 16), dtype=torch.int64)

    def histogram(self, bits, sc: Scratch):
        """This pass's histogram of one block (blocks are counted in parallel, then `add`ed)."""
        import torch

        high = torch.bitwise_right_shift(bits, 16, out=sc.get("high", bits.numel(), torch.int32))
        if self.pass_no == 1:
            return torch.bincount(high, minlength=1 << 15)
        sel = torch.eq(high, self.hi, out=sc.get("sel", bits.numel(), torch.bool))
        return torch.bincount(bits[sel].bitwise_and_(0xFFFF), minlength=1 << 16)

    def add(self, hist) -> None:
        self.hist += hist

    def finish(self) -> None:
        import torch

        rev = self.hist.flip(0).cumsum(0)
        if self.pass_no == 1:
            i = int(torch.searchsorted(rev, self.k))
            self.hi = (1 << 15) - 1 - i
            self.above = int(rev[i]) - int(self.hist[self.hi])
        else:
            j = int(torch.searchsorted(rev, self.k - self.above))
            lo = (1 << 16) - 1 - j
            greater = self.above + int(rev[j]) - int(self.hist[lo])
            self.threshold = (self.hi << 16) | lo
            self.need = self.k - greater
            del self.hist

    def count_equal(self, bits) -> int:
        return int((bits == self.threshold).sum())

    def keep(self, bits, seen_before: int, sc: Scratch):
        """Keep mask of one block, given how many threshold-equal entries precede it in flat order."""
        import torch

        gt = torch.gt(bits, self.threshold, out=sc.get("keep", bits.numel(), torch.bool))
        if seen_before >= self.need:
            return gt
        eq = bits == self.threshold
        rank = eq.cumsum(0) + seen_before
        return gt.logical_or_(eq.logical_and_(rank <= self.need))
