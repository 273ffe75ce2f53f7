"""The Arrow view: any set of grounded-sample files as ``pyarrow`` record batches.

Sources: pseudo-label shards (tars, or folders of tars), MDETR GoldG JSON, COCO
detection JSON and ODVG JSONL; a JSON/JSONL path may carry its image root as
``ANN.json=IMAGE_DIR`` (needed only to find the images, e.g. for rendering). Every path
may be a URI (``storage.fs``). A folder written by a stage gives the tars its manifest
commits; a tar with a label table beside it (``LABEL_SCHEMA``, written by ``ShardWriter``)
is read from that table, so a summary or a filter of millions of samples never reads
the images.

Two shapes, both streamed batch by batch so memory does not grow with the number
of shards:

- samples (``SAMPLE_SCHEMA``): one row per sample, boxes nested;
- boxes (``BOX_SCHEMA``): one row per box - key, phrase text, bbox, score, source.

Boxes are ``[x, y, w, h]`` float32 pixels, scores float64 (exact against --where
literals and histogram edges), spans ``[start, end)`` character offsets.
Tar shards take a fast path (JSON dict straight into columns, no per-sample
objects); the checks are those of ``validate_sample`` (bad spans, boxes outside the
image or of non-positive size are dropped and counted, boxes overlapping the border
are clipped).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import fs
from storage.errors import InputError
from storage.records import GroundedSample
from storage.shards import IMAGE_EXTENSIONS, labels_name, list_shard_files
from storage.skips import StageCounts
from storage.tar_members import iter_tar_groups

SPAN = pa.list_(pa.int32(), 2)
BBOX = pa.list_(pa.float32(), 4)
PHRASE = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
BOX = pa.struct([("bbox", BBOX), ("tokens_positive", pa.list_(SPAN)), ("phrase", pa.int32()),
                 ("phrase_text", pa.string()), ("score", pa.float64())])

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("source", pa.string()), ("file", pa.string()),
    ("phrases", pa.list_(PHRASE)), ("boxes", pa.list_(BOX)),
])

# The label table beside each tar: the samples of that tar without images ("file" is the
# view's column, filled in on reading with the tar's full path).
LABEL_SCHEMA = pa.schema([f for f in SAMPLE_SCHEMA if f.name != "file"])

BOX_SCHEMA = pa.schema([
    ("key", pa.string()), ("box_index", pa.int32()), ("phrase", pa.string()), ("bbox", BBOX),
    ("score", pa.float64()), ("source", pa.string()), ("file", pa.string()),
])


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class ViewSource:
    """One input of the view: ``kind`` is "shard", "json" (MDETR or COCO) or "odvg".

    ``labels``: a shard's label table, when it has one (read instead of the tar's JSON).
    """
    kind: str
    path: str
    image_root: str | None = None
    labels: str | None = None


def _shard_sources(path: str) -> list[ViewSource]:
    """The tars of a folder or tar path, each with its label table when the writer made one."""
    from storage.manifest import Manifest

    tars = list_shard_files([path])
    manifest = Manifest.load(path) if fs.is_dir(path) else None
    if manifest is not None:   # label tables the manifest commits: no request per tar
        committed = {fs.join(path, n) for e in manifest.shards.values() if e.get("status") == "done"
                     for n in e.get("labels") or []}
        return [ViewSource("shard", t, labels=labels_name(t) if labels_name(t) in committed else None)
                for t in tars]
    return [ViewSource("shard", t, labels=labels_name(t) if fs.exists(labels_name(t)) else None)
            for t in tars]


def resolve_sources(paths: list[str]) -> list[ViewSource]:
    """Expand user paths into view sources (folders become their tar shards).

    Raises ``InputError`` for a missing path, an empty folder or an unknown file type.
    """
    if not paths:
        raise InputError("no input paths given")
    out: list[ViewSource] = []
    for raw in paths:
        path, root = fs.normalize(raw), None
        kind = fs.kind_of(path)
        if kind is None and "=" in raw:
            left, right = raw.rsplit("=", 1)
            path, root = fs.normalize(left), fs.normalize(right)
            kind = fs.kind_of(path)
        if kind is None:
            raise InputError(f"{path}: no such file or folder")
        suffix = fs.suffix_of(path)
        if suffix == ".tar" or kind == "dir":
            out.extend(_shard_sources(path))
        elif suffix == ".json":
            out.append(ViewSource("json", path, root))   # MDETR or COCO: decided on reading
        elif suffix == ".jsonl":
            out.append(ViewSource("odvg", path, root))
        else:
            raise InputError(f"{path}: not a shard (.tar), MDETR/COCO (.json) or ODVG (.jsonl) file")
    return out


def manifest_totals(paths: list[str]) -> dict[str, Any] | None:
    """Summed totals of the ``_manifest.json`` of every folder among ``paths`` (None if none)."""
    from storage.manifest import Manifest

    totals: dict[str, Any] | None = None
    for raw in paths:
        p = fs.normalize(raw)
        try:
            if not fs.is_dir(p):
                continue
            m = Manifest.load(p)
        except (ValueError, OSError):
            continue
        if m is None:
            continue
        t = m.totals()
        if totals is None:
            totals = {"read": 0, "written": 0, "skipped": {}, "failed_shards": []}
        totals["read"] += t["read"]
        totals["written"] += t["written"]
        for k, v in t["skipped"].items():
            totals["skipped"][k] = totals["skipped"].get(k, 0) + v
        totals["failed_shards"] += [f"{p}/{s}" for s in t["failed_shards"]]
    return totals


def _sample_dicts(src: ViewSource, counts: StageCounts, with_images: bool = False
                  ) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """``(sample as a dict, image bytes or None)`` from one source.

    Tar shards yield their JSON unvalidated (the batch builder checks it); the other
    readers yield already validated samples.
    """
    if src.kind == "shard":
        wanted = frozenset(("json",) + (IMAGE_EXTENSIONS if with_images else ()))
        for stem, group in iter_tar_groups(src.path, counts, wanted):
            counts.read += 1
            where = f"{src.path} key {stem}"
            raw = group.get("json")
            if raw is None:
                counts.skip("missing_json", where)
                continue
            try:
                d = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                counts.skip("bad_json", where, str(exc))
                continue
            image = next((group[e] for e in IMAGE_EXTENSIONS if group.get(e)), None) if with_images else None
            yield d, image
        return
    for sample in _record_samples(src, counts):
        image = None
        if with_images and sample.extra.get("image_path"):
            try:
                image = fs.read_bytes(sample.extra["image_path"])
            except OSError:
                counts.skip("missing_image", f"{src.path} key {sample.key}", sample.extra["image_path"])
                continue
        yield sample.to_dict(), image


def _record_samples(src: ViewSource, counts: StageCounts) -> Iterator[GroundedSample]:
    check = src.image_root is not None
    if src.kind == "odvg":
        from storage.odvg import load_odvg
        yield from load_odvg(src.path, src.image_root, counts, check_images=check)
        return
    from storage.coco import iter_coco_detection
    from storage.goldg import is_mdetr, iter_mdetr, load_coco_api

    coco = load_coco_api(src.path, counts)
    if is_mdetr(coco):
        yield from iter_mdetr(coco, src.path, src.image_root, counts, check_images=check)
    else:
        yield from iter_coco_detection(coco, src.path, src.image_root, counts, check_images=check)


# ----------------------------------------------------------------------------- batches

class _Columns:
    """Column buffers for one record batch of SAMPLE_SCHEMA (flat values + list offsets)."""

    def __init__(self) -> None:
        self.key: list[str] = []
        self.caption: list[str] = []
        self.width: list[int] = []
        self.height: list[int] = []
        self.source: list[str] = []
        self.file: list[str] = []
        self.ph_off = [0]
        self.ph_text: list[str] = []
        self.ph_start: list[int] = []
        self.ph_end: list[int] = []
        self.box_off = [0]
        self.bbox: list[float] = []
        self.tp_off = [0]
        self.tp: list[int] = []
        self.b_phrase: list[int] = []
        self.b_text: list[str] = []
        self.b_score: list[float] = []

    def __len__(self) -> int:
        return len(self.key)

    def add(self, d: dict[str, Any], file: str, counts: StageCounts) -> bool:
        """Append one sample dict after the ``validate_sample`` checks; False when skipped."""
        where = f"{file} key {d.get('key') if isinstance(d, dict) else '?'}"
        try:
            key, caption = str(d["key"]), d["caption"]
            width, height = int(d["width"]), int(d["height"])
            phrases, boxes = d.get("phrases") or [], d.get("boxes") or []
        except (KeyError, TypeError, ValueError) as exc:
            counts.skip("malformed_record", where, repr(exc))
            return False
        if width <= 0 or height <= 0 or not isinstance(caption, str) or not caption:
            counts.skip("invalid_sample", where, "no caption or non-positive image size")
            return False
        n = len(caption)
        remap: dict[int, int] = {}
        ph_text, ph_start, ph_end = [], [], []
        bbox, tp_off, tp, b_phrase, b_text, b_score = [], [], [], [], [], []
        try:
            for i, p in enumerate(phrases):
                s, e = int(p["start"]), int(p["end"])
                if not 0 <= s < e <= n:
                    counts.skip("phrase_span_outside_caption", where)
                    continue
                remap[i] = len(ph_text)
                ph_text.append(caption[s:e])
                ph_start.append(s)
                ph_end.append(e)
            fw, fh = float(width), float(height)
            for b in boxes:
                spans = b.get("tokens_positive") or ()
                good = [(int(s), int(e)) for s, e in spans if 0 <= s < e <= n]
                if len(good) != len(spans):
                    counts.skip("box_span_outside_caption", where)
                    if not good:
                        continue
                x, y, w, h = b["bbox"]
                x, y, w, h = float(x), float(y), float(w), float(h)
                if w != w or h != h or x != x or y != y:   # NaN
                    counts.skip("box_malformed", where)
                    continue
                if w <= 0 or h <= 0:
                    counts.skip("box_non_positive_size", where)
                    continue
                if x < 0 or y < 0 or x + w > fw or y + h > fh:   # clip (rare): validate_sample's rule
                    x0, y0 = max(0.0, x), max(0.0, y)
                    x1, y1 = min(fw, x + w), min(fh, y + h)
                    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
                        counts.skip("box_outside_image", where)
                        continue
                    x, y, w, h = x0, y0, x1 - x0, y1 - y0
                elif w < 1.0 or h < 1.0:
                    counts.skip("box_outside_image", where)   # validate_sample's min_size
                    continue
                ph = remap.get(b.get("phrase", -1), -1)
                bbox += (x, y, w, h)
                for se in good:
                    tp += se
                tp_off.append(len(good))
                b_phrase.append(ph)
                b_text.append(ph_text[ph] if ph >= 0 else " ".join(caption[s:e] for s, e in good))
                b_score.append(b.get("score", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            counts.skip("malformed_record", where, repr(exc))
            return False
        self.key.append(key)
        self.caption.append(caption)
        self.width.append(width)
        self.height.append(height)
        self.source.append(str(d.get("source") or ""))
        self.file.append(file)
        self.ph_text += ph_text
        self.ph_start += ph_start
        self.ph_end += ph_end
        self.ph_off.append(len(self.ph_text))
        self.bbox += bbox
        for k in tp_off:
            self.tp_off.append(self.tp_off[-1] + k)
        self.tp += tp
        self.b_phrase += b_phrase
        self.b_text += b_text
        self.b_score += b_score
        self.box_off.append(len(self.b_score))
        return True

    def to_batch(self) -> pa.RecordBatch:
        i32, f32 = pa.int32(), pa.float32()

        def ints(values: list[int]) -> pa.Array:   # numpy converts plain int lists faster than pa.array
            return pa.array(np.asarray(values, dtype=np.int32), i32)

        phrases = pa.ListArray.from_arrays(
            ints(self.ph_off),
            pa.StructArray.from_arrays([pa.array(self.ph_text, pa.string()), ints(self.ph_start),
                                        ints(self.ph_end)], fields=list(PHRASE)))
        bbox = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(self.bbox, dtype=np.float32), f32), 4)
        spans = pa.FixedSizeListArray.from_arrays(ints(self.tp), 2)
        tokens_positive = pa.ListArray.from_arrays(ints(self.tp_off), spans)
        boxes = pa.ListArray.from_arrays(
            ints(self.box_off),
            pa.StructArray.from_arrays([bbox, tokens_positive, ints(self.b_phrase),
                                        pa.array(self.b_text, pa.string()),
                                        pa.array(np.asarray(self.b_score, dtype=np.float64), pa.float64())],
                                       fields=list(BOX)))
        return pa.RecordBatch.from_arrays(
            [pa.array(self.key, pa.string()), pa.array(self.caption, pa.string()),
             ints(self.width), ints(self.height), pa.array(self.source, pa.string()),
             pa.array(self.file, pa.string()), phrases, boxes], schema=SAMPLE_SCHEMA)


def samples_batch(rows: Iterable[tuple[dict[str, Any], str]], counts: StageCounts) -> pa.RecordBatch:
    """SAMPLE_SCHEMA rows of ``(grounded-sample dict, file)`` pairs, checked as the view checks
    tar records (a row that fails is a counted skip and left out): the view of samples already
    in memory, so that a ``--where`` filter sees them exactly as ``inspect`` does."""
    cols = _Columns()
    for d, file in rows:
        cols.add(d, file, counts)
    return cols.to_batch()


def iter_sample_batches(paths: list[str], counts: StageCounts, batch_size: int = 8192
                        ) -> Iterator[pa.RecordBatch]:
    """Stream SAMPLE_SCHEMA batches of at most ``batch_size`` rows from ``paths``.

    ``counts.read`` counts samples met, ``counts.written`` samples in the view; bad
    records and boxes are counted skips. Raises ``InputError`` for unusable paths.
    """
    cols = _Columns()
    for src in resolve_sources(paths):
        if src.labels is not None:
            if len(cols):
                yield cols.to_batch()
                cols = _Columns()
            yield from _label_batches(src, counts, batch_size)
            continue
        for d, _ in _sample_dicts(src, counts):
            if cols.add(d, src.path, counts):
                counts.written += 1
            if len(cols) >= batch_size:
                yield cols.to_batch()
                cols = _Columns()
    if len(cols):
        yield cols.to_batch()


def _label_batches(src: ViewSource, counts: StageCounts, batch_size: int) -> Iterator[pa.RecordBatch]:
    """SAMPLE_SCHEMA batches of a tar's label table (validated when it was written)."""
    try:
        pf = pq.ParquetFile(fs.open_input_file(src.labels))
        for batch in pf.iter_batches(batch_size=batch_size, columns=LABEL_SCHEMA.names):
            n = batch.num_rows
            counts.read += n
            counts.written += n
            columns = [batch.column(name).cast(field.type) for name, field in zip(LABEL_SCHEMA.names, LABEL_SCHEMA)]
            columns.insert(SAMPLE_SCHEMA.names.index("file"), pa.array([src.path] * n, pa.string()))
            yield pa.RecordBatch.from_arrays(columns, schema=SAMPLE_SCHEMA)
    except (OSError, pa.ArrowInvalid) as exc:
        counts.skip("unreadable_labels", src.labels, str(exc))


def write_labels(path: str | os.PathLike, samples: list[dict[str, Any]], file: str = "") -> str:
    """Write the label table (LABEL_SCHEMA) of ``samples`` (grounded-sample dicts) to ``path``.

    Returns the sha256 of the bytes written. The samples pass the view's own checks, so
    reading the table gives the rows reading the tar would.
    """
    import hashlib

    cols = _Columns()
    counts = StageCounts()
    for d in samples:
        cols.add(d, file, counts)
    table = pa.Table.from_batches([cols.to_batch()], SAMPLE_SCHEMA).drop_columns(["file"])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def explode_boxes(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The box view (BOX_SCHEMA) of a samples batch: one row per box, vectorised."""
    boxes = batch.column("boxes")
    parent = pc.list_parent_indices(boxes)
    flat = pc.list_flatten(boxes)
    offsets = boxes.offsets.to_numpy()
    lengths = offsets[1:] - offsets[:-1]
    # position of each box inside its sample: running index minus the sample's first offset
    box_index = np.arange(len(flat), dtype=np.int32) - np.repeat(offsets[:-1] - offsets[0], lengths).astype(np.int32)
    return pa.RecordBatch.from_arrays([
        pc.take(batch.column("key"), parent), pa.array(box_index, pa.int32()),
        flat.field("phrase_text"), flat.field("bbox"), flat.field("score"),
        pc.take(batch.column("source"), parent), pc.take(batch.column("file"), parent),
    ], schema=BOX_SCHEMA)


def iter_box_batches(paths: list[str], counts: StageCounts, batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
    """Stream BOX_SCHEMA batches (one row per box) from ``paths``."""
    for batch in iter_sample_batches(paths, counts, batch_size):
        yield explode_boxes(batch)


def samples_table(paths: list[str], counts: StageCounts | None = None) -> pa.Table:
    """All samples of ``paths`` as one table (SAMPLE_SCHEMA); small inputs and tests."""
    return pa.Table.from_batches(list(iter_sample_batches(paths, counts or StageCounts())), SAMPLE_SCHEMA)


def boxes_table(paths: list[str], counts: StageCounts | None = None) -> pa.Table:
    """All boxes of ``paths`` as one table (BOX_SCHEMA); small inputs and tests."""
    return pa.Table.from_batches(list(iter_box_batches(paths, counts or StageCounts())), BOX_SCHEMA)


def iter_samples_with_images(paths: list[str], counts: StageCounts
                             ) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    """``(sample dict, image bytes or None, file)`` in view order, for rendering."""
    for src in resolve_sources(paths):
        for d, image in _sample_dicts(src, counts, with_images=True):
            yield d, image, src.path
