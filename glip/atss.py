"""ATSS assignment (Zhang et al. 2020), as GLIP's official loss does it.

For each ground-truth box: take the ``topk`` anchors per FPN level whose centres are closest to the box centre;
the IoU threshold is mean + std (unbiased) of those candidates' IoUs; a candidate is positive when its IoU reaches
the threshold and its centre lies inside the box (by more than 0.01 px). An anchor positive for several boxes
goes to the one with the highest IoU.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_iou


def legacy_box_iou(a: torch.Tensor, b: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """IoU [N, M] of xyxy boxes; ``plus_one``: areas as (x2 - x1 + 1)(y2 - y1 + 1) (maskrcnn-benchmark)."""
    if not plus_one:
        return box_iou(a, b)
    one = a.new_tensor([0.0, 0.0, 1.0, 1.0])
    return box_iou(a + one, b + one)


def _centers(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)


def atss_assign(anchors_per_level: list[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9,
                plus_one: bool = True) -> torch.Tensor:
    """Match anchors to ground truth.

    Args:
        anchors_per_level: per level Tensor[A_l, 4], xyxy pixels (concatenated in this order).
        gt_boxes: Tensor[G, 4], xyxy pixels.
    Returns:
        LongTensor[sum A_l]: index of the matched box, or -1 for background.
    """
    anchors = torch.cat(anchors_per_level, dim=0)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)

    ious = legacy_box_iou(anchors, gt_boxes, plus_one)                        # [A, G]
    anchor_centers = _centers(anchors)
    distances = torch.cdist(anchor_centers, _centers(gt_boxes))               # [A, G]

    candidates, start = [], 0
    for level in anchors_per_level:
        end = start + level.shape[0]
        k = min(topk, level.shape[0])
        candidates.append(distances[start:end].topk(k, dim=0, largest=False).indices + start)
        start = end
    candidates = torch.cat(candidates, dim=0)                                 # [K, G]

    gt_index = torch.arange(num_gt, device=anchors.device)
    candidate_ious = ious[candidates, gt_index]                               # [K, G]
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    is_pos = candidate_ious >= threshold[None, :]

    cx = anchor_centers[candidates, 0]
    cy = anchor_centers[candidates, 1]
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1],
                          gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], dim=0).min(dim=0).values > 0.01
    is_pos &= inside

    masked = torch.full_like(ious, -1.0)                                      # IoU where positive, else -1
    cand_flat = candidates[is_pos]
    gt_flat = gt_index.expand_as(candidates)[is_pos]
    masked[cand_flat, gt_flat] = ious[cand_flat, gt_flat]
    best_iou, best_gt = masked.max(dim=1)
    return torch.where(best_iou >= 0, best_gt, torch.full_like(best_gt, -1))
