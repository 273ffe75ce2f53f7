"""Anchors, box coding, resizing and post-processing against values worked out by hand from the official code."""
from __future__ import annotations

import torch

from glip.anchors import BoxCoder, level_anchors
from glip.postprocess import phrase_scores, postprocess_image
from glip.preprocess import resized_size


def test_official_anchor_layout():
    anchors = level_anchors(2, 3, stride=8, size=64)
    # generate_anchors(8, (64,), (1,)) = [-28, -28, 35, 35], then shifted by 8 px per cell, row-major
    assert anchors[0].tolist() == [-28.0, -28.0, 35.0, 35.0]
    assert anchors[1].tolist() == [-20.0, -28.0, 43.0, 35.0]
    assert anchors[3].tolist() == [-28.0, -20.0, 35.0, 43.0]


def test_box_coder_round_trip_and_plus_one():
    anchors = torch.tensor([[0.0, 0, 63, 63], [10, 20, 50, 40]])
    boxes = torch.tensor([[5.0, 3, 70, 60], [12, 18, 44, 47]])
    for plus_one in (True, False):
        coder = BoxCoder(plus_one)
        torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes)
    # zero deltas give the anchor back; with +1 a 64-wide anchor is x2 - x1 + 1 = 64
    assert BoxCoder(True).decode(torch.zeros(1, 4), anchors[:1]).tolist() == [[0.0, 0.0, 63.0, 63.0]]


def test_resize_rule_matches_official():
    assert resized_size(640, 480, 800, 1333) == (1066, 800)
    assert resized_size(2000, 500, 800, 1333) == (1332, 333)  # int(333 * 2000 / 500), as official
    assert resized_size(480, 640, 320, 512) == (320, 426)
    assert resized_size(800, 600, 600, 1333) == (800, 600)


def test_phrase_score_is_the_mean_of_token_probabilities():
    probs = torch.tensor([[0.2, 0.4, 0.9, 0.0]])
    phrases = torch.tensor([[False, True, True, False], [True, False, False, False], [False] * 4])
    torch.testing.assert_close(phrase_scores(probs, phrases), torch.tensor([[0.65, 0.2, 0.0]]))


def test_postprocess_scores_threshold_nms_and_clipping():
    anchors = torch.tensor([[0.0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [40, 40, 49, 49]])
    big = 10.0
    # token 0 is phrase 0, token 1 is phrase 1; anchor 3's phrase score is below the 0.05 threshold
    logits = torch.tensor([[big, -big], [1.0, -big], [-big, 0.0], [-4.0, -big]])
    centerness = torch.tensor([0.0, 0.0, 0.0, big])
    phrase_tokens = torch.tensor([[True, False], [False, True]])
    det = postprocess_image([logits], [torch.zeros(4, 4)], [centerness], [anchors], phrase_tokens,
                            image_hw=(25, 25), coder=BoxCoder(True), score_threshold=0.05, pre_nms_top_n=1000,
                            nms_threshold=0.6, max_detections=100, plus_one=True)
    # anchors 0 and 1 overlap (IoU 0.67 with +1 areas) -> one survives; anchor 2 is clipped to the 25x25 image
    assert det.labels.tolist() == [0, 1]
    expected = [(torch.sigmoid(torch.tensor(big)) * 0.5).sqrt(), (0.5 * 0.5) ** 0.5]
    torch.testing.assert_close(det.scores, torch.stack([torch.as_tensor(e) for e in expected]).float())
    assert det.boxes[1].tolist() == [20.0, 20.0, 24.0, 24.0]
    assert det.boxes[0].tolist() == [0.0, 0.0, 9.0, 9.0]
