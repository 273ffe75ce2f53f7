"""The tiny GLIP learns: two synthetic images overfit (total loss / 5 within a bounded number of steps), every
fusion layer receives gradients, and afterwards ground() finds each object."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from glip import GLIP

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 96
MAX_STEPS = 150


def disc_image(color, box):
    """A shaded ellipse filling ``box`` (xyxy) on grey: its centre is visible locally, unlike a flat square."""
    image = torch.full((3, SIZE, SIZE), 0.5)
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    x1, y1, x2, y2 = box
    d = (((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2).sqrt()
    inside = d <= 1
    for c in range(3):
        image[c][inside] = (color[c] * (0.4 + 0.6 * (1 - d)))[inside]
    return image


def test_tiny_overfits_two_images_with_gradients_in_every_fusion_layer():
    torch.manual_seed(0)
    model = GLIP.from_preset("tiny").train()
    model.language_backbone.requires_grad_(False)  # pretrained MiniLM kept: faster steps, same test of the rest
    boxes = [(12, 24, 48, 60), (48, 12, 84, 48)]
    images = [disc_image((1.0, 0.0, 0.0), boxes[0]), disc_image((0.0, 0.0, 1.0), boxes[1])]
    captions = ["a red disc.", "a blue disc."]
    targets = [{"boxes": torch.tensor([boxes[0]], dtype=torch.float), "tokens_positive": [[[0, 10]]]},
               {"boxes": torch.tensor([boxes[1]], dtype=torch.float), "tokens_positive": [[[0, 11]]]}]
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=3e-3, text_lr=1e-4, weight_decay=0.0))

    first = None
    for step in range(MAX_STEPS):
        losses = model(images, captions, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        if first is None:
            first = float(losses["loss"].detach())
            for i, layer in enumerate(model.head.dyhead_tower):
                for part in ("b_attn", "text_layer", "image_layer"):
                    grads = [p.grad for p in getattr(layer, part).parameters()]
                    assert all(g is not None for g in grads), f"layer {i} {part}: parameter without gradient"
                    assert sum(float(g.abs().sum()) for g in grads) > 0, f"layer {i} {part}: zero gradient"
        optimizer.step()
        if float(losses["loss"].detach()) <= first / 5:
            break
    final = float(losses["loss"].detach())
    assert final <= first / 5, f"loss {final:.3f} after {MAX_STEPS} steps, from {first:.3f}"

    model.eval()
    found = model.ground(images, captions, [[(0, 10)], [(0, 11)]], max_per_phrase=1)
    for per_image, box in zip(found, boxes):
        x, y, w, h = per_image[0][0]["bbox"]
        iou = box_iou(torch.tensor([[x, y, x + w, y + h]]), torch.tensor([box], dtype=torch.float))
        assert float(iou) > 0.5
