"""Word problems of the synthetic world: a question template and the steps of its worked answer, the
seeded sampling of distinct problems, and preference pairs (a correct worked answer vs a plausible wrong
one). Everything is drawn from the caller's `random.Random`."""

from __future__ import annotations

import dataclasses
import random

OBJECTS = ("apples", "marbles", "coins", "books", "shells", "stickers", "pencils", "eggs", "cards", "stones")


def apply_op(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y



# --------------------------------------------------------------------------------------------------
# Word problems: a question template and the steps of its worked answer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Template:
    name: str
    question: str  # fields: n, m, k (names), obj, a, b, c, d (numbers)
    steps: tuple[tuple[str, str, str, str], ...]  # (description, left, op, right); operands: a-d or r1, r2
    ranges: tuple[tuple[int, int], ...]  # inclusive ranges of a, b, c, d


TEMPLATES = (
    _Template("add_sub",
              "{n} has {a} {obj}. {m} gives {n} {b} more {obj}. Then {n} gives {c} {obj} to {k}. "
              "How many {obj} does {n} have now?",
              (("{n} gets {b} more", "a", "+", "b"), ("{n} gives away {c}", "r1", "-", "c")),
              ((2, 40), (2, 30), (2, 30))),
    _Template("mul_add",
              "{n} buys {a} bags of {obj}. Each bag has {b} {obj}. {m} gives {n} {c} more {obj}. "
              "How many {obj} does {n} have?",
              (("{n} buys {a} bags of {b}", "a", "*", "b"), ("{m} gives {c} more", "r1", "+", "c")),
              ((2, 9), (2, 9), (2, 30))),
    _Template("mul_sub",
              "There are {a} boxes with {b} {obj} in each box. {n} takes {c} {obj} away. "
              "How many {obj} are left in the boxes?",
              (("{n} counts {a} boxes of {b}", "a", "*", "b"), ("{n} takes {c}", "r1", "-", "c")),
              ((2, 9), (2, 9), (2, 30))),
    _Template("sub_sub",
              "{n} has {a} {obj}. {n} gives {b} {obj} to {m} and {c} {obj} to {k}. "
              "How many {obj} does {n} have left?",
              (("{n} gives {b} to {m}", "a", "-", "b"), ("{n} gives {c} to {k}", "r1", "-", "c")),
              ((20, 90), (2, 30), (2, 30))),
    _Template("add_add_sub",
              "{n} has {a} {obj}. On Monday {n} finds {b} more. On Tuesday {n} finds {c} more. "
              "Then {n} loses {d} of them. How many {obj} does {n} have now?",
              (("{n} finds {b} on Monday", "a", "+", "b"), ("{n} finds {c} on Tuesday", "r1", "+", "c"),
               ("{n} loses {d}", "r2", "-", "d")),
              ((2, 30), (2, 20), (2, 20), (2, 30))),
    _Template("more_than",
              "{n} has {a} {obj}. {m} has {b} more {obj} than {n}. "
              "How many {obj} do {n} and {m} have together?",
              (("{m} has {b} more", "a", "+", "b"), ("{n} and {m} together", "a", "+", "r1")),
              ((2, 40), (2, 30))),
)
_SLIPS = (-10, -2, -1, 1, 2, 10)
_FLIPS = {"+": "-", "-": "+", "*": "+"}  # the wrong operation a careless solver uses


@dataclasses.dataclass(frozen=True)
class MathProblem:
    template: str
    names: tuple[str, str, str]
    obj: str
    numbers: tuple[int, ...]

    @property
    def key(self) -> tuple:
        """What makes two problems 'the same problem' for the train/eval split."""
        return (self.template, self.numbers)

    def _fields(self) -> dict:
        f = dict(zip("abcd", self.numbers))
        f.update(n=self.names[0], m=self.names[1], k=self.names[2], obj=self.obj)
        return f

    def question(self) -> str:
        return _TEMPLATE_BY_NAME[self.template].question.format(**self._fields())

    def solve(self, slip: tuple[int, int] | None = None,
              flip: tuple[int, str] | None = None) -> tuple[str, list[int]]:
        """The worked answer ('desc: x op y = r.' lines, then '#### n') and its step results.

        `slip=(step, delta)` makes that step's result off by `delta`; `flip=(step, op)` does that step
        with the wrong operation (correctly computed); later steps use the wrong value.
        """
        t = _TEMPLATE_BY_NAME[self.template]
        fields = self._fields()
        vals = dict(zip("abcd", self.numbers))
        lines, results = [], []
        for i, (desc, left, op, right) in enumerate(t.steps):
            x, y = vals[left], vals[right]
            if flip and flip[0] == i:
                op = flip[1]
            r = apply_op(x, op, y) + (slip[1] if slip and slip[0] == i else 0)
            vals[f"r{i + 1}"] = r
            results.append(r)
            lines.append(f"{desc.format(**fields)}: {x} {op} {y} = {r}.")
        lines.append(f"#### {results[-1]}")
        return "\n".join(lines), results

    def answer(self) -> str:
        return self.solve()[0]

    def final(self) -> int:
        return self.solve()[1][-1]


_TEMPLATE_BY_NAME = {t.name: t for t in TEMPLATES}


def _sample_problem(rng: random.Random, names: list[str]) -> MathProblem:
    while True:
        t = rng.choice(TEMPLATES)
        numbers = tuple(rng.randint(lo, hi) for lo, hi in t.ranges)
        n, m, k = rng.sample(names, 3)
        p = MathProblem(t.name, (n, m, k), rng.choice(OBJECTS), numbers)
        if min(p.solve()[1]) >= 0:
            return p


def sample_problems(rng: random.Random, names: list[str], count: int, exclude: set) -> list[MathProblem]:
    """`count` problems whose keys are unique and not in `exclude` (which this adds them to)."""
    out = []
    while len(out) < count:
        p = _sample_problem(rng, names)
        if p.key not in exclude:
            exclude.add(p.key)
            out.append(p)
    return out


REJECTED_KINDS = ("final_line", "slip", "operation")


def _rejected_answer(rng: random.Random, p: MathProblem) -> tuple[str, str]:
    """A plausible wrong worked answer and its kind (REJECTED_KINDS), a third of each:
    - a careless final line: every step is right but `#### n` does not match the last result;
    - an arithmetic slip: one step's result is off, the later steps follow from it;
    - a wrong operation: one step adds where it should subtract (or the reverse, or adds instead of
      multiplying), computed correctly, and the later steps follow from it.
    """
    steps = len(_TEMPLATE_BY_NAME[p.template].steps)
    correct = p.final()
    kind = rng.random()
    if kind < 1 / 3:
        delta = rng.choice([d for d in _SLIPS if correct + d >= 0])
        text = p.answer()
        return text[: text.rindex("#### ")] + f"#### {correct + delta}", "final_line"
    if kind >= 2 / 3:
        order = list(range(steps))
        rng.shuffle(order)
        for i in order:  # at most one try per step; a flip that goes negative or changes nothing is skipped
            text, results = p.solve(flip=(i, _FLIPS[_TEMPLATE_BY_NAME[p.template].steps[i][2]]))
            if min(results) >= 0 and results[-1] != correct:
                return text, "operation"
    for _ in range(100):  # a slip of +1, +2 or +10 always qualifies; the cap only guards against a bug
        slip = (rng.randrange(steps), rng.choice(_SLIPS))
        text, results = p.solve(slip)
        if min(results) >= 0 and results[-1] != correct:
            return text, "slip"
    raise AssertionError(f"no wrong answer found for {p}")


def math_pair(rng: random.Random, p: MathProblem) -> dict:
    rejected, kind = _rejected_answer(rng, p)
    return {"prompt": p.question(), "chosen": p.answer(), "rejected": rejected, "kind": kind}
