"""Official GLIP checkpoints (github microsoft/GLIP ``.pth``) -> the state dict of our :class:`glip.GLIP`.

An official file holds ``{"model": {"module.<key>": tensor}, ...}`` (saved DDP-wrapped; ``iteration``,
``optimizer``, ``scheduler`` may sit beside it) or a bare state dict. Its keys follow the official module tree:

- ``backbone.body.*``: the Microsoft Swin layout (``patch_embed``, ``layers.N.blocks.M``, ``layers.N.downsample``
  at the END of stage N, output norms ``norm1..3`` for stages 2-4). Ours keeps that tree but is built from
  torchvision's ``SwinTransformerBlock`` / ``PatchMerging``: the block MLP is ``mlp.0`` / ``mlp.3`` (official
  ``mlp.fc1`` / ``mlp.fc2``) and the relative position index is stored flattened ([W^4] instead of [W^2, W^2]).
- ``backbone.fpn.*``, ``language_backbone.body.model.*`` (a HF ``BertModel``, ours ``language_backbone.model.*``),
  ``rpn.head.*`` (the VL DyHead, ours ``head.*``): the names are mirrored by our modules; only prefixes change,
  except the fusion tower: official ``dyhead_tower.{3i}`` (``b_attn``), ``{3i+1}`` (BERT layer), ``{3i+2}``
  (DyConv) are ours ``dyhead_tower.{i}`` itself, ``dyhead_tower.{i}.text_layer``, ``dyhead_tower.{i}.image_layer``.

Every official key ends in exactly one bucket of the :class:`ConversionReport`: consumed (copied), ignored
(known and deliberately unused, with the reason, e.g. the BERT pooler), or an error (no place for it, or a shape
that does not fit). Every key of our state dict is either filled or named as not filled. ``convert_state_dict``
refuses (``InputError``) on any error unless ``allow_partial``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from storage.errors import InputError

# Swin embed dim of the official backbone -> our preset of the same sizes.
PRESET_BY_EMBED_DIM = {96: "glip-t", 192: "glip-l"}

# Where the official sub-trees live in our model (left: official prefix, right: ours).
# The head of the official model sits under ``rpn.head``; ours is ``head``.
PREFIX_MAP = (
    ("backbone.fpn.", "backbone.fpn."),
    ("language_backbone.body.model.", "language_backbone.model."),
    ("rpn.head.", "head."),
)
SWIN_OFFICIAL_PREFIX = "backbone.body."
SWIN_OUR_PREFIX = "backbone.body."

# Official keys that are known and deliberately not copied. A check may still refuse them (see _check_ignored).
IGNORED = (
    (re.compile(r"^language_backbone\.body\.model\.embeddings\.position_ids$"),
     "BERT position_ids buffer (files from transformers<4.31): a fixed arange that our BERT rebuilds; checked"),
    (re.compile(r"^language_backbone\.body\.model\.pooler\."),
     "BERT pooler: GLIP never uses the pooled output"),
    (re.compile(r"^rpn\.head\.cls_logits\."),
     "legacy fixed-class classifier of the official head, unused in grounding"),
    (re.compile(r"^rpn\.anchor_generator\.cell_anchors\.\d+$"),
     "ATSS cell anchors: one square anchor of 8 x stride per level, recomputed by our head; checked"),
)


@dataclass
class ConversionReport:
    """What happened to every official key and every key of ours.

    ``consumed``: official keys copied (official -> our key). ``ignored``: official keys left out on purpose,
    with the reason. ``unmapped``: official keys with no place in our model (reason). ``mismatched``: official keys
    whose tensor does not fit (reason with both shapes). ``not_filled``: our keys no official tensor filled.
    """

    source: str
    preset: str
    consumed: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, str] = field(default_factory=dict)
    not_filled: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the conversion is complete: nothing unmapped, mismatched or left unfilled."""
        return not (self.unmapped or self.mismatched or self.not_filled)

    def problems(self, limit: int = 5) -> list[str]:
        """Human-readable lines naming the first ``limit`` problems of each kind."""
        lines = []
        for title, items in (("mismatched", self.mismatched), ("unmapped", self.unmapped)):
            for key, why in list(items.items())[:limit]:
                lines.append(f"{title}: {key}: {why}")
            if len(items) > limit:
                lines.append(f"{title}: ... {len(items) - limit} more")
        for key in self.not_filled[:limit]:
            lines.append(f"not filled: {key}")
        if len(self.not_filled) > limit:
            lines.append(f"not filled: ... {len(self.not_filled) - limit} more")
        return lines

    def summary(self) -> str:
        """One line of counts."""
        return (f"{self.source}: preset {self.preset}; {len(self.consumed)} official keys consumed, "
                f"{len(self.ignored)} ignored, {len(self.unmapped)} unmapped, {len(self.mismatched)} mismatched; "
                f"{len(self.not_filled)} of our keys not filled")

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)


# ----------------------------------------------------------------------------------------------- loading

def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DDP ``module.`` prefix, only when every key has it (as the official loader does)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of a loaded official file: ``obj["model"]`` or ``obj`` itself, ``module.`` stripped."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(f"{source}: no state dict found (expected a dict of tensors or one under 'model')")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{source}: the state dict holds no tensors")
    return strip_module_prefix(tensors)


def load_official_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an official ``.pth`` on CPU (memory-mapped when possible) and return its model weights.

    Loads with ``weights_only=True`` (no code runs); a file that needs arbitrary unpickling is refused unless
    ``trust_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the user's file
        hint = "" if trust_pickle else " (if you trust it and it holds pickled objects, use --trust-pickle)"
        raise InputError(f"{path}: cannot read checkpoint: {type(exc).__name__}: {exc}{hint}") from None
    return extract_state_dict(obj, str(path))


def detect_preset(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """``glip-t`` or ``glip-l`` from the Swin patch embedding's width (96 or 192)."""
    key = SWIN_OFFICIAL_PREFIX + "patch_embed.proj.weight"
    if key not in state_dict:
        raise InputError(f"{source}: not an official GLIP Swin checkpoint (no key {key!r})")
    dim = int(state_dict[key].shape[0])
    if dim not in PRESET_BY_EMBED_DIM:
        raise InputError(f"{source}: Swin embed dim {dim} matches no preset (known: {PRESET_BY_EMBED_DIM})")
    return PRESET_BY_EMBED_DIM[dim]


# ----------------------------------------------------------------------------------------------- key mapping

_SWIN_RENAMES = (  # torchvision's SwinTransformerBlock MLP is Sequential(Linear, GELU, Dropout, Linear, Dropout)
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.mlp\.)fc1\."), r"\g<1>0."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.mlp\.)fc2\."), r"\g<1>3."),
)


def _swin_key(rest: str) -> str:
    """Official Swin key (after ``backbone.body.``) -> ours: the same tree (``patch_embed``, ``layers.N.blocks.M``,
    ``layers.N.downsample``, ``norm1..3``) built from torchvision blocks, whose MLP layers are numbered."""
    for pattern, replacement in _SWIN_RENAMES:
        rest = pattern.sub(replacement, rest)
    return rest


_TOWER = re.compile(r"^rpn\.head\.dyhead_tower\.(\d+)\.(.+)$")
# The official tower is one flat Sequential of (VLFuse, BertEncoderLayer, DyConv) per fusion layer; ours groups
# each triple in one FusionLayer. The VLFuse module's only weights sit under ``b_attn`` in both.
_TOWER_PARTS = ("", "text_layer.", "image_layer.")


def _tower_key(index: int, rest: str) -> str:
    """Official ``rpn.head.dyhead_tower.{index}.{rest}`` -> ours."""
    layer, part = divmod(index, 3)
    return f"head.dyhead_tower.{layer}.{_TOWER_PARTS[part]}{rest}"


def official_to_ours(key: str) -> str | None:
    """Our state-dict key for an official key (``module.`` already stripped), or None when it has no place."""
    if key.startswith(SWIN_OFFICIAL_PREFIX):
        return SWIN_OUR_PREFIX + _swin_key(key[len(SWIN_OFFICIAL_PREFIX):])
    m = _TOWER.match(key)
    if m:
        return _tower_key(int(m[1]), m[2])
    for official_prefix, our_prefix in PREFIX_MAP:
        if key.startswith(official_prefix):
            return our_prefix + key[len(official_prefix):]
    return None


def ignore_reason(key: str) -> str | None:
    """Why an official key is deliberately not copied, or None when it should be."""
    for pattern, reason in IGNORED:
        if pattern.match(key):
            return reason
    return None


def _expected_cell_anchor(level: int) -> torch.Tensor:
    """The official ATSS cell anchor of FPN level ``level`` (stride 8 * 2**level; size 8 * stride)."""
    stride = 8 * 2 ** level
    half = 8 * stride / 2 - 0.5   # maskrcnn_benchmark's "+1" box convention: x2 - x1 + 1 = size
    c = (stride - 1) / 2
    return torch.tensor([[c - half, c - half, c + half, c + half]])


def _check_ignored(key: str, tensor: torch.Tensor) -> str | None:
    """Value check for ignored buffers whose content our model recomputes; returns a problem or None."""
    if tensor.device.type == "meta":
        return None
    if key.endswith("embeddings.position_ids"):
        if not torch.equal(tensor.reshape(-1).to(torch.int64), torch.arange(tensor.numel())):
            return "position_ids is not 0..n-1; our BERT assumes absolute positions in order"
    m = re.search(r"cell_anchors\.(\d+)$", key)
    if m:
        expected = _expected_cell_anchor(int(m[1]))
        if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, atol=1e-3):
            return (f"cell anchor {tensor.tolist()} differs from the one square anchor of 8 x stride "
                    f"{expected.tolist()} our head uses")
    return None


def _fit(official_key: str, tensor: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """``tensor`` reshaped/cast to ``target``'s layout, or (None, reason) when it does not fit."""
    if official_key.endswith("relative_position_index") and tensor.dim() == 2 and target.dim() == 1:
        tensor = tensor.reshape(-1)   # official [W*W, W*W]; torchvision keeps it flattened
    if tuple(tensor.shape) != tuple(target.shape):
        return None, f"official shape {list(tensor.shape)}, ours {list(target.shape)}"
    if tensor.dtype.is_floating_point != target.dtype.is_floating_point:
        return None, f"official dtype {tensor.dtype}, ours {target.dtype}"
    return tensor.to(target.dtype), None


def convert_state_dict(official: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor], *,
                       source: str = "checkpoint", preset: str = "?", allow_partial: bool = False,
                       ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an official state dict (``module.`` stripped) onto ``ours`` (our model's ``state_dict()``,
    real or on the meta device: only names, shapes and dtypes are read).

    Returns ``(converted, report)``: ``converted`` holds our keys with official tensors (cast to our dtypes).
    Raises ``InputError`` naming the problems when the report is not ok, unless ``allow_partial``.
    """
    report = ConversionReport(source=source, preset=preset)
    converted: dict[str, torch.Tensor] = {}
    filled_from: dict[str, str] = {}
    for key, tensor in official.items():
        reason = ignore_reason(key)
        if reason is not None:
            problem = _check_ignored(key, tensor)
            if problem:
                report.mismatched[key] = problem
            else:
                report.ignored[key] = reason
            continue
        our_key = official_to_ours(key)
        if our_key is None:
            report.unmapped[key] = "no rule maps this official key onto our model"
            continue
        if our_key not in ours:
            report.unmapped[key] = f"our model has no {our_key!r}"
            continue
        if our_key in filled_from:
            report.unmapped[key] = f"{our_key!r} already filled from {filled_from[our_key]!r}"
            continue
        fitted, problem = _fit(key, tensor, ours[our_key])
        if problem:
            report.mismatched[key] = f"{problem} ({our_key})"
            continue
        if key.endswith("relative_position_index") and not _same_values(fitted, ours[our_key]):
            report.mismatched[key] = f"relative position index differs from ours ({our_key}): another window size?"
            continue
        converted[our_key] = fitted
        filled_from[our_key] = key
        report.consumed[key] = our_key
    report.not_filled = [k for k in ours if k not in converted]
    if not report.ok and not allow_partial:
        raise InputError(f"{source}: cannot convert onto {preset} ({report.summary()}); "
                         + "; ".join(report.problems(3)) + ". Use --allow-partial to keep what fits.")
    return converted, report


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "meta" or b.device.type == "meta":
        return True
    return torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- model level

def load_official(path: str | Path, preset: str = "auto", *, allow_partial: bool = False,
                  trust_pickle: bool = False):
    """Our GLIP for an official checkpoint, filled from it. Returns ``(model, report)``.

    ``preset``: ``glip-t``, ``glip-l`` or ``auto`` (from the Swin width). The mapping is checked first against a
    model built on the meta device (cheap, so a refusal costs no full build). A complete conversion then takes the
    file's tensors as the parameters (no random init at all); with ``allow_partial`` a real model is built and
    what the file does not fill keeps its random init (the report names it).
    """
    from glip.model import GLIP

    official = load_official_state_dict(path, trust_pickle=trust_pickle)
    detected = detect_preset(official, str(path))
    if preset == "auto":
        preset = detected
    elif preset != detected and not allow_partial:
        raise InputError(f"{path}: looks like {detected} (Swin width), not {preset}; "
                         f"use --preset auto or --allow-partial")
    with torch.device("meta"):
        skeleton = GLIP.from_preset(preset)
    converted, report = convert_state_dict(official, skeleton.state_dict(), source=str(path), preset=preset,
                                           allow_partial=allow_partial)
    if report.ok:
        # every key filled: adopt the tensors (cloned: the loaded file may be memory-mapped and read-only)
        skeleton.load_state_dict({k: v.clone() for k, v in converted.items()}, strict=True, assign=True)
        skeleton._materialize_non_persistent_buffers("cpu")
        model = skeleton
    else:
        model = GLIP.from_preset(preset)
        model.load_state_dict(converted, strict=False)
    return model.eval(), report


def load_official_model(path: str | Path, preset: str | None = "auto", *, allow_partial: bool = False,
                        trust_pickle: bool = False) -> torch.nn.Module:
    """Our GLIP filled from an official ``.pth`` (``load_official`` without the report), in eval mode."""
    model, _ = load_official(path, preset or "auto", allow_partial=allow_partial, trust_pickle=trust_pickle)
    return model.eval()


def parameter_count(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of floating-point elements (parameters and float buffers) in a state dict."""
    return sum(math.prod(t.shape) for t in state_dict.values() if t.dtype.is_floating_point)
