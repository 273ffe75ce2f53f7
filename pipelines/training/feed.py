"""The per-reader sample feed: mix sources, turn records into augmented training examples.

Every source is a list of shards (``sources.TrainingSources``), streamed by one
``sampling.ShardStream`` each, and becomes the same ``TrainExample`` (image tensor, caption,
xyxy boxes, character spans): gold and pseudo-label samples as they are, detection images as
a prompt of category names drawn per visit (GLIP's detection-as-grounding: the image's
categories plus random absent ones from the dataset's vocabulary as negatives, in random
order). A record that cannot be used is a counted skip and the next record of the same source
is drawn instead, so the mix ratio holds.

A feed owns all its randomness (mix, prompts, and the torch generator state augmentation
draws from, swapped in around each augmentation), so its ``state_dict`` alone replays it,
whichever process runs it (``loader``).
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
from pipelines.training.sampling import MixSampler, ShardStream
from pipelines.training.sources import DetectionImage, TrainingSources

_PROMPT, _AUGMENT = 5, 6   # seed streams of the detection prompt draws and of augmentation
_TAGS = {"gold": 1, "detection": 2, "pseudo": 3}   # one shard order per source
MAX_DRAWS_IN_A_ROW = 1000


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


def fixed_detection_prompt(image: DetectionImage, prompt: dict) -> tuple[str, list[list[float]], list[list[list[int]]]]:
    """The one prompt of a prompt-tuning run (``tuning.fixed_category_prompt``: every category, in order)
    and the image's boxes with their names' spans in it."""
    spans = {c["name"]: [int(c["start"]), int(c["end"])] for c in prompt["categories"]}
    kept = [(bbox, name) for bbox, name in image.boxes if name in spans]
    return prompt["caption"], [b for b, _ in kept], [[spans[n]] for _, n in kept]


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


def make_example(augment: TrainAugment, image, caption: str, boxes_xywh, spans, source: str, key: str,
                 counts: StageCounts) -> TrainExample | None:
    """Augment one record into a ``TrainExample``; None (a counted skip) when no box is left."""
    if not boxes_xywh:
        counts.skip("no_valid_boxes", key)
        return None
    out = augment(image, _xywh_to_xyxy(boxes_xywh), caption)
    if out.boxes.shape[0] == 0:
        counts.skip("no_boxes_after_augment", key)
        return None
    return TrainExample(out.image, caption, out.boxes, [spans[int(i)] for i in out.keep], source, key)


class MixedFeed:
    """Draws ``TrainExample``s for reader ``rank`` of ``world`` from ``sources``.

    ``counts`` holds one StageCounts per source: ``read`` = records drawn, ``written`` =
    examples handed to training, ``skipped`` by reason; ``reader_counts`` the shard readers'
    own (samples read from the tars, bad members).
    """

    def __init__(self, sources: TrainingSources, weights: dict[str, float], augment: TrainAugment,
                 seed: int, rank: int = 0, world: int = 1, pseudo_min_score: float = 0.0,
                 pseudo_unboxed: str = "negative", detection_negatives: int | None = 8, shuffle_buffer: int = 256,
                 max_tokens: int = 256, group_shards: int = 4, fixed_prompt: dict | None = None):
        available = sources.available()
        self.mix = MixSampler({n: w for n, w in weights.items() if available.get(n)}, seed, rank)
        self.sources, self.augment = sources, augment
        self.pseudo_min_score, self.detection_negatives = pseudo_min_score, detection_negatives
        self.pseudo_unboxed = pseudo_unboxed
        self.counts = {name: StageCounts() for name in self.mix.names}
        self.reader_counts = {name: StageCounts() for name in self.mix.names}
        self.streams = {name: ShardStream(sources.files(name), seed, rank, world, tag=_TAGS[name],
                                          group_shards=group_shards, buffer_size=shuffle_buffer,
                                          counts=self.reader_counts[name])
                        for name in self.mix.names}
        self.max_tokens = max_tokens
        self.fixed_prompt = fixed_prompt
        self.prompt_rng = np.random.default_rng([seed, rank, _PROMPT])
        self.augment_rng = torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, _AUGMENT])
                                                             .integers(2 ** 62))).get_state()

    # ------------------------------------------------------------------ drawing

    def next_batch(self, size: int) -> list[TrainExample]:
        return [self.next_example() for _ in range(size)]

    def next_example(self) -> TrainExample:
        source = self.mix.next()
        counts = self.counts[source]
        for _ in range(MAX_DRAWS_IN_A_ROW):
            counts.read += 1
            example = self._draw(source, counts)
            if example is not None:
                counts.written += 1
                return example
        raise InputError(f"{source}: no usable record in {MAX_DRAWS_IN_A_ROW} draws in a row "
                         f"(skipped: {dict(counts.skipped)}); check the input")

    def _draw(self, source: str, counts: StageCounts) -> TrainExample | None:
        from labeling.images import ImageSkip, decode_image

        path, sample, data = self.streams[source].next()
        decoded = decode_image(data)
        if isinstance(decoded, ImageSkip):
            counts.skip(decoded.reason, f"{path} key {sample.key}", decoded.detail)
            return None
        if (decoded.width, decoded.height) != (sample.width, sample.height):
            counts.skip("image_size_mismatch", f"{path} key {sample.key}",
                        f"record {sample.width}x{sample.height}, image {decoded.width}x{decoded.height}")
            return None
        if source == "detection":
            return self._detection_example(path, sample, decoded.image, counts)
        if source == "pseudo":
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
        example = self._augmented(decoded.image, sample.caption, [b.bbox for b in sample.boxes],
                                  [b.tokens_positive for b in sample.boxes], source, sample.key, counts)
        if example is not None and source == "pseudo" and self.pseudo_unboxed == "ignore":
            example.tokens_ignore = unboxed_phrase_spans(sample)
        return example

    def _detection_example(self, path: str, sample: GroundedSample, image, counts: StageCounts) -> TrainExample | None:
        from storage.packed import detection_boxes, vocabulary_path

        where = vocabulary_path(fs.parent_of(path), str(sample.extra.get("vocabulary", "")))
        vocabulary = self.sources.vocabularies.get(where)
        if vocabulary is None:
            counts.skip("unknown_vocabulary", f"{path} key {sample.key}", f"no vocabulary at {where}")
            return None
        record = DetectionImage(sample.key, path, sample.width, sample.height, detection_boxes(sample),
                                vocabulary, sample.source)
        if self.fixed_prompt is not None:
            caption, boxes, spans = fixed_detection_prompt(record, self.fixed_prompt)
        else:
            caption, boxes, spans = detection_prompt(record, self.prompt_rng, self.detection_negatives, self.max_tokens)
        return self._augmented(image, caption, boxes, spans, "detection", sample.key, counts)

    def _augmented(self, image, caption, boxes_xywh, spans, source, key, counts) -> TrainExample | None:
        """``make_example`` drawing from this feed's own torch generator state."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.augment_rng)
        try:
            return make_example(self.augment, image, caption, boxes_xywh, spans, source, key, counts)
        finally:
            self.augment_rng = torch.get_rng_state()
            torch.set_rng_state(outer)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "mix": self.mix.state_dict(),
            "streams": {n: s.state_dict() for n, s in self.streams.items()},
            "prompt_rng": self.prompt_rng.bit_generator.state,
            "augment_rng": self.augment_rng.clone(),
            "counts": self.all_counts(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` (this reader's, same split) was taken."""
        self._load_counts(state.get("counts") or {})
        self.mix.load_state_dict(state["mix"])
        for name, stream_state in state["streams"].items():
            if name in self.streams:
                self.streams[name].load_state_dict(stream_state)
        self.prompt_rng.bit_generator.state = state["prompt_rng"]
        self.augment_rng = state["augment_rng"].clone()

    def resplit(self, states: list[dict], keep_counts: bool) -> None:
        """Continue the data position of another split (``states``: every old reader's, in
        order): each stream takes its part of the shards left; the random draws start afresh.
        ``keep_counts``: this reader carries the old readers' counts (one reader should)."""
        if keep_counts:
            total: dict[str, StageCounts] = {}
            for s in states:
                for name, c in (s.get("counts") or {}).items():
                    total.setdefault(name, StageCounts()).merge(c)
            self._load_counts({n: c.to_dict() for n, c in total.items()})
        for name, stream in self.streams.items():
            old = [s["streams"][name] for s in states if name in s.get("streams", {})]
            if old:
                stream.resplit(old)

    def _load_counts(self, counts: dict[str, dict]) -> None:
        for name, c in counts.items():
            reader = name.removeprefix(READER_PREFIX)
            target = self.reader_counts if name.startswith(READER_PREFIX) else self.counts
            if reader in target:   # the stream holds this object: update it in place
                loaded = StageCounts.from_dict(c)
                target[reader].read, target[reader].written = loaded.read, loaded.written
                target[reader].skipped = loaded.skipped

    def all_counts(self) -> dict[str, dict]:
        """Per-source counts as dicts; each shard reader's own under ``_reader_<source>``."""
        result = {name: c.to_dict() for name, c in self.counts.items()}
        result.update({READER_PREFIX + name: c.to_dict() for name, c in self.reader_counts.items()})
        return result


READER_PREFIX = "_reader_"
