"""The pseudo-label stage on Ray Data: crawled images + phrase files -> teacher -> WebDataset shards.

Dataflow (streaming; every arrow is a Ray Data operator)::

    one row per pending input shard
      -> read_shard     (task, 0.25 CPU)  crawled records joined with the shard's phrase file by key
      -> decode_batch   (task, 0.25 CPU)  labeling.images.decode_image + TeacherResize (uint8)
      -> TeacherWorker  (autoscaling actor pool (1, N); num_gpus when the cluster has GPUs)
                        batched grounding + labeling.filters
      -> driver         ShardSink: one ShardWriter per input shard, manifest entry per finished shard

Rows are plain columns (strings, ints, bytes) so no Arrow tensor extension is involved:
``kind`` is "sample" (an image to label), "skip" (decode or the teacher said no) or "end"
(one per shard, after its last row: how many rows the read emitted and its read counts).
The driver closes a shard when its "end" row has arrived together with that many rows, so
shards finish (and are marked done in ``_manifest.json``) while others still stream. Blocks
hold about one teacher batch (``block_bytes``), so decoding overlaps inference and results
come back as they are made.

Bad input (DESIGN.md: counted skips, never a crash), by reason in the manifest:
``corrupt_image``, ``truncated_image``, ``image_too_small`` (1x1 etc.), ``decompression_bomb``,
``empty_image``, ``unsupported_image_format`` (decodable but not jpg/png/webp, which the shard
readers expect), ``no_phrase_row`` (an image whose key the phrase file lacks),
``phrase_row_without_image`` (the reverse), ``no_phrases`` (a caption in which parsing found
nothing to ground), ``duplicate_key``, ``phrase_span_invalid`` (one phrase dropped, the image
kept), ``teacher_error`` (the teacher raised on this image alone), plus the crawled readers'
own reasons (``truncated_tar``, ``missing_caption``, ...). PNG with alpha (composited over
white), grayscale, palette and CMYK images are labeled; their stored bytes stay as they were.
An image where no phrase passes the threshold is written with its phrases ungrounded and
counted as ``without_boxes`` (a negative example for the student).

Failures: a read that raises emits its "end" row with the error; the shard is recorded as
failed and the others go on. A worker that dies is restarted by Ray and its batch retried
(``max_restarts=-1``, ``max_task_retries=3``); a batch that keeps failing is dropped
(``max_errored_blocks=-1``) and the shards short of rows at the end are retried once, each
alone (batches mix neighbouring shards); one that fails again is recorded with its error.
A re-run retries exactly the shards not marked done, after deleting their partial tars.

Reading the output with Ray Data: ``ray.data.read_webdataset(paths, decoder=None)`` gives the
original bytes; Ray's default decoder cannot put grayscale (2-D) and colour (3-D) arrays in
one block.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from labeling.filters import FilterConfig
from labeling.teacher import TeacherIdentity, TeacherResize
from storage.crawled import CrawledShard
from storage.manifest import Manifest
from storage.shards import ShardWriter
from storage.skips import StageCounts

log = logging.getLogger("glipctl")

STAGE = "pseudo-label"
READ_CHUNK = 32                  # rows per yield of a read task (Ray re-blocks them by block_bytes)
SUPPORTED_EXTENSIONS = ("jpg", "png", "webp")   # what storage.shards readers accept as images

# Read-side skip reasons (decode-side ones are labeling.images.SKIP_*).
SKIP_NO_PHRASE_ROW = "no_phrase_row"                   # image whose key is absent from the phrase file
SKIP_PHRASE_WITHOUT_IMAGE = "phrase_row_without_image"  # phrase row whose key has no image
SKIP_NO_PHRASES = "no_phrases"                         # caption in which parsing found no phrase
SKIP_DUPLICATE_KEY = "duplicate_key"
SKIP_BAD_SPAN = "phrase_span_invalid"                  # a phrase (not the image) dropped: span outside caption
SKIP_UNSUPPORTED_FORMAT = "unsupported_image_format"   # decodable, but not jpg/png/webp
SKIP_TEACHER_ERROR = "teacher_error"


def phrase_file_for(phrases_dir: str | Path, shard: CrawledShard) -> Path:
    """Where parse-captions wrote the phrases of ``shard``: ``<dir>/<shard name>.parquet``."""
    return Path(phrases_dir) / f"{shard.name}.parquet"


def output_pattern(name: str) -> str:
    """Glob of the tars ShardWriter writes for input shard ``name``."""
    return f"{name}-[0-9][0-9][0-9][0-9][0-9].tar"


# ------------------------------------------------------------------------------------------ rows
def _row(kind: str, shard: str, **values: Any) -> dict[str, Any]:
    """One pipeline row with every column present (Arrow needs one schema for all rows)."""
    row = {"kind": kind, "shard": shard, "key": "", "caption": "", "phrases": "[]", "url": "",
           "source_index": -1, "image": b"", "ext": "", "pixels": b"", "ph": 0, "pw": 0,
           "width": 0, "height": 0, "reason": "", "detail": "", "expected": 0, "counts": "",
           "sample": "", "boxes": 0, "dropped": "", "ready_at": 0.0}
    row.update(values)
    return row


def _rows_to_table(rows: list[dict[str, Any]]):
    """Rows -> a pyarrow Table (the batch format of every stage: bytes stay bytes).

    Not numpy batches: Arrow binary -> numpy may become fixed-width ``S`` arrays, which
    strip trailing NUL bytes, and image bytes may end in NUL.
    """
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def _table_to_rows(table) -> list[dict[str, Any]]:
    return table.to_pylist()


# ------------------------------------------------------------------------------------------ read
def read_shard(spec: dict[str, Any], chunk: int = READ_CHUNK) -> Iterator[list[dict[str, Any]]]:
    """Join one crawled shard with its phrase file by key; yield chunks of "sample" rows, then "end".

    ``spec``: ``{"shard": CrawledShard fields as dict, "phrase_file": path}``. Records whose
    key has no phrase row, phrase rows whose key has no image, captions without phrases and
    repeated keys are counted skips in the shard's read counts (carried by the "end" row).
    Never raises: an unexpected error ends the shard with the error in its "end" row.
    """
    shard = CrawledShard(**spec["shard"])
    counts = StageCounts()
    emitted = 0
    pending: list[dict[str, Any]] = []
    error = ""
    try:
        from storage.phrase_files import iter_phrase_rows
        from storage.records import span_is_valid

        phrase_rows = {}
        for prow in iter_phrase_rows(spec["phrase_file"]):
            phrase_rows.setdefault(str(prow["key"]), prow)
        seen: set[str] = set()
        for rec in shard.iter_records(counts, with_images=True):
            key = rec["key"]
            where = f"{shard.path} key {key}"
            if key in seen:
                counts.skip(SKIP_DUPLICATE_KEY, where)
                continue
            seen.add(key)
            prow = phrase_rows.get(key)
            if prow is None:
                counts.skip(SKIP_NO_PHRASE_ROW, where, f"not in {spec['phrase_file']}")
                continue
            caption = prow["caption"] or ""
            phrases = []
            for p in prow.get("phrases") or []:
                start, end = int(p["start"]), int(p["end"])
                if not span_is_valid(start, end, caption):   # never hand the teacher a bad span
                    counts.skip(SKIP_BAD_SPAN, where, f"[{start}, {end}) in a {len(caption)}-char caption")
                    continue
                phrases.append({"text": caption[start:end], "start": start, "end": end, "root": p.get("root")})
            if not phrases:
                counts.skip(SKIP_NO_PHRASES, where)
                continue
            pending.append(_row("sample", shard.name, key=key, caption=caption,
                                phrases=json.dumps(phrases), url=rec.get("url") or "",
                                source_index=int(rec["source_index"]), image=rec["image"]))
            emitted += 1
            if len(pending) >= chunk:
                yield pending
                pending = []
        for key in phrase_rows.keys() - seen:
            counts.skip(SKIP_PHRASE_WITHOUT_IMAGE, f"{spec['phrase_file']} key {key}")
    except Exception as exc:  # noqa: BLE001 - any failure of one shard must not end the run
        error = f"{type(exc).__name__}: {exc}"
    pending.append(_row("end", shard.name, expected=emitted, counts=json.dumps(counts.to_dict()),
                        detail=error))
    yield pending


def read_shard_batches(batch) -> Iterator[Any]:
    """Ray ``map_batches`` adapter of ``read_shard`` (a pyarrow batch of shard specs as JSON)."""
    for spec_json in batch.column("spec").to_pylist():
        for rows in read_shard(json.loads(spec_json)):
            yield _rows_to_table(rows)


# ------------------------------------------------------------------------------------------ decode
def decode_rows(rows: list[dict[str, Any]], resize: TeacherResize) -> list[dict[str, Any]]:
    """Decode and resize each "sample" row's image; undecodable ones become "skip" rows."""
    from labeling.images import DecodedImage, decode_image

    out = []
    for row in rows:
        if row["kind"] != "sample":
            out.append(row)
            continue
        decoded = decode_image(row["image"])
        if not isinstance(decoded, DecodedImage):
            out.append({**row, "kind": "skip", "image": b"", "reason": decoded.reason,
                        "detail": decoded.detail[:200]})
            continue
        if decoded.extension not in SUPPORTED_EXTENSIONS:
            out.append({**row, "kind": "skip", "image": b"", "reason": SKIP_UNSUPPORTED_FORMAT,
                        "detail": decoded.format})
            continue
        pixels = resize(decoded.image)
        out.append({**row, "pixels": pixels.tobytes(), "ph": int(pixels.shape[0]),
                    "pw": int(pixels.shape[1]), "width": decoded.width, "height": decoded.height,
                    "ext": decoded.extension})
    return out


def decode_batch(batch, min_size: int, max_size: int):
    """Ray ``map_batches`` adapter of ``decode_rows`` (pyarrow in, pyarrow out)."""
    return _rows_to_table(decode_rows(_table_to_rows(batch), TeacherResize(min_size, max_size)))


# ------------------------------------------------------------------------------------------ teacher
def label_rows(rows: list[dict[str, Any]], teacher, config: FilterConfig,
               extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Ground the "sample" rows in one teacher call and turn detections into grounded samples.

    A batch that makes the teacher raise is retried one image at a time, so one bad
    record costs a ``teacher_error`` skip, not the batch.
    """
    import numpy as np

    from labeling.filters import pseudo_sample

    todo = [i for i, r in enumerate(rows) if r["kind"] == "sample"]
    out = [dict(r, pixels=b"") if r["kind"] != "sample" else r for r in rows]

    def ground(indices: list[int]) -> list[list[list[dict[str, Any]]]]:
        images = [np.frombuffer(rows[i]["pixels"], dtype=np.uint8).reshape(rows[i]["ph"], rows[i]["pw"], 3)
                  for i in indices]
        return teacher.ground(images, [(rows[i]["width"], rows[i]["height"]) for i in indices],
                              [rows[i]["caption"] for i in indices],
                              [[(p["start"], p["end"]) for p in json.loads(rows[i]["phrases"])]
                               for i in indices],
                              threshold=config.threshold, nms_iou=config.nms_iou)

    results: dict[int, Any] = {}
    if todo:
        try:
            results = dict(zip(todo, ground(todo)))
        except Exception:  # noqa: BLE001 - isolate the record that breaks the teacher
            for i in todo:
                try:
                    results[i] = ground([i])[0]
                except Exception as exc:  # noqa: BLE001
                    results[i] = exc
    for i in todo:
        row = rows[i]
        result = results[i]
        if isinstance(result, Exception):
            out[i] = dict(row, kind="skip", pixels=b"", image=b"", reason=SKIP_TEACHER_ERROR,
                          detail=f"{type(result).__name__}: {result}"[:200])
            continue
        sample_extra = {k: v for k, v in extra.items() if k != "teacher_source"}
        sample_extra.update(source_shard=row["shard"], source_index=row["source_index"])
        if row["url"]:
            sample_extra["url"] = row["url"]
        sample, dropped = pseudo_sample(row["key"], row["caption"], row["width"], row["height"],
                                        json.loads(row["phrases"]), result, config,
                                        extra["teacher_source"], sample_extra)
        out[i] = dict(row, pixels=b"", sample=json.dumps(sample.to_dict()), boxes=len(sample.boxes),
                      dropped=json.dumps(dict(dropped)))
    return out


class TeacherWorker:
    """Ray Data callable class: the teacher model, loaded once per actor."""

    def __init__(self, teacher_path: str, identity: dict[str, str], config: dict[str, Any],
                 extra: dict[str, Any], use_gpu: bool):
        import torch

        from labeling.teacher import GLIPTeacher

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        ident = TeacherIdentity(identity["path"], identity["sha256"], identity["kind"])
        self.teacher = GLIPTeacher.load(teacher_path, ident, device=device)
        self.config = FilterConfig(**config)
        self.extra = extra
        self.ready_at = time.time()     # wall clock: lets the driver separate model loading from labeling

    def __call__(self, batch):
        rows = label_rows(_table_to_rows(batch), self.teacher, self.config, self.extra)
        return _rows_to_table([dict(r, ready_at=self.ready_at) for r in rows])


# ------------------------------------------------------------------------------------------ driver side
@dataclass
class ShardProgress:
    """What the driver knows about one input shard while its rows stream in."""
    name: str
    counts: StageCounts = field(default_factory=StageCounts)
    received: int = 0
    expected: int | None = None
    error: str = ""
    boxes: int = 0
    without_boxes: int = 0
    box_drops: Counter = field(default_factory=Counter)
    writer: ShardWriter | None = None
    seen: set[str] = field(default_factory=set)     # keys received: a re-delivered row is ignored

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received >= self.expected

    def summary(self) -> dict[str, Any]:
        d = self.counts.to_dict()
        d.update(boxes=self.boxes, without_boxes=self.without_boxes,
                 boxes_dropped=dict(sorted(self.box_drops.items())))
        return d


class ShardSink:
    """Writes results grouped by input shard; marks each shard in the manifest as it finishes."""

    def __init__(self, out_dir: Path, manifest: Manifest, names: list[str], max_samples: int,
                 on_update: Callable[[int, int], None] | None = None,
                 paths: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.paths = paths or {}
        self.manifest = manifest
        self.max_samples = max_samples
        self.shards = {n: ShardProgress(n) for n in names}
        self.on_update = on_update or (lambda images, boxes: None)
        self.first_ready_at: float | None = None   # wall time the first teacher finished loading

    def add(self, row: dict[str, Any]) -> None:
        sp = self.shards.get(row["shard"])
        if sp is None:      # the shard already finished: a re-delivered row
            log.warning("ignoring a late result for finished shard %s (key %s)", row["shard"], row["key"])
            return
        kind = row["kind"]
        if row.get("ready_at"):
            self.first_ready_at = min(self.first_ready_at or row["ready_at"], row["ready_at"])
        if kind != "end" and row["key"] in sp.seen:
            log.warning("ignoring a repeated result for shard %s key %s", sp.name, row["key"])
            return
        if kind == "end":
            sp.expected = int(row["expected"])
            read_counts = StageCounts.from_dict(json.loads(row["counts"]))
            sp.counts.read += read_counts.read
            sp.counts.skipped.update(read_counts.skipped)
            sp.error = row["detail"] or ""
        else:
            sp.received += 1
            sp.seen.add(row["key"])
            if kind == "skip":
                where = f"{self.paths.get(sp.name, 'shard ' + sp.name)} key {row['key']}"
                sp.counts.skip(row["reason"], where, row["detail"])
            else:
                self._write(sp, row)
        if sp.complete:
            self._finish(sp)

    def _write(self, sp: ShardProgress, row: dict[str, Any]) -> None:
        from storage.records import GroundedSample

        if sp.writer is None:
            sp.writer = ShardWriter(self.out_dir, sp.name, max_samples=self.max_samples)
        sp.writer.write(GroundedSample.from_dict(json.loads(row["sample"])), row["image"], row["ext"])
        sp.counts.written += 1
        n_boxes = int(row["boxes"])
        sp.boxes += n_boxes
        sp.without_boxes += n_boxes == 0
        if row["dropped"]:
            sp.box_drops.update(json.loads(row["dropped"]))
        self.on_update(1, n_boxes)

    def _finish(self, sp: ShardProgress) -> None:
        if sp.error:
            self._fail(sp, sp.error)
            return
        outputs = []
        if sp.writer is not None:
            sp.writer.close()
            outputs = sp.writer.outputs
            sp.writer = None
        self.manifest.mark(sp.name, "done", counts=sp.summary(), outputs=outputs)
        self.manifest.save(self.out_dir)
        del self.shards[sp.name]
        self.on_update(0, 0)         # the progress bar's shard count moves

    def _fail(self, sp: ShardProgress, error: str) -> None:
        if sp.writer is not None:
            sp.writer._abort()       # removes the unfinished tar
            sp.writer = None
        for stale in self.out_dir.glob(output_pattern(sp.name)):
            stale.unlink()           # finished parts of a failed shard would look like output
        self.manifest.mark(sp.name, "failed", counts=sp.summary(), error=error)
        self.manifest.save(self.out_dir)
        self.shards.pop(sp.name, None)
        self.on_update(0, 0)

    def fail_unfinished(self, error: str) -> list[str]:
        """Record every shard still open (its rows were lost) as failed; returns their names."""
        names = []
        for sp in list(self.shards.values()):
            lost = "" if sp.expected is None else f" ({sp.received} of {sp.expected} results arrived)"
            self._fail(sp, sp.error or error + lost)
            names.append(sp.name)
        return names

    def abort(self) -> None:
        """Interrupted: drop unfinished tars, leave the manifest as it is (those shards redo)."""
        for sp in self.shards.values():
            if sp.writer is not None:
                sp.writer._abort()
                sp.writer = None


def block_bytes(resize: TeacherResize, batch_size: int) -> int:
    """Bytes of ~``batch_size`` decoded rows: resized pixels (<= min x max x 3) + ~100 KB of JPEG."""
    row = resize.min_size * resize.max_size * 3 + 100_000
    return max(256 * 1024, batch_size * row)


def build_dataset(specs: list[dict[str, Any]], *, resize: TeacherResize, teacher_path: str,
                  identity: TeacherIdentity, config: FilterConfig, extra: dict[str, Any],
                  workers: int, batch_size: int, gpus_per_worker: float, actor_cpus: float = 1.0,
                  worker_cls: type | None = None):
    """The lazy Ray Dataset of labeled rows for ``specs`` (one per pending input shard).

    ``worker_cls``: ``TeacherWorker`` or a subclass (fault injection in tests).
    """
    import ray

    ds = ray.data.from_items([{"spec": json.dumps(s)} for s in specs],
                             override_num_blocks=max(1, len(specs)))
    # The dataset's own copy of the DataContext (shared by the datasets derived from it):
    # other Ray Data users in this process keep their settings.
    ctx = ds.context
    ctx.max_errored_blocks = -1   # a batch that keeps failing costs its shard, not the run
    ctx.enable_progress_bars = False          # the command draws its own (images/s, boxes/s)
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # Blocks of about one teacher batch, so results stream back (and shards finish) while the
    # rest is labeled; Ray's 128 MiB default would make each input shard one block.
    ctx.target_max_block_size = block_bytes(resize, batch_size)
    ds = ds.map_batches(read_shard_batches, batch_size=1, num_cpus=0.25, batch_format="pyarrow")
    ds = ds.map_batches(decode_batch, fn_kwargs={"min_size": resize.min_size, "max_size": resize.max_size},
                        batch_size=batch_size, num_cpus=0.25, batch_format="pyarrow")
    with warnings.catch_warnings():
        # max_task_retries has no named parameter yet (Ray 2.60 deprecates **ray_remote_args
        # for 2.64); without it a batch that kills its actor every time is retried forever.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _teacher_stage(ds, worker_cls or TeacherWorker, teacher_path, identity, config, extra,
                            workers, batch_size, gpus_per_worker, actor_cpus)
    return ds


def _teacher_stage(ds, worker_cls: type, teacher_path: str, identity: TeacherIdentity, config: FilterConfig,
                   extra: dict[str, Any], workers: int, batch_size: int, gpus_per_worker: float,
                   actor_cpus: float):
    """Append the teacher actor pool (autoscaling between 1 and ``workers`` actors) to ``ds``."""
    import ray

    use_gpu = gpus_per_worker > 0
    ds = ds.map_batches(
        worker_cls,
        fn_constructor_kwargs={"teacher_path": teacher_path, "identity": identity.to_dict(),
                               "config": config.to_dict(), "extra": extra, "use_gpu": use_gpu},
        batch_size=batch_size, batch_format="pyarrow",
        # autoscaling pool: a lost node shrinks it instead of deadlocking (DESIGN.md)
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
        num_gpus=gpus_per_worker if use_gpu else None,
        num_cpus=actor_cpus,
        # a dead actor is restarted (a preempted node); a batch that kills it 3 times is dropped
        max_restarts=-1, max_task_retries=3,
    )
    return ds


def run_pipeline(ds, sink: ShardSink) -> list[str]:
    """Stream the dataset's rows into ``sink``; shards short of rows at the end are failed.

    Returns the names of shards that lost rows (a batch dropped after its retries).
    """
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in _table_to_rows(batch):
                sink.add(row)
    except BaseException:
        sink.abort()
        raise
    return sink.fail_unfinished("results lost in the pipeline (a task failed repeatedly; see Ray logs)")


# ------------------------------------------------------------------------------------------ the stage
@dataclass
class PseudoLabelOptions:
    """Every option of a run, recorded verbatim in the manifest."""
    phrases: str
    teacher: str
    threshold: float
    nms_iou: float
    max_boxes_per_phrase: int
    min_box_size: float
    image_size: int | None = None
    workers: int = 1
    batch_size: int = 8
    gpus_per_worker: float | None = None     # None: 1 when the cluster has GPUs, else 0
    max_samples_per_tar: int = 10000
    caption_field: str = "caption"
    overwrite: bool = False

    @property
    def filter_config(self) -> FilterConfig:
        return FilterConfig(self.threshold, self.nms_iou, self.max_boxes_per_phrase, self.min_box_size)


# Options that change what is written: a resumed run must use the same ones.
OUTPUT_OPTIONS = ("threshold", "nms_iou", "max_boxes_per_phrase", "min_box_size", "teacher_sha256",
                  "teacher_min_size", "teacher_max_size")


@dataclass
class PseudoLabelResult:
    manifest: Manifest
    done: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    images: int = 0
    boxes: int = 0
    seconds: float = 0.0
    teacher_ready_seconds: float | None = None   # from the start until the first teacher had loaded

    def totals(self) -> dict[str, Any]:
        """Summed over every shard in the manifest (this run and earlier ones)."""
        totals = self.manifest.totals()
        totals["boxes"] = sum(int((e.get("counts") or {}).get("boxes", 0)) for e in self.manifest.shards.values())
        totals["without_boxes"] = sum(int((e.get("counts") or {}).get("without_boxes", 0))
                                      for e in self.manifest.shards.values())
        return totals


def _output_options(options: PseudoLabelOptions, identity: TeacherIdentity,
                    resize: TeacherResize) -> dict[str, Any]:
    return {"threshold": options.threshold, "nms_iou": options.nms_iou,
            "max_boxes_per_phrase": options.max_boxes_per_phrase, "min_box_size": options.min_box_size,
            "teacher_sha256": identity.sha256, "teacher_min_size": resize.min_size,
            "teacher_max_size": resize.max_size}


def open_manifest(out_dir: Path, options: PseudoLabelOptions, identity: TeacherIdentity,
                  resize: TeacherResize) -> Manifest:
    """The manifest to resume from, or a fresh one; ``InputError`` when options changed."""
    from dataclasses import asdict

    recorded = dict(asdict(options), **_output_options(options, identity, resize))
    if not options.overwrite:
        old = Manifest.resumable(out_dir, STAGE, recorded, OUTPUT_OPTIONS)
        if old is not None:
            return Manifest(stage=STAGE, options=recorded, model=identity.to_dict(), shards=old.shards)
    else:
        try:
            old = Manifest.load(out_dir)
        except ValueError:
            old = None          # unreadable: nothing of it to keep
        for entry in (old.shards.values() if old is not None and old.stage == STAGE else []):
            for name in entry.get("outputs") or []:
                (out_dir / name).unlink(missing_ok=True)
    return Manifest(stage=STAGE, options=recorded, model=identity.to_dict())


def check_options(options: PseudoLabelOptions) -> None:
    """Cheap checks of the user's paths (no hashing, no Ray): ``InputError`` naming the bad one."""
    from labeling.teacher import teacher_resize
    from storage.errors import InputError

    teacher = Path(options.teacher)
    if not teacher.exists():
        raise InputError(f"{teacher}: teacher checkpoint not found")
    if teacher.is_dir() and not (teacher / "config.json").is_file():
        raise InputError(f"{teacher}: not a glipctl checkpoint (no config.json); "
                         f"pass a checkpoint directory or an official GLIP .pth")
    teacher_resize(teacher, options.image_size)            # an unreadable config.json is exit 2
    if not Path(options.phrases).is_dir():
        raise InputError(f"{options.phrases}: phrases folder not found (the --out of parse-captions)")


def _actor_cpus(workers: int, cluster_cpus: float, use_gpu: bool) -> float:
    """CPUs per teacher actor: one (half beside a GPU) unless that leaves reads no room.

    DESIGN.md: whole-CPU actors filling the cluster starve (and after a node loss deadlock)
    the read/decode tasks; asking slightly less keeps a slot for them.
    """
    want = 0.5 if use_gpu else 1.0
    return max(0.1, min(want, (cluster_cpus - 0.5) / max(1, workers)))


def run_pseudo_label(shards: list[CrawledShard], out_dir: str | Path, options: PseudoLabelOptions,
                     on_progress: Callable[[int, int, int, int], None] | None = None,
                     worker_cls: type | None = None) -> PseudoLabelResult:
    """Label every input shard not yet done into ``out_dir``; Ray must already be initialised.

    ``on_progress(images_so_far, boxes_so_far, shards_finished, shards_total)`` is called as
    results arrive. The manifest is saved whenever a shard finishes. ``worker_cls``
    replaces ``TeacherWorker`` (a subclass, e.g. for fault injection in tests).
    """
    import ray

    from labeling.teacher import teacher_identity, teacher_resize
    from storage.errors import InputError

    out_dir = Path(out_dir)
    identity = teacher_identity(options.teacher)
    resize = teacher_resize(options.teacher, options.image_size)
    phrases_dir = Path(options.phrases)
    if not phrases_dir.is_dir():
        raise InputError(f"{phrases_dir}: phrases folder not found (the --out of parse-captions)")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = open_manifest(out_dir, options, identity, resize)
    result = PseudoLabelResult(manifest)

    pending, missing = [], []
    for shard in shards:
        entry = manifest.shards.get(shard.name, {})
        if manifest.is_done(shard.name) and all((out_dir / o).exists() for o in entry.get("outputs") or []):
            result.resumed.append(shard.name)
        elif not phrase_file_for(phrases_dir, shard).exists():
            missing.append(shard)
        else:
            pending.append(shard)
    if missing and not pending and not result.resumed:
        raise InputError(f"{phrases_dir}: no phrase file for any input shard (expected e.g. "
                         f"{phrase_file_for(phrases_dir, missing[0]).name}); run parse-captions first")
    for shard in missing:
        manifest.mark(shard.name, "failed", counts={}, error=f"no phrase file "
                      f"{phrase_file_for(phrases_dir, shard)}; run parse-captions on this shard")
        result.failed.append(shard.name)
    for shard in pending:   # a shard redone from scratch: tars of an interrupted attempt go first
        for stale in out_dir.glob(output_pattern(shard.name)):
            stale.unlink()
    manifest.save(out_dir)
    if not pending:
        return result

    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    config = options.filter_config
    extra = {"teacher_sha256": identity.sha256, "teacher_source": identity.source,
             **config.to_dict(), "teacher_min_size": resize.min_size, "teacher_max_size": resize.max_size}
    specs = [{"shard": {"name": s.name, "path": s.path, "kind": s.kind, "caption_field": s.caption_field,
                        "key_field": s.key_field, "url_field": s.url_field},
              "phrase_file": str(phrase_file_for(phrases_dir, s))} for s in pending]
    started = time.perf_counter()
    started_wall = time.time()
    names = [s.name for s in pending]

    def update(images: int, boxes: int) -> None:
        result.images += images
        result.boxes += boxes
        if on_progress is not None:
            finished = sum(manifest.shards.get(n, {}).get("status") in ("done", "failed") for n in names)
            on_progress(result.images, result.boxes, finished, len(names))

    def execute(batch_specs: list[dict[str, Any]]) -> list[str]:
        """One pipeline over ``batch_specs``; returns the shards that lost rows."""
        sink = ShardSink(out_dir, manifest, [s["shard"]["name"] for s in batch_specs],
                         options.max_samples_per_tar, update,
                         paths={s["shard"]["name"]: s["shard"]["path"] for s in batch_specs})
        ds = build_dataset(batch_specs, resize=resize, teacher_path=options.teacher, identity=identity,
                           config=config, extra=extra, workers=options.workers, batch_size=options.batch_size,
                           gpus_per_worker=gpus, actor_cpus=_actor_cpus(options.workers, cluster_cpus, gpus > 0),
                           worker_cls=worker_cls)
        try:
            return run_pipeline(ds, sink)
        except Exception as exc:   # the pipeline itself broke (e.g. the teacher cannot load)
            sink.fail_unfinished(f"pipeline error: {format_exception(exc)}"[:2000])
            return []
        finally:
            if sink.first_ready_at is not None and result.teacher_ready_seconds is None:
                result.teacher_ready_seconds = max(0.0, sink.first_ready_at - started_wall)

    lost = execute(specs)
    # Batches mix rows of neighbouring shards, so one poisoned batch fails them all. Give
    # each such shard a second chance alone: the ones that fail again are the bad ones.
    if len(specs) > 1:
        for name in lost:
            log.warning("shard %s lost results; retrying it alone", name)
            execute([s for s in specs if s["shard"]["name"] == name])
    manifest.save(out_dir)
    for name in names:
        (result.done if manifest.is_done(name) else result.failed).append(name)
    result.seconds = time.perf_counter() - started
    return result


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
