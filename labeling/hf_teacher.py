"""Transformers zero-shot detectors as teachers: Grounding DINO, MM Grounding DINO and OWLv2.

``HFGrounder`` gives a transformers model GLIP's call surface (``ground(images, captions,
phrase_spans, ...)``, ``.to``, ``.eval``, ``.config.max_query_len``, ``.tokenizer``), so that
evaluate and predict take it as they take ``glip.GLIP``; ``HFTeacher`` wraps it in the
``labeling.teacher.Teacher`` protocol for pseudo-label. No Ray here.

How a phrase (a character span of its caption) is scored, by family:

- Grounding DINO / MM Grounding DINO (``model_type`` grounding-dino, mm-grounding-dino): the caption
  is the prompt (with " ." appended unless it ends with "." or "?", as the official demo does: the
  model's text attention blocks end at those tokens, and without one the last block's attention
  would change with the batch's padding). Each of the model's queries has a box and a logit per
  token; a phrase's score for a query is the MAX of the sigmoid logits over the phrase's OWN token
  positions, found from the character span through the tokenizer's offset mapping
  (``glip.positive_map.spans_to_positive_map``, the one span-to-token mapper). That is
  transformers' ``post_process_grounded_object_detection`` reduction (max over tokens) restricted
  to the phrase. A caption over ``config.max_text_len`` tokens is split into several prompts
  (``prompt_chunks``: contiguous slices of the caption holding whole phrases, spans re-based), so
  every phrase is grounded. Boxes: normalized cxcywh of the (unpadded) image -> original pixels.
- OWLv2 (``model_type`` owlv2): each phrase's TEXT is its own query (the image side does not depend on
  the text: one image pass serves any number of phrases and prompts, ``ground_prompts``); the score
  of a (box, phrase) pair is the sigmoid of its class logit. The processor pads the image to a
  square (bottom/right) and the boxes are normalized to that square's side, so they are mapped back
  with the side of the padded input and the resize that made it (``owlv2_boxes_to_pixels``).

Selection (both families, ``select_per_phrase``): ``threshold`` a number: every (query, phrase) pair
scoring at least it, per-phrase NMS at ``nms_threshold`` (None: no NMS, DETR-style set prediction),
at most ``max_per_phrase`` per phrase (default ``DETECTIONS_PER_PROMPT``). ``threshold`` None: the
official evaluation rule of Grounding DINO (its COCO post-processor's ``num_select``): the best
``DETECTIONS_PER_PROMPT`` (query, phrase) pairs of each image and prompt, no floor. Boxes are not
clipped here (``labeling.filters`` clips pseudo-labels).

Images: the CPU side resizes to the processor's own size rule (``hf_resize``, a
``labeling.teacher.TeacherResize``) and the processor then only rescales, normalizes and pads (its
resize is skipped for Grounding DINO and is the identity for OWLv2's square). Why: the decode
threads/tasks do the resize while the accelerator runs, as for GLIP, and buffered images are at model
size, not crawl size; the cost is PIL's bilinear resize instead of the processor's torchvision one
(the same output size; pixel values differ by at most about one level of 255, measured on noise). ``ground`` runs one forward pass per input
shape (``input_shape``), so a label never depends on its batch neighbours.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from labeling.teacher import (HF_KIND, PRECISIONS, Detection, PhraseSpans, TeacherIdentity,
                              TeacherResize, as_detections, check_device, check_ground_args, device_errors)
from storage.errors import InputError

GDINO_TYPES = ("grounding-dino", "mm-grounding-dino")
OWL_TYPES = ("owlv2",)
HF_MODEL_TYPES = GDINO_TYPES + OWL_TYPES
# Grounding DINO's COCO evaluation keeps the best 300 (query, category) pairs of an image (num_select).
DETECTIONS_PER_PROMPT = 300
# OWLv2 has no caption limit (each phrase is its own query): a prompt chunk of a long category list
# holds this many tokens, as GLIP's query window, and bounds the text batch.
OWL_PROMPT_TOKENS = 256
# Phrase queries per text-encoder call (OWLv2): bounds memory for LVIS-sized category lists.
OWL_TEXT_BATCH = 256
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?")
# What a hub snapshot is loaded (and hashed) from; other files (READMEs, ONNX, .bin twins) are left out.
_HUB_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors")
_HUB_FALLBACK_WEIGHTS = ("*.bin",)
_OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


# ----------------------------------------------------------------------------- what a path is
def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a Hugging Face hub model (``owner/name`` or ``owner/name@revision``): that form,
    not a URI, not an existing local path, not a checkpoint file name (``x/y.pth``)."""
    text = os.fspath(text)
    if "://" in text or not _HUB_ID.fullmatch(text) or os.path.exists(os.path.expanduser(text)):
        return False
    return not text.split("@", 1)[0].lower().endswith(_OFFICIAL_SUFFIXES)


def split_hub_id(text: str) -> tuple[str, str | None]:
    """``"owner/name@rev"`` -> ``("owner/name", "rev")``; without ``@``: ``(text, None)``."""
    repo, _, revision = text.partition("@")
    return repo, (revision or None)


def hf_model_type(path: str) -> str | None:
    """The supported ``model_type`` in the ``config.json`` of the model folder ``path`` (local or URI), None
    when the folder is not a transformers model (a glipctl checkpoint has no ``model_type``).
    ``InputError`` for a transformers model of an unsupported type."""
    from storage import fs

    config = fs.join(path, "config.json")
    try:
        model_type = fs.read_json(config).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{config}: unreadable config ({exc})") from exc
    if model_type is None:
        return None
    if model_type not in HF_MODEL_TYPES:
        raise InputError(f"{path}: a transformers {model_type!r} model is not a grounding teacher "
                         f"(supported model_type: {', '.join(HF_MODEL_TYPES)})")
    return str(model_type)


def resolve_hub(text: str, revision: str | None = None) -> tuple[str, str]:
    """``(local snapshot folder, commit)`` of the hub model ``text`` (``owner/name[@revision]``), from the
    hub cache or downloaded (only config, processor, tokenizer and safetensors weights; ``.bin`` weights
    when there are none). ``InputError`` when it is neither cached nor reachable."""
    from huggingface_hub import snapshot_download

    repo, rev = split_hub_id(text)
    rev = revision or rev
    try:
        folder = snapshot_download(repo, revision=rev, allow_patterns=list(_HUB_PATTERNS))
        if not any(p.suffix == ".safetensors" for p in Path(folder).iterdir()):
            folder = snapshot_download(repo, revision=rev, allow_patterns=list(_HUB_PATTERNS + _HUB_FALLBACK_WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated: all the user's to fix
        raise InputError(f"{text}: not a local path, and not a model on the Hugging Face hub or in its cache "
                         f"({type(exc).__name__}: {exc})") from None
    return folder, Path(folder).name


def _local_folder(path: str) -> tuple[str, str]:
    """``(folder to read, revision)``: a hub id resolved (``resolve_hub``), anything else as it is."""
    if is_hub_id(path):
        return resolve_hub(path)
    return path, ""


def processor_image_config(path: str) -> dict[str, Any]:
    """The image processor settings of the model folder ``path`` (local or URI): ``preprocessor_config.json``
    (hub checkpoints) or the ``image_processor`` of ``processor_config.json`` (``save_pretrained`` of a
    transformers 5 processor). ``InputError`` when there is neither."""
    from storage import fs

    for name in _PROCESSOR_FILES:
        file = fs.join(path, name)
        if not fs.is_file(file):
            continue
        try:
            data = fs.read_json(file)
        except (OSError, ValueError) as exc:
            raise InputError(f"{file}: unreadable processor config ({exc})") from exc
        if name == "processor_config.json":
            data = data.get("image_processor") or {}
        if data:
            return data
    raise InputError(f"{path}: no image processor config ({' or '.join(_PROCESSOR_FILES)}); save the "
                     f"model together with its processor (processor.save_pretrained)")


def resize_for(model_type: str, image_config: dict[str, Any], image_size: int | None = None) -> TeacherResize:
    """The ``TeacherResize`` matching the processor settings ``image_config`` of a ``model_type`` model.

    Grounding DINO: ``size`` ``{"shortest_edge", "longest_edge"}`` by transformers' rule ("detr");
    ``image_size`` overrides the shorter side, the cap scaled in proportion (800/1333 -> 400/666).
    OWLv2: ``size`` ``{"height", "width"}`` of the padded square: the longer side to it ("longer");
    ``image_size`` overrides the side (the model interpolates its position embeddings).
    """
    size = dict(image_config.get("size") or {})
    if model_type in OWL_TYPES:
        side = int(max(size.get("height", 0), size.get("width", 0)) or size.get("shortest_edge", 0) or 960)
        side = image_size or side
        return TeacherResize(side, side, "longer")
    if not size.get("shortest_edge") or not size.get("longest_edge"):
        raise InputError(f"{model_type} processor size {size}: expected shortest_edge and longest_edge")
    min_size, max_size = int(size["shortest_edge"]), int(size["longest_edge"])
    if image_size is not None:
        max_size = max(image_size, int(round(image_size * max_size / min_size)))
        min_size = image_size
    return TeacherResize(min_size, max_size, "detr")


def hf_resize(path: str, image_size: int | None = None) -> TeacherResize:
    """``resize_for`` the transformers teacher at ``path`` (folder, URI or hub id), read from its configs."""
    if image_size is not None and image_size < 16:
        raise InputError(f"--image-size {image_size}: must be at least 16 pixels")
    folder, _ = _local_folder(path)
    model_type = hf_model_type(folder)
    if model_type is None:
        raise InputError(f"{path}: config.json has no model_type")
    return resize_for(model_type, processor_image_config(folder), image_size)


def check_hf_teacher(path: str) -> str:
    """Refuse (``InputError``) a transformers teacher no worker could load: unsupported ``model_type``, no
    processor config, no tokenizer, no weights. Returns the model type; loads nothing."""
    from storage import fs

    folder, _ = _local_folder(path)
    model_type = hf_model_type(folder)
    if model_type is None:
        raise InputError(f"{path}: config.json has no model_type")
    processor_image_config(folder)
    names = {e.name for e in fs.list_dir(folder)}
    if not names & {"tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json"}:
        raise InputError(f"{path}: no tokenizer files (save the processor beside the model)")
    if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json") for n in names):
        raise InputError(f"{path}: no weights (model.safetensors)")
    return model_type


def hf_identity(path: str) -> TeacherIdentity:
    """The identity of a transformers teacher: its model type, the sha256 of its folder (every file that
    defines it, ``labeling.teacher.checkpoint_sha256``; for a hub id the snapshot's files it is loaded
    from, ``_HUB_PATTERNS``) and, for a hub id, the commit it resolved to."""
    from labeling.teacher import checkpoint_sha256

    folder, revision = _local_folder(path)
    model_type = hf_model_type(folder) or ""
    if revision:
        from fnmatch import fnmatch

        sha = checkpoint_sha256(folder, include=lambda name: any(fnmatch(name.rsplit("/", 1)[-1], p)
                                                                 for p in _HUB_PATTERNS + _HUB_FALLBACK_WEIGHTS))
        path = split_hub_id(path)[0]
    else:
        sha = checkpoint_sha256(folder)
    return TeacherIdentity(path, sha, HF_KIND, model_type, revision)


# ----------------------------------------------------------------------------- prompts
def gdino_prompt(text: str) -> str:
    """The Grounding DINO prompt for ``text``: ``text + " ."`` unless it ends with "." or "?" (spans into
    ``text`` stay valid). The model's text attention blocks end at "." / "?" / [SEP]; a block closed by the
    last token of the batch is dropped (official masking), so without this the caption's last words would
    attend to each other only when the batch pads it."""
    return text if text.rstrip().endswith((".", "?")) else text + " ."


@dataclass(frozen=True)
class PromptChunk:
    """One prompt of a caption: ``text`` (a Grounding DINO prompt), ``offset`` (where it starts in the
    caption: a phrase span ``(s, e)`` is ``(s - offset, e - offset)`` in ``text``) and ``phrases`` (indices
    into the caption's phrase list)."""
    text: str
    offset: int
    phrases: tuple[int, ...]


def prompt_chunks(caption: str, spans: Sequence[tuple[int, int]], count_tokens: Callable[[str], int],
                  limit: int) -> list[PromptChunk]:
    """Split ``caption`` into prompts of at most ``limit`` tokens (``count_tokens``, special tokens included)
    that together hold every phrase whole.

    The whole caption when it fits. Otherwise each chunk is the contiguous slice of the caption from its
    first phrase's start to its last phrase's end (the words between phrases kept as context), phrases taken
    greedily in caption order; a single phrase over the limit is a chunk of its own (truncated by the
    model, its surviving tokens score it). Phrases without characters are in no chunk.
    """
    whole = gdino_prompt(caption)
    real = [i for i, (s, e) in enumerate(spans) if e > s]
    if count_tokens(whole) <= limit:
        return [PromptChunk(whole, 0, tuple(real))] if real else []
    order = sorted(real, key=lambda i: (spans[i][0], spans[i][1], i))

    def chunk(members: list[int]) -> PromptChunk:
        start, end = min(spans[j][0] for j in members), max(spans[j][1] for j in members)
        return PromptChunk(gdino_prompt(caption[start:end]), start, tuple(members))

    chunks: list[PromptChunk] = []
    members: list[int] = []
    for i in order:
        if members and count_tokens(chunk(members + [i]).text) > limit:
            chunks.append(chunk(members))
            members = []
        members.append(i)
    if members:
        chunks.append(chunk(members))
    return chunks


# ----------------------------------------------------------------------------- boxes and selection
def owlv2_boxes_to_pixels(boxes_cxcywh, input_size: tuple[int, int], original_size: tuple[int, int]):
    """OWLv2 boxes -> xyxy pixels of the original image.

    ``boxes_cxcywh`` (Tensor[N, 4]): normalized to the side ``S = max(w, h)`` of the square the processor
    padded the ``input_size`` = (w, h) image into (bottom/right padding, so the image occupies
    ``[0, w/S] x [0, h/S]``). ``original_size`` = (W, H): the image before the CPU resize to ``input_size``.
    x = x_norm * S * W / w, y = y_norm * S * H / h (with no resize: x_norm * max(W, H), transformers' own
    ``post_process_object_detection``)."""
    from torchvision.ops import box_convert

    (w, h), (ow, oh) = input_size, original_size
    side = float(max(w, h))
    scale = boxes_cxcywh.new_tensor([side * ow / w, side * oh / h, side * ow / w, side * oh / h])
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * scale


def normalized_boxes_to_pixels(boxes_cxcywh, original_size: tuple[int, int]):
    """Grounding DINO boxes (Tensor[N, 4] cxcywh normalized to the unpadded image) -> xyxy pixels of the
    ``original_size`` = (W, H) image."""
    from torchvision.ops import box_convert

    ow, oh = original_size
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * boxes_cxcywh.new_tensor([ow, oh, ow, oh])


def select_per_phrase(boxes_xyxy, scores, threshold: float | None, nms_threshold: float | None,
                      max_per_phrase: int | None) -> list[list[Detection]]:
    """One image, one prompt: ``boxes_xyxy`` (Tensor[N, 4] original pixels), ``scores`` (Tensor[N, P], a
    negative score marks a phrase the prompt could not score) -> per phrase
    ``[{"bbox": [x, y, w, h], "score"}, ...]`` best first (rules in the module docstring)."""
    import torch
    from torchvision.ops import batched_nms

    from glip.postprocess import rank_within_label

    num_phrases = scores.shape[1]
    out: list[list[Detection]] = [[] for _ in range(num_phrases)]
    if scores.numel() == 0:
        return out
    if threshold is None:
        flat = scores.flatten()
        top = flat.topk(min(DETECTIONS_PER_PROMPT, flat.numel())).indices
        query, phrase = top // num_phrases, top % num_phrases
        valid = flat[top] >= 0
        query, phrase = query[valid], phrase[valid]
    else:
        query, phrase = ((scores >= threshold) & (scores >= 0)).nonzero(as_tuple=True)
    picked, boxes = scores[query, phrase], boxes_xyxy[query]
    if nms_threshold is not None and nms_threshold < 1.0:
        keep = batched_nms(boxes, picked, phrase, nms_threshold)        # sorted by score, descending
    else:
        keep = torch.sort(picked, descending=True, stable=True).indices
    cap = DETECTIONS_PER_PROMPT if max_per_phrase is None else max_per_phrase
    if cap > 0:
        keep = keep[rank_within_label(phrase[keep]) < cap]
    for (x1, y1, x2, y2), s, p in zip(boxes[keep].tolist(), picked[keep].tolist(), phrase[keep].tolist()):
        out[p].append({"bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    return out


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class HFGrounderConfig:
    """What callers read from ``model.config``: ``max_query_len`` (tokens of one prompt: Grounding DINO's
    ``max_text_len``; OWLv2 ``OWL_PROMPT_TOKENS``, a chunk size only), ``min_size``/``max_size`` of its
    resize, the model type."""
    model_type: str
    max_query_len: int
    min_size: int
    max_size: int


class HFGrounder:
    """A transformers zero-shot detector with ``glip.GLIP``'s inference surface (see the module docstring).

    ``model``: a ``GroundingDinoForObjectDetection`` / ``MMGroundingDinoForObjectDetection`` /
    ``Owlv2ForObjectDetection``; ``processor``: its processor (tokenizer + image processor).
    """

    def __init__(self, model, processor, resize: TeacherResize | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.model_type = str(model.config.model_type)
        if self.model_type not in HF_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {HF_MODEL_TYPES}")
        self.resize = resize or resize_for(self.model_type, self.image_processor.to_dict())
        if self.model_type in OWL_TYPES:
            text = model.config.text_config
            self.text_limit = int(text.max_position_embeddings)
            limit = OWL_PROMPT_TOKENS
        else:
            self.text_limit = int(model.config.max_text_len)
            limit = self.text_limit
        self.config = HFGrounderConfig(self.model_type, limit, self.resize.min_size, self.resize.max_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, revision: str | None = None,
                        image_size: int | None = None) -> "HFGrounder":
        """Load model + processor from a local folder or a hub id (``owner/name[@revision]``; the cache or the
        hub). In eval mode, on the CPU."""
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        path = os.fspath(path)
        if is_hub_id(path):
            path, rev = split_hub_id(path)
            revision = revision or rev
        processor = AutoProcessor.from_pretrained(path, revision=revision)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(path, revision=revision)
        resize = resize_for(str(model.config.model_type), processor.image_processor.to_dict(), image_size)
        return cls(model.eval(), processor, resize)

    # ------------------------------------------------------------------ module-like surface
    def to(self, device) -> "HFGrounder":
        self.model.to(device)
        return self

    def eval(self) -> "HFGrounder":
        self.model.eval()
        return self

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def reuses_image_features(self) -> bool:
        """Whether the image side is independent of the text (OWLv2): ``ground_prompts`` then runs the image
        encoder once for all prompts."""
        return self.model_type in OWL_TYPES

    def prepare_image(self, image) -> np.ndarray:
        """PIL image -> resized ``uint8 [h, w, 3]`` RGB (``self.resize``, what the pipeline's CPU tasks do)."""
        return self.resize(image)

    def input_shape(self, array: np.ndarray) -> tuple[int, int]:
        """``(H, W)`` of the network input for a resized ``uint8 [h, w, 3]`` array: images of one shape run
        in one forward pass (Grounding DINO pads a batch to its largest image; OWLv2 pads each image to its
        own square, so its shape is always the square's)."""
        h, w = int(array.shape[0]), int(array.shape[1])
        if self.model_type in OWL_TYPES:
            return max(h, w), max(h, w)
        return h, w

    # ------------------------------------------------------------------ inference
    def ground(self, images: Sequence, captions: Sequence[str], phrase_spans: Sequence[PhraseSpans], *,
               threshold: float | None = None, nms_threshold: float | None = None,
               max_per_phrase: int | None = None, image_sizes: Sequence[tuple[int, int]] | None = None,
               autocast_dtype=None) -> list[list[list[Detection]]]:
        """Ground each caption's phrases in its image.

        Args:
            images: PIL images (resized here by ``self.resize``) or resized ``uint8 [h, w, 3]`` arrays (then
                ``image_sizes`` gives each original (width, height); without it the array size is taken).
            captions: one caption per image; phrase_spans: per caption its (start, end) character spans.
            threshold, nms_threshold, max_per_phrase: the selection of ``select_per_phrase``.
            autocast_dtype: run the network under ``torch.autocast`` (e.g. ``torch.bfloat16``); scores and boxes
                are float32.
        Returns:
            per image, per phrase, ``[{"bbox": [x, y, w, h] original pixels, "score": float}, ...]`` best first.
        """
        if not len(images) == len(captions) == len(phrase_spans):
            raise ValueError(f"{len(images)} images, {len(captions)} captions and {len(phrase_spans)} phrase lists")
        arrays, originals = self._arrays(images, image_sizes)
        spans = [[(int(s), int(e)) for s, e in per] for per in phrase_spans]
        out: list[list[list[Detection]]] = [[[] for _ in per] for per in spans]
        for indices in self._buckets(arrays).values():
            if self.model_type in OWL_TYPES:
                texts = [[captions[i][s:e] for s, e in spans[i]] for i in indices]
                scored = self._owl_scores([arrays[i] for i in indices], [originals[i] for i in indices], texts,
                                          autocast_dtype)
                for i, (boxes, scores) in zip(indices, scored):
                    out[i] = select_per_phrase(boxes, scores, threshold, nms_threshold, max_per_phrase)
            else:
                self._gdino_ground([arrays[i] for i in indices], [originals[i] for i in indices],
                                   [captions[i] for i in indices], [spans[i] for i in indices],
                                   [out[i] for i in indices], threshold, nms_threshold, max_per_phrase,
                                   autocast_dtype)
        return out

    def ground_prompts(self, images: Sequence, prompts: Sequence[tuple[str, PhraseSpans]], *,
                       threshold: float | None = None, nms_threshold: float | None = None,
                       max_per_phrase: int | None = None, image_sizes: Sequence[tuple[int, int]] | None = None,
                       autocast_dtype=None) -> list[list[list[list[Detection]]]]:
        """Ground every prompt ``(caption, spans)`` in every image: per prompt, per image, per phrase, the
        detections of ``ground(images, [caption] * n, [spans] * n, ...)``.

        OWLv2: one image-encoder pass per image for all prompts (and one text pass per distinct phrase);
        each prompt's selection is its own, so the result equals running each prompt. Grounding DINO (image
        features depend on the text): each prompt runs on its own."""
        if self.model_type not in OWL_TYPES:
            return [self.ground(images, [c] * len(images), [list(s)] * len(images), threshold=threshold,
                                nms_threshold=nms_threshold, max_per_phrase=max_per_phrase,
                                image_sizes=image_sizes, autocast_dtype=autocast_dtype) for c, s in prompts]
        arrays, originals = self._arrays(images, image_sizes)
        texts = [caption[int(s):int(e)] for caption, spans in prompts for s, e in spans]
        bounds, start = [], 0
        for _, spans in prompts:
            bounds.append((start, start + len(spans)))
            start += len(spans)
        out: list[list[list[list[Detection]]]] = [[[] for _ in arrays] for _ in prompts]
        for indices in self._buckets(arrays).values():
            scored = self._owl_scores([arrays[i] for i in indices], [originals[i] for i in indices],
                                      [texts] * len(indices), autocast_dtype)
            for i, (boxes, scores) in zip(indices, scored):
                for k, (lo, hi) in enumerate(bounds):
                    out[k][i] = select_per_phrase(boxes, scores[:, lo:hi], threshold, nms_threshold, max_per_phrase)
        return out

    # ------------------------------------------------------------------ internals
    def _arrays(self, images: Sequence, image_sizes) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        arrays, originals = [], []
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray):
                arrays.append(image)
                originals.append(tuple(image_sizes[i]) if image_sizes is not None
                                 else (int(image.shape[1]), int(image.shape[0])))
            else:
                arrays.append(self.prepare_image(image))
                originals.append(tuple(image.size))
        return arrays, originals

    def _buckets(self, arrays: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, array in enumerate(arrays):
            buckets.setdefault(self.input_shape(array), []).append(i)
        return buckets

    def _pixels(self, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
        """The image processor on arrays of one input shape: rescale, normalize, pad (no resize, see the module
        docstring). Returns the model's image inputs on its device."""
        writable = [a if a.flags.writeable else a.copy() for a in arrays]   # Ray hands read-only views
        if self.model_type in OWL_TYPES:
            side = self.input_shape(writable[0])[0]
            batch = self.image_processor(images=writable, size={"height": side, "width": side}, return_tensors="pt")
        else:
            batch = self.image_processor(images=writable, do_resize=False, return_tensors="pt")
        device = self.device
        return {k: v.to(device) for k, v in batch.items() if k in ("pixel_values", "pixel_mask")}

    def _autocast(self, dtype):
        import contextlib

        import torch

        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _gdino_ground(self, arrays, originals, captions, spans, outs, threshold, nms_threshold, max_per_phrase,
                      autocast_dtype) -> None:
        """Grounding DINO on images of one input shape: one row per (image, prompt chunk), all rows in one
        forward pass; fills ``outs[b][phrase]``."""
        import torch

        from glip.positive_map import phrase_token_lists, spans_to_positive_map, tokenize

        count = _token_counter(self.tokenizer)
        rows: list[tuple[int, PromptChunk]] = []
        for b, (caption, per) in enumerate(zip(captions, spans)):
            rows.extend((b, c) for c in prompt_chunks(caption, per, count, self.text_limit))
        if not rows:
            return
        pixels = self._pixels(arrays)
        device = self.device
        tok = tokenize(self.tokenizer, [c.text for _, c in rows], self.text_limit)
        index = torch.tensor([b for b, _ in rows], device=device)
        inputs = {k: v.index_select(0, index) for k, v in pixels.items()}
        with torch.inference_mode(), self._autocast(autocast_dtype):
            output = self.model(**inputs, input_ids=tok.input_ids.to(device),
                                attention_mask=tok.attention_mask.to(device),
                                token_type_ids=torch.zeros_like(tok.input_ids).to(device))
        num_tokens = tok.input_ids.shape[1]
        probs_all = output.logits.float()[:, :, :num_tokens].sigmoid()             # [R, Q, T]
        boxes_all = output.pred_boxes.float()                                      # [R, Q, 4]
        for r, (b, chunk) in enumerate(rows):
            local = [[(spans[b][p][0] - chunk.offset, spans[b][p][1] - chunk.offset)] for p in chunk.phrases]
            positive = spans_to_positive_map(tok.offsets[r], local, num_tokens, tok.truncated_at[r])
            scores = probs_all.new_full((probs_all.shape[1], len(chunk.phrases)), -1.0)
            for k, tokens in enumerate(phrase_token_lists(positive)):
                if tokens:
                    scores[:, k] = probs_all[r][:, tokens].amax(dim=1)
            boxes = normalized_boxes_to_pixels(boxes_all[r], originals[b])
            for p, dets in zip(chunk.phrases, select_per_phrase(boxes, scores, threshold, nms_threshold,
                                                                max_per_phrase)):
                outs[b][p] = dets

    def _owl_text_embeds(self, texts: list[str], autocast_dtype):
        """Normalized query embeddings [len(texts), D] (float32), as ``Owlv2ForObjectDetection.forward`` makes
        them: each text alone, padded to the text model's length, pooled at its end token."""
        import torch

        device = self.device
        parts = []
        for i in range(0, len(texts), OWL_TEXT_BATCH):
            enc = self.tokenizer(texts[i:i + OWL_TEXT_BATCH], padding="max_length", truncation=True,
                                 max_length=self.text_limit, return_tensors="pt")
            with torch.inference_mode(), self._autocast(autocast_dtype):
                pooled = self.model.owlv2.get_text_features(input_ids=enc["input_ids"].to(device),
                                                            attention_mask=enc["attention_mask"].to(device)).pooler_output
            pooled = pooled.float()
            parts.append(pooled / torch.linalg.norm(pooled, ord=2, dim=-1, keepdim=True))
        return torch.cat(parts) if parts else torch.zeros((0, self.model.config.projection_dim), device=device)

    def _owl_scores(self, arrays, originals, texts_per_image: list[list[str]], autocast_dtype):
        """OWLv2 on images of one input shape: per image ``(boxes [N, 4] xyxy original pixels, scores [N, P])``,
        P = that image's texts. One image pass for the batch; each distinct text encoded once."""
        import torch

        pixels = self._pixels(arrays)["pixel_values"]
        interpolate = pixels.shape[-1] != int(self.model.config.vision_config.image_size)
        with torch.inference_mode(), self._autocast(autocast_dtype):
            feature_map = self.model.image_embedder(pixel_values=pixels, interpolate_pos_encoding=interpolate)[0]
            batch, grid_h, grid_w, dim = feature_map.shape
            image_feats = feature_map.reshape(batch, grid_h * grid_w, dim)
            boxes = self.model.box_predictor(image_feats, feature_map, interpolate)
        distinct = list(dict.fromkeys(t for texts in texts_per_image for t in texts))
        embeds = self._owl_text_embeds(distinct, autocast_dtype)
        where = {t: k for k, t in enumerate(distinct)}
        out = []
        for b, texts in enumerate(texts_per_image):
            pixel_boxes = owlv2_boxes_to_pixels(boxes[b].float(), (arrays[b].shape[1], arrays[b].shape[0]),
                                                originals[b])
            if not texts:
                out.append((pixel_boxes, pixel_boxes.new_zeros((pixel_boxes.shape[0], 0))))
                continue
            queries = embeds[[where[t] for t in texts]]
            with torch.inference_mode(), self._autocast(autocast_dtype):
                logits = self.model.class_predictor(image_feats[b:b + 1], queries[None].to(image_feats.dtype))[0]
            out.append((pixel_boxes, logits[0].float().sigmoid()))
        return out


def _token_counter(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])


def load_hf_grounder(path: str, revision: str | None = None) -> HFGrounder:
    """``HFGrounder.from_pretrained`` with load failures as ``InputError`` naming ``path``."""
    try:
        return HFGrounder.from_pretrained(path, revision=revision)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: not a loadable transformers zero-shot detector ({exc})") from exc


# ----------------------------------------------------------------------------- the Teacher
class HFTeacher:
    """``labeling.teacher.Teacher`` backed by ``HFGrounder``; the model is loaded once, at construction.

    Batch independence: ``HFGrounder.ground`` runs one forward pass per input shape; ``bucket_of`` is that
    shape, so a caller that accumulates images per bucket gets full forward passes. Text is padded per batch
    with attention masks (Grounding DINO prompts end in "." so padding cannot change the text attention;
    OWLv2 pads every query to the text model's length).

    ``precision``: "fp32", or "bf16" (the network under ``torch.autocast(device type, bfloat16)``;
    post-processing and the returned floats stay float32).
    """

    def __init__(self, grounder: HFGrounder, identity: TeacherIdentity, device: str = "cpu",
                 precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_device(device)
        self.grounder = grounder.to(device).eval()
        self.identity = identity
        self.device = device
        self.precision = precision

    @classmethod
    def load(cls, path: str, identity: TeacherIdentity | None = None, device: str = "cpu",
             precision: str = "fp32") -> "HFTeacher":
        """Load the transformers teacher at ``path`` (local folder or hub id, at ``identity.revision``) onto
        ``device``; ``TeacherDeviceError`` before anything is read when ``device`` is a CUDA device torch cannot
        use."""
        check_device(device)
        identity = identity or hf_identity(path)
        revision = identity.revision or None
        return cls(load_hf_grounder(path, revision), identity, device, precision)

    def bucket_of(self, image: np.ndarray) -> tuple[int, int]:
        """``(H, W)``: the network input shape of a resized ``uint8 [h, w, 3]`` array."""
        return self.grounder.input_shape(image)

    def ground(self, images: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]],
               captions: Sequence[str], phrase_spans: Sequence[PhraseSpans], *,
               threshold: float, nms_iou: float,
               max_per_phrase: int | None = None) -> list[list[list[Detection]]]:
        import torch

        check_ground_args(images, image_sizes, captions, phrase_spans)
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        with device_errors(self.device):
            found = self.grounder.ground(list(images), list(captions), phrase_spans, threshold=threshold,
                                         nms_threshold=nms_iou, max_per_phrase=max_per_phrase,
                                         image_sizes=[tuple(s) for s in image_sizes], autocast_dtype=autocast)
        return [as_detections(per_image) for per_image in found]
