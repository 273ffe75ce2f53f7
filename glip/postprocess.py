"""Detections from head outputs (official ATSSPostProcessor with dot-product logits, SCORE_AGG "MEAN").

Per image and level: phrase score = mean over the phrase's tokens of sigmoid(token logit); locations whose phrase
score exceeds ``score_threshold`` are candidates; the top ``pre_nms_top_n`` by score x sigmoid(centerness) are
decoded; final score = sqrt(phrase score x sigmoid(centerness)). Boxes are clipped to the resized image, NMS runs
per phrase (torchvision ``batched_nms``; with ``plus_one`` boxes get +1 on x2/y2 so IoU uses the legacy
(x2 - x1 + 1) areas), and the best ``detections_per_image`` are kept (official keeps ties at the cut too).

With ``min_score`` (``GLIP.ground(threshold=...)``) the rule is exact instead: the candidates are every location
and phrase whose final score is >= ``min_score`` (no phrase-score threshold), at most ``pre_nms_top_n`` per
level AND phrase, and after the same NMS at most ``max_per_phrase`` per phrase (no per-image cap). Greedy NMS
visits boxes best first, so leaving the lower boxes out changes nothing above ``min_score``: the result is every
NMS survivor scoring at least ``min_score`` (as long as the per-phrase bounds are not reached).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from glip.anchors import BoxCoder


@dataclass
class Detections:
    """One image: ``boxes`` [K, 4] xyxy in the resized image's pixels, ``scores`` [K], ``labels`` [K] (phrase
    index, 0-based), best first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def phrase_scores(token_probs: torch.Tensor, phrase_tokens: torch.Tensor) -> torch.Tensor:
    """token_probs [A, T], phrase_tokens bool [P, T] -> mean prob of each phrase's tokens [A, P] (0 if none)."""
    weights = phrase_tokens.to(token_probs.dtype)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return token_probs @ (weights / counts[:, None]).T


def level_candidates(token_logits: torch.Tensor, box_regression: torch.Tensor, centerness: torch.Tensor,
                     anchors: torch.Tensor, phrase_tokens: torch.Tensor, coder: BoxCoder,
                     score_threshold: float, pre_nms_top_n: int):
    """One image, one level: token_logits [A, T], box_regression [A, 4], centerness [A] (logits), anchors [A, 4].
    Returns (boxes [K, 4], scores [K], labels [K])."""
    scores = phrase_scores(token_logits.sigmoid(), phrase_tokens)              # [A, P]
    candidates = scores > score_threshold
    ranked = scores * centerness.sigmoid()[:, None]
    flat = ranked[candidates]
    keep = min(int(candidates.sum()), pre_nms_top_n)
    top, order = flat.topk(keep, sorted=False)
    loc, label = candidates.nonzero(as_tuple=True)
    loc, label = loc[order], label[order]
    boxes = coder.decode(box_regression[loc], anchors[loc])
    return boxes, torch.sqrt(top), label


def level_candidates_above(token_logits: torch.Tensor, box_regression: torch.Tensor, centerness: torch.Tensor,
                           anchors: torch.Tensor, phrase_tokens: torch.Tensor, coder: BoxCoder,
                           min_score: float, top_n_per_phrase: int):
    """One image, one level, the exact rule: every (location, phrase) whose final score sqrt(phrase score x
    sigmoid(centerness)) is >= ``min_score``, at most the best ``top_n_per_phrase`` of each phrase; phrases
    without tokens (truncated away) have none. Shapes as ``level_candidates``; returns (boxes [K, 4],
    scores [K] final, labels [K])."""
    scores = phrase_scores(token_logits.sigmoid(), phrase_tokens)              # [A, P]
    final = torch.sqrt(scores * centerness.sigmoid()[:, None])
    candidates = (final >= min_score) & phrase_tokens.any(dim=1)[None, :]
    keep = min(final.shape[0], max(int(top_n_per_phrase), 0))
    if keep < final.shape[0] and bool((candidates.sum(dim=0) > keep).any()):
        top = final.masked_fill(~candidates, -1.0).topk(keep, dim=0).indices   # [keep, P]
        bounded = torch.zeros_like(candidates).scatter_(0, top, True)
        candidates &= bounded
    loc, label = candidates.nonzero(as_tuple=True)
    boxes = coder.decode(box_regression[loc], anchors[loc])
    return boxes, final[loc, label], label


def clip_boxes(boxes: torch.Tensor, height: int, width: int, plus_one: bool) -> torch.Tensor:
    one = 1.0 if plus_one else 0.0
    x = boxes[:, 0::2].clamp(min=0, max=width - one)
    y = boxes[:, 1::2].clamp(min=0, max=height - one)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, nms_threshold: float,
                      max_detections: int, plus_one: bool, max_per_label: int | None = None) -> Detections:
    """Per-phrase NMS then the best ``max_detections`` of the image (``max_per_label`` None), or the best
    ``max_per_label`` of each phrase (``max_detections`` unused); sorted by score. A cap <= 0 keeps all."""
    nms_boxes = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) if plus_one else boxes
    keep = batched_nms(nms_boxes, scores, labels, nms_threshold)             # sorted by score, descending
    if max_per_label is not None:
        keep = keep[rank_within_label(labels[keep]) < max_per_label] if max_per_label > 0 else keep
    elif max_detections > 0:
        keep = keep[:max_detections]
    return Detections(boxes[keep], scores[keep], labels[keep])


def rank_within_label(labels: torch.Tensor) -> torch.Tensor:
    """labels [K] (in score order) -> [K] each entry's 0-based position among the entries of its label."""
    if labels.numel() == 0:
        return labels.clone()
    order = torch.sort(labels, stable=True).indices
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    return rank


def postprocess_image(token_logits: list[torch.Tensor], box_regression: list[torch.Tensor],
                      centerness: list[torch.Tensor], anchors: list[torch.Tensor], phrase_tokens: torch.Tensor,
                      image_hw: tuple[int, int], coder: BoxCoder, score_threshold: float, pre_nms_top_n: int,
                      nms_threshold: float, max_detections: int, plus_one: bool, *,
                      min_score: float | None = None, max_per_phrase: int | None = None) -> Detections:
    """One image over all levels (per level: token_logits [A_l, T], box_regression [A_l, 4], centerness [A_l]).

    ``min_score`` None: the official rule (``score_threshold`` on the phrase score, ``pre_nms_top_n`` per level,
    ``max_detections`` per image). ``min_score`` given: the exact rule of the module doc, ``pre_nms_top_n`` per
    level and phrase, ``max_per_phrase`` (default ``max_detections``) per phrase; ``score_threshold`` unused."""
    if min_score is None:
        parts = [level_candidates(t, b, c, a, phrase_tokens, coder, score_threshold, pre_nms_top_n)
                 for t, b, c, a in zip(token_logits, box_regression, centerness, anchors)]
    else:
        parts = [level_candidates_above(t, b, c, a, phrase_tokens, coder, min_score, pre_nms_top_n)
                 for t, b, c, a in zip(token_logits, box_regression, centerness, anchors)]
    boxes = torch.cat([p[0] for p in parts])
    scores = torch.cat([p[1] for p in parts])
    labels = torch.cat([p[2] for p in parts])
    boxes = clip_boxes(boxes, image_hw[0], image_hw[1], plus_one)
    if min_score is None:
        return select_detections(boxes, scores, labels, nms_threshold, max_detections, plus_one)
    per_phrase = max_detections if max_per_phrase is None else max_per_phrase
    return select_detections(boxes, scores, labels, nms_threshold, max_detections, plus_one,
                             max_per_label=per_phrase)
