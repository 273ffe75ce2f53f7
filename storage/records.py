"""The grounded sample: the one record shape every source becomes (DESIGN.md).

Boxes are COCO ``[x, y, w, h]`` in absolute pixels of the stored image; spans are
character offsets into ``caption``, end exclusive. Validation clips boxes to the
image and drops what cannot be trained on, reporting every drop by reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Phrase:
    text: str
    start: int
    end: int
    root: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"text": self.text, "start": self.start, "end": self.end}
        if self.root is not None:
            d["root"] = self.root
        return d


@dataclass
class Box:
    bbox: list[float]                       # [x, y, w, h], absolute pixels
    tokens_positive: list[list[int]]        # [[start, end], ...] into caption
    phrase: int = -1                        # index into phrases, -1 when none
    score: float = 1.0                      # 1.0 for gold

    def to_dict(self) -> dict[str, Any]:
        return {
            "bbox": [float(v) for v in self.bbox],
            "tokens_positive": [[int(s), int(e)] for s, e in self.tokens_positive],
            "phrase": int(self.phrase),
            "score": float(self.score),
        }


@dataclass
class GroundedSample:
    key: str
    caption: str
    width: int
    height: int
    phrases: list[Phrase] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. teacher id, thresholds, image path

    def to_dict(self) -> dict[str, Any]:
        d = {
            "key": self.key,
            "caption": self.caption,
            "width": int(self.width),
            "height": int(self.height),
            "phrases": [p.to_dict() for p in self.phrases],
            "boxes": [b.to_dict() for b in self.boxes],
            "source": self.source,
        }
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GroundedSample":
        """Build from a parsed JSON object; raises ``InvalidRecord`` on a wrong shape."""
        try:
            return cls(
                key=str(d["key"]),
                caption=str(d["caption"]),
                width=int(d["width"]),
                height=int(d["height"]),
                phrases=[Phrase(str(p["text"]), int(p["start"]), int(p["end"]), p.get("root"))
                         for p in d.get("phrases") or []],
                boxes=[Box([float(v) for v in b["bbox"]],
                           [[int(s), int(e)] for s, e in b.get("tokens_positive") or []],
                           int(b.get("phrase", -1)), float(b.get("score", 1.0)))
                       for b in d.get("boxes") or []],
                source=str(d.get("source", "")),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord(f"malformed grounded sample: {exc!r}") from exc


class InvalidRecord(ValueError):
    """A record that cannot be used at all (the caller counts it as a skip)."""


def span_is_valid(start: int, end: int, caption: str) -> bool:
    return 0 <= start < end <= len(caption)


def validate_sample(sample: GroundedSample, min_size: float = 1.0) -> tuple[GroundedSample, dict[str, int]]:
    """Clip boxes to the image, drop degenerate boxes and invalid spans.

    Returns the cleaned sample and ``{reason: count}`` of what was dropped. Raises
    ``InvalidRecord`` when the sample itself is unusable (no caption, no size).
    """
    if sample.width <= 0 or sample.height <= 0:
        raise InvalidRecord(f"image size {sample.width}x{sample.height} is not positive")
    if not sample.caption:
        raise InvalidRecord("empty caption")
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    phrases, remap = [], {}
    for i, p in enumerate(sample.phrases):
        if not span_is_valid(p.start, p.end, sample.caption):
            drop("phrase_span_outside_caption")
            continue
        remap[i] = len(phrases)
        phrases.append(Phrase(sample.caption[p.start:p.end], p.start, p.end, p.root))

    boxes = []
    for b in sample.boxes:
        spans = [[s, e] for s, e in b.tokens_positive if span_is_valid(s, e, sample.caption)]
        if len(spans) != len(b.tokens_positive):
            drop("box_span_outside_caption")
            if not spans:
                continue
        if len(b.bbox) != 4 or any(v != v for v in b.bbox):   # NaN check without numpy
            drop("box_malformed")
            continue
        x, y, w, h = b.bbox
        if w <= 0 or h <= 0:
            drop("box_non_positive_size")
            continue
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(sample.width), x + w), min(float(sample.height), y + h)
        if x1 - x0 < min_size or y1 - y0 < min_size:
            drop("box_outside_image")
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            drop("box_clipped")   # kept, but reported
        phrase = remap.get(b.phrase, -1) if b.phrase >= 0 else -1
        boxes.append(Box([x0, y0, x1 - x0, y1 - y0], spans, phrase, b.score))
    cleaned = GroundedSample(sample.key, sample.caption, sample.width, sample.height,
                             phrases, boxes, sample.source, sample.extra)
    return cleaned, dropped
