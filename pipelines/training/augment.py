"""Training augmentation on (image, boxes) pairs with torchvision.transforms.v2.

Boxes travel as ``tv_tensors.BoundingBoxes`` (XYXY, pixels) so every geometric transform
moves them with the pixels; after the transforms boxes are clamped to the image and the
degenerate ones dropped, and ``keep`` says which input boxes survived so their text spans
can follow. The output image is a float RGB tensor [3, H, W] in [0, 1], the model's input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from glip.preprocess import resized_size

# A mirrored image makes "the man on the left" false; such captions are never flipped.
_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def caption_allows_flip(caption: str) -> bool:
    """False when the caption names a side ("left", "right") that a mirror would swap."""
    return _SIDE_WORDS.search(caption) is None


@dataclass
class Augmented:
    image: torch.Tensor      # float32 [3, H, W], RGB in [0, 1]
    boxes: torch.Tensor      # float32 [N, 4], XYXY pixels of ``image``
    keep: torch.Tensor       # int64 [N], index of each surviving box in the input boxes
    flipped: bool


class TrainAugment:
    """Resize (shortest side to a random one of ``min_sizes``, longest side at most
    ``max_size``, by the model's own rule ``glip.preprocess.resized_size`` and, like
    ``model.prepare_image``, on the PIL image), colour jitter, horizontal flip with
    probability ``flip_p`` where the caption allows it; ``train=False`` resizes only.

    Randomness comes from torch's global generator, so restoring ``torch.get_rng_state()``
    replays the same augmentations (resume).
    """

    def __init__(self, min_sizes: tuple[int, ...] | int, max_size: int, *, train: bool = True,
                 flip_p: float = 0.5, jitter: float = 0.2, min_box_side: float = 1.0):
        self.min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
        self.max_size = max_size
        self.train = train
        self.flip_p = flip_p if train else 0.0
        self.min_box_side = min_box_side
        self.colour = v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter) if train and jitter else None
        self.flip = v2.RandomHorizontalFlip(p=1.0)
        self.to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.sanitize = v2.Compose([
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=min_box_side, labels_getter=lambda inputs: inputs["keep"]),
        ])

    def __call__(self, image: Image.Image, boxes_xyxy: torch.Tensor, caption: str) -> Augmented:
        """``boxes_xyxy`` float [N, 4] in pixels of ``image`` (PIL, RGB)."""
        boxes = tv_tensors.BoundingBoxes(boxes_xyxy.reshape(-1, 4).float(), format="XYXY",
                                         canvas_size=(image.height, image.width))
        sample = {"image": image, "boxes": boxes, "keep": torch.arange(boxes.shape[0], dtype=torch.int64)}
        size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))] if len(self.min_sizes) > 1 else self.min_sizes[0]
        new_w, new_h = resized_size(image.width, image.height, size, self.max_size)
        if (new_w, new_h) != (image.width, image.height):
            sample = v2.Resize((new_h, new_w), antialias=True)(sample)
        sample["image"] = self.to_float(sample["image"])
        flipped = False
        if self.flip_p > 0 and caption_allows_flip(caption) and float(torch.rand(())) < self.flip_p:
            sample = self.flip(sample)
            flipped = True
        if self.colour is not None:
            sample["image"] = self.colour(sample["image"])
        sample = self.sanitize(sample)
        return Augmented(image=sample["image"].as_subclass(torch.Tensor).clamp_(0, 1),
                         boxes=sample["boxes"].as_subclass(torch.Tensor).float(),
                         keep=sample["keep"], flipped=flipped)
