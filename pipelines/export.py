"""``glipctl export``: grounded-sample shards -> ODVG JSONL or COCO detection JSON, with the images.

One streaming pass in this process (the output is one file, so there is nothing to spread
over Ray)::

    shards: pseudo-label / pack output folders (the tars their manifests commit) or .tar files,
            local paths or URIs
      -> each tar's samples in shard order: the sample JSON (+ the original image bytes when
         --images is given; local tars seek over them otherwise)
      -> --where: inspect's filter (pipelines.inspect_where) on the same box view
         (storage.arrow_view), keeping the matching boxes; COCO: each box's category
      -> a sample with a box left (with --keep-empty: every sample) gets its image file name,
         its image bytes are written under --images (a few writes in flight, never re-encoded),
         its ODVG line / COCO image entry appended
      -> once every image is written, the ODVG / COCO file: complete or absent (storage.fs)

The tars' JSON is read rather than the label tables beside them: a line needs what only the
JSON and the tar hold, the image member's name and extension, and (for COCO) the phrases'
root nouns.

File names: a sample's image is ``<member>.<ext>``, its name inside its tar (the sample key
made file-safe, the real image format's extension), so that without --images ``tar -xf`` of the
shards into one folder gives the image folder the output names. A name two tars share (two
runs over one crawl) gets ``_1``, ``_2``, ... for the later ones (``ExportResult.renamed``).

Counts: samples read, written, and skipped by reason (the shard readers' reasons:
``truncated_tar``, ``bad_json``, ``missing_image``, ...; export's own: ``no_boxes`` (the sample
had none), ``no_matching_box`` (--where kept none), ``no_category_box`` (COCO: no box maps to a
category)); boxes read, written and dropped by reason (``not_matching_where``, ``no_category``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from storage import fs
from storage.coco import CocoDetectionWriter, box_category, normalize_category
from storage.errors import InputError
from storage.odvg import OdvgWriter
from storage.shards import ShardEntry, iter_shard_entries, list_shard_files
from storage.skips import StageCounts

FORMATS = {"odvg": ".jsonl", "coco": ".json"}      # format -> the output file's suffix
BATCH_SAMPLES = 1024            # samples per --where evaluation (one Arrow batch)
IMAGE_WRITES_IN_FLIGHT = 16     # object-store writes are latency-bound
SKIP_NO_BOXES = "no_boxes"
SKIP_NO_MATCHING_BOX = "no_matching_box"
SKIP_NO_CATEGORY_BOX = "no_category_box"
BOX_NOT_MATCHING_WHERE = "not_matching_where"
BOX_NO_CATEGORY = "no_category"


@dataclass
class ExportOptions:
    format: str                          # "odvg" | "coco"
    out: str                             # the output file, local path or URI
    images: str | None = None            # folder for the image files, local path or URI
    where: str | None = None             # inspect's --where, on boxes
    categories: list[str] | None = None  # COCO vocabulary; None: the phrases' root nouns
    keep_empty: bool = False             # also write samples left without a box
    batch_size: int = BATCH_SAMPLES


@dataclass
class ExportResult:
    format: str
    out: str
    images: str | None
    shards: int
    counts: StageCounts                                  # samples: read, written, skipped by reason
    boxes: Counter = field(default_factory=Counter)      # read, written, and dropped by reason
    images_written: int = 0
    renamed: int = 0
    categories: list[str] = field(default_factory=list)  # COCO: the categories written, by id

    def to_dict(self) -> dict[str, Any]:
        boxes = dict(self.boxes)
        return {"format": self.format, "out": self.out, "images": self.images, "shards": self.shards,
                "samples": self.counts.to_dict(),
                "boxes": {"read": boxes.pop("read", 0), "written": boxes.pop("written", 0),
                          "dropped": dict(sorted(boxes.items()))},
                "images_written": self.images_written, "renamed": self.renamed,
                "categories": self.categories}


# ----------------------------------------------------------------------------- checks

def parse_categories(text: str | None) -> list[str] | None:
    """``"cat, traffic light,Dog"`` -> ``["cat", "traffic light", "dog"]`` (normalized, unique)."""
    if text is None:
        return None
    names = list(dict.fromkeys(n for n in (normalize_category(t) for t in text.split(",")) if n))
    if not names:
        raise InputError("--categories names no category")
    return names


def check_export(paths: list[str], options: ExportOptions) -> list[str]:
    """The tars to export (normalized), after every check that needs no sample read.

    InputError for an unknown format, an output name of the wrong kind, options that do not
    apply, a bad --where, a missing path, a folder without shards, or a file that is not a tar.
    """
    from pipelines.inspect_where import compile_where

    if options.format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {options.format!r}")
    suffix = FORMATS[options.format]
    if fs.suffix_of(options.out) != suffix:
        raise InputError(f"--out {options.out}: a {options.format} file name ends in {suffix}")
    if options.categories is not None and options.format != "coco":
        raise InputError("--categories applies to --format coco")
    if options.where:
        compile_where(options.where)
    if fs.kind_of(options.out) == "dir":
        raise InputError(f"--out {options.out}: a folder; name the output file")
    if options.images is not None and fs.kind_of(options.images) == "file":
        raise InputError(f"--images {options.images}: a file, not a folder")
    if not paths:
        raise InputError("no input paths given")
    tars = list_shard_files(paths)
    for tar in tars:
        if fs.suffix_of(tar) != ".tar":
            raise InputError(f"{tar}: not a shard; export reads grounded-sample shards (.tar, or the "
                             f"folders pseudo-label and pack write)")
    return tars


# ----------------------------------------------------------------------------- the pass

class ImageNames:
    """File names for exported images: ``<member>.<ext>``, made unique across tars."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.renamed = 0

    def claim(self, entry: ShardEntry) -> str:
        name = f"{entry.member}.{entry.ext}"
        n = 0
        while name in self.taken:
            n += 1
            name = f"{entry.member}_{n}.{entry.ext}"
        self.renamed += n > 0
        self.taken.add(name)
        return name


class ImageWriter:
    """Writes image files into a folder (local or URI) with a few writes in flight.

    Leaving the ``with`` block waits for every write; the first failed write raises there.
    """

    def __init__(self, folder: str, in_flight: int = IMAGE_WRITES_IN_FLIGHT):
        self.folder = fs.normalize(folder)
        self.in_flight = in_flight
        self.written = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> "ImageWriter":
        fs.makedirs(self.folder)
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="export-images")
        return self

    def write(self, name: str, data: bytes) -> None:
        while len(self._pending) >= 2 * self.in_flight:
            self._finish_one()
        self._pending.append(self._pool.submit(fs.write_bytes, fs.join(self.folder, name), data))

    def _finish_one(self) -> None:
        self._pending.popleft().result()
        self.written += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._finish_one()
            else:
                for f in self._pending:
                    f.cancel()
        finally:
            self._pool.shutdown(wait=True)


def matching_boxes(entries: list[ShardEntry], predicate: Callable | None) -> list[list[int]]:
    """Per entry, the indices of its boxes that ``predicate`` (a compiled --where) keeps.

    The predicate runs on the box view of the entries (``storage.arrow_view``: the rows inspect
    filters, ``file`` the tar's path), so export keeps exactly the boxes inspect matches.
    """
    if predicate is None:
        return [list(range(len(e.sample.boxes))) for e in entries]
    import pyarrow.compute as pc

    from storage.arrow_view import explode_boxes, samples_batch

    checks = StageCounts()
    batch = samples_batch(((e.sample.to_dict(), e.tar) for e in entries), checks)
    if batch.num_rows != len(entries) or checks.skipped:   # the samples were validated on reading
        raise RuntimeError(f"the box view disagrees with the validated samples: {dict(checks.skipped)}")
    boxes = explode_boxes(batch)
    mask = predicate(boxes).to_numpy(zero_copy_only=False).astype(bool)
    parent = pc.list_parent_indices(batch.column("boxes")).to_numpy()
    index = boxes.column("box_index").to_numpy()
    kept: list[list[int]] = [[] for _ in entries]
    for p, i in zip(parent[mask].tolist(), index[mask].tolist()):
        kept[p].append(i)
    return kept


def _chunks(items: Iterable[ShardEntry], size: int) -> Iterator[list[ShardEntry]]:
    chunk: list[ShardEntry] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _coco_info(paths: list[str], options: ExportOptions) -> str:
    from storage.manifest import glipctl_version

    return (f"glipctl {glipctl_version()} export of {', '.join(fs.normalize(p) for p in paths)}"
            + (f" --where {options.where!r}" if options.where else "")
            + (" --categories" if options.categories else " (categories: phrase root nouns)"))


def run_export(paths: list[str], options: ExportOptions,
               on_progress: Callable[[int, int, int, int], None] | None = None) -> ExportResult:
    """Export the samples of ``paths`` (module docstring). ``on_progress(shards_done,
    shards_total, samples_read, samples_written)`` after each batch.

    InputError for bad input (``check_export``) and when no sample is left to write: then no
    output file is written.
    """
    from pipelines.inspect_where import compile_where

    tars = check_export(paths, options)
    predicate = compile_where(options.where) if options.where else None
    vocabulary = frozenset(options.categories) if options.categories is not None else None
    counts = StageCounts()
    result = ExportResult(options.format, fs.normalize(options.out),
                          fs.normalize(options.images) if options.images else None, len(tars), counts)
    names = ImageNames()
    position = {t: i for i, t in enumerate(tars)}
    with contextlib.ExitStack() as stack:
        if options.format == "odvg":
            odvg = stack.enter_context(OdvgWriter(result.out))
        else:
            coco = stack.enter_context(CocoDetectionWriter(result.out, options.categories,
                                                           _coco_info(paths, options)))
        images = stack.enter_context(ImageWriter(options.images)) if options.images else None
        entries = iter_shard_entries(tars, counts, with_images=images is not None)
        for chunk in _chunks(entries, options.batch_size):
            for entry, kept in zip(chunk, matching_boxes(chunk, predicate)):
                sample = entry.sample
                result.boxes["read"] += len(sample.boxes)
                result.boxes[BOX_NOT_MATCHING_WHERE] += len(sample.boxes) - len(kept)
                boxes = [sample.boxes[i] for i in kept]
                categories: list[str] = []
                if options.format == "coco":
                    named = [(b, box_category(sample, b, vocabulary)) for b in boxes]
                    boxes = [b for b, c in named if c is not None]
                    categories = [c for _, c in named if c is not None]
                    result.boxes[BOX_NO_CATEGORY] += len(named) - len(boxes)
                if not boxes and not options.keep_empty:
                    reason = (SKIP_NO_BOXES if not sample.boxes else
                              SKIP_NO_MATCHING_BOX if not kept else SKIP_NO_CATEGORY_BOX)
                    counts.skipped[reason] += 1     # what was asked for, not a fault: not logged
                    continue
                if not entry.ext:
                    counts.skip("missing_image", f"{entry.tar} key {entry.member}")
                    continue
                name = names.claim(entry)
                if images is not None:
                    images.write(name, entry.image)
                if options.format == "odvg":
                    odvg.write(dataclasses.replace(sample, boxes=boxes), file_name=name)
                else:
                    coco.add(name, sample.width, sample.height,
                             [(b.bbox, c, b.score) for b, c in zip(boxes, categories)],
                             key=sample.key, source=sample.source)
                counts.written += 1
                result.boxes["written"] += len(boxes)
            if on_progress is not None:
                on_progress(position[chunk[-1].tar], len(tars), counts.read, counts.written)
        if counts.written == 0:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(counts.skipped.items())) or "nothing read"
            raise InputError(f"no sample to export from {', '.join(paths)} ({counts.read} read; "
                             f"skipped: {skipped}); nothing written")
    if on_progress is not None:
        on_progress(len(tars), len(tars), counts.read, counts.written)
    result.images_written = images.written if images is not None else 0
    result.renamed = names.renamed
    if options.format == "coco":
        result.categories = list(coco.category_ids)
    for reason in (BOX_NOT_MATCHING_WHERE, BOX_NO_CATEGORY):
        if not result.boxes[reason]:
            del result.boxes[reason]
    return result
