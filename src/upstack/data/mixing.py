"""Taking rows from several sources: samples and weights for SFT/DPO rows (`mix`), and for streamed
pretraining documents one source after another (`chain`) or in the ratio of their weights (`interleave`)."""

from __future__ import annotations

import random
from typing import Iterator

from upstack.data.load_report import LoadReport
from upstack.data.spec import DataSpec
from upstack.errors import DataError


def mix(specs: list[DataSpec], per_source: list[list[dict]], report: LoadReport, seed: int) -> list[dict]:
    """Per source: `samples` -> exactly that many (seeded sample); `weight` -> a share of the weighted
    total, which is as large as the sources allow without repeating a row; neither -> every row in
    file order. Several sources: the mixture is shuffled with `seed`."""
    weights = {i: s.weight for i, s in enumerate(specs) if s.weight is not None}
    total_w = sum(weights.values())
    weighted_total = min((len(per_source[i]) * total_w / w for i, w in weights.items()), default=0.0)
    out = []
    for i, (spec, rows) in enumerate(zip(specs, per_source)):
        src = report.sources[i]
        if spec.samples is not None:
            if spec.samples > len(rows):
                raise DataError(f"{src.spec}: samples={spec.samples} but only {len(rows)} rows are usable"
                                f" ({src.counts()})")
            take = random.Random(spec.seed).sample(rows, spec.samples)
        elif spec.weight is not None:
            count = min(len(rows), round(weighted_total * spec.weight / total_w))
            if count == 0:
                raise DataError(f"{src.spec}: weight {spec.weight} gives this source 0 of the mixture's rows")
            take = random.Random(spec.seed).sample(rows, count)
        else:
            take = rows
        src.used = len(take)
        out.extend(take)
    if len(specs) > 1:
        random.Random(seed).shuffle(out)
    return out


def chain(streams: list[Iterator[str]], report: LoadReport) -> Iterator[str]:
    for stream, src in zip(streams, report.sources):
        for doc in stream:
            src.used += 1
            yield doc


def interleave(streams: list[Iterator[str]], weights: list[float], seed: int, report: LoadReport) -> Iterator[str]:
    """Stride scheduling: each source is due every 1/weight steps, from a seeded random phase, so any
    prefix of the stream holds the sources in their weight ratio (within one document each)."""
    rng = random.Random(seed)
    due = [rng.random() / w for w in weights]
    while True:
        i = min(range(len(streams)), key=due.__getitem__)
        doc = next(streams[i], None)
        if doc is None:  # first exhausted: keeps the proportions exact
            for stream in streams:
                stream.close()
            return
        due[i] += 1 / weights[i]
        report.sources[i].used += 1
        yield doc
