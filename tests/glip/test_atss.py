"""ATSS assignment on hand-made anchors and boxes, and against a loop-by-loop reading of the paper."""
from __future__ import annotations

import statistics

import torch

from glip.atss import atss_assign, legacy_box_iou

# level A: three 10x10 anchors in a row; level B: one 30x30 anchor covering them
LEVEL_A = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10]])
LEVEL_B = torch.tensor([[0.0, 0, 30, 30]])


def test_hand_made_boxes_get_their_anchor():
    gt = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 30, 30]])
    # box 0: candidates a0 (IoU 1), a1 (0), b0 (1/9): threshold mean+std = 0.92 -> only a0
    # box 2: candidates a1, a0 (1/9 each), b0 (1): threshold 0.92 -> only b0
    matched = atss_assign([LEVEL_A, LEVEL_B], gt, topk=2, plus_one=False)
    assert matched.tolist() == [0, 1, -1, 2]


def test_no_boxes_means_all_background():
    matched = atss_assign([LEVEL_A, LEVEL_B], torch.zeros(0, 4), topk=2, plus_one=False)
    assert matched.tolist() == [-1, -1, -1, -1]


def test_centre_outside_the_box_is_never_positive():
    # a thin box along the top edge: anchor centres (y = 5) lie outside it (y <= 2) however high the IoU rank
    gt = torch.tensor([[0.0, 0, 30, 2]])
    matched = atss_assign([LEVEL_A, LEVEL_B], gt, topk=3, plus_one=False)
    assert (matched == -1).all()


def reference_atss(levels, gt, topk, plus_one):
    """The paper's algorithm written out with Python loops."""
    anchors = torch.cat(levels)
    ious = legacy_box_iou(anchors, gt, plus_one)
    centres = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors.tolist()]
    best = [(-1.0, -1)] * len(anchors)
    for g, (x1, y1, x2, y2) in enumerate(gt.tolist()):
        gx, gy = (x1 + x2) / 2, (y1 + y2) / 2
        candidates, start = [], 0
        for level in levels:
            idx = list(range(start, start + len(level)))
            idx.sort(key=lambda i: ((centres[i][0] - gx) ** 2 + (centres[i][1] - gy) ** 2, i))
            candidates += idx[:topk]
            start += len(level)
        values = [float(ious[i, g]) for i in candidates]
        threshold = statistics.mean(values) + statistics.stdev(values)
        for i in candidates:
            cx, cy = centres[i]
            inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01
            if float(ious[i, g]) >= threshold and inside and float(ious[i, g]) > best[i][0]:
                best[i] = (float(ious[i, g]), g)
    return [g for _, g in best]


def grid(size, stride, anchor):
    xs = torch.arange(size) * stride + stride / 2
    cy, cx = torch.meshgrid(xs, xs, indexing="ij")
    c = torch.stack([cx.flatten(), cy.flatten()], 1)
    return torch.cat([c - anchor / 2, c + anchor / 2], 1)


def test_matches_the_loop_reference_on_random_boxes():
    gen = torch.Generator().manual_seed(0)
    levels = [grid(16, 8, 32), grid(8, 16, 64), grid(4, 32, 128)]
    for plus_one in (False, True):
        xy = torch.rand(6, 2, generator=gen) * 90
        wh = torch.rand(6, 2, generator=gen) * 60 + 8
        gt = torch.cat([xy, xy + wh], 1)
        assert atss_assign(levels, gt, topk=9, plus_one=plus_one).tolist() == \
            reference_atss(levels, gt, 9, plus_one)
