"""The pack stage: gold grounding, COCO detection and ODVG data -> grounded-sample shards.

Training at scale streams every source from the one shard format pseudo-labels use
(DESIGN.md; ``storage.packed`` is the contract with ``train-student``)::

    driver: each annotation file parsed once -> datasets -> shard plan (record ranges, no
            records) + each detection dataset's vocabulary (_vocabulary/<dataset>.json)
      -> one row per pending shard (ray.data.from_items, one block each)
      -> ShardPacker (autoscaling actor pool (1, N)), for its shard, end to end:
           the annotation file (COCO/MDETR: loaded once per actor; ODVG: the shard's byte range)
           -> the shard's records -> each image's bytes (storage.fs, a few reads in flight)
           -> header + reduced-size decode check -> ShardWriter: {shard}-00000.tar +
           {shard}-00000.labels.parquet -> the shard's commit record (the commit point)
      -> driver: one small row per shard (name, manifest entry): manifest + progress

A dataset is one ``--gold``/``--detection``/``--odvg`` value, named after its annotation
file's stem (characters other than ``[A-Za-z0-9_]`` become ``_``; ``_2``, ``_3``, ... make
two equal stems unique, in the order given), so a shard name splits at its last ``-``.
Its records, in the reader's order, are cut into shards of ``samples_per_shard`` records:

- gold (MDETR) and COCO detection files: the image entries sorted by id (the order of
  ``storage.goldg.iter_mdetr`` / ``storage.coco.iter_coco_detection``); shard ``i`` is
  ``{dataset}-{i:05d}``;
- ODVG files: the lines of each kind, in file order; shard ``i`` of the grounding lines is
  ``{dataset}-g{i:05d}``, of the detection lines ``{dataset}-d{i:05d}`` (always, so a
  shard's name says its kind). A shard covers a byte range of the file (a worker reads
  only that, memory O(shard)); lines that are neither kind (bad JSON, no ``grounding`` or
  ``detection`` object) are read and counted by the shards of the file's first kind
  (grounding when it has any) whose range holds them, so each line counts once.

Every commit record / manifest entry: ``status``, ``kind`` ("grounding" or "detection"),
``dataset``, ``counts`` (read, written, skipped by reason, boxes), ``outputs`` (the tar),
``labels`` (its label table), ``checksums`` (sha256 of both), ``records`` (the shard's
``[start, stop)`` record range in its kind), ``seconds``. Samples:

- gold: the ``GroundedSample`` of ``storage.goldg.load_mdetr`` without ``extra["image_path"]``;
- COCO detection: one ``storage.packed.detection_sample`` per image (not per prompt), key
  ``det/<dataset>/<image_id>``, source ``det/<dataset>``, ``extra`` image_id and file_name;
- ODVG: grounding lines as ``storage.odvg`` reads them (``extra["file_name"]``), detection
  lines one ``detection_sample`` per line (source the line's, else ``det/<dataset>``).

A sample whose boxes all fail validation is a counted skip (``no_valid_boxes``; detection
images ``no_boxes``, as ``storage.coco`` counts them). Images are the original bytes, never
re-encoded, named by their real format; one that is absent is ``missing_image``, that does
not decode ``corrupt_image``, whose size differs from the annotation's
``image_size_mismatch``, that is not JPEG/PNG/WebP ``unsupported_image_format``, of more
pixels than ``labeling.images.MAX_PIXELS`` ``decompression_bomb``.

Resume and failures follow parse-captions (``pipelines.parse_captions``): commit records are
the truth; the options that change what is written (``samples_per_shard``, the dataset list
with each annotation file's size) must match unless ``overwrite``; a shard whose worker
raises is recorded failed and the others go on; a lost actor is restarted and its shard
redone, byte-identical. When every shard of a dataset is already committed the driver does
not parse its file again (the plan is recorded in the manifest's ``plan``).
"""
from __future__ import annotations

import io
import json
import logging
import re
import time
import warnings
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from storage import fs
from storage.errors import InputError
from storage.manifest import COMMITS_DIR, Manifest, clear_shard, commit_path, commit_shard, dumps_entry
from storage.packed import STAGE, VOCABULARY_DIR, detection_sample, vocabulary_path, write_vocabulary
from storage.records import GroundedSample
from storage.skips import StageCounts

log = logging.getLogger("glipctl.pack")

SPEC_KINDS = ("gold", "detection", "odvg")
OPTION_OF = {"gold": "--gold", "detection": "--detection", "odvg": "--odvg"}
# Options that change what is written; a resumed run must use the same ones.
OUTPUT_OPTIONS = ("samples_per_shard", "datasets")
MANIFEST_SAVE_INTERVAL_S = 2.0
# Passes over the shards whose results were lost (their worker's node died): time, never samples.
LOST_SHARD_RETRIES = 1
# CPUs kept free per node beside the actors (as parse-captions: room for Ray Data's own tasks
# and for an actor restarting after a node loss).
SPARE_CPUS_PER_NODE = 0.1
IMAGE_READS_IN_FLIGHT = 8        # per actor: object-store reads are latency-bound
MAX_SAMPLES_PER_TAR = 1 << 30    # one tar per shard: the shard is cut by samples_per_shard
ANNOTATION_FILES_CACHED = 1      # parsed COCO/MDETR files an actor keeps (rows come in dataset order)
IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}   # what storage.shards reads

SKIP_MISSING_IMAGE = "missing_image"
SKIP_CORRUPT_IMAGE = "corrupt_image"
SKIP_SIZE_MISMATCH = "image_size_mismatch"
SKIP_UNSUPPORTED_FORMAT = "unsupported_image_format"
SKIP_NO_VALID_BOXES = "no_valid_boxes"      # a grounding sample whose boxes were all dropped
SKIP_NO_BOXES = "no_boxes"                  # a detection image without a usable box (storage.coco's name)

RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("entry", pa.string()), ("error", pa.string())])

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_]+")


# ------------------------------------------------------------------------- what to pack

@dataclass(frozen=True)
class PackSpec:
    """One dataset to pack: an annotation file and the folder its file names are relative to.

    ``kind``: "gold" (MDETR/GoldG JSON), "detection" (COCO JSON) or "odvg" (ODVG JSONL);
    ``label_map``: ODVG only, a ``{"label": "name"}`` JSON file (default: the instances'
    ``category`` fields). Paths are local paths or URIs.
    """
    kind: str
    annotations: str
    image_root: str
    label_map: str | None = None

    @classmethod
    def parse(cls, kind: str, value: str, label_map: str | None = None) -> "PackSpec":
        """``ANN.json=IMAGE_DIR`` (as given to ``--gold`` etc.) -> PackSpec; InputError when malformed.

        Split after ``.json=``/``.jsonl=`` when there is one, else at the first ``=``, so a URI
        with ``=`` in it (``s3://b/date=2024/ann.json=s3://b/images``) parses.
        """
        from pipelines.training.options import split_annotated

        ann, root = split_annotated(value, OPTION_OF.get(kind, kind))
        return cls(kind, ann, root, label_map)

    @property
    def option(self) -> str:
        return OPTION_OF[self.kind]


@dataclass
class PackOptions:
    samples_per_shard: int = 1000
    workers: int | None = None        # actor pool maximum; None = the cluster's CPU count
    overwrite: bool = False


@dataclass(frozen=True)
class Dataset:
    """A checked ``PackSpec`` with its unique name; paths normalized. Recorded in the manifest."""
    name: str
    format: str                  # PackSpec.kind
    annotations: str
    image_root: str
    label_map: str | None
    size: int                    # bytes of the annotation file: a changed file is not resumed

    @property
    def option(self) -> str:
        return OPTION_OF[self.format]


@dataclass(frozen=True)
class ShardTask:
    """One shard's work, as it travels to an actor (a few hundred bytes, never records).

    ``start``/``stop``: the shard's records in its kind (COCO/MDETR: index into the image ids
    sorted; ODVG: ordinal among the file's lines of ``kind``). ODVG also: the byte range
    ``[byte_start, byte_stop)`` starting at line ``first_line``, and whether this shard counts
    the lines of neither kind in it. ``file_skips``: the dataset's first shard also counts
    what concerns the whole file (annotations without an image, malformed annotations).
    """
    name: str
    dataset: str
    kind: str                    # "grounding" | "detection"
    format: str                  # "gold" | "detection" | "odvg"
    annotations: str
    image_root: str
    start: int
    stop: int
    file_skips: bool = False
    first_line: int = 0
    byte_start: int = 0
    byte_stop: int = 0
    count_bad_lines: bool = False


@dataclass
class DatasetPlan:
    dataset: Dataset
    records: int
    tasks: list[ShardTask]
    label_map: dict[int, str] | None = None   # ODVG with detection lines
    vocabulary: bool = False                  # written to _vocabulary/<dataset>.json

    @property
    def shards(self) -> list[str]:
        return [t.name for t in self.tasks]


@dataclass
class PackResult:
    manifest: Manifest
    datasets: list[Dataset] = field(default_factory=list)
    counts: dict[str, StageCounts] = field(default_factory=dict)   # per dataset, all its shards
    shards: dict[str, list[str]] = field(default_factory=dict)     # per dataset, its shard names
    done: list[str] = field(default_factory=list)       # shards packed by this run
    resumed: list[str] = field(default_factory=list)    # shards already committed before it
    failed: list[str] = field(default_factory=list)
    images: int = 0                                      # samples written by this run
    seconds: float = 0.0

    def dataset_counts(self) -> list[StageCounts]:
        """Read / written / skipped of each dataset, in the order of the specs given."""
        return [self.counts[d.name] for d in self.datasets]


def dataset_name(annotations: str) -> str:
    """The safe stem of an annotation file (``final_flickr_separateGT_train.json`` -> itself minus .json)."""
    stem = fs.name_of(annotations)
    for suffix in (".jsonl", ".json"):
        if stem.lower().endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    return _UNSAFE_NAME.sub("_", stem).strip("_") or "dataset"


def resolve_datasets(specs: list[PackSpec]) -> list[Dataset]:
    """The specs checked (files and folders exist) and named; InputError naming the bad path."""
    if not specs:
        raise InputError("nothing to pack: give at least one --gold, --detection or --odvg ANN=IMAGE_DIR")
    out: list[Dataset] = []
    taken: set[str] = set()
    for spec in specs:
        if spec.kind not in SPEC_KINDS:
            raise ValueError(f"PackSpec.kind must be one of {SPEC_KINDS}, not {spec.kind!r}")
        ann, root = fs.normalize(spec.annotations), fs.normalize(spec.image_root)
        if fs.kind_of(ann) != "file":
            raise InputError(f"{spec.option} {spec.annotations}: annotation file not found")
        if fs.kind_of(root) != "dir":
            raise InputError(f"{spec.option} {spec.annotations}={spec.image_root}: image folder not found")
        label_map = None
        if spec.label_map is not None:
            if spec.kind != "odvg":
                raise InputError(f"--label-map {spec.label_map}: only ODVG files take a label map")
            label_map = fs.normalize(spec.label_map)
            if fs.kind_of(label_map) != "file":
                raise InputError(f"--label-map {spec.label_map}: file not found")
        base = name = dataset_name(ann)
        n = 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        out.append(Dataset(name, spec.kind, ann, root, label_map, fs.size_of(ann)))
    return out


def manifest_options(datasets: list[Dataset], options: PackOptions) -> dict[str, Any]:
    return {**asdict(options), "datasets": [asdict(d) for d in datasets]}


def open_manifest(out_dir: str, datasets: list[Dataset], options: PackOptions) -> Manifest:
    """The manifest to resume from, or a fresh one (``overwrite`` or none yet).

    Raises InputError when ``out_dir`` holds another stage's output, an unreadable manifest,
    or packs written with other output options (without ``overwrite``).
    """
    wanted = manifest_options(datasets, options)
    if not options.overwrite:
        try:
            old = Manifest.resumable(out_dir, STAGE, wanted, OUTPUT_OPTIONS)
        except OSError as exc:     # bad credentials, unknown bucket, unreachable endpoint
            raise InputError(f"--out {out_dir}: cannot be read ({exc})") from None
        if old is not None:
            return old
    return Manifest(stage=STAGE, options=wanted)


def check_pack(specs: list[PackSpec], out_dir: str, options: PackOptions) -> list[Dataset]:
    """Everything that can be refused before Ray starts (paths, --out's manifest); InputError."""
    if options.samples_per_shard < 1:
        raise InputError("--samples-per-shard must be at least 1")
    datasets = resolve_datasets(specs)
    open_manifest(fs.normalize(out_dir), datasets, options)
    return datasets


# ------------------------------------------------------------------------- planning (driver)

def _ranges(n: int, per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + per_shard)) for a in range(0, n, per_shard)]


def plan_coco(dataset: Dataset, out_dir: str, per_shard: int) -> DatasetPlan:
    """Shards of a gold (MDETR) or COCO detection file; writes a detection dataset's vocabulary."""
    from storage.coco import category_name
    from storage.goldg import is_mdetr, load_coco_api

    coco = load_coco_api(dataset.annotations, StageCounts(max_logged=0))   # the first shard counts
    if not coco.imgs:
        raise InputError(f"{dataset.option} {dataset.annotations}: no image entries")
    if dataset.format == "gold":
        if not is_mdetr(coco):
            raise InputError(f"--gold {dataset.annotations}: not MDETR/GoldG grounding data (its image "
                             f"entries have no caption); COCO detection data goes to --detection")
        kind = "grounding"
    else:
        names = list(dict.fromkeys(n for n in (category_name(coco.cats[c]) for c in sorted(coco.cats)) if n))
        if not names:
            raise InputError(f"--detection {dataset.annotations}: no named categories")
        write_vocabulary(out_dir, dataset.name, names)
        kind = "detection"
    tasks = [ShardTask(f"{dataset.name}-{i:05d}", dataset.name, kind, dataset.format, dataset.annotations,
                       dataset.image_root, a, b, file_skips=(i == 0))
             for i, (a, b) in enumerate(_ranges(len(coco.imgs), per_shard))]
    return DatasetPlan(dataset, len(coco.imgs), tasks, vocabulary=kind == "detection")


def odvg_line(raw: bytes) -> tuple[str | None, dict[str, Any] | None, str]:
    """``(kind, object, "")`` for an ODVG line, or ``(None, object or None, skip reason)``.

    The reasons are ``storage.odvg``'s: ``bad_json`` (not a JSON object), ``malformed_record``
    (neither a ``grounding`` nor a ``detection`` object).
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, None, "bad_json"
    if not isinstance(obj, dict):
        return None, None, "bad_json"
    if isinstance(obj.get("grounding"), dict):
        return "grounding", obj, ""
    if isinstance(obj.get("detection"), dict):
        return "detection", obj, ""
    return None, obj, "malformed_record"


def _iter_lines(stream, first_line: int = 1, offset: int = 0,
                chunk: int = 1 << 20) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, line without its newline)`` for each line of a stream."""
    n, rest, rest_at = first_line, b"", offset
    while True:
        data = stream.read(chunk)
        if not data:
            break
        data = rest + data
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                break
            yield n, rest_at + pos, data[pos:end]
            n += 1
            pos = end + 1
        rest_at += pos
        rest = data[pos:]
    if rest:
        yield n, rest_at, rest


def _read_label_map(path: str) -> dict[int, str]:
    try:
        raw = fs.read_json(path)
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(f"--label-map {path}: unreadable label map ({exc})") from None


def plan_odvg(dataset: Dataset, out_dir: str, per_shard: int) -> DatasetPlan:
    """Shards of an ODVG file (one pass over its lines; module docstring); writes its vocabulary."""
    from storage.coco import category_name

    # per kind: [first line, first byte, stop byte] of each shard, and the kind's line count
    groups: dict[str, list[list[int]]] = {"grounding": [], "detection": []}
    seen: Counter = Counter()
    found_labels: dict[int, str] = {}
    end = 0
    with fs.open_input_stream(dataset.annotations) as fh:
        for n, at, raw in _iter_lines(fh):
            end = at + len(raw) + 1
            if not raw.strip():
                continue
            kind, obj, _ = odvg_line(raw)
            if kind is None:
                continue
            if seen[kind] % per_shard == 0:
                groups[kind].append([n, at, end])
            groups[kind][-1][2] = end
            seen[kind] += 1
            if kind == "detection" and dataset.label_map is None:
                for inst in obj["detection"].get("instances") or []:
                    if isinstance(inst, dict) and "label" in inst and inst.get("category"):
                        try:
                            found_labels.setdefault(int(inst["label"]), str(inst["category"]))
                        except (TypeError, ValueError):
                            pass    # the worker counts the instance
    if not seen:
        raise InputError(f"--odvg {dataset.annotations}: no grounding or detection line")
    label_map = None
    if seen["detection"]:
        label_map = _read_label_map(dataset.label_map) if dataset.label_map else found_labels
        names = list(dict.fromkeys(n for n in (category_name({"name": label_map[k]}) for k in sorted(label_map))
                                   if n))
        if not names:
            raise InputError(f"--odvg {dataset.annotations}: detection lines without category names "
                             f"(no instance has a 'category'; pass --label-map)")
        write_vocabulary(out_dir, dataset.name, names)
    primary = "grounding" if seen["grounding"] else "detection"
    tasks: list[ShardTask] = []
    for kind in ("grounding", "detection"):
        spans = groups[kind]
        if kind == primary and spans:
            # the primary kind's shards tile the whole file: each line of neither kind lies in one
            starts = [(1, 0)] + [(first, at) for first, at, _ in spans[1:]]
            stops = [at for _, at, _ in spans[1:]] + [end]
            spans = [[first, at, stop] for (first, at), stop in zip(starts, stops)]
        for i, ((first, start, stop), (a, b)) in enumerate(zip(spans, _ranges(seen[kind], per_shard))):
            tasks.append(ShardTask(f"{dataset.name}-{kind[0]}{i:05d}", dataset.name, kind, "odvg",
                                   dataset.annotations, dataset.image_root, a, b, first_line=first,
                                   byte_start=start, byte_stop=stop, count_bad_lines=kind == primary))
    return DatasetPlan(dataset, sum(seen.values()), tasks, label_map, vocabulary=label_map is not None)


def plan_dataset(dataset: Dataset, out_dir: str, per_shard: int) -> DatasetPlan:
    if dataset.format == "odvg":
        return plan_odvg(dataset, out_dir, per_shard)
    return plan_coco(dataset, out_dir, per_shard)


# ------------------------------------------------------------------------- one shard (in an actor)

def check_image(data: bytes, width: int, height: int) -> tuple[str | None, str, str]:
    """``(extension, "", "")`` for usable image bytes of ``width`` x ``height`` pixels, else
    ``(None, skip reason, detail)``.

    Reads the header, then proves the data decodes without building full-size pixels: a JPEG
    is decoded at 1/8 scale (libjpeg still reads every entropy-coded byte, so a truncated or
    corrupt file fails; measured 1.9 ms vs 3.0 ms for a full decode of a 640x480 JPEG), a
    PNG's chunks are CRC-checked (``verify``), a WebP is decoded. More pixels than
    ``labeling.images.MAX_PIXELS`` is ``decompression_bomb``.
    """
    from PIL import Image

    from labeling.images import MAX_PIXELS, SKIP_BOMB

    if not data:
        return None, SKIP_CORRUPT_IMAGE, "empty file"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            size, fmt = img.size, img.format or ""
            if fmt not in IMAGE_FORMATS:
                return None, SKIP_UNSUPPORTED_FORMAT, fmt or "unknown"
            if size[0] * size[1] > MAX_PIXELS:
                return None, SKIP_BOMB, f"{size[0]}x{size[1]} exceeds {MAX_PIXELS} pixels"
            if size != (width, height):
                return None, SKIP_SIZE_MISMATCH, f"image is {size[0]}x{size[1]}, annotation says {width}x{height}"
            if fmt == "PNG":
                img.verify()
            else:
                if fmt in ("JPEG", "MPO"):
                    img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return None, SKIP_BOMB, str(exc)[:200]
        except Exception as exc:   # noqa: BLE001 - PIL raises many types on bad bytes; all mean corrupt
            return None, SKIP_CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}"[:200]
    return IMAGE_FORMATS[fmt], "", ""


def read_image(path: str) -> tuple[bytes | None, str, str]:
    """``(bytes, "", "")`` or ``(None, skip reason, detail)`` for an image path or URI.

    A missing file (or a folder) is ``missing_image``; a local file that cannot be read
    ``corrupt_image``. Other errors of an object store (throttling, a dropped connection)
    raise: the shard fails and is redone by the next run, rather than losing the image.
    """
    try:
        return fs.read_bytes(path), "", ""
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, SKIP_MISSING_IMAGE, path
    except OSError as exc:
        if fs.is_remote(path):
            raise
        return None, SKIP_CORRUPT_IMAGE, f"{path}: {exc}"[:200]


class _CocoSlice:
    """Some images of a loaded ``pycocotools.coco.COCO``: what ``storage.goldg.iter_mdetr`` and
    ``storage.coco.iter_coco_detection`` read (``imgs``, ``imgToAnns``, ``cats``,
    ``dataset["annotations"]``). The annotations list is empty: annotations without an image
    concern the whole file and are counted once, by the dataset's first shard."""

    def __init__(self, coco, ids: list[int]):
        self.imgs = {i: coco.imgs[i] for i in ids}
        self.imgToAnns = coco.imgToAnns
        self.cats = coco.cats
        self.dataset = {"annotations": []}


class AnnotationCache:
    """Parsed COCO/MDETR files by path (the last ``ANNOTATION_FILES_CACHED``), for one actor."""

    def __init__(self, size: int = ANNOTATION_FILES_CACHED):
        self.size = size
        self._files: OrderedDict[str, tuple[Any, list[int], Counter]] = OrderedDict()

    def get(self, path: str) -> tuple[Any, list[int], Counter]:
        """``(COCO, image ids sorted, skips of loading)``."""
        from storage.goldg import load_coco_api

        if path not in self._files:
            while len(self._files) >= self.size:
                self._files.popitem(last=False)
            counts = StageCounts(max_logged=0)     # logged when the first shard counts them
            coco = load_coco_api(path, counts)
            self._files[path] = (coco, sorted(coco.imgs), counts.skipped)
        self._files.move_to_end(path)
        return self._files[path]


def _without_image_path(sample: GroundedSample) -> GroundedSample:
    sample.extra = {k: v for k, v in sample.extra.items() if k != "image_path"}
    return sample


def _coco_slice(task: ShardTask, cache: AnnotationCache, counts: StageCounts):
    from storage.goldg import count_orphan_annotations

    coco, ids, load_skips = cache.get(task.annotations)
    if task.file_skips:
        for reason, n in load_skips.items():
            for _ in range(n):
                counts.skip(reason, task.annotations)
        count_orphan_annotations(coco, counts, task.annotations)
    return _CocoSlice(coco, ids[task.start:task.stop])


def gold_records(task: ShardTask, cache: AnnotationCache,
                 counts: StageCounts) -> Iterator[tuple[GroundedSample, str]]:
    """``(sample, image path)`` of an MDETR shard, in ``iter_mdetr``'s order."""
    from storage.goldg import iter_mdetr

    view = _coco_slice(task, cache, counts)
    for sample in iter_mdetr(view, task.annotations, task.image_root, counts, check_images=False):
        if not sample.boxes:
            counts.skip(SKIP_NO_VALID_BOXES, f"{task.annotations} key {sample.key}")
            continue
        path = sample.extra["image_path"]
        yield _without_image_path(sample), path


def coco_detection_records(task: ShardTask, cache: AnnotationCache,
                           counts: StageCounts) -> Iterator[tuple[GroundedSample, str]]:
    """``(detection sample, image path)`` per image of a COCO shard: ``storage.coco``'s prompt
    samples of one image (its categories split over prompts) merged back into one."""
    from storage.coco import iter_coco_detection

    view = _coco_slice(task, cache, counts)
    source = f"det/{task.dataset}"
    current: list[GroundedSample] = []

    def merged() -> tuple[GroundedSample, str]:
        first = current[0]
        boxes = [(list(b.bbox), s.caption[b.tokens_positive[0][0]:b.tokens_positive[0][1]])
                 for s in current for b in s.boxes]
        image_id = first.extra["image_id"]
        sample = detection_sample(f"{source}/{image_id}", first.width, first.height, boxes, source=source,
                                  vocabulary=task.dataset,
                                  extra={"image_id": image_id, "file_name": first.extra["file_name"]})
        return sample, first.extra["image_path"]

    for prompt_sample in iter_coco_detection(view, task.annotations, task.image_root, counts, name=task.dataset,
                                             check_images=False):
        if current and current[0].extra["image_id"] != prompt_sample.extra["image_id"]:
            yield merged()
            current = []
        current.append(prompt_sample)
    if current:
        yield merged()


class OdvgLabels:
    """The prompts ``storage.odvg`` builds from a label map, per dataset (for detection lines)."""

    def __init__(self, label_maps: dict[str, dict[int, str]]):
        self.label_maps = label_maps
        self._prompts: dict[str, tuple[list, dict]] = {}

    def prompts(self, dataset: str) -> tuple[list, dict]:
        from storage.coco import category_prompts

        if dataset not in self._prompts:
            labels = {int(k): v for k, v in (self.label_maps.get(dataset) or {}).items()}
            prompts = category_prompts([{"id": k, "name": v} for k, v in labels.items()])
            prompt_of = {c: (p, j) for p, (_, spans) in enumerate(prompts) for j, (_, _, c) in enumerate(spans)}
            self._prompts[dataset] = (prompts, prompt_of)
        return self._prompts[dataset]


def odvg_records(task: ShardTask, labels: OdvgLabels,
                 counts: StageCounts) -> Iterator[tuple[GroundedSample, str]]:
    """``(sample, image path)`` for the lines of ``task.kind`` in the shard's byte range.

    Lines become samples exactly as in ``storage.odvg.load_odvg`` (its per-line builders),
    but only this shard's part of the file is read.
    """
    # storage.odvg reads whole files only; its per-line builders are what a byte range needs
    from storage.odvg import _base, _detection_samples, _grounding_sample
    from storage.shards import validated

    with fs.open_input_file(task.annotations) as fh:
        fh.seek(task.byte_start)
        data = fh.read(task.byte_stop - task.byte_start)
    ordinal = task.start
    for n, _, raw in _iter_lines(io.BytesIO(data), task.first_line, task.byte_start):
        if not raw.strip():
            continue
        kind, obj, reason = odvg_line(raw)
        where = f"{task.annotations} line {n}"
        if kind != task.kind:
            if kind is None and task.count_bad_lines:
                counts.read += 1
                counts.skip(reason, where, "neither 'grounding' nor 'detection'" if obj is not None else "")
            continue
        if ordinal >= task.stop:      # never happens: the range ends before the next shard's first line
            continue
        ordinal += 1
        counts.read += 1
        file_name = str(obj.get("filename") or "")
        try:
            if kind == "grounding":
                sample = _grounding_sample(obj, task.dataset, n, counts, where)
                if sample is None:
                    continue
                sample.extra["file_name"] = file_name
                sample = validated(sample, counts, where)
                if sample is None:
                    continue
                if not sample.boxes:
                    counts.skip(SKIP_NO_VALID_BOXES, where)
                    continue
            else:
                prompts, prompt_of = labels.prompts(task.dataset)
                parts = _detection_samples(obj, task.dataset, n, prompts, prompt_of, counts, where)
                if not parts:
                    continue    # counted no_boxes
                boxes = []
                for part in parts:
                    part = validated(part, counts, where)
                    if part is not None:
                        boxes += [(list(b.bbox), part.caption[b.tokens_positive[0][0]:b.tokens_positive[0][1]])
                                  for b in part.boxes]
                if not boxes:
                    counts.skip(SKIP_NO_BOXES, where)
                    continue
                key, source = _base(obj, f"det/{task.dataset}", n)
                sample = detection_sample(key, int(obj.get("width") or 0), int(obj.get("height") or 0), boxes,
                                          source=source, vocabulary=task.dataset,
                                          extra={"file_name": file_name, "line": n})
        except (TypeError, ValueError, KeyError) as exc:
            counts.skip("malformed_record", where, repr(exc)[:120])
            continue
        yield sample, fs.join(task.image_root, file_name)


def _read_ahead(records: Iterator[tuple[GroundedSample, str]], pool: ThreadPoolExecutor,
                depth: int) -> Iterator[tuple[GroundedSample, str, Any]]:
    """``(sample, path, future of read_image(path))`` in order, ``depth`` reads in flight."""
    window: deque = deque()
    for sample, path in records:
        window.append((sample, path, pool.submit(read_image, path)))
        if len(window) >= depth:
            yield window.popleft()
    while window:
        yield window.popleft()


def pack_shard(task: ShardTask, out_dir: str, cache: AnnotationCache, labels: OdvgLabels,
               reads_in_flight: int = IMAGE_READS_IN_FLIGHT) -> dict[str, Any]:
    """Pack one shard end to end: its tar + label table, then its commit record; the entry.

    Raises when the annotation file, an object-store image or the output cannot be read or
    written (the caller records the shard failed; nothing is committed).
    """
    from storage.shards import ShardWriter

    started = time.perf_counter()
    counts = StageCounts()
    boxes = 0
    if task.format == "gold":
        records = gold_records(task, cache, counts)
    elif task.format == "detection":
        records = coco_detection_records(task, cache, counts)
    else:
        records = odvg_records(task, labels, counts)
    writer = ShardWriter(out_dir, task.name, max_samples=MAX_SAMPLES_PER_TAR)
    with writer, ThreadPoolExecutor(reads_in_flight, thread_name_prefix="glipctl-pack-read") as pool:
        for sample, path, future in _read_ahead(records, pool, reads_in_flight):
            data, reason, detail = future.result()
            ext = None
            if data is not None:
                ext, reason, detail = check_image(data, sample.width, sample.height)
            if ext is None:
                counts.skip(reason, f"{task.annotations} key {sample.key}", detail)
                continue
            writer.write(sample, data, ext)
            counts.written += 1
            boxes += len(sample.boxes)
    entry: dict[str, Any] = {
        "status": "done", "stage": STAGE, "kind": task.kind, "dataset": task.dataset,
        "counts": {**counts.to_dict(), "boxes": boxes}, "outputs": writer.outputs, "labels": writer.labels,
        "checksums": writer.checksums, "records": [task.start, task.stop],
        "seconds": round(time.perf_counter() - started, 3)}
    commit_shard(out_dir, task.name, entry)    # the commit point: the tar and its table are complete
    return entry


class ShardPacker:
    """Ray Data callable class: packs whole shards into ``out_dir``.

    In: a table with column ``task`` (a ``ShardTask`` as JSON), one row per shard. Out: one
    ``RESULT_SCHEMA`` row per shard (the committed entry as JSON, or the error).
    ``label_maps``: ``{dataset: {label: name}}`` of the ODVG datasets with detection lines.
    """

    def __init__(self, out_dir: str, label_maps: dict[str, dict[int, str]]):
        self.out_dir = out_dir
        self.cache = AnnotationCache()
        self.labels = OdvgLabels(label_maps)

    def pack(self, task: ShardTask) -> dict[str, Any]:
        return pack_shard(task, self.out_dir, self.cache, self.labels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from storage.manifest import read_commit

        names, entries, errors = [], [], []
        for spec in batch.column("task").to_pylist():
            task = ShardTask(**json.loads(spec))
            entry, error = "", ""
            try:
                # a retried block (its actor died) only reads back what it committed before dying
                done = read_commit(self.out_dir, task.name)
                entry = dumps_entry(done if done is not None else self.pack(task))
            except Exception as exc:   # noqa: BLE001 - one shard's failure must not end the run
                error = f"{type(exc).__name__}: {exc}"[:2000]
            names.append(task.name)
            entries.append(entry)
            errors.append(error)
        return pa.table({"shard": names, "entry": entries, "error": errors}, schema=RESULT_SCHEMA)


# ------------------------------------------------------------------------- driver side

class _Recorder:
    """The driver's whole job per shard: its result row into the manifest, the progress moved.

    O(1) per row; ``_manifest.json`` is rewritten at most every ``interval`` seconds and by
    ``close``. ``on_progress(images, shards_finished, shards_total)``.
    """

    def __init__(self, manifest: Manifest, out_dir: str, pending: list[ShardTask], result: PackResult,
                 on_progress: Callable[[int, int, int], None] | None = None,
                 interval: float = MANIFEST_SAVE_INTERVAL_S):
        self.manifest, self.out_dir, self.result = manifest, out_dir, result
        self.tasks = {t.name: t for t in pending}
        self.waiting = set(self.tasks)
        self.total = len(pending)
        self.on_progress = on_progress
        self.interval = interval
        self.last_save = time.perf_counter()

    def add_batch(self, table: pa.Table) -> None:
        for name, entry, error in zip(table.column("shard").to_pylist(), table.column("entry").to_pylist(),
                                      table.column("error").to_pylist()):
            if entry:
                self.add(name, json.loads(entry))
            else:
                self.fail(name, error or "unknown error")

    def fail(self, name: str, error: str) -> None:
        task = self.tasks[name]
        self.add(name, {"status": "failed", "kind": task.kind, "dataset": task.dataset, "counts": {},
                        "error": error})

    def add(self, name: str, entry: dict[str, Any]) -> None:
        if name not in self.waiting:      # a repeated row (a retried task): already recorded
            return
        self.waiting.discard(name)
        entry.pop("stage", None)
        if entry.get("status") == "done":
            self.result.done.append(name)
            self.result.images += int((entry.get("counts") or {}).get("written", 0))
        else:
            log.warning("shard %s failed: %s", name, entry.get("error"))
            self.result.failed.append(name)
        self.manifest.shards[name] = entry
        if time.perf_counter() - self.last_save >= self.interval:
            self.save()
        if self.on_progress is not None:
            self.on_progress(self.result.images, self.total - len(self.waiting), self.total)

    def save(self) -> None:
        self.manifest.save(self.out_dir)
        self.last_save = time.perf_counter()

    def close(self, error: str) -> None:
        """Record the shards whose row never came: done if a worker committed them, else failed."""
        for name in sorted(self.waiting):
            try:
                record = fs.read_json(commit_path(self.out_dir, name))
            except (OSError, ValueError):
                record = None
            if isinstance(record, dict) and record.get("status") == "done":
                record.pop("shard", None)
                self.add(name, record)
            else:
                self.fail(name, error)
        self.save()


def _actor_cpus(workers: int, cluster_cpus: float, nodes: int = 1) -> float:
    """CPUs each actor asks for: one, unless that leaves no spare room on a node (parse-captions' rule)."""
    free_for_actors = cluster_cpus - SPARE_CPUS_PER_NODE * max(1, nodes)
    return round(max(0.1, min(1.0, free_for_actors / max(1, workers))), 3)


def _clear_previous_output(out_dir: str) -> None:
    """``overwrite``: forget every shard an earlier pack committed here, and the vocabularies.

    Only outputs a pack manifest names are deleted (never files it does not own).
    """
    try:
        old = Manifest.load(out_dir)
    except (ValueError, OSError):
        return
    if old is None or old.stage != STAGE:
        return
    for name, entry in old.shards.items():
        clear_shard(out_dir, name, (entry.get("outputs") or []) + (entry.get("labels") or []))
    fs.delete_dir(fs.join(out_dir, VOCABULARY_DIR))


def _names_in(folder: str) -> set[str]:
    try:
        return {e.name for e in fs.list_dir(folder) if not e.is_dir}
    except FileNotFoundError:
        return set()


def _is_complete(manifest: Manifest, name: str, committed: set[str], present: set[str]) -> bool:
    entry = manifest.shards.get(name, {})
    outputs = (entry.get("outputs") or []) + (entry.get("labels") or [])
    return manifest.is_done(name) and name in committed and all(o in present for o in outputs)


def _dataset_counts(manifest: Manifest, names: list[str]) -> StageCounts:
    counts = StageCounts()
    for name in names:
        counts.merge(manifest.shards.get(name, {}).get("counts") or {})
    return counts


def run_pack(specs: list[PackSpec], out_dir: str, options: PackOptions,
             on_progress: Callable[[int, int, int], None] | None = None,
             packer_cls: type | None = None) -> PackResult:
    """Pack every dataset of ``specs`` into ``out_dir`` (local path or URI); Ray must be up.

    Resumes from ``out_dir``'s manifest (committed shards are not redone). ``on_progress(
    images_written, shards_finished, shards_total)`` is called per finished shard. Raises
    InputError for a missing annotation file or image folder, a file that does not parse, a
    folder written with other output options (unless ``options.overwrite``), and a dataset of
    which no record could be packed (after the run, its counts saved in the manifest).
    ``packer_cls`` replaces ``ShardPacker`` (a subclass, e.g. for fault injection in tests).
    """
    out_dir = fs.normalize(out_dir)
    if options.samples_per_shard < 1:
        raise InputError("--samples-per-shard must be at least 1")
    datasets = resolve_datasets(specs)
    if options.overwrite:
        _clear_previous_output(out_dir)
    manifest = open_manifest(out_dir, datasets, options)
    fs.makedirs(out_dir)
    result = PackResult(manifest, datasets)
    present = _names_in(out_dir)
    committed = {n[:-5] for n in _names_in(fs.join(out_dir, COMMITS_DIR)) if n.endswith(".json")}
    recorded_plan = manifest.options.get("plan") or {}
    plan: dict[str, dict[str, Any]] = {}
    pending: list[ShardTask] = []
    label_maps: dict[str, dict[int, str]] = {}
    for dataset in datasets:
        old = recorded_plan.get(dataset.name)
        if old and all(_is_complete(manifest, n, committed, present) for n in old["shards"]) and \
                (not old.get("vocabulary") or fs.exists(vocabulary_path(out_dir, dataset.name))):
            plan[dataset.name] = old                 # nothing to do: the file is not parsed again
            result.resumed += old["shards"]
            result.shards[dataset.name] = list(old["shards"])
            continue
        dataset_plan = plan_dataset(dataset, out_dir, options.samples_per_shard)
        plan[dataset.name] = {"records": dataset_plan.records, "shards": dataset_plan.shards,
                              "vocabulary": dataset_plan.vocabulary}
        result.shards[dataset.name] = dataset_plan.shards
        if dataset_plan.label_map is not None:
            label_maps[dataset.name] = dataset_plan.label_map
        for task in dataset_plan.tasks:
            if _is_complete(manifest, task.name, committed, present):
                result.resumed.append(task.name)
                continue
            entry = manifest.shards.pop(task.name, None)
            if entry is not None or task.name in committed:  # its record or an output is gone: redo it
                clear_shard(out_dir, task.name, ((entry or {}).get("outputs") or []) +
                            ((entry or {}).get("labels") or []))
            pending.append(task)
    _remove_unfinished_local_files(out_dir, {t.name for t in pending}, present)
    manifest.options = {**manifest_options(datasets, options), "plan": plan}
    manifest.save(out_dir)
    started = time.perf_counter()
    if pending:
        _run_tasks(pending, out_dir, options, label_maps, manifest, result, on_progress, packer_cls)
    result.seconds = time.perf_counter() - started
    for dataset in datasets:
        names = result.shards[dataset.name]
        counts = result.counts[dataset.name] = _dataset_counts(manifest, names)
        if counts.written == 0 and not any(n in result.failed for n in names):
            raise InputError(f"{dataset.option} {dataset.annotations}: no usable record (images looked up "
                             f"in {dataset.image_root}; read {counts.read}, skipped {dict(counts.skipped)})")
    return result


def _run_tasks(pending: list[ShardTask], out_dir: str, options: PackOptions, label_maps: dict[str, dict[int, str]],
               manifest: Manifest, result: PackResult, on_progress, packer_cls: type | None) -> None:
    import ray

    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    workers = options.workers or max(1, int(cluster_cpus))
    recorder = _Recorder(manifest, out_dir, pending, result, on_progress)
    error = "lost: its result never arrived (the worker failed repeatedly; see Ray logs)"
    todo = pending
    try:
        for attempt in range(1 + LOST_SHARD_RETRIES):
            # A task whose actor vanished with its node is an errored block to Ray Data, not a
            # retry: its shards come back in another pass (a committed one is only read back).
            if attempt:
                log.warning("%d shards lost their results (a worker or node was lost); running them again",
                            len(todo))
            ds = build_dataset(todo, out_dir, label_maps, workers, _actor_cpus(workers, cluster_cpus, nodes),
                               packer_cls or ShardPacker)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    recorder.add_batch(batch)
            except Exception as exc:   # the pipeline itself broke: record what was left, keep the rest
                log.error("pack pipeline stopped: %s", exc)
                error = f"pipeline error: {type(exc).__name__}: {exc}"[:2000]
                break
            todo = [t for t in todo if t.name in recorder.waiting]
            if not todo:
                break
    finally:
        recorder.close(error)


def _remove_unfinished_local_files(out_dir: str, names: set[str], present: set[str]) -> None:
    """Temporaries a crash left in a local ``out_dir`` (``.{shard}-00000.tar.<random>.tmp``)."""
    if fs.is_remote(out_dir):
        return     # object stores: an unfinished upload is no object; commits decide the rest
    for name in present:
        if name.startswith(".") and name.endswith(".tmp") and name[1:].rsplit("-", 1)[0] in names:
            fs.delete(fs.join(out_dir, name))


def build_dataset(pending: list[ShardTask], out_dir: str, label_maps: dict[str, dict[int, str]], workers: int,
                  actor_cpus: float, packer_cls: type = ShardPacker):
    """The lazy Ray Dataset of one ``RESULT_SCHEMA`` row per pending shard."""
    import ray.data

    items = [{"task": json.dumps(asdict(t))} for t in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The dataset's own copy of the DataContext: other Ray Data users in this process keep theirs.
    ctx = ds.context
    ctx.max_errored_blocks = -1          # a shard that keeps killing its actor costs that shard only
    ctx.enable_progress_bars = False     # the command draws its own (images/s)
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    size = max(1, workers)
    remote_args: dict[str, Any] = {}
    env = fs.worker_environment()
    if env:   # the storage this driver sees, whoever started Ray (ensure_ray sets it job-wide too)
        remote_args["runtime_env"] = {"env_vars": env}
    with warnings.catch_warnings():
        # max_task_retries has no named parameter yet (Ray 2.60 deprecates **ray_remote_args
        # for 2.64); without it a shard that kills its actor every time is retried forever.
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            packer_cls, batch_size=1, batch_format="pyarrow",
            fn_constructor_kwargs={"out_dir": out_dir, "label_maps": label_maps},
            # autoscaling pool: a lost node shrinks it instead of deadlocking (DESIGN.md); one
            # shard per actor at a time, so a shard never queues behind another on a busy actor
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=min(size, len(items)),
                                               max_tasks_in_flight_per_actor=1),
            num_cpus=actor_cpus,
            # a dead actor is restarted (a preempted node); a shard that kills it 3 times is dropped
            max_restarts=-1, max_task_retries=3, **remote_args)
