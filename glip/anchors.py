"""Anchors and the box coder of GLIP's ATSS head.

One square anchor per FPN location (official ``generate_anchors`` with aspect ratio 1): at stride s, size S and
grid cell (x, y) the anchor is centred on (x*s + (s-1)/2, y*s + (s-1)/2) with corners +-(S-1)/2, xyxy pixels of
the padded network input. Box deltas (dx, dy, dw, dh) use weights (10, 10, 5, 5); with ``plus_one`` widths are
x2 - x1 + 1 (the legacy maskrcnn-benchmark convention the official model was trained with).
"""
from __future__ import annotations

import math

import torch


def level_anchors(height: int, width: int, stride: int, size: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Anchors of one level in row-major (y, x) order: Tensor[height * width, 4], xyxy pixels."""
    xs = torch.arange(width, device=device, dtype=dtype) * stride
    ys = torch.arange(height, device=device, dtype=dtype) * stride
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    center = (stride - 1) / 2.0
    half = (size - 1) / 2.0
    cx = shift_x.reshape(-1) + center
    cy = shift_y.reshape(-1) + center
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def anchors_for_levels(shapes: list[tuple[int, int]], strides, sizes, device=None) -> list[torch.Tensor]:
    """One [H_l * W_l, 4] anchor tensor per level (the same for every image of a padded batch)."""
    return [level_anchors(h, w, s, z, device=device) for (h, w), s, z in zip(shapes, strides, sizes)]


class BoxCoder:
    """Encode/decode boxes against anchors: deltas [N, 4] <-> boxes [N, 4] xyxy pixels."""

    weights = (10.0, 10.0, 5.0, 5.0)
    max_log_ratio = math.log(1000.0 / 16)

    def __init__(self, plus_one: bool = True):
        self.one = 1.0 if plus_one else 0.0

    def _center_size(self, boxes: torch.Tensor):
        w = boxes[:, 2] - boxes[:, 0] + self.one
        h = boxes[:, 3] - boxes[:, 1] + self.one
        return (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, w, h

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        ax, ay, aw, ah = self._center_size(anchors)
        gx, gy, gw, gh = self._center_size(boxes)
        wx, wy, ww, wh = self.weights
        return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                            ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        anchors = anchors.to(deltas.dtype)
        ax, ay, aw, ah = self._center_size(anchors)
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.max_log_ratio)
        dh = (deltas[:, 3] / wh).clamp(max=self.max_log_ratio)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * (w - self.one), cy - 0.5 * (h - self.one),
                            cx + 0.5 * (w - self.one), cy + 0.5 * (h - self.one)], dim=1)
