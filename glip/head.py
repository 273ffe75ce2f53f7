"""The VL DyHead: deep fusion tower + word-region grounding head (box regression, centerness, token logits).

Official key map (``rpn.head.*`` -> ``head.*``): ``dyhead_tower.{3i}.b_attn`` -> ``dyhead_tower.{i}.b_attn``,
``dyhead_tower.{3i+1}`` (BERT layer) -> ``dyhead_tower.{i}.text_layer``, ``dyhead_tower.{3i+2}`` (DyConv) ->
``dyhead_tower.{i}.image_layer``; bbox_pred, centerness, dot_product_projection_text, log_scale, bias_lang, bias0
and scales keep their names. The legacy fixed-class ``cls_logits`` is not built (unused in grounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glip.config import GLIPConfig
from glip.dyconv import DyConv
from glip.fusion import CLAMP, BiAttentionBlock, FusionBertLayer


@dataclass
class HeadOutputs:
    """Per FPN level l (finest first): ``box_regression[l]`` [B, 4, H_l, W_l] (anchor deltas),
    ``centerness[l]`` [B, 1, H_l, W_l] (logits), ``token_logits[l]`` [B, H_l*W_l, T] (region-token alignment
    logits, row-major locations); ``text_hidden`` [B, T, D] the fused text features."""

    box_regression: list[torch.Tensor]
    centerness: list[torch.Tensor]
    token_logits: list[torch.Tensor]
    text_hidden: torch.Tensor


class Scale(nn.Module):
    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class FusionLayer(nn.Module):
    """One deep-fusion layer: bi-attention (image<->text), then a BERT layer on text and DyConv on the image."""

    def __init__(self, cfg: GLIPConfig, text_config: dict):
        super().__init__()
        self.b_attn = BiAttentionBlock(cfg.fpn_channels, text_config["hidden_size"], cfg.fusion_embed_dim,
                                       cfg.fusion_heads, cfg.fusion_dropout, cfg.layer_scale_init,
                                       clamp=cfg.clamp_fusion, stable_softmax_2d=cfg.stable_softmax_2d,
                                       norm_visual=cfg.fusion_norm_visual)
        self.image_residual = cfg.fusion_image_residual
        self.text_layer = FusionBertLayer(text_config, clamp_attention=cfg.clamp_bert_attention)
        self.image_layer = DyConv(cfg.fpn_channels, cfg.dyhead_groups, cfg.use_deform, cfg.use_dyrelu,
                                  cfg.use_dyfuse, cfg.reuse_offsets_across_levels, cfg.deform_impl)

    def forward(self, levels: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor):
        levels, text = self.b_attn.forward_levels(levels, text, text_mask)
        text = self.text_layer(text, text_mask)
        fused = self.image_layer(levels)
        if self.image_residual:      # small-data variant (GLIPConfig.fusion_image_residual)
            fused = [x + y for x, y in zip(levels, fused)]
        return fused, text


class GroundingHead(nn.Module):
    """Fusion tower, then per level: deltas (scaled per level), centerness, and the dot-product token logits
    S = O P^T / exp(log_scale) + bias, with P = W_t (normalize(text) / 2) + b_t and bias = normalize(text) . bias_lang
    + bias0 (official), clamped to +-50000."""

    def __init__(self, cfg: GLIPConfig, text_config: dict):
        super().__init__()
        channels, lang_dim = cfg.fpn_channels, text_config["hidden_size"]
        self.clamp_dot_product = cfg.clamp_dot_product
        self.dyhead_tower = nn.ModuleList(FusionLayer(cfg, text_config) for _ in range(cfg.num_fusion_layers))
        self.bbox_pred = nn.Conv2d(channels, 4, 1)
        self.centerness = nn.Conv2d(channels, 1, 1)
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.dot_product_projection_image = nn.Identity()
        self.dot_product_projection_text = nn.Linear(lang_dim, channels)
        bias_value = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        self.log_scale = nn.Parameter(torch.tensor([cfg.log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(lang_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(cfg.num_levels))

    def fuse(self, levels: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor):
        for layer in self.dyhead_tower:
            levels, text = layer(levels, text, text_mask)
        return levels, text

    def token_logits(self, feature: torch.Tensor, proj_tokens: torch.Tensor, token_bias: torch.Tensor):
        """feature [B, C, H, W], proj_tokens [B, T, C], token_bias [B, T] -> logits [B, H*W, T]."""
        queries = self.dot_product_projection_image(feature).flatten(2).transpose(1, 2)
        logits = queries @ proj_tokens.transpose(1, 2) / self.log_scale.exp() + token_bias[:, None, :]
        return logits.clamp(min=-CLAMP, max=CLAMP) if self.clamp_dot_product else logits

    def forward(self, levels: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor) -> HeadOutputs:
        levels, text = self.fuse(levels, text, text_mask)
        embedding = F.normalize(text, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(embedding / 2.0)
        token_bias = embedding @ self.bias_lang + self.bias0
        return HeadOutputs(
            box_regression=[scale(self.bbox_pred(x)) for x, scale in zip(levels, self.scales)],
            centerness=[self.centerness(x) for x in levels],
            token_logits=[self.token_logits(x, proj_tokens, token_bias) for x in levels],
            text_hidden=text,
        )
