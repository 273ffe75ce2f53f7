"""Training sources loaded on the driver: gold grounding, detection, pseudo-label shard lists.

Gold and detection annotations are read once here (``storage`` readers), checked against
the image folders and validated, so bad input fails before any worker starts and every
skipped record is counted with its reason. Pseudo-label shards stay on disk: only their
file list travels to the workers, which stream them (``sampling.PseudoStream``). Every path
is a local path (made absolute here) or a URI; image paths take the form of their root.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from storage import fs
from storage.errors import InputError
from storage.records import GroundedSample
from storage.skips import StageCounts

from pipelines.training.options import AnnotatedImages


@dataclass
class DetectionImage:
    """One image of a detection dataset, before its prompt is drawn.

    ``boxes`` are ``([x, y, w, h] pixels, category name)``; ``categories`` is the dataset's
    whole vocabulary (shared by every image of the dataset), the pool negatives come from.
    """
    key: str
    image_path: str
    width: int
    height: int
    boxes: list[tuple[list[float], str]]
    categories: tuple[str, ...]
    source: str


@dataclass
class TrainingSources:
    """What the workers sample from; picklable (it travels in the Ray Train config)."""
    gold: list[GroundedSample] = field(default_factory=list)
    detection: list[DetectionImage] = field(default_factory=list)
    pseudo_files: list[str] = field(default_factory=list)
    counts: dict[str, StageCounts] = field(default_factory=dict)   # driver-side loading counts

    def available(self) -> dict[str, bool]:
        return {"gold": bool(self.gold), "pseudo": bool(self.pseudo_files), "detection": bool(self.detection)}


def load_gold(specs: list[AnnotatedImages], counts: StageCounts) -> list[GroundedSample]:
    """Validated gold samples whose image exists (``extra["image_path"]`` set by storage).

    Missing images, bad spans and boxes outside the image are counted by ``storage.goldg``.
    Raises InputError when a file yields no usable sample (a wrong image folder, say).
    """
    from storage.goldg import load_mdetr

    samples: list[GroundedSample] = []
    for spec in specs:
        before = len(samples)
        for sample in load_mdetr(spec.annotations, spec.image_root, counts):
            if not sample.boxes:
                counts.skip("no_valid_boxes", spec.annotations, sample.key)
                continue
            samples.append(sample)
        if len(samples) == before:
            raise InputError(f"--gold {spec.annotations}: no usable sample "
                             f"(images looked up in {spec.image_root}; skipped: {dict(counts.skipped)})")
    return samples


def load_detection(specs: list[AnnotatedImages], counts: StageCounts) -> list[DetectionImage]:
    """Detection images with their boxes named by category; prompts are drawn per visit.

    ``storage.coco`` splits an image's categories over several prompts when they exceed
    the token limit; they are merged back per image here, since the training prompt is
    drawn anew at every visit from the dataset's whole vocabulary.
    """
    from storage.coco import category_name, load_coco_detection
    from storage.goldg import load_coco_api

    images: list[DetectionImage] = []
    for spec in specs:
        vocabulary = tuple(dict.fromkeys(
            n for n in (category_name(c) for c in load_coco_api(spec.annotations).cats.values()) if n))
        by_image: dict[str, DetectionImage] = {}
        for sample in load_coco_detection(spec.annotations, spec.image_root, counts):
            image_key = str(sample.extra.get("image_id", sample.key))
            entry = by_image.get(image_key)
            if entry is None:
                entry = by_image[image_key] = DetectionImage(
                    key=f"{sample.source}/{image_key}", image_path=str(sample.extra["image_path"]),
                    width=sample.width, height=sample.height, boxes=[], categories=vocabulary,
                    source=sample.source)
            for box in sample.boxes:
                s, e = box.tokens_positive[0]
                entry.boxes.append((list(box.bbox), sample.caption[s:e]))
        if not by_image:
            raise InputError(f"--detection {spec.annotations}: no usable image "
                             f"(images looked up in {spec.image_root}; skipped: {dict(counts.skipped)})")
        images.extend(by_image.values())
    return images


def find_pseudo_shards(paths: list[str]) -> list[str]:
    """Every pseudo-label shard (``.tar``) under ``paths``; InputError when there is none."""
    from storage.shards import list_shard_files

    files = [str(p) for p in list_shard_files(paths)]
    if not files:
        raise InputError(f"--pseudo {' '.join(paths)}: no pseudo-label shards (.tar) found")
    return sorted(files)


def load_sources(gold: list[AnnotatedImages], detection: list[AnnotatedImages],
                 pseudo: list[str]) -> TrainingSources:
    """Load and check every source given on the command line (driver side)."""
    sources = TrainingSources(counts={name: StageCounts() for name in ("gold", "detection", "pseudo")})
    # absolute paths: Ray Train workers need not share the driver's working directory
    gold = [AnnotatedImages(fs.normalize(g.annotations), fs.normalize(g.image_root)) for g in gold]
    detection = [AnnotatedImages(fs.normalize(d.annotations), fs.normalize(d.image_root)) for d in detection]
    pseudo = [fs.normalize(p) for p in pseudo]
    if gold:
        sources.gold = load_gold(gold, sources.counts["gold"])
    if detection:
        sources.detection = load_detection(detection, sources.counts["detection"])
    if pseudo:
        sources.pseudo_files = find_pseudo_shards(pseudo)
    return sources
