"""Image preprocessing: resize (official maskrcnn-benchmark rule), normalize per config, zero-pad into a batch.

Images enter the model as float RGB tensors [3, H, W] in [0, 1]. ``normalize`` turns them into the network's
input space (``pixel_format`` "BGR255": BGR channel order, 0-255, official mean/std; "RGB1": as given, ImageNet
mean/std); ``batch_images`` pads after normalization with zeros to a multiple of ``size_divisibility``
(bottom/right), as the official ``to_image_list``. The padding is part of the input (convolutions see it at the
borders, DyHead pools over it): an image's outputs depend on the padded shape, ``padded_shape`` of the largest
image in its batch, so callers that need batch-independent outputs batch only images of one padded shape.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from glip.config import GLIPConfig


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_width, new_height): shorter side to ``min_size`` unless the longer would pass ``max_size``
    (official Resize.get_size, int() truncation included: 640x480 -> 1066x800)."""
    size = float(min_size)
    short, long = float(min(width, height)), float(max(width, height))
    if max_size is not None and long / short * size > max_size:
        size = float(int(round(max_size * short / long)))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return int(size), int(size * height / width)
    return int(size * width / height), int(size)


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> float RGB [3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)


def prepare_image(image, cfg: GLIPConfig) -> torch.Tensor:
    """Resize a PIL image (bilinear, as torchvision's resize of PIL images) -> RGB [3, h, w] in [0, 1]."""
    from PIL import Image

    width, height = image.size
    new_w, new_h = resized_size(width, height, cfg.min_size, cfg.max_size)
    if (new_w, new_h) != (width, height):
        image = image.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    return pil_to_tensor(image)


def normalize(image: torch.Tensor, cfg: GLIPConfig) -> torch.Tensor:
    """RGB [3, H, W] in [0, 1] -> network input space (see module doc)."""
    if cfg.pixel_format == "BGR255":
        image = image[[2, 1, 0]] * 255.0
    elif cfg.pixel_format != "RGB1":
        raise ValueError(f"unknown pixel_format {cfg.pixel_format!r}")
    mean = torch.as_tensor(cfg.pixel_mean, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.as_tensor(cfg.pixel_std, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - mean) / std


def padded_shape(height: int, width: int, divisibility: int) -> tuple[int, int]:
    """(H, W): ``height`` x ``width`` pixels rounded up to multiples of ``divisibility`` (<= 1: unchanged), the
    input shape of a batch of one such image. Pure; callers group images by it (``labeling.teacher``)."""
    div = max(int(divisibility), 1)
    return -(-int(height) // div) * div, -(-int(width) // div) * div


def batch_images(images: list[torch.Tensor], cfg: GLIPConfig) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Normalize each image and zero-pad into [B, 3, H_pad, W_pad], (H_pad, W_pad) the ``padded_shape`` of the
    largest height and width; returns the batch and each (h, w) before padding."""
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    max_h, max_w = padded_shape(max(h for h, _ in sizes), max(w for _, w in sizes), cfg.size_divisibility)
    batch = torch.stack([F.pad(normalize(im, cfg), (0, max_w - im.shape[-1], 0, max_h - im.shape[-2]))
                         for im in images])
    return batch, sizes
