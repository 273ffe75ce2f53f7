"""The image side of a fusion layer: DyHead's DyConv (scale-, spatial- and task-aware attention).

Per FPN level l: modulated deformable 3x3 convs (``torchvision.ops.deform_conv2d`` or the equal
``glip.deform`` grid-sample version; offsets as (dy, dx) pairs per kernel point, mask = sigmoid) on levels
l-1 (stride 2), l and l+1 (upsampled bilinearly to l), each followed by GroupNorm; scale-aware attention
(global pool -> 1x1 conv -> ReLU -> hard sigmoid) weights the three before averaging; a task-aware DyReLU ends it. Keys follow the official ``dyhead_tower.{3i+2}`` module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glip.deform import modulated_deform_conv2d


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6 (official h_sigmoid)."""
    return F.relu6(x + 3.0) / 6.0


def fit_offsets_to_output(offset: torch.Tensor, mask: torch.Tensor, out_hw: tuple[int, int]):
    """Reuse one level's deformable offsets/mask for a conv whose output has another size (official quirk).

    The official DyConv computes offset [B, 18, H, W] and mask [B, 9, H, W] at level l and also passes them to the
    conv applied to level l+1. Its CUDA op never checks sizes, so for an output of size (H', W') it reads the
    first 18*H'*W' (9*H'*W') elements of each image's buffer as if they were [18, H', W'] ([9, H', W']). We copy
    that: flatten per image, take the prefix, view. Shapes that already match are returned unchanged.
    """
    h, w = out_hw
    if offset.shape[-2:] == (h, w):
        return offset, mask
    b = offset.shape[0]
    offset = offset.reshape(b, -1)[:, : offset.shape[1] * h * w].reshape(b, offset.shape[1], h, w)
    mask = mask.reshape(b, -1)[:, : mask.shape[1] * h * w].reshape(b, mask.shape[1], h, w)
    return offset, mask


class DeformConvNorm(nn.Module):
    """Modulated deformable 3x3 conv (or a plain conv when offsets are not given) + GroupNorm."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, groups: int, reuse_offsets: bool = True,
                 impl: str = "torchvision"):
        super().__init__()
        self.stride, self.reuse_offsets, self.impl = stride, reuse_offsets, impl
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1)
        self.bn = nn.GroupNorm(groups, channels_out)
        nn.init.normal_(self.conv.weight, 0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        return (h - 1) // self.stride + 1, (w - 1) // self.stride + 1

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if offset is None:
            y = self.conv(x)
        else:
            out_hw = self.output_size(x)
            if self.reuse_offsets:
                offset, mask = fit_offsets_to_output(offset, mask, out_hw)
            else:  # a cleaner alternative: resample the offsets to the output grid
                offset = F.interpolate(offset, size=out_hw, mode="bilinear", align_corners=False)
                mask = F.interpolate(mask, size=out_hw, mode="bilinear", align_corners=False)
            y = modulated_deform_conv2d(x, offset, mask, self.conv.weight, self.conv.bias, self.stride, 1, self.impl)
        return self.bn(y)


class DyReLU(nn.Module):
    """Task-aware dynamic ReLU (K=2 with bias): y = max(a1 x + b1, a2 x + b2), coefficients from a pooled MLP."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = hard_sigmoid(self.fc(x.mean(dim=(2, 3)))).view(x.shape[0], 4 * self.channels, 1, 1)
        a1, b1, a2, b2 = torch.split(coeffs, self.channels, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0   # lambda_a = 2, init_a = (1, 0), init_b = (0, 0) as official
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class DyConv(nn.Module):
    """One DyHead block over all FPN levels: list of [B, C, H_l, W_l] -> same shapes."""

    def __init__(self, channels: int, groups: int, use_deform: bool = True, use_dyrelu: bool = True,
                 use_dyfuse: bool = True, reuse_offsets: bool = True, deform_impl: str = "torchvision"):
        super().__init__()
        # index 0: applied to the coarser level l+1, 1: to level l, 2: to the finer level l-1 with stride 2
        self.DyConv = nn.ModuleList([DeformConvNorm(channels, channels, stride, groups, reuse_offsets, deform_impl)
                                     for stride in (1, 1, 2)])
        self.AttnConv = None
        if use_dyfuse:
            self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU(inplace=True))
            nn.init.normal_(self.AttnConv[1].weight, 0, 0.01)
            nn.init.zeros_(self.AttnConv[1].bias)
        self.relu = DyReLU(channels) if use_dyrelu else nn.ReLU()
        self.offset = nn.Conv2d(channels, 27, 3, padding=1) if use_deform else None

    def offsets_for(self, feature: torch.Tensor):
        """(offset [B, 18, H, W] as (dy, dx) pairs, mask [B, 9, H, W] in (0, 1)) predicted from one level."""
        if self.offset is None:
            return None, None
        offset_mask = self.offset(feature)
        return offset_mask[:, :18], offset_mask[:, 18:].sigmoid()

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for l, feature in enumerate(levels):
            offset, mask = self.offsets_for(feature)
            parts = [self.DyConv[1](feature, offset, mask)]
            if l > 0:
                parts.append(self.DyConv[2](levels[l - 1], offset, mask))
            if l < len(levels) - 1:
                coarser = self.DyConv[0](levels[l + 1], offset, mask)  # offsets of level l on level l+1: quirk
                parts.append(F.interpolate(coarser, size=feature.shape[-2:], mode="bilinear", align_corners=True))
            stacked = torch.stack(parts)
            if self.AttnConv is not None:
                weights = hard_sigmoid(torch.stack([self.AttnConv(p) for p in parts]))
                stacked = stacked * weights
            outputs.append(stacked.mean(dim=0))
        return [self.relu(x) for x in outputs]
