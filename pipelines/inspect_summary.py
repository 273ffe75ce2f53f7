"""``glipctl inspect``'s summary, accumulated batch by batch in bounded memory.

Everything here is a fixed-size histogram or a bounded counter, so the memory of a
summary does not grow with the number of shards (the phrase counter keeps at most
``capacity`` distinct phrases; beyond that its counts are approximate, flagged).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCORE_BINS = np.arange(11) / 10.0      # ten bins of 0.1; i / 10 lands exactly on 0.3, 0.6 (linspace does not)
PER_SAMPLE_EDGES = [0, 1, 2, 3, 4, 5, 10, 20, 50]               # last bin: 50 and more
PER_SAMPLE_LABELS = ["0", "1", "2", "3", "4", "5-9", "10-19", "20-49", "50+"]


class TopCounter:
    """Counts of the most frequent values in bounded memory.

    Exact while fewer than ``capacity`` distinct values were seen; after that the
    rarest half is dropped whenever the table doubles (the usual heavy-hitters
    compromise: frequent phrases stay, their counts may be slightly low).
    """

    def __init__(self, capacity: int = 20000):
        self.capacity = capacity
        self.counts: Counter = Counter()
        self.approximate = False

    def update(self, values: pa.Array) -> None:
        vc = pc.value_counts(values)
        self.counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
        if len(self.counts) > 2 * self.capacity:
            self.counts = Counter(dict(self.counts.most_common(self.capacity)))
            self.approximate = True

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return self.counts.most_common(n)


def matched_per_sample(samples: pa.RecordBatch, mask: np.ndarray | None) -> np.ndarray:
    """Boxes kept by ``mask`` (over the exploded boxes) for each sample row."""
    boxes = samples.column("boxes")
    if mask is None:
        return pc.list_value_length(boxes).to_numpy(zero_copy_only=False).astype(np.int64)
    parent = pc.list_parent_indices(boxes).to_numpy()
    return np.bincount(parent[mask], minlength=samples.num_rows)


def filter_samples(samples: pa.RecordBatch, mask: np.ndarray) -> pa.RecordBatch:
    """Samples with only their matching boxes; samples left without any box are dropped."""
    boxes = samples.column("boxes")
    per = matched_per_sample(samples, mask)
    offsets = np.concatenate([[0], np.cumsum(per)]).astype(np.int32)
    kept = pa.ListArray.from_arrays(pa.array(offsets), pc.list_flatten(boxes).filter(pa.array(mask)),
                                    type=boxes.type)
    i = samples.schema.get_field_index("boxes")
    out = samples.set_column(i, samples.schema.field(i), kept)
    return out.filter(pa.array(per > 0))


class InspectSummary:
    """What ``inspect`` reports: samples, boxes per sample, scores, phrases, sources."""

    def __init__(self, phrase_capacity: int = 20000):
        self.samples = 0
        self.samples_with_boxes = 0
        self.boxes = 0
        self.per_sample = np.zeros(len(PER_SAMPLE_LABELS), dtype=np.int64)
        self.score_hist = np.zeros(len(SCORE_BINS) - 1, dtype=np.int64)
        self.score_sum = 0.0
        self.score_min = float("inf")
        self.score_max = float("-inf")
        self.phrases = TopCounter(phrase_capacity)
        self.sample_sources: Counter = Counter()
        self.box_sources: Counter = Counter()

    def update(self, samples: pa.RecordBatch, boxes: pa.RecordBatch, mask: np.ndarray | None) -> None:
        """Add one batch: ``boxes`` is ``explode_boxes(samples)``, ``mask`` the --where result."""
        per = matched_per_sample(samples, mask)
        self.samples += samples.num_rows
        self.samples_with_boxes += int((per > 0).sum())
        bins = np.searchsorted(PER_SAMPLE_EDGES, per, side="right") - 1
        self.per_sample += np.bincount(bins, minlength=len(PER_SAMPLE_LABELS))
        kept = boxes if mask is None else boxes.filter(pa.array(mask))
        self.boxes += kept.num_rows
        vc = pc.value_counts(samples.column("source"))
        self.sample_sources.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
        if kept.num_rows == 0:
            return
        scores = kept.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        self.score_hist += np.histogram(np.clip(scores, 0.0, 1.0), bins=SCORE_BINS)[0]
        self.score_sum += float(scores.sum())
        self.score_min = min(self.score_min, float(scores.min()))
        self.score_max = max(self.score_max, float(scores.max()))
        self.phrases.update(pc.utf8_lower(kept.column("phrase")))
        vc = pc.value_counts(kept.column("source"))
        self.box_sources.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))

    def to_dict(self, top: int = 15) -> dict[str, Any]:
        """A JSON-ready summary (``--json``)."""
        has_scores = self.boxes > 0
        return {
            "samples": self.samples,
            "samples_with_boxes": self.samples_with_boxes,
            "boxes": self.boxes,
            "boxes_per_sample": {
                "mean": self.boxes / self.samples if self.samples else 0.0,
                "histogram": dict(zip(PER_SAMPLE_LABELS, self.per_sample.tolist())),
            },
            "score": {
                "mean": self.score_sum / self.boxes if has_scores else None,
                "min": self.score_min if has_scores else None,
                "max": self.score_max if has_scores else None,
                "histogram": {f"{lo:.1f}-{hi:.1f}": int(n) for lo, hi, n in
                              zip(SCORE_BINS[:-1], SCORE_BINS[1:], self.score_hist)},
            },
            "top_phrases": [[p, n] for p, n in self.phrases.most_common(top)],
            "top_phrases_approximate": self.phrases.approximate,
            "sources": {s: {"samples": n, "boxes": self.box_sources.get(s, 0)}
                        for s, n in sorted(self.sample_sources.items())},
        }
