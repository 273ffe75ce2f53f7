"""Swin window attention with the official shift rule (glip.swin_attention) against torchvision and against a
direct per-token computation of the official semantics."""
from __future__ import annotations

import torch
from torchvision.models.swin_transformer import ShiftedWindowAttention, shifted_window_attention

from glip.swin_attention import OfficialShiftedWindowAttention, official_window_attention


def _attention(window=7, shift=3, dim=24, heads=3, seed=0) -> OfficialShiftedWindowAttention:
    torch.manual_seed(seed)
    attn = OfficialShiftedWindowAttention(dim, [window, window], [shift, shift], heads).eval()
    with torch.no_grad():   # a non-trivial relative position bias (torchvision initialises it tiny)
        attn.relative_position_bias_table.normal_(0, 1.0)
    return attn


def _torchvision(x, attn: ShiftedWindowAttention):
    return shifted_window_attention(x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(),
                                    attn.window_size, attn.num_heads, attn.shift_size, qkv_bias=attn.qkv.bias,
                                    proj_bias=attn.proj.bias, training=False)


def _official_by_token(x: torch.Tensor, attn: ShiftedWindowAttention) -> torch.Tensor:
    """The official block's attention, token by token: pad to whole windows, roll by -shift, each token attends
    to the tokens of its window that lie in the same region of the official mask slices, with the relative
    position bias of their offset; roll back, crop."""
    b, h, w, c = x.shape
    win, s = attn.window_size[0], attn.shift_size[0]
    heads, hd = attn.num_heads, c // attn.num_heads
    hp, wp = -(-h // win) * win, -(-w // win) * win
    grid = torch.zeros(b, hp, wp, c)
    grid[:, :h, :w] = x
    grid = torch.roll(grid, shifts=(-s, -s), dims=(1, 2)) if s else grid

    def region(p, size):
        if not s:
            return 0
        return 0 if p < size - win else (1 if p < size - s else 2)

    tokens = grid.reshape(b, hp * wp, c)
    qkv = torch.nn.functional.linear(tokens, attn.qkv.weight, attn.qkv.bias).view(b, hp * wp, 3, heads, hd)
    out = torch.zeros(b, hp * wp, heads, hd)
    table = attn.relative_position_bias_table
    coords = [(i, j) for i in range(hp) for j in range(wp)]
    for qi, (i, j) in enumerate(coords):
        keys = [ki for ki, (a, bb) in enumerate(coords)
                if a // win == i // win and bb // win == j // win
                and (region(a, hp), region(bb, wp)) == (region(i, hp), region(j, wp))]
        bias = torch.stack([table[((i % win) - (coords[k][0] % win) + win - 1) * (2 * win - 1)
                                  + (j % win) - (coords[k][1] % win) + win - 1] for k in keys])   # [K, heads]
        q = qkv[:, qi, 0] * hd ** -0.5                                      # [B, heads, hd]
        k = qkv[:, keys, 1]                                                 # [B, K, heads, hd]
        v = qkv[:, keys, 2]
        scores = torch.einsum("bhd,bkhd->bhk", q, k) + bias.T[None]
        out[:, qi] = torch.einsum("bhk,bkhd->bhd", scores.softmax(-1), v)
    out = torch.nn.functional.linear(out.reshape(b, hp, wp, c), attn.proj.weight, attn.proj.bias)
    out = torch.roll(out, shifts=(s, s), dims=(1, 2)) if s else out
    return out[:, :h, :w]


def test_same_as_torchvision_where_torchvision_shifts():
    attn = _attention()
    x = torch.randn(2, 10, 12, 24)     # padded 14 x 14 > window 7: torchvision keeps the shift
    with torch.no_grad():
        reference = _torchvision(x, attn)
        assert torch.allclose(_official_by_token(x, attn), reference, atol=1e-5)   # the by-token reference is right
        assert torch.allclose(official_window_attention(x, attn), reference, atol=1e-5)
        assert torch.equal(attn(x), reference)                       # delegated to torchvision's kernel


def test_thin_maps_shift_as_the_official_swin():
    attn = _attention()
    x = torch.randn(1, 5, 17, 24)      # padded height 7 = window: torchvision drops the shift, the official does not
    with torch.no_grad():
        ours = attn(x)
        official = _official_by_token(x, attn)
        torchvision = _torchvision(x, attn)
    assert torch.allclose(ours, official, atol=1e-5)
    assert not torch.allclose(torchvision, official, atol=1e-3)


def test_unshifted_blocks_untouched():
    attn = _attention(shift=0)
    x = torch.randn(1, 5, 6, 24)
    with torch.no_grad():
        assert torch.equal(attn(x), _torchvision(x, attn))
        assert torch.allclose(_official_by_token(x, attn), attn(x), atol=1e-5)
