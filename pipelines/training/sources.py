"""Training sources as shard lists: packed gold, packed detection, pseudo-label shards.

Every source reaches the workers as a list of shard files (``TrainingSources``, kilobytes),
and each worker streams its own part (``sampling.ShardStream``). ``ANN.json=IMAGES`` inputs
are packed into the run's folder first (``prepare_sources``), so bad input is counted and
refused before any training worker starts. ``load_gold`` / ``load_detection`` read small
annotation files whole, for the held-out sets of ``--eval``. Every path is a local path
(made absolute here) or a URI.
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
    """What the workers stream, as shard lists: kilobytes in the Ray Train config, whatever the
    size of the data. ``vocabularies``: the category names of each packed detection dataset,
    by its ``storage.packed.vocabulary_path``."""
    gold_files: list[str] = field(default_factory=list)
    detection_files: list[str] = field(default_factory=list)
    pseudo_files: list[str] = field(default_factory=list)
    vocabularies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    counts: dict[str, StageCounts] = field(default_factory=dict)   # driver-side (packing) counts

    def files(self, name: str) -> list[str]:
        return {"gold": self.gold_files, "detection": self.detection_files, "pseudo": self.pseudo_files}[name]

    def available(self) -> dict[str, bool]:
        return {name: bool(self.files(name)) for name in ("gold", "pseudo", "detection")}


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


def load_vocabularies(detection_files: list[str]) -> dict[str, tuple[str, ...]]:
    """The vocabulary of every packed detection dataset the shards come from (one listing per folder)."""
    from storage.packed import VOCABULARY_DIR, read_vocabulary, vocabulary_path

    found: dict[str, tuple[str, ...]] = {}
    for folder in dict.fromkeys(fs.parent_of(f) for f in detection_files):
        try:
            entries = fs.list_dir(fs.join(folder, VOCABULARY_DIR))
        except FileNotFoundError:
            raise InputError(f"--detection {folder}: packed detection shards without their {VOCABULARY_DIR}/ "
                             f"folder; pack the data again with `glipctl pack`") from None
        for e in entries:
            if e.name.endswith(".json") and not e.name.startswith("."):
                dataset = e.name[:-5]
                found[vocabulary_path(folder, dataset)] = read_vocabulary(folder, dataset)
    return found


def pack_folder(run_out: str, specs: list) -> str:
    """Where a run packs its ``ANN.json=IMAGES`` inputs: ``OUT/_packed/<digest>``, the digest
    of the inputs (paths and sizes) so a resumed run finds its pack and other inputs get another."""
    import hashlib
    import json

    described = []
    for spec in specs:
        sizes = []
        for path in (spec.annotations, spec.label_map):
            sizes.append(fs.size_of(path) if path else None)
        described.append([spec.kind, spec.annotations, spec.image_root, spec.label_map, sizes])
    digest = hashlib.sha256(json.dumps([described, PACK_SAMPLES_PER_SHARD]).encode()).hexdigest()[:16]
    return fs.join(run_out, PACKED_DIR, digest)


PACKED_DIR = "_packed"
# Small shards for on-the-fly packs: small data still splits over workers and shuffles well.
PACK_SAMPLES_PER_SHARD = 64


def prepare_sources(gold: list[AnnotatedImages | str], detection: list[AnnotatedImages | str],
                    pseudo: list[str], run_out: str, workers: int | None = None,
                    progress: bool = False) -> TrainingSources:
    """Shard lists of every source given on the command line (driver side; Ray must be up).

    Packed folders and ``.tar`` shards are listed from their manifests; ``ANN.json=IMAGES``
    inputs are packed first (``pipelines.pack``) into ``pack_folder(run_out, ...)``, once:
    a resumed run reuses it. Only file names are read here, never records or images.
    """
    from storage.packed import packed_shards

    from pipelines.pack import PackOptions, PackSpec, run_pack

    sources = TrainingSources(counts={name: StageCounts() for name in ("gold", "detection", "pseudo")})
    specs = [PackSpec("gold", g.annotations, g.image_root) for g in gold if isinstance(g, AnnotatedImages)]
    specs += [PackSpec("detection", d.annotations, d.image_root) for d in detection if isinstance(d, AnnotatedImages)]
    packed_gold = [fs.normalize(g) for g in gold if not isinstance(g, AnnotatedImages)]
    packed_detection = [fs.normalize(d) for d in detection if not isinstance(d, AnnotatedImages)]
    if specs:
        folder = pack_folder(run_out, specs)
        result = run_pack(specs, folder, PackOptions(samples_per_shard=PACK_SAMPLES_PER_SHARD, workers=workers))
        for spec, counts in zip(specs, result.dataset_counts()):
            sources.counts[spec.kind].merge(counts)
            if not counts.written:
                where = "--gold" if spec.kind == "gold" else "--detection"
                raise InputError(f"{where} {spec.annotations}: no usable record (images looked up in "
                                 f"{spec.image_root}; skipped: {dict(counts.skipped)})")
        if any(s.kind == "gold" for s in specs):
            packed_gold.append(folder)
        if any(s.kind == "detection" for s in specs):
            packed_detection.append(folder)
    if packed_gold:
        sources.gold_files = packed_shards(packed_gold, "grounding", "--gold")
    if packed_detection:
        sources.detection_files = packed_shards(packed_detection, "detection", "--detection")
        sources.vocabularies = load_vocabularies(sources.detection_files)
    if pseudo:
        sources.pseudo_files = find_pseudo_shards([fs.normalize(p) for p in pseudo])
    return sources
