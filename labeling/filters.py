"""Which teacher boxes become pseudo-labels: thresholds, per-phrase NMS and cap, box sanity.

Pure functions on plain records, no model: the teacher hands over, per phrase, a list of
``{"bbox": [x, y, w, h], "score": float}`` (COCO xywh, pixels of the stored image, any
order), and ``pseudo_sample`` turns one image's detections into a ``GroundedSample``.

Order of the per-phrase filter, and why:
1. non-finite boxes/scores are dropped (a NaN must never reach a training file);
2. score >= threshold (greedy NMS visits boxes best first, so thresholding before NMS keeps
   exactly the boxes thresholding after would);
3. clip to the image, then drop boxes whose clipped width or height is under ``min_box_size``
   (NMS then compares the boxes we actually store);
4. NMS at ``nms_iou`` within the phrase only (two phrases may rightly box the same object:
   "a man" and "the rider");
5. keep the ``max_boxes_per_phrase`` best.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from storage.records import Box, GroundedSample, Phrase, validate_sample

# Defaults, and where they come from:
# - 0.5: the confidence threshold the official GLIP demo passes to
#   ``GLIPDemo.run_on_web_image(image, caption, 0.5)`` (microsoft/GLIP demo notebook; that call
#   overrides the ``confidence_threshold=0.7`` the notebook builds GLIPDemo with); the paper does
#   not print the value it used for its 24M web pseudo-labels.
# - 0.6: the official ATSS/GLIP configs' ``MODEL.ATSS.NMS_TH``.
# - 10 boxes per phrase and 2 px: our choices (a caption phrase rarely names more than a few
#   instances; a box under 2 px cannot be learned from a stride-8 feature map).
DEFAULT_THRESHOLD = 0.5
DEFAULT_NMS_IOU = 0.6
DEFAULT_MAX_BOXES_PER_PHRASE = 10
DEFAULT_MIN_BOX_SIZE = 2.0

DROP_NONFINITE = "box_nonfinite"
DROP_TOO_SMALL = "box_too_small"
DROP_NMS = "box_suppressed_nms"
DROP_CAP = "box_over_phrase_cap"


@dataclass(frozen=True)
class FilterConfig:
    """The pseudo-label decision rule; recorded verbatim in every sample and the manifest."""
    threshold: float = DEFAULT_THRESHOLD          # keep score >= threshold
    nms_iou: float = DEFAULT_NMS_IOU              # suppress IoU > nms_iou within a phrase
    max_boxes_per_phrase: int = DEFAULT_MAX_BOXES_PER_PHRASE
    min_box_size: float = DEFAULT_MIN_BOX_SIZE    # pixels, each side after clipping

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"NMS IoU must be in (0, 1], got {self.nms_iou}")
        if self.max_boxes_per_phrase < 1:
            raise ValueError(f"max boxes per phrase must be >= 1, got {self.max_boxes_per_phrase}")
        if self.min_box_size < 0:
            raise ValueError(f"min box size must be >= 0, got {self.min_box_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clip_xywh(bbox: Sequence[float], width: float, height: float) -> list[float]:
    """Clip a COCO ``[x, y, w, h]`` box to a ``width`` x ``height`` image (may become empty)."""
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)]


def iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two COCO ``[x, y, w, h]`` boxes (0 when both are empty)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def nms_xywh(boxes: Sequence[Sequence[float]], scores: Sequence[float], iou: float) -> list[int]:
    """Greedy NMS; indices of kept boxes, best score first.

    Uses ``torchvision.ops.nms`` (the one NMS of the project's model code) on xyxy boxes.
    """
    if not boxes:
        return []
    import torch
    from torchvision.ops import nms

    t = torch.tensor([list(b) for b in boxes], dtype=torch.float64)
    xyxy = torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)
    keep = nms(xyxy, torch.tensor(list(scores), dtype=torch.float64), iou)
    return [int(i) for i in keep]


def filter_phrase_detections(detections: Sequence[dict[str, Any]], width: int, height: int,
                             config: FilterConfig,
                             dropped: Counter | None = None) -> list[dict[str, Any]]:
    """One phrase's teacher detections -> the boxes to keep, best first.

    ``detections``: ``[{"bbox": [x, y, w, h], "score": s}, ...]`` in pixels of a
    ``width`` x ``height`` image. Returns new dicts with clipped boxes. Drops of boxes that
    passed the threshold are added to ``dropped`` by reason (falling under the threshold is
    the normal case and not counted).
    """
    dropped = dropped if dropped is not None else Counter()
    candidates = []
    for det in detections:
        bbox, score = list(det.get("bbox") or []), det.get("score")
        if len(bbox) != 4 or score is None or not all(map(math.isfinite, [*bbox, score])):
            dropped[DROP_NONFINITE] += 1
            continue
        if score < config.threshold:
            continue
        clipped = clip_xywh(bbox, width, height)
        if clipped[2] < max(config.min_box_size, 1e-6) or clipped[3] < max(config.min_box_size, 1e-6):
            dropped[DROP_TOO_SMALL] += 1
            continue
        candidates.append({"bbox": clipped, "score": float(score)})
    keep = nms_xywh([c["bbox"] for c in candidates], [c["score"] for c in candidates], config.nms_iou)
    dropped[DROP_NMS] += len(candidates) - len(keep)
    if len(keep) > config.max_boxes_per_phrase:
        dropped[DROP_CAP] += len(keep) - config.max_boxes_per_phrase
        keep = keep[:config.max_boxes_per_phrase]
    return [candidates[i] for i in keep]


def pseudo_sample(key: str, caption: str, width: int, height: int,
                  phrases: Sequence[dict[str, Any]],
                  detections: Sequence[Sequence[dict[str, Any]]],
                  config: FilterConfig, source: str,
                  extra: dict[str, Any] | None = None) -> tuple[GroundedSample, Counter]:
    """Build the pseudo-labeled sample of one image.

    ``phrases``: ``[{"text", "start", "end", "root"?}, ...]`` character spans into
    ``caption`` (end exclusive); ``detections[i]`` is the teacher output for ``phrases[i]``.
    Every phrase stays in ``sample.phrases``, grounded or not; each kept box points to its
    phrase (``phrase`` index) and carries the phrase span as ``tokens_positive``.
    Returns the sample (validated with ``storage.records.validate_sample``) and the
    ``{reason: count}`` of dropped boxes and phrases.
    """
    if len(detections) != len(phrases):
        raise ValueError(f"{key}: {len(detections)} detection lists for {len(phrases)} phrases")
    dropped: Counter = Counter()
    phrase_records = [Phrase(str(p["text"]), int(p["start"]), int(p["end"]), p.get("root"))
                      for p in phrases]
    boxes = []
    for index, (phrase, dets) in enumerate(zip(phrase_records, detections)):
        for det in filter_phrase_detections(dets, width, height, config, dropped):
            boxes.append(Box(det["bbox"], [[phrase.start, phrase.end]], index, det["score"]))
    sample = GroundedSample(key, caption, width, height, phrase_records, boxes, source,
                            dict(extra or {}))
    sample, validation_drops = validate_sample(sample, min_size=min(1.0, config.min_box_size))
    dropped.update(validation_drops)
    return sample, +dropped
