"""The fusion block against the paper's equations computed element by element, and the DyConv offset quirk."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from glip.dyconv import DyConv, fit_offsets_to_output
from glip.fusion import BiAttentionBlock


def loop_fusion(block: BiAttentionBlock, v: torch.Tensor, l: torch.Tensor, mask: torch.Tensor):
    """Paper eq. 3-4 (GLIP's X-MHA) with Python loops: one batch element, every head, token and region."""
    att = block.attn
    v = F.layer_norm(v, v.shape[-1:], block.layer_norm_v.weight, block.layer_norm_v.bias)
    l = F.layer_norm(l, l.shape[-1:], block.layer_norm_l.weight, block.layer_norm_l.bias)
    q, k = att.v_proj(v), att.l_proj(l)
    val_v, val_l = att.values_v_proj(v), att.values_l_proj(l)
    n, t, d = v.shape[0], l.shape[0], att.head_dim
    out_v = torch.zeros(n, att.embed_dim)
    out_l = torch.zeros(t, att.embed_dim)
    valid = [j for j in range(t) if mask[j] > 0]
    for h in range(att.num_heads):
        sl = slice(h * d, (h + 1) * d)
        a = [[float(q[i, sl] @ k[j, sl]) / math.sqrt(d) for j in range(t)] for i in range(n)]
        for i in range(n):   # image region i attends to the real words
            z = sum(math.exp(a[i][j]) for j in valid)
            for j in valid:
                out_v[i, sl] += math.exp(a[i][j]) / z * val_l[j, sl]
        for j in range(t):   # word j attends to all regions
            z = sum(math.exp(a[i][j]) for i in range(n))
            for i in range(n):
                out_l[j, sl] += math.exp(a[i][j]) / z * val_v[i, sl]
    delta_v, delta_l = att.out_v_proj(out_v), att.out_l_proj(out_l)
    return v + block.gamma_v * delta_v, l + block.gamma_l * delta_l


def test_bi_attention_matches_loop_computation():
    torch.manual_seed(0)
    block = BiAttentionBlock(v_dim=8, l_dim=6, embed_dim=16, num_heads=4, dropout=0.1, init_values=0.5).eval()
    with torch.no_grad():
        block.gamma_v.uniform_(0.5, 1.5)
        block.gamma_l.uniform_(0.5, 1.5)
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    v = torch.randn(2, 7, 8)
    l = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got_v, got_l = block(v, l, mask)
        for b in range(2):
            want_v, want_l = loop_fusion(block, v[b], l[b], mask[b])
            torch.testing.assert_close(got_v[b], want_v, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_l[b], want_l, atol=1e-5, rtol=1e-5)


def test_forward_levels_splits_back_into_fpn_shapes():
    torch.manual_seed(0)
    block = BiAttentionBlock(8, 6, 16, 2, 0.0, 1.0).eval()
    levels = [torch.randn(1, 8, 4, 6), torch.randn(1, 8, 2, 3)]
    l = torch.randn(1, 3, 6)
    with torch.no_grad():
        out, _ = block.forward_levels(levels, l, torch.ones(1, 3))
        flat_v, _ = block(torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1), l, torch.ones(1, 3))
    assert [o.shape for o in out] == [x.shape for x in levels]
    torch.testing.assert_close(out[1].flatten(2).transpose(1, 2), flat_v[:, 24:])


def test_offset_quirk_reads_the_flattened_prefix():
    offset = torch.arange(2 * 18 * 4 * 4, dtype=torch.float).reshape(2, 18, 4, 4)
    mask = torch.arange(2 * 9 * 4 * 4, dtype=torch.float).reshape(2, 9, 4, 4)
    o, m = fit_offsets_to_output(offset, mask, (2, 2))
    assert o.shape == (2, 18, 2, 2) and m.shape == (2, 9, 2, 2)
    assert torch.equal(o[1].flatten(), offset[1].flatten()[: 18 * 4])   # per image: its own buffer's prefix
    assert torch.equal(m[0].flatten(), mask[0].flatten()[: 9 * 4])
    same = fit_offsets_to_output(offset, mask, (4, 4))
    assert same[0] is offset and same[1] is mask


def test_dyconv_applies_level_offsets_to_the_next_level():
    torch.manual_seed(0)
    block = DyConv(channels=8, groups=2).eval()
    with torch.no_grad():
        block.offset.weight.normal_(0, 0.3)
        levels = [torch.randn(1, 8, 6, 6), torch.randn(1, 8, 3, 3)]
        offset, mask = block.offsets_for(levels[0])
        conv = block.DyConv[0]
        o, m = offset.reshape(1, -1)[:, : 18 * 9].reshape(1, 18, 3, 3), mask.reshape(1, -1)[:, :81].reshape(1, 9, 3, 3)
        want = conv.bn(deform_conv2d(levels[1], o, conv.conv.weight, conv.conv.bias, padding=1, mask=m))
        assert torch.allclose(conv(levels[1], offset, mask), want)
        quirky = block(levels)
        block.DyConv[0].reuse_offsets = False
        resampled = block(levels)
    assert quirky[1].shape == resampled[1].shape == (1, 8, 3, 3)
    assert not torch.allclose(quirky[0], resampled[0])   # level 0 reads level 1 through the quirk


def test_grid_sample_deform_conv_equals_torchvision_with_gradients():
    from glip.deform import modulated_deform_conv2d

    torch.manual_seed(0)
    for h, w, stride in [(7, 9, 1), (8, 8, 2), (1, 1, 1), (3, 5, 2)]:
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        inputs = [torch.randn(2, 6, h, w, dtype=torch.float64),
                  torch.randn(2, 18, ho, wo, dtype=torch.float64) * 2,   # offsets reaching outside the map
                  torch.rand(2, 9, ho, wo, dtype=torch.float64),
                  torch.randn(5, 6, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
        inputs = [t.requires_grad_() for t in inputs]
        x, offset, mask, weight, bias = inputs
        ref = modulated_deform_conv2d(x, offset, mask, weight, bias, stride, 1, "torchvision")
        ours = modulated_deform_conv2d(x, offset, mask, weight, bias, stride, 1, "grid_sample")
        torch.testing.assert_close(ours, ref)
        for g_ours, g_ref in zip(torch.autograd.grad(ours.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
            torch.testing.assert_close(g_ours, g_ref)
