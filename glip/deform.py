"""Modulated deformable 3x3 convolution (DCNv2), two implementations of the same function.

- ``"torchvision"``: ``torchvision.ops.deform_conv2d`` (the reference; its CPU backward is slow).
- ``"grid_sample"``: bilinear sampling of the K kernel points with ``F.grid_sample`` (zeros outside the image,
  which is torchvision's corner rule), times the mask, then one matmul with the weights. Same numbers to float
  noise (tested), several times faster to train on CPU, more memory: [B, C*K, H_out, W_out] is materialised.

Layouts as torchvision: ``offset`` [B, 2K, H_out, W_out] holding (dy, dx) pairs per kernel point (row-major over
the kernel), ``mask`` [B, K, H_out, W_out], ``weight`` [O, C, kh, kw].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d


def modulated_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, stride: int = 1, padding: int = 1,
                            impl: str = "torchvision") -> torch.Tensor:
    if impl == "torchvision":
        if x.dtype in (torch.float32, torch.float64) and offset.dtype == mask.dtype == weight.dtype == x.dtype:
            return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, mask=mask)
        # mixed precision: torchvision's autocast rule (run in float32) on every device; its CPU kernel has none
        with torch.autocast(device_type=x.device.type, enabled=False):
            return deform_conv2d(x.float(), offset.float(), weight.float(), None if bias is None else bias.float(),
                                 stride=stride, padding=padding, mask=mask.float())
    if impl == "grid_sample":
        return _deform_conv2d_grid_sample(x, offset, mask, weight, bias, stride, padding)
    raise ValueError(f"unknown deformable conv implementation {impl!r}")


def _deform_conv2d_grid_sample(x, offset, mask, weight, bias, stride, padding):
    b, c, h, w = x.shape
    out_ch, _, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[-2:]
    dtype, device = x.dtype, x.device
    ky, kx = torch.meshgrid(torch.arange(kh, device=device, dtype=dtype),
                            torch.arange(kw, device=device, dtype=dtype), indexing="ij")
    base_y = (torch.arange(ho, device=device, dtype=dtype) * stride - padding)[None, None, :, None]
    base_x = (torch.arange(wo, device=device, dtype=dtype) * stride - padding)[None, None, None, :]
    offset = offset.view(b, k, 2, ho, wo)
    y = base_y + ky.reshape(1, k, 1, 1) + offset[:, :, 0]                  # [B, K, Ho, Wo] pixel rows
    xx = base_x + kx.reshape(1, k, 1, 1) + offset[:, :, 1]
    # pixel -> normalized coordinates for align_corners=False (valid for maps of any size, 1 included)
    grid = torch.stack([(2 * xx + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1).view(b, k * ho, wo, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(b, c, k, ho, wo) * mask.view(b, 1, k, ho, wo)
    out = torch.einsum("bckhw,ock->bohw", sampled, weight.reshape(out_ch, c, k))
    return out if bias is None else out + bias.view(1, -1, 1, 1)
