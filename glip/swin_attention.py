"""Swin window attention that shifts exactly as the official (detection) Swin does, on any feature size.

torchvision's ``shifted_window_attention`` drops the cyclic shift along an axis whose padded size is not larger
than the window ("no need to shift"). The official Swin of GLIP (Swin-Transformer-Object-Detection) always shifts
in the odd blocks and masks the wrapped-around regions. The two agree whenever the padded feature map is larger
than the window on both axes, which is every stage of a GLIP-T/GLIP-L input of normal proportions; they differ on
thin maps, e.g. stage 4 of glip-l (window 12) for a panorama wider than ~3.5:1 at 800 px. With official weights
only the official behaviour reproduces the official features, so ``OfficialShiftedWindowAttention`` takes over
exactly in those cases and leaves torchvision's kernel in charge otherwise.

Shapes: feature maps ``[B, H, W, C]`` channels-last, windows of ``wh x ww`` tokens, ``N = wh * ww``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention

MASKED = -100.0   # the additive mask both implementations use between tokens of different regions


def _bands(size: int, window: int, shift: int, device) -> torch.Tensor:
    """Region index (0, 1, 2) of each position along one padded axis after the cyclic shift: the official
    slices [0, size - window), [size - window, size - shift), [size - shift, size)."""
    pos = torch.arange(size, device=device)
    return (pos >= size - window).long() + (pos >= size - shift).long()


def _partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, Hp, Wp, C] -> [B * nW, wh * ww, C], windows in row-major order."""
    b, hp, wp, c = x.shape
    wh, ww = window
    x = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _merge(windows: torch.Tensor, batch: int, hp: int, wp: int, window: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``_partition``: [B * nW, wh * ww, C] -> [B, Hp, Wp, C]."""
    wh, ww = window
    c = windows.shape[-1]
    x = windows.view(batch, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, c)


def shift_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], device=None) -> torch.Tensor:
    """Additive attention mask [nW, N, N] for shifted windows: 0 within a region, ``MASKED`` across regions."""
    region = _bands(hp, window[0], shift[0], device)[:, None] * 3 + _bands(wp, window[1], shift[1], device)[None, :]
    labels = _partition(region[None, :, :, None].float(), window)[..., 0]          # [nW, N]
    different = labels[:, None, :] != labels[:, :, None]
    return torch.where(different, MASKED, 0.0)


def official_window_attention(x: torch.Tensor, attn: ShiftedWindowAttention) -> torch.Tensor:
    """Window multi-head self-attention of ``attn``'s weights on ``x`` [B, H, W, C], shifting by
    ``attn.shift_size`` whatever the feature size (official). Returns [B, H, W, C]."""
    b, h, w, c = x.shape
    window = tuple(attn.window_size)
    shift = tuple(attn.shift_size)
    heads = attn.num_heads
    x = F.pad(x, (0, 0, 0, (-w) % window[1], 0, (-h) % window[0]))
    hp, wp = x.shape[1], x.shape[2]
    shifted = any(shift)
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = _partition(x, window)                                                # [B*nW, N, C]
    n = windows.shape[1]
    qkv = F.linear(windows, attn.qkv.weight, attn.qkv.bias).view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                               # [B*nW, heads, N, C/heads]
    scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + attn.get_relative_position_bias()
    if shifted:
        mask = shift_mask(hp, wp, window, shift, x.device).to(scores.dtype)       # [nW, N, N]
        scores = (scores.view(b, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    probs = F.dropout(scores.softmax(dim=-1), p=attn.attention_dropout, training=attn.training)
    out = (probs @ v).transpose(1, 2).reshape(-1, n, c)
    out = F.dropout(F.linear(out, attn.proj.weight, attn.proj.bias), p=attn.dropout, training=attn.training)
    out = _merge(out, b, hp, wp, window)
    if shifted:
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    return out[:, :h, :w].contiguous()


class OfficialShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (same parameters and state-dict keys) with the official shift
    rule: on a feature map whose padded size does not exceed the window along an axis, it still shifts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        wh, ww = self.window_size
        padded_h, padded_w = -(-h // wh) * wh, -(-w // ww) * ww
        if not any(self.shift_size) or (padded_h > wh and padded_w > ww):
            return super().forward(x)   # torchvision keeps the shift here: identical to the official
        return official_window_attention(x, self)
