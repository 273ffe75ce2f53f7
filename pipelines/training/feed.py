"""The per-worker sample feed: mix sources, turn records into augmented training examples.

Every source becomes the same ``TrainExample`` (image tensor, caption, xyxy boxes, character
spans): gold and pseudo-label samples as they are, detection images as a prompt of category
names drawn per visit (GLIP's detection-as-grounding: the image's categories plus random
absent ones as negatives, in random order). A record that cannot be used is a counted skip
and the next record of the same source is drawn instead, so the mix ratio holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from storage import fs
from storage.errors import InputError
from storage.records import GroundedSample, InvalidRecord, validate_sample
from storage.skips import StageCounts

from pipelines.training.augment import TrainAugment
from pipelines.training.sampling import EpochCursor, MixSampler, PseudoStream
from pipelines.training.sources import DetectionImage, TrainingSources

_PROMPT = 5   # seed stream of the detection prompt draws


@dataclass
class TrainExample:
    """One augmented sample, as the model's training forward takes it."""
    image: torch.Tensor                       # float32 [3, H, W], RGB in [0, 1]
    caption: str
    boxes: torch.Tensor                       # float32 [N, 4], XYXY pixels of ``image``, N >= 1
    tokens_positive: list[list[list[int]]]    # per box: [[start, end], ...] into ``caption``
    source: str                               # "gold" | "pseudo" | "detection"
    key: str
    tokens_ignore: list[list[int]] = field(default_factory=list)   # spans taught neither way (model docstring)


def detection_prompt(image: DetectionImage, rng: np.random.Generator, negatives: int | None,
                     max_tokens: int = 256) -> tuple[str, list[list[float]], list[list[list[int]]]]:
    """Caption "cat. dog. car." naming the image's categories plus 0..``negatives`` absent
    ones (random count, random choice; ``None``: every absent one, as evaluation prompts do),
    in random order; returns (caption, boxes [x, y, w, h], spans per box).

    Names are added, positives first, while the caption fits ``max_tokens`` (by the
    conservative ``storage.coco.estimate_tokens``); boxes of a category that did not fit are
    left out, since a box whose name is absent would teach the model it is background.
    """
    from storage.coco import SEPARATOR, estimate_tokens

    positives = sorted({name for _, name in image.boxes})
    positives = [positives[i] for i in rng.permutation(len(positives))]
    present = set(positives)
    pool = [c for c in image.categories if c not in present]
    if negatives is None:
        chosen = pool
    else:
        count = int(rng.integers(0, min(negatives, len(pool)) + 1)) if pool and negatives > 0 else 0
        chosen = [pool[i] for i in rng.choice(len(pool), count, replace=False)] if count else []
    names: list[str] = []
    for name in positives + chosen:
        if not names or estimate_tokens(SEPARATOR.join(names + [name]) + ".") <= max_tokens:
            names.append(name)
    names = [names[i] for i in rng.permutation(len(names))]
    spans: dict[str, list[int]] = {}
    caption = ""
    for name in names:
        if caption:
            caption += SEPARATOR
        spans[name] = [len(caption), len(caption) + len(name)]
        caption += name
    caption += "."
    kept = [(bbox, name) for bbox, name in image.boxes if name in spans]
    return caption, [b for b, _ in kept], [[spans[n]] for _, n in kept]


def unboxed_phrase_spans(sample: GroundedSample) -> list[list[int]]:
    """Spans of the phrases no box grounds (the teacher found nothing above its threshold).

    The teacher missing an object is not evidence the object is absent: taught as negatives
    everywhere, these phrases would train the student against exactly the teacher's misses.
    """
    boxed = [span for b in sample.boxes for span in b.tokens_positive]
    return [[p.start, p.end] for p in sample.phrases
            if not any(s < p.end and p.start < e for s, e in boxed)]


def _xywh_to_xyxy(boxes: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)


class MixedFeed:
    """Draws ``TrainExample``s for worker ``rank`` of ``world`` from ``sources``.

    ``counts`` holds one StageCounts per source: ``read`` = records drawn, ``written`` =
    examples handed to training, ``skipped`` by reason.
    """

    def __init__(self, sources: TrainingSources, weights: dict[str, float], augment: TrainAugment,
                 seed: int, rank: int = 0, world: int = 1, pseudo_min_score: float = 0.0,
                 pseudo_unboxed: str = "negative", detection_negatives: int | None = 8, shuffle_buffer: int = 256,
                 max_tokens: int = 256):
        available = sources.available()
        self.mix = MixSampler({n: w for n, w in weights.items() if available.get(n)}, seed, rank)
        self.sources, self.augment = sources, augment
        self.pseudo_min_score, self.detection_negatives = pseudo_min_score, detection_negatives
        self.pseudo_unboxed = pseudo_unboxed
        self.counts = {name: StageCounts() for name in self.mix.names}
        self.cursors: dict[str, EpochCursor] = {}
        if sources.gold:
            self.cursors["gold"] = EpochCursor(len(sources.gold), seed, rank, world, tag=1)
        if sources.detection:
            self.cursors["detection"] = EpochCursor(len(sources.detection), seed, rank, world, tag=2)
        self.pseudo = (PseudoStream(sources.pseudo_files, seed, rank, world, shuffle_buffer)
                       if sources.pseudo_files and "pseudo" in self.mix.names else None)
        self.max_tokens = max_tokens
        self.prompt_rng = np.random.default_rng([seed, rank, _PROMPT])

    # ------------------------------------------------------------------ drawing

    def next_batch(self, size: int) -> list[TrainExample]:
        return [self.next_example() for _ in range(size)]

    def next_example(self) -> TrainExample:
        source = self.mix.next()
        counts = self.counts[source]
        limit = self._attempt_limit(source)
        for _ in range(limit):
            counts.read += 1
            example = self._draw(source, counts)
            if example is not None:
                counts.written += 1
                return example
        raise InputError(f"{source}: no usable record in {limit} draws in a row "
                         f"(skipped: {dict(counts.skipped)}); check the input")

    def _attempt_limit(self, source: str) -> int:
        size = {"gold": len(self.sources.gold), "detection": len(self.sources.detection)}.get(source, 0)
        return max(1000, 2 * size)

    def _draw(self, source: str, counts: StageCounts) -> TrainExample | None:
        from labeling.images import ImageSkip, decode_image

        if source == "pseudo":
            sample, data = self.pseudo.next()
            decoded = decode_image(data)
            if isinstance(decoded, ImageSkip):
                counts.skip(decoded.reason, sample.key, decoded.detail)
                return None
            if (decoded.width, decoded.height) != (sample.width, sample.height):
                counts.skip("image_size_mismatch", sample.key,
                            f"record {sample.width}x{sample.height}, image {decoded.width}x{decoded.height}")
                return None
            kept = [b for b in sample.boxes if b.score >= self.pseudo_min_score]
            if not kept:
                counts.skip("no_box_above_min_score", sample.key)
                return None
            sample.boxes = kept
            try:
                sample, _ = validate_sample(sample)
            except InvalidRecord as exc:
                counts.skip("invalid_record", sample.key, str(exc))
                return None
            example = self._example(decoded.image, sample.caption, [b.bbox for b in sample.boxes],
                                    [b.tokens_positive for b in sample.boxes], source, sample.key, counts)
            if example is not None and self.pseudo_unboxed == "ignore":
                example.tokens_ignore = unboxed_phrase_spans(sample)
            return example

        index = self.cursors[source].next()
        if source == "gold":
            record: GroundedSample | DetectionImage = self.sources.gold[index]
            path = record.extra["image_path"]
        else:
            record = self.sources.detection[index]
            path = record.image_path
        try:
            decoded = decode_image(fs.read_bytes(path))
        except OSError as exc:
            counts.skip("missing_image", path, str(exc))
            return None
        if isinstance(decoded, ImageSkip):
            counts.skip(decoded.reason, path, decoded.detail)
            return None
        if source == "gold":
            return self._example(decoded.image, record.caption, [b.bbox for b in record.boxes],
                                 [b.tokens_positive for b in record.boxes], source, record.key, counts)
        caption, boxes, spans = detection_prompt(record, self.prompt_rng, self.detection_negatives, self.max_tokens)
        return self._example(decoded.image, caption, boxes, spans, source, record.key, counts)

    def _example(self, image, caption: str, boxes_xywh, spans, source: str, key: str,
                 counts: StageCounts) -> TrainExample | None:
        if not boxes_xywh:
            counts.skip("no_valid_boxes", key)
            return None
        out = self.augment(image, _xywh_to_xyxy(boxes_xywh), caption)
        if out.boxes.shape[0] == 0:
            counts.skip("no_boxes_after_augment", key)
            return None
        return TrainExample(out.image, caption, out.boxes, [spans[int(i)] for i in out.keep], source, key)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "mix": self.mix.state_dict(),
            "cursors": {n: c.state_dict() for n, c in self.cursors.items()},
            "pseudo": self.pseudo.state_dict() if self.pseudo else None,
            "prompt_rng": self.prompt_rng.bit_generator.state,
            "counts": self.all_counts(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.mix.load_state_dict(state["mix"])
        for name, cursor_state in state["cursors"].items():
            if name in self.cursors:
                self.cursors[name].load_state_dict(cursor_state)
        if self.pseudo is not None and state.get("pseudo"):
            self.pseudo.load_state_dict(state["pseudo"])
        self.prompt_rng.bit_generator.state = state["prompt_rng"]
        for name, counts in (state.get("counts") or {}).items():
            if name in self.counts:
                self.counts[name] = StageCounts.from_dict(counts)
        if self.pseudo is not None:
            reader = (state.get("counts") or {}).get("_pseudo_reader")
            if reader:
                self.pseudo.counts = StageCounts.from_dict(reader)

    def all_counts(self) -> dict[str, dict]:
        """Per-source counts as dicts; the shard reader's own skips under ``_pseudo_reader``."""
        result = {name: c.to_dict() for name, c in self.counts.items()}
        if self.pseudo is not None:
            result["_pseudo_reader"] = self.pseudo.reader_counts().to_dict()
        return result
