"""Image encoder: a body (Swin via torchvision blocks, or a small ResNet) giving C3-C5, then an FPN giving P3..

``ImageBackbone(cfg)(images [B, 3, H, W]) -> list of [B, fpn_channels, H/s, W/s]`` for strides 8, 16, 32 (, 64, 128).
Module names follow the official checkpoint (``backbone.body.*``, ``backbone.fpn.fpn_inner2`` ...), see
``glip.official_keys`` for the few renames (torchvision's Swin MLP is ``mlp.0``/``mlp.3`` where the official
has ``mlp.fc1``/``mlp.fc2``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock

from glip.config import GLIPConfig
from glip.swin_attention import OfficialShiftedWindowAttention


class PatchEmbed(nn.Module):
    """4x4 patchify conv + LayerNorm: [B, 3, H, W] -> [B, H/4, W/4, C] (channels last)."""

    def __init__(self, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = (-x.shape[-2]) % self.patch_size
        pad_w = (-x.shape[-1]) % self.patch_size
        if pad_h or pad_w:  # official pads to a multiple of the patch size
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """``depth`` Swin blocks (alternating shifted windows), then an optional patch merging (official layout)."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, drop_path: list[float], downsample: bool):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, heads, window_size=[window, window],
                                 shift_size=[0 if i % 2 == 0 else window // 2] * 2,
                                 stochastic_depth_prob=drop_path[i], norm_layer=norm,
                                 attn_layer=OfficialShiftedWindowAttention)  # official shift on thin maps too
            for i in range(depth))
        self.downsample = PatchMerging(dim, norm_layer=norm) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, H, W, C] -> (stage output [B, H, W, C], input of the next stage [B, H/2, W/2, 2C])."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinBody(nn.Module):
    """Swin Transformer returning the LayerNorm-ed outputs of stages 2-4 (official out_features stage3-5)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        dim = cfg.swin_embed_dim
        depths = cfg.swin_depths
        total = sum(depths)
        rates = [cfg.swin_drop_path * i / max(total - 1, 1) for i in range(total)]
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.layers.append(SwinStage(dim * 2 ** i, depth, cfg.swin_num_heads[i], cfg.swin_window_size,
                                         rates[start:start + depth], downsample=i < len(depths) - 1))
            start += depth
        self.out_channels = [dim * 2 ** i for i in range(1, len(depths))]
        for i, channels in enumerate(self.out_channels, start=1):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.layers):
            y, x = stage(x)
            if i >= 1:
                outs.append(getattr(self, f"norm{i}")(y).permute(0, 3, 1, 2).contiguous())
        return outs


class ResNetBody(nn.Module):
    """A small GroupNorm ResNet (torchvision BasicBlocks): C3, C4, C5 at strides 8, 16, 32."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        widths, blocks, groups = cfg.resnet_widths, cfg.resnet_blocks, cfg.resnet_groups
        norm = partial(nn.GroupNorm, groups)
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False), norm(widths[0]),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layers = nn.ModuleList()
        in_ch = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(count):
                down = None
                if j == 0 and (stride != 1 or in_ch != width):
                    down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), norm(width))
                layer.append(BasicBlock(in_ch, width, stride if j == 0 else 1, down, norm_layer=norm))
                in_ch = width
            self.layers.append(nn.Sequential(*layer))
        self.out_channels = list(widths[1:])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(images)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i >= 1:
                outs.append(x)
        return outs


class LastLevels(nn.Module):
    """Extra FPN levels from the P5 output: p6 = conv3x3/2(P5), p7 = conv3x3/2(relu(p6)) (official LastLevelP6P7)."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.count = count
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        if count > 1:
            self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for conv in self.children():
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))] if self.count > 1 else [p6]


class FPN(nn.Module):
    """Top-down FPN over C3-C5 (names fpn_inner2..4 / fpn_layer2..4 as official), nearest upsampling to size."""

    def __init__(self, in_channels: list[int], channels: int, extra_levels: int):
        super().__init__()
        self.names = [str(i) for i in range(2, 2 + len(in_channels))]
        for name, c_in in zip(self.names, in_channels):
            inner = nn.Conv2d(c_in, channels, 1)
            layer = nn.Conv2d(channels, channels, 3, padding=1)
            for conv in (inner, layer):  # official conv_with_kaiming_uniform
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.constant_(conv.bias, 0)
            self.add_module(f"fpn_inner{name}", inner)
            self.add_module(f"fpn_layer{name}", layer)
        self.top_blocks = LastLevels(channels, extra_levels) if extra_levels else None

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        last = getattr(self, f"fpn_inner{self.names[-1]}")(feats[-1])
        results = [getattr(self, f"fpn_layer{self.names[-1]}")(last)]
        for feat, name in zip(feats[:-1][::-1], self.names[:-1][::-1]):
            lateral = getattr(self, f"fpn_inner{name}")(feat)
            top_down = last if lateral.shape[-2:] == last.shape[-2:] else \
                F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            results.insert(0, getattr(self, f"fpn_layer{name}")(last))
        if self.top_blocks is not None:
            results.extend(self.top_blocks(results[-1]))
        return results


class ImageBackbone(nn.Module):
    """``body`` + ``fpn``: normalized padded images [B, 3, H, W] -> FPN levels, finest first."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        if cfg.backbone == "swin":
            self.body = SwinBody(cfg)
        elif cfg.backbone == "resnet":
            self.body = ResNetBody(cfg)
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}")
        self.fpn = FPN(self.body.out_channels, cfg.fpn_channels, cfg.fpn_extra_levels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.body(images))
