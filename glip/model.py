"""``GLIP``: image backbone + FPN, BERT text encoder, deep fusion head; losses in training, grounding in inference.

Public API (the other packages call only this):

- ``GLIP.from_preset(name, **overrides)`` ("tiny" | "glip-t" | "glip-l"), ``GLIP.from_pretrained(dir)``,
  ``model.save_pretrained(dir)``, ``model.config`` (``min_size``, ``max_size``, ``max_query_len`` ...).
- ``model(images, captions, targets)`` -> dict of scalar losses ``loss`` (total), ``loss_cls``, ``loss_box``,
  ``loss_centerness``. ``images``: list of float RGB tensors [3, H, W] in [0, 1] (already resized); ``targets``:
  per image ``{"boxes": FloatTensor[N, 4] xyxy pixels of that tensor, "tokens_positive": per box [[start, end], ...]}``
  and optionally ``"tokens_ignore": [[start, end], ...]``: caption spans whose boxes are unknown (a pseudo-label's
  phrase the teacher found nothing for); their tokens get no classification loss, rather than "absent".
  Without targets it returns the raw ``GLIPOutputs``.
- ``model.prepare_image(pil) -> Tensor[3, h, w]`` (resized per config, RGB [0, 1]).
- ``model.ground(images, captions, phrase_spans, ...)`` -> per image, per phrase, ``[{"bbox": [x, y, w, h],
  "score": s}, ...]`` in ORIGINAL image pixels, best first.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from glip.anchors import BoxCoder, anchors_for_levels
from glip.backbone import ImageBackbone
from glip.config import GLIPConfig
from glip.head import GroundingHead, HeadOutputs
from glip.language import LanguageBackbone, load_tokenizer, resolve_text_config
from glip.losses import grounding_losses, match_image
from glip.positive_map import Tokenized, spans_to_positive_map, tokenize
from glip.postprocess import postprocess_image
from glip.preprocess import batch_images, prepare_image

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
PROMPT_PREFIX = "prompt."


@dataclass
class GLIPOutputs:
    """A forward pass without targets: head outputs, per-level anchors [A_l, 4] (xyxy, padded-input pixels),
    each image's (h, w) before padding, and the tokenized captions."""

    head: HeadOutputs
    anchors: list[torch.Tensor]
    image_sizes: list[tuple[int, int]]
    tokenized: Tokenized
    stats: dict[str, int] = field(default_factory=dict)


class GLIP(nn.Module):
    def __init__(self, config: GLIPConfig, tokenizer=None):
        super().__init__()
        if config.text_config is None:
            config = config.replace(text_config=resolve_text_config(config))
        self.config = config
        self.backbone = ImageBackbone(config)
        self.language_backbone = LanguageBackbone(config.text_config)
        self.head = GroundingHead(config, config.text_config)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        self.box_coder = BoxCoder(plus_one=config.legacy_box_plus_one)
        self.last_batch_stats: dict[str, int] = {}
        self.prompt = None     # a glip.prompt.PromptOffset once ``attach_prompt``: not part of the checkpoint

    # ------------------------------------------------------------------ construction and checkpoints
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GLIP":
        """A preset with random weights, except the text encoder's when ``text_pretrained`` and available offline."""
        config = GLIPConfig.preset(name, **overrides)
        model = cls(config)
        if config.text_pretrained and model.device.type != "meta":
            if not model.language_backbone.load_pretrained_weights(config.text_encoder):
                log.warning("no offline weights for text encoder %r: it stays randomly initialised",
                            config.text_encoder)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "GLIP":
        """Rebuild from ``config.json`` and load ``model.safetensors`` (strict) and the saved tokenizer."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{path} is not a GLIP checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = GLIPConfig.from_json(path / CONFIG_NAME)
        with torch.device("meta"):  # skip random init: every tensor comes from the file
            model = cls(config, tokenizer=load_tokenizer(config, path))
        state = load_file(str(path / WEIGHTS_NAME), device=str(map_location))
        # safetensors' CPU tensors are not 64-byte aligned, and oneDNN/MKL then take other kernels: the
        # same weights computed 1 ulp apart (4.8e-7 in the logits of a demo-t model). Fresh allocations are
        # aligned, so a loaded model computes bit for bit what the saved one did, in every process.
        state = {k: v.clone() if v.device.type == "cpu" else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model._materialize_non_persistent_buffers(map_location)
        return model.eval()

    def _materialize_non_persistent_buffers(self, device) -> None:
        """Buffers not saved in the state dict (HF position ids) are rebuilt on ``device`` after a meta build."""
        for module in self.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    if name in ("position_ids",):
                        value = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
                    elif name == "token_type_ids":
                        value = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                    else:
                        raise RuntimeError(f"buffer {name} of {type(module).__name__} missing from checkpoint")
                    module._buffers[name] = value.to(buf.dtype)

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` (each atomically) into ``path``.

        ``state_dict``: weights to write instead of the live ones (a snapshot taken earlier,
        so a background thread can write while training goes on)."""
        from safetensors.torch import save_file

        from storage.atomic import atomic_path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()
                 if not k.startswith(PROMPT_PREFIX)}   # a prompt is its own artifact (glip.prompt)
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "glip_preset": self.config.name})
        tmp_tok = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=path))
        self.tokenizer.save_pretrained(str(tmp_tok))
        final_tok = path / TOKENIZER_DIR
        if final_tok.exists():
            shutil.rmtree(final_tok)
        os.replace(tmp_tok, final_tok)
        self.config.to_json(path / CONFIG_NAME)  # last: a directory with config.json is complete

    def attach_prompt(self, prompt) -> None:
        """Add ``prompt`` (a ``glip.prompt.PromptOffset``, or None to remove it) to the text features before
        fusion, in training and in ``ground`` alike. ``save_pretrained`` never writes it."""
        if prompt is not None:
            hidden = self.language_backbone.hidden_size
            if prompt.offset.shape[1] != hidden:
                raise ValueError(f"a prompt of width {prompt.offset.shape[1]} for a text encoder of width {hidden}")
            prompt = prompt.to(self.device)
        self.prompt = prompt

    def parameter_groups(self, lr: float, text_lr: float | None = None, weight_decay: float = 1e-4) -> list[dict]:
        """AdamW groups: the text side (``language_backbone`` and the fusion BERT layers) at ``text_lr`` (default
        lr / 10, the official BASE_LR / LANG_LR ratio), everything else at ``lr``; frozen parameters skipped.
        (Measured on tiny: fusion BERT layers at the image lr collapse all tokens to one vector.)"""
        text, rest = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                is_text = name.startswith("language_backbone.") or ".text_layer." in name
                (text if is_text else rest).append(param)
        text_lr = lr / 10 if text_lr is None else text_lr
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": text, "lr": text_lr, "weight_decay": weight_decay}]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ forward
    def prepare_image(self, image) -> torch.Tensor:
        """PIL image -> RGB [3, h, w] in [0, 1], resized to ``config.min_size`` / ``config.max_size``."""
        return prepare_image(image, self.config)

    def encode(self, images: Sequence[torch.Tensor], captions: Sequence[str]) -> GLIPOutputs:
        """Run the network on RGB [0, 1] tensors (any sizes) and their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        device = self.device
        batch, sizes = batch_images([im.to(device) for im in images], self.config)
        tok = tokenize(self.tokenizer, list(captions), self.config.max_query_len, self.config.pad_to_max)
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        text = self.language_backbone(ids, mask)
        if self.prompt is not None:
            text = self.prompt(text)
        levels = self.backbone(batch)
        head = self.head(levels, text, mask)
        anchors = anchors_for_levels([lvl.shape[-2:] for lvl in levels], self.config.anchor_strides,
                                     self.config.anchor_sizes, device=device)
        return GLIPOutputs(head, anchors, sizes, tok)

    def forward(self, images: Sequence[torch.Tensor], captions: Sequence[str],
                targets: Sequence[dict] | None = None):
        outputs = self.encode(images, captions)
        if targets is None:
            return outputs
        return self.compute_losses(outputs, targets)

    def compute_losses(self, outputs: GLIPOutputs, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        cfg, head, tok = self.config, outputs.head, outputs.tokenized
        num_tokens = tok.input_ids.shape[1]
        stats = {"boxes": 0, "boxes_without_tokens": 0, "spans_dropped": 0, "spans_truncated": 0}
        matches = []
        loss_mask = tok.attention_mask.clone()
        for b, target in enumerate(targets):
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=self.device).reshape(-1, 4)
            spans = [[(int(s), int(e)) for s, e in box_spans] for box_spans in target["tokens_positive"]]
            if len(spans) != boxes.shape[0]:
                raise ValueError(f"image {b}: {boxes.shape[0]} boxes but {len(spans)} tokens_positive entries")
            positive = spans_to_positive_map(tok.offsets[b], spans, num_tokens, tok.truncated_at[b])
            has_tokens = positive.map.any(dim=1).to(self.device)
            stats["boxes"] += boxes.shape[0]
            stats["boxes_without_tokens"] += int((~has_tokens).sum())
            stats["spans_dropped"] += positive.dropped_spans
            stats["spans_truncated"] += positive.truncated_spans
            # a box whose phrase was truncated away is left out, not taught as "no object"
            matches.append(match_image(outputs.anchors, boxes[has_tokens], positive.map.to(self.device)[has_tokens],
                                       cfg.atss_topk, cfg.legacy_box_plus_one))
            ignore = [(int(s), int(e)) for s, e in target.get("tokens_ignore", [])]
            if ignore:   # phrases whose boxes are unknown: neither positive nor negative anywhere
                unknown = spans_to_positive_map(tok.offsets[b], [ignore], num_tokens, tok.truncated_at[b]).map[0]
                loss_mask[b] &= ~(unknown & ~positive.map.any(dim=0)).to(loss_mask.dtype)
        self.last_batch_stats = stats
        bsz = len(targets)
        token_logits = torch.cat(head.token_logits, dim=1)
        box_regression = torch.cat([r.permute(0, 2, 3, 1).reshape(bsz, -1, 4) for r in head.box_regression], dim=1)
        centerness = torch.cat([c.reshape(bsz, -1) for c in head.centerness], dim=1)
        return grounding_losses(token_logits, box_regression, centerness, torch.cat(outputs.anchors),
                                loss_mask.to(self.device), matches, self.box_coder,
                                cfg.focal_alpha, cfg.focal_gamma, cfg.reg_loss_weight)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def ground(self, images: Sequence, captions: Sequence[str], phrase_spans: Sequence[Sequence[tuple[int, int]]], *,
               threshold: float | None = None, nms_threshold: float | None = None,
               max_per_phrase: int | None = None,
               image_sizes: Sequence[tuple[int, int]] | None = None,
               autocast_dtype: torch.dtype | None = None) -> list[list[list[dict]]]:
        """Ground each caption's phrases in its image.

        The images are run as ONE batch, zero-padded to the largest (as the official model): an image's boxes
        depend on its neighbours' sizes unless all share one ``padded_shape`` (``labeling.teacher.GLIPTeacher``
        groups them so).

        Args:
            images: PIL images (resized here) or tensors from ``prepare_image`` (then ``image_sizes`` gives each
                original (width, height); without it the tensor size is taken as the original).
            captions: one caption per image.
            phrase_spans: per caption a list of (start, end) character spans, end exclusive.
            threshold: None: the official rule (pre-NMS ``config.score_threshold`` on the phrase score,
                ``config.pre_nms_top_n`` per level, the best ``config.detections_per_image`` of the image).
                A number: exactly every box whose final score sqrt(phrase score x sigmoid(centerness)) is
                >= ``threshold`` after the per-phrase NMS, bounded per phrase only (``config.pre_nms_top_n``
                per level and phrase before NMS, ``max_per_phrase`` or else ``config.detections_per_image``
                per phrase after), so that no phrase of a long caption is starved by another.
            nms_threshold: IoU for the per-phrase NMS (default ``config.nms_threshold``).
            max_per_phrase: keep at most this many boxes per phrase.
            autocast_dtype: run the network under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``);
                post-processing stays float32.
        Returns:
            per image, per phrase, a list of {"bbox": [x, y, w, h] (original pixels), "score": float}, best first.
        """
        cfg = self.config
        tensors, originals = [], []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                tensors.append(image)
                originals.append(tuple(image_sizes[i]) if image_sizes is not None
                                 else (int(image.shape[-1]), int(image.shape[-2])))
            else:
                tensors.append(self.prepare_image(image))
                originals.append(tuple(image.size))
        was_training = self.training
        self.eval()
        try:
            if autocast_dtype is None:
                outputs = self.encode(tensors, captions)
            else:
                with torch.autocast(self.device.type, dtype=autocast_dtype):
                    outputs = self.encode(tensors, captions)
        finally:
            self.train(was_training)
        head, tok = outputs.head, outputs.tokenized
        num_tokens = tok.input_ids.shape[1]
        one = 1.0 if cfg.legacy_box_plus_one else 0.0
        nms = cfg.nms_threshold if nms_threshold is None else nms_threshold
        results = []
        for b, spans in enumerate(phrase_spans):
            phrase_tokens = spans_to_positive_map(tok.offsets[b], [[tuple(s)] for s in spans], num_tokens,
                                                  tok.truncated_at[b]).map.to(self.device)
            det = postprocess_image(
                [t[b].float() for t in head.token_logits],
                [r[b].float().permute(1, 2, 0).reshape(-1, 4) for r in head.box_regression],
                [c[b].float().reshape(-1) for c in head.centerness],
                outputs.anchors, phrase_tokens, outputs.image_sizes[b], self.box_coder, cfg.score_threshold,
                cfg.pre_nms_top_n, nms, cfg.detections_per_image, cfg.legacy_box_plus_one,
                min_score=threshold, max_per_phrase=max_per_phrase)
            h, w = outputs.image_sizes[b]
            orig_w, orig_h = originals[b]
            scale = det.boxes.new_tensor([orig_w / w, orig_h / h, orig_w / w, orig_h / h])
            boxes = (det.boxes * scale).tolist()
            per_phrase: list[list[dict]] = [[] for _ in spans]
            for (x1, y1, x2, y2), score, label in zip(boxes, det.scores.tolist(), det.labels.tolist()):
                if max_per_phrase is not None and len(per_phrase[label]) >= max_per_phrase:
                    continue
                per_phrase[label].append({"bbox": [x1, y1, x2 - x1 + one, y2 - y1 + one], "score": float(score)})
            results.append(per_phrase)
        return results
