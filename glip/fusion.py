"""Cross-modality deep fusion (paper eq. 3-4): bidirectional image<->text multi-head attention with layer scale,
and the BERT layer that follows it on the text side.

Shapes: visual tokens ``v [B, N, Cv]`` (all FPN levels flattened and concatenated), text tokens ``l [B, T, Cl]``,
text mask ``[B, T]`` (1 = real token). Names match the official ``b_attn`` / BERT layer keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: fp16-safe bound used by the official clamps (half has a max of 65504)
CLAMP = 50000.0


def _clamp(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.clamp(min=-CLAMP, max=CLAMP) if enabled else x


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention sharing one affinity matrix A = (Wq v)(Wk l)^T / sqrt(d).

    Image queries read the text (softmax over tokens, padding masked); text queries read the image (softmax of
    A^T over visual tokens, after the official per-row max subtraction). Returns (delta_v [B, N, Cv],
    delta_l [B, T, Cl]).
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1,
                 clamp: bool = True, stable_softmax_2d: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout, self.clamp, self.stable_softmax_2d = dropout, clamp, stable_softmax_2d
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, E] -> [B, H, S, E/H]"""
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, S, E/H] -> [B, S, E]"""
        b, _, s, _ = x.shape
        return x.transpose(1, 2).reshape(b, s, self.embed_dim)

    def forward(self, v: torch.Tensor, l: torch.Tensor, mask_l: torch.Tensor | None = None):
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(l))
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(l))

        attn = q @ k.transpose(-1, -2)                       # [B, H, N, T]
        if self.stable_softmax_2d:
            attn = attn - attn.max()
        attn = _clamp(attn, self.clamp)

        attn_t = attn.transpose(-1, -2)                      # [B, H, T, N]: text queries over visual tokens
        attn_t = attn_t - attn_t.max(dim=-1, keepdim=True).values
        attn_l = _clamp(attn_t, self.clamp).softmax(dim=-1)

        if mask_l is not None:                               # image queries never read padding tokens
            attn = attn + (1.0 - mask_l[:, None, None, :].to(attn.dtype)) * -9e15
        attn_v = attn.softmax(dim=-1)

        attn_v = F.dropout(attn_v, p=self.dropout, training=self.training)
        attn_l = F.dropout(attn_l, p=self.dropout, training=self.training)
        out_v = self.out_v_proj(self._merge(attn_v @ value_l))
        out_l = self.out_l_proj(self._merge(attn_l @ value_v))
        return out_v, out_l


class BiAttentionBlock(nn.Module):
    """Pre-LayerNorm bi-attention with layer scale: v' = LN(v) + gamma_v * dv, l' = LN(l) + gamma_l * dl.

    (Official: the residual adds to the *normalized* inputs.) Official key prefix ``dyhead_tower.{3i}.b_attn``.
    ``norm_visual=False`` (a small-data variant, ``GLIPConfig.fusion_norm_visual``) leaves ``v`` unnormalized.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float,
                 init_values: float, clamp: bool = True, stable_softmax_2d: bool = False, norm_visual: bool = True):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim) if norm_visual else nn.Identity()
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout, clamp, stable_softmax_2d)
        self.gamma_v = nn.Parameter(init_values * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(init_values * torch.ones(l_dim))

    def forward(self, v: torch.Tensor, l: torch.Tensor, mask_l: torch.Tensor | None = None):
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, mask_l)
        return v + self.gamma_v * delta_v, l + self.gamma_l * delta_l

    def forward_levels(self, levels: list[torch.Tensor], l: torch.Tensor, mask_l: torch.Tensor | None):
        """Fuse all FPN levels at once: levels [B, C, H_i, W_i] -> same shapes, and l [B, T, Cl]."""
        shapes = [lvl.shape[-2:] for lvl in levels]
        v = torch.cat([lvl.flatten(2).transpose(1, 2) for lvl in levels], dim=1)
        v, l = self(v, l, mask_l)
        v = v.transpose(1, 2)
        out, start = [], 0
        for h, w in shapes:
            out.append(v[:, :, start:start + h * w].reshape(v.shape[0], -1, h, w))
            start += h * w
        return out, l


# ---------------------------------------------------------------------------------------------- text side
class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, clamp: bool):
        super().__init__()
        self.heads, self.head_dim, self.clamp, self.dropout = heads, hidden // heads, clamp, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = _clamp(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), self.clamp)
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        probs = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        return (probs @ v).transpose(1, 2).reshape(b, t, c)


class _DenseNorm(nn.Module):
    """dense -> dropout -> (clamp) -> LayerNorm(+ residual) -> (clamp): BERT's SelfOutput / Output."""

    def __init__(self, d_in: int, d_out: int, dropout: float, eps: float, clamp: bool):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout, self.clamp = nn.Dropout(dropout), clamp

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = _clamp(self.dropout(self.dense(x)), self.clamp)
        return _clamp(self.LayerNorm(x + residual), self.clamp)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, eps: float, clamp_attn: bool):
        super().__init__()
        self.self = _SelfAttention(hidden, heads, dropout, clamp_attn)
        self.output = _DenseNorm(hidden, hidden, dropout, eps, clamp=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _clamp(F.gelu(_clamp(self.dense(x), True)), True)


class FusionBertLayer(nn.Module):
    """One BERT encoder layer on the fused text features, with the official fp16 clamps (the official
    BertIntermediate/BertOutput clamp always; attention scores when ``clamp_attention``). Keys as HF's BertLayer."""

    def __init__(self, text_config: dict, clamp_attention: bool = True):
        super().__init__()
        hidden = text_config["hidden_size"]
        dropout = text_config.get("hidden_dropout_prob", 0.1)
        eps = text_config.get("layer_norm_eps", 1e-12)
        self.attention = _Attention(hidden, text_config["num_attention_heads"],
                                    text_config.get("attention_probs_dropout_prob", 0.1), eps, clamp_attention)
        self.attention.output.dropout = nn.Dropout(dropout)
        self.intermediate = _Intermediate(hidden, text_config["intermediate_size"])
        self.output = _DenseNorm(text_config["intermediate_size"], hidden, dropout, eps, clamp=True)
        self._init_weights(text_config.get("initializer_range", 0.02))

    def _init_weights(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(x, mask)
        return self.output(self.intermediate(attended), attended)
