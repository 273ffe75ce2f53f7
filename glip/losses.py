"""GLIP's training losses (official ATSSLossComputation with the dot-product token loss).

- ``loss_cls``: token-level sigmoid focal loss (alpha 0.25, gamma 2) between every anchor's token logits and its
  target row of the positive map, over real (non-padding) tokens; an anchor matched to no box has an all-zero
  row (the paper's "no object": the official extra target on token T-1 falls on padding and is masked out).
  Sum / max(#positive anchors, 1).
- ``loss_box``: GIoU between decoded predictions and the matched boxes, weighted by the centerness targets,
  / sum(centerness targets), x ``reg_loss_weight`` (2).
- ``loss_centerness``: BCE with logits against sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of the anchor centre
  in its box; sum / max(#positive anchors, 1).

Across DDP workers (``torch.distributed`` initialised, the loss backpropagated) the two normalisers are the
global ones, as the official ``reduce_sum(num_pos) / num_gpus``: #positive anchors and sum(centerness targets)
are summed over the process group (one all-reduce per call) and divided by its size, so that DDP's gradient
average is the gradient of the global batch's loss and the mean of the workers' losses is that loss, whatever
each worker's share of the positives. The clamps apply to the global sums (max(N, 1) / W where the official code
has max(N / W, 1)), which keeps this exact also for a global batch with fewer positives than workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from glip.anchors import BoxCoder
from glip.atss import atss_assign


@dataclass
class MatchedTargets:
    """For one image: ``matched`` LongTensor[A] (box index or -1), ``token_targets`` [A, T] float,
    ``boxes`` [A, 4] xyxy (the matched box; zeros where unmatched)."""

    matched: torch.Tensor
    token_targets: torch.Tensor
    boxes: torch.Tensor


def token_sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, text_mask: torch.Tensor,
                             alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Summed binary focal loss over real tokens. logits/targets [B, A, T], text_mask [B, T] (1 = real)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return (loss * text_mask[:, None, :].to(loss.dtype)).sum()


def centerness_targets(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Centerness of anchor centres [N] inside their boxes [N, 4] (xyxy); centres must be inside."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - boxes[:, 0], boxes[:, 2] - cx], dim=1)
    tb = torch.stack([cy - boxes[:, 1], boxes[:, 3] - cy], dim=1)
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def match_image(anchors_per_level: list[torch.Tensor], boxes: torch.Tensor, positive_map: torch.Tensor,
                topk: int, plus_one: bool) -> MatchedTargets:
    """ATSS-assign one image's boxes [G, 4] with their token rows positive_map [G, T] to the anchors."""
    matched = atss_assign(anchors_per_level, boxes, topk=topk, plus_one=plus_one)
    num_anchors = matched.shape[0]
    token_targets = positive_map.new_zeros((num_anchors, positive_map.shape[1]), dtype=torch.float32)
    matched_boxes = boxes.new_zeros((num_anchors, 4))
    pos = matched >= 0
    if pos.any():
        token_targets[pos] = positive_map[matched[pos]].float()
        matched_boxes[pos] = boxes[matched[pos]]
    return MatchedTargets(matched, token_targets, matched_boxes)


def workers_sharing_the_batch(logits: torch.Tensor) -> int:
    """How many processes the loss normalisers are summed over: the default process group's size when
    ``torch.distributed`` is initialised and the loss will be backpropagated (``logits.requires_grad``), else 1.
    A loss that is only measured (under ``torch.no_grad``, e.g. held-out evaluation on one rank) stays local and
    calls no collective."""
    if not (logits.requires_grad and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def grounding_losses(token_logits: torch.Tensor, box_regression: torch.Tensor, centerness: torch.Tensor,
                     anchors: torch.Tensor, text_mask: torch.Tensor, matches: list[MatchedTargets],
                     coder: BoxCoder, alpha: float = 0.25, gamma: float = 2.0,
                     reg_loss_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """All levels concatenated: token_logits [B, A, T], box_regression [B, A, 4], centerness [B, A],
    anchors [A, 4], text_mask [B, T]. Returns ``loss`` (sum) and the three terms.

    With more than one worker (``workers_sharing_the_batch``) this is a collective: every rank of the default
    process group must call it once per step, with or without positives of its own."""
    token_targets = torch.stack([m.token_targets for m in matches]).to(token_logits.dtype)
    pos = torch.stack([m.matched >= 0 for m in matches])                          # [B, A]
    local_pos = pos.sum()
    if pos.any():
        img_idx, anchor_idx = pos.nonzero(as_tuple=True)
        pos_anchors = anchors[anchor_idx]
        gt_boxes = torch.stack([m.boxes for m in matches])[img_idx, anchor_idx]
        ctr_targets = centerness_targets(pos_anchors, gt_boxes)
        local_ctr = ctr_targets.sum()
    else:
        local_ctr = anchors.new_zeros(())
    world = workers_sharing_the_batch(token_logits)
    if world > 1:   # the global normalisers, per worker: DDP's mean of the gradients is the global batch's
        totals = torch.stack([local_pos.to(torch.float32), local_ctr.detach().to(torch.float32)])
        dist.all_reduce(totals)
        num_pos = max(float(totals[0]), 1.0) / world
        ctr_norm = totals[1].clamp(min=1e-6) / world
    else:
        num_pos = max(float(local_pos), 1.0)
        ctr_norm = local_ctr.clamp(min=1e-6)
    loss_cls = token_sigmoid_focal_loss(token_logits, token_targets, text_mask, alpha, gamma) / num_pos

    if pos.any():
        pred_boxes = coder.decode(box_regression[img_idx, anchor_idx], pos_anchors)
        pred_boxes = torch.cat([pred_boxes[:, :2], torch.maximum(pred_boxes[:, :2], pred_boxes[:, 2:])], dim=1)
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
        loss_box = (giou * ctr_targets).sum() / ctr_norm * reg_loss_weight
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[img_idx, anchor_idx], ctr_targets,
                                                      reduction="sum") / num_pos
    else:  # keep the graph connected so DDP and the optimizer see every parameter
        loss_box = box_regression.sum() * 0.0
        loss_ctr = centerness.sum() * 0.0
    return {"loss": loss_cls + loss_box + loss_ctr, "loss_cls": loss_cls, "loss_box": loss_box,
            "loss_centerness": loss_ctr}
