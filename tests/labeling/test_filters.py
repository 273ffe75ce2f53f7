"""labeling.filters: the pseudo-label decision rule on plain records."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from labeling.filters import (DROP_CAP, DROP_NMS, DROP_NONFINITE, DROP_TOO_SMALL, FilterConfig,
                              clip_xywh, filter_phrase_detections, iou_xywh, nms_xywh, pseudo_sample)
from storage.records import span_is_valid


def det(x, y, w, h, s):
    return {"bbox": [x, y, w, h], "score": s}


def test_clip_and_iou():
    assert clip_xywh([-10, -5, 30, 20], 100, 50) == [0, 0, 20, 15]
    assert clip_xywh([90, 40, 30, 30], 100, 50) == [90, 40, 10, 10]
    assert clip_xywh([200, 10, 5, 5], 100, 50)[2] == 0          # fully outside -> empty
    assert iou_xywh([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)
    assert iou_xywh([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou_xywh([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_nms_keeps_best_of_overlapping_and_disjoint_boxes():
    boxes = [[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 10, 10]]
    assert nms_xywh(boxes, [0.8, 0.9, 0.3], 0.5) == [1, 2]
    assert nms_xywh(boxes, [0.8, 0.9, 0.3], 0.99) == [1, 0, 2]
    assert nms_xywh([], [], 0.5) == []


def test_threshold_is_inclusive_and_results_are_best_first():
    cfg = FilterConfig(threshold=0.5, nms_iou=0.5, max_boxes_per_phrase=10, min_box_size=2)
    out = filter_phrase_detections([det(0, 0, 10, 10, 0.49), det(40, 0, 10, 10, 0.5),
                                    det(0, 30, 10, 10, 0.9)], 100, 100, cfg)
    assert [d["score"] for d in out] == [0.9, 0.5]


def test_sanity_nms_and_cap_are_counted():
    cfg = FilterConfig(threshold=0.1, nms_iou=0.5, max_boxes_per_phrase=2, min_box_size=3)
    dets = [det(float("nan"), 0, 10, 10, 0.9), det(0, 0, 10, 10, math.inf),
            det(0, 0, 1, 30, 0.9),                 # too thin
            det(95, 0, 20, 20, 0.9),               # clipped to 5 px wide: kept
            det(0, 0, 20, 20, 0.8), det(1, 1, 20, 20, 0.7),   # second suppressed by NMS
            det(40, 40, 10, 10, 0.6), det(60, 60, 10, 10, 0.5)]
    dropped = Counter()
    out = filter_phrase_detections(dets, 100, 100, cfg, dropped)
    assert [d["bbox"] for d in out] == [[95, 0, 5, 20], [0, 0, 20, 20]]
    assert dropped == Counter({DROP_NONFINITE: 2, DROP_TOO_SMALL: 1, DROP_NMS: 1, DROP_CAP: 2})


def test_config_is_validated():
    for bad in (dict(threshold=1.5), dict(nms_iou=0), dict(max_boxes_per_phrase=0), dict(min_box_size=-1)):
        with pytest.raises(ValueError):
            FilterConfig(**bad)
    assert FilterConfig().to_dict() == {"threshold": 0.5, "nms_iou": 0.6,
                                        "max_boxes_per_phrase": 10, "min_box_size": 2.0}


def test_pseudo_sample_keeps_ungrounded_phrases_and_points_boxes_at_them():
    caption = "a red star next to a blue circle"
    phrases = [{"text": "a red star", "start": 0, "end": 10, "root": "star"},
               {"text": "a blue circle", "start": 19, "end": 32, "root": "circle"}]
    dets = [[det(10, 10, 30, 30, 0.9)], [det(0, 0, 5, 5, 0.2)]]
    sample, dropped = pseudo_sample("k1", caption, 64, 48, phrases, dets, FilterConfig(threshold=0.5),
                                    "pseudo/abc", {"teacher_sha256": "abc"})
    assert [p.text for p in sample.phrases] == ["a red star", "a blue circle"]
    assert len(sample.boxes) == 1
    box = sample.boxes[0]
    assert box.phrase == 0 and box.tokens_positive == [[0, 10]] and box.score == pytest.approx(0.9)
    assert box.bbox == [10, 10, 30, 30]
    assert sample.source == "pseudo/abc" and sample.extra == {"teacher_sha256": "abc"}
    assert not dropped
    d = sample.to_dict()
    assert d["width"] == 64 and all(span_is_valid(s, e, caption) for b in d["boxes"]
                                    for s, e in b["tokens_positive"])


def test_pseudo_sample_drops_boxes_of_invalid_phrase_spans():
    phrases = [{"text": "x", "start": 5, "end": 50}]
    sample, dropped = pseudo_sample("k", "short caption", 64, 64, phrases, [[det(0, 0, 20, 20, 0.9)]],
                                    FilterConfig(), "pseudo/x")
    assert sample.phrases == [] and sample.boxes == []
    assert dropped["phrase_span_outside_caption"] == 1 and dropped["box_span_outside_caption"] == 1


def test_pseudo_sample_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        pseudo_sample("k", "a cat", 10, 10, [{"text": "a cat", "start": 0, "end": 5}], [], FilterConfig(), "p")
