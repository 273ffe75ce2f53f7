"""The pseudo-label stage on Ray Data: crawled images + phrase files -> teacher -> WebDataset shards.

The input shard is the unit of work (img2dataset's rule)::

    one row per pending input shard
      -> TeacherWorker  (autoscaling actor pool (1, N); num_gpus when the cluster has GPUs)
           for its shard, end to end, where the teacher runs:
           read (storage.fs stream) + join with the shard's phrase file by key   [prefetch thread]
           -> decode + resize                                                   [decode thread]
           -> batches of images of one padded shape -> teacher -> labeling.filters
           -> ShardWriter straight to --out (tars + label tables), in input order
           -> the shard's commit record (storage.manifest.commit_shard)
      -> driver: one small row per shard (counts, output names, checksums): manifest + progress

No image bytes, pixels or caption rows reach the driver, and its work per row is O(1); encoded
bytes are decoded in the actor that labels them, so pixels never cross nodes.

The teacher is any ``labeling.teacher.Teacher`` (``load_teacher``: GLIP, or a transformers
Grounding DINO / MM Grounding DINO / OWLv2); its identity (kind, model type, sha256, hub revision)
is the manifest's ``model`` and, with the thresholds, every sample's ``extra``.

A label is a function of (image, caption, teacher, options) alone: images are batched only with
images of the same padded shape (each padded exactly as it would be alone; ``Teacher.bucket_of``), so
batch neighbours, worker count, retries and lost nodes do not move a box. Samples are written in
input order, so a shard redone after a crash gives byte-identical tars. Keys are
``<input shard>/<crawled key>``: unique across the whole input (two img2dataset runs both start at
key 000000000) and traceable to their source; a repeated key within a shard is a counted skip.

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

Failures: a shard whose read raises comes back as a row with the error; it is recorded failed
(no commit) and the others go on. An actor that dies (a preempted node, a CUDA error: the
worker exits on purpose so that Ray restarts it instead of skipping every later image) is
restarted by Ray and its shard retried (``max_restarts=-1``, ``max_task_retries=3``). A task
whose actor vanished with its node comes back to Ray Data as an error, not a retry: the shards
whose results never arrived run again in ``LOST_SHARD_RETRIES`` more pass(es) (a shard the
lost worker had committed is only read back), and one that still fails is recorded failed
("lost"). A re-run redoes exactly the shards without a commit record; their objects are
rewritten under the same names.

A category prompt instead of the captions (``--prompt`` a tuned prompt, ``--prompt-template`` a
manual one; ``LabelPrompt``): every joined image is asked for the same categories; its sample's
caption is that prompt, its phrases the categories (root = category name, span = the name) and
``extra["alt_text"]`` its crawled caption. The tuned prompt is attached in each actor after the
teacher loads (``attach_tuned_prompt``); its sha256 and the template in effect are output options.

Reading the output with Ray Data: ``ray.data.read_webdataset(tars, decoder=None)`` gives the
original bytes (pass the tars, not the folder: it also holds label tables and the manifest);
Ray's default decoder cannot put grayscale (2-D) and colour (3-D) arrays in one block.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from labeling.filters import FilterConfig
from labeling.teacher import TeacherIdentity, TeacherResize
from storage import fs
from storage.crawled import CrawledShard
from storage.manifest import Manifest, clear_shard, commit_shard
from storage.skips import StageCounts

log = logging.getLogger("glipctl")

STAGE = "pseudo-label"
SUPPORTED_EXTENSIONS = ("jpg", "png", "webp")   # what storage.shards readers accept as images
PRECISIONS = ("fp32", "bf16")
MANIFEST_SAVE_INTERVAL_S = 2.0
# ... and at most this share of the driver's time: the summary grows with the number of shards,
# so the pause between saves grows with the time a save takes (O(1) work per shard overall).
MANIFEST_SAVE_SHARE = 0.05
# Input shards per Ray Data block: the driver's work is per block (task submission, output
# bookkeeping), so many small shards are grouped, while every actor still gets several blocks
# to balance the tail. A block that is retried skips the shards it already committed.
BLOCKS_PER_WORKER = 4
# Passes over the shards whose results were lost (their worker's node died): time, never labels.
LOST_SHARD_RETRIES = 1
# A batch in which more than this share of images fail one by one is the device's fault, not
# the images': the actor exits and Ray restarts it.
DEVICE_FAILURE_SHARE = 0.5

# Read-side skip reasons (decode-side ones are labeling.images.SKIP_*).
SKIP_NO_PHRASE_ROW = "no_phrase_row"                   # image whose key is absent from the phrase file
SKIP_PHRASE_WITHOUT_IMAGE = "phrase_row_without_image"  # phrase row whose key has no image
SKIP_NO_PHRASES = "no_phrases"                         # caption in which parsing found no phrase
SKIP_DUPLICATE_KEY = "duplicate_key"
SKIP_BAD_SPAN = "phrase_span_invalid"                  # a phrase (not the image) dropped: span outside caption
SKIP_UNSUPPORTED_FORMAT = "unsupported_image_format"   # decodable, but not jpg/png/webp
SKIP_TEACHER_ERROR = "teacher_error"


def phrase_file_for(phrases_dir: str, shard: CrawledShard) -> str:
    """Where parse-captions wrote the phrases of ``shard``: ``<dir>/<shard name>.parquet``."""
    return fs.join(phrases_dir, f"{shard.name}.parquet")


def sample_key(shard: str, key: str) -> str:
    """The key of a pseudo-labeled sample: unique across every input shard of a run."""
    return f"{shard}/{key}"


# ------------------------------------------------------------------------------------------ read
def iter_joined(spec: dict[str, Any], counts: StageCounts,
                category_prompt: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The shard's images joined with its phrase file by key, in input order.

    ``spec``: ``{"shard": CrawledShard.to_dict(), "phrase_file": path}``. Yields
    ``{key, caption, phrases, url, source_index, image}`` (phrases: list of
    ``{text, start, end, root}`` with valid spans). Images whose key has no phrase row,
    phrase rows whose key has no image, captions without phrases and repeated keys are
    counted skips. Raises when the shard or phrase file cannot be read at all.

    ``category_prompt`` (``{"caption", "phrases"}``, a ``LabelPrompt``'s): every image gets that
    caption and those phrases instead of its own, and its own caption as ``alt_text``; the phrase
    file still decides which images there are, but not what they are asked for (no ``no_phrases``
    or ``phrase_span_invalid`` skips).
    """
    from storage.phrase_files import iter_phrase_rows
    from storage.records import span_is_valid

    shard = CrawledShard(**spec["shard"])
    phrase_rows: dict[str, dict] = {}
    for prow in iter_phrase_rows(spec["phrase_file"]):
        phrase_rows.setdefault(str(prow["key"]), {"caption": prow["caption"], "phrases": prow["phrases"]})
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
        if category_prompt is not None:
            yield {"key": key, "caption": category_prompt["caption"],
                   "phrases": [dict(p) for p in category_prompt["phrases"]], "alt_text": caption,
                   "url": rec.get("url") or "", "source_index": int(rec["source_index"]), "image": rec["image"]}
            continue
        phrases = []
        for p in prow["phrases"] or []:
            start, end = int(p["start"]), int(p["end"])
            if not span_is_valid(start, end, caption):   # never hand the teacher a bad span
                counts.skip(SKIP_BAD_SPAN, where, f"[{start}, {end}) in a {len(caption)}-char caption")
                continue
            phrases.append({"text": caption[start:end], "start": start, "end": end, "root": p.get("root")})
        if not phrases:
            counts.skip(SKIP_NO_PHRASES, where)
            continue
        yield {"key": key, "caption": caption, "phrases": phrases, "url": rec.get("url") or "",
               "source_index": int(rec["source_index"]), "image": rec["image"]}
    for key in sorted(phrase_rows.keys() - seen):
        counts.skip(SKIP_PHRASE_WITHOUT_IMAGE, f"{spec['phrase_file']} key {key}")


def decode_item(item: dict[str, Any], resize: TeacherResize) -> dict[str, Any]:
    """Decode and resize one joined item: adds ``pixels`` (uint8 [h, w, 3]), ``width``,
    ``height``, ``ext``; or ``skip`` (a reason) and ``detail`` when it cannot be labeled."""
    from labeling.images import DecodedImage, decode_image

    decoded = decode_image(item["image"])
    if not isinstance(decoded, DecodedImage):
        return {**item, "skip": decoded.reason, "detail": decoded.detail[:200]}
    if decoded.extension not in SUPPORTED_EXTENSIONS:
        return {**item, "skip": SKIP_UNSUPPORTED_FORMAT, "detail": decoded.format}
    return {**item, "pixels": resize(decoded.image), "width": decoded.width, "height": decoded.height,
            "ext": decoded.extension}


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items`` produced by a background thread, at most ``depth`` ahead (overlaps storage reads)."""
    done = object()
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:   # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="glipctl-read")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():      # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


# ------------------------------------------------------------------------------------------ one shard
@dataclass
class ShardTally:
    """What labeling one input shard read, wrote and skipped (the manifest entry's counts)."""
    counts: StageCounts = field(default_factory=StageCounts)
    boxes: int = 0
    without_boxes: int = 0
    box_drops: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        d = self.counts.to_dict()
        d.update(boxes=self.boxes, without_boxes=self.without_boxes,
                 boxes_dropped=dict(sorted(self.box_drops.items())))
        return d


class TeacherDeviceError(RuntimeError):
    """The accelerator failed (or most of a batch did): the actor must be replaced, not the images skipped."""


def _device_error_type() -> type:
    try:
        from labeling.teacher import TeacherDeviceError as teacher_error   # the teacher's own, when it has one
        return teacher_error
    except ImportError:
        return TeacherDeviceError


class ShardLabeler:
    """Labels whole input shards with one loaded teacher and writes their output (no Ray here).

    Images are grouped by the teacher's padded shape (``teacher.bucket_of``) into batches of
    ``batch_size``; a group is also run early when the images waiting for it hold up more than
    ``max_buffered`` results (memory stays bounded whatever the shard's size). Samples are
    written in input order.
    """

    def __init__(self, teacher, config: FilterConfig, extra: dict[str, Any], resize: TeacherResize,
                 batch_size: int, max_samples_per_tar: int, max_buffered: int | None = None,
                 decode_threads: int = 1, category_prompt: dict[str, Any] | None = None):
        self.teacher = teacher
        self.category_prompt = category_prompt      # {"caption", "phrases"}: grounded in every image
        self.config = config
        self.extra = extra
        self.resize = resize
        self.batch_size = batch_size
        self.max_samples_per_tar = max_samples_per_tar
        self.max_buffered = max_buffered or max(4 * batch_size, 16)
        self.decode_threads = decode_threads
        self._device_error = _device_error_type()

    def bucket_of(self, pixels) -> tuple:
        bucket = getattr(self.teacher, "bucket_of", None)
        return tuple(bucket(pixels)) if bucket is not None else tuple(pixels.shape[:2])

    def label_shard(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Label one shard into ``spec["out_dir"]`` and commit it; returns its manifest entry.

        Raises when the shard cannot be read or written (the caller records it failed) and
        ``TeacherDeviceError`` when the accelerator fails.
        """
        from storage.shards import ShardWriter

        started = time.perf_counter()
        name = spec["shard"]["name"]
        out_dir = spec["out_dir"]
        tally = ShardTally()
        writer = ShardWriter(out_dir, name, max_samples=self.max_samples_per_tar)
        with writer, ThreadPoolExecutor(self.decode_threads, thread_name_prefix="glipctl-decode") as pool:
            order = _InOrder(lambda result: self._write(writer, tally, result))
            buckets: dict[tuple, list[tuple[int, dict]]] = {}
            waiting = 0                            # decoded items sitting in buckets
            decoding: deque = deque()

            def take_decoded() -> None:
                nonlocal waiting
                seq, item = decoding.popleft()
                item = item.result()
                if "skip" in item:
                    tally.counts.skip(item["skip"], f"{spec['shard']['path']} key {item['key']}", item["detail"])
                    order.put(seq, None)
                    return
                bucket = buckets.setdefault(self.bucket_of(item["pixels"]), [])
                bucket.append((seq, item))
                waiting += 1
                if len(bucket) >= self.batch_size:
                    run(self.bucket_of(item["pixels"]))
                while buckets and waiting + order.held > self.max_buffered:   # the oldest result holds the rest up
                    run(min(buckets, key=lambda b: buckets[b][0][0]))

            def run(bucket_key: tuple) -> None:
                nonlocal waiting
                batch = buckets.pop(bucket_key)
                waiting -= len(batch)
                for (seq, _), result in zip(batch, self._label_batch(name, [it for _, it in batch])):
                    order.put(seq, result)

            items = _prefetched(iter_joined(spec, tally.counts, self.category_prompt), depth=2 * self.batch_size)
            for seq, item in enumerate(items):
                decoding.append((seq, pool.submit(decode_item, item, self.resize)))
                if len(decoding) > self.decode_threads + self.batch_size:
                    take_decoded()
            while decoding:
                take_decoded()
            while buckets:
                run(min(buckets, key=lambda b: buckets[b][0][0]))
        entry = {"status": "done", "stage": STAGE, "counts": tally.summary(), "outputs": writer.outputs,
                 "labels": writer.labels, "checksums": writer.checksums,
                 "seconds": round(time.perf_counter() - started, 3)}
        commit_shard(out_dir, name, entry)   # the commit point: every object above is complete
        return entry

    def _label_batch(self, shard: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Ground one batch; a batch that makes the teacher raise is retried image by image, so
        one bad record costs a ``teacher_error`` skip, not the batch."""
        from labeling.filters import pseudo_sample

        def ground(batch: list[dict]) -> list:
            return self.teacher.ground([it["pixels"] for it in batch], [(it["width"], it["height"]) for it in batch],
                                       [it["caption"] for it in batch],
                                       [[(p["start"], p["end"]) for p in it["phrases"]] for it in batch],
                                       threshold=self.config.threshold, nms_iou=self.config.nms_iou)

        try:
            results: list = ground(items)
        except self._device_error:
            raise
        except Exception:  # noqa: BLE001 - isolate the record that breaks the teacher
            results = []
            for it in items:
                try:
                    results.append(ground([it])[0])
                except self._device_error:
                    raise
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
            failed = sum(isinstance(r, Exception) for r in results)
            if len(items) > 1 and failed > DEVICE_FAILURE_SHARE * len(items):
                raise self._device_error(f"{failed} of {len(items)} images of one batch failed; "
                                         f"first: {next(r for r in results if isinstance(r, Exception))}")
        out = []
        sample_extra = {k: v for k, v in self.extra.items() if k != "teacher_source"}
        for it, result in zip(items, results):
            if isinstance(result, Exception):
                out.append({"key": it["key"], "skip": SKIP_TEACHER_ERROR,
                            "detail": f"{type(result).__name__}: {result}"[:200]})
                continue
            extra = dict(sample_extra, source_shard=shard, source_key=it["key"], source_index=it["source_index"])
            if it["url"]:
                extra["url"] = it["url"]
            if "alt_text" in it:            # a category prompt was grounded: the crawled caption stays with it
                extra["alt_text"] = it["alt_text"]
            sample, dropped = pseudo_sample(sample_key(shard, it["key"]), it["caption"], it["width"], it["height"],
                                            it["phrases"], result, self.config, self.extra["teacher_source"], extra)
            out.append({"sample": sample, "image": it["image"], "ext": it["ext"], "dropped": dropped})
        return out

    @staticmethod
    def _write(writer, tally: ShardTally, result: dict[str, Any] | None) -> None:
        if result is None:
            return
        if "skip" in result:
            tally.counts.skip(result["skip"], f"key {result['key']}", result["detail"])
            return
        sample = result["sample"]
        writer.write(sample, result["image"], result["ext"])
        tally.counts.written += 1
        tally.boxes += len(sample.boxes)
        tally.without_boxes += not sample.boxes
        tally.box_drops.update(result["dropped"])


class _InOrder:
    """Hands results to ``emit`` in sequence order, holding those that arrive early."""

    def __init__(self, emit: Callable[[Any], None]):
        self.emit = emit
        self.next = 0
        self.early: dict[int, Any] = {}

    @property
    def held(self) -> int:
        return len(self.early)

    def put(self, seq: int, value: Any) -> None:
        self.early[seq] = value
        while self.next in self.early:
            self.emit(self.early.pop(self.next))
            self.next += 1


# ------------------------------------------------------------------------------------------ Ray actor
class TeacherWorker:
    """Ray Data callable class: the teacher, loaded once per actor; each call labels whole shards.

    In: a table with a ``spec`` column (one JSON shard spec per row). Out: per shard one row
    ``{shard, entry, error, ready_at}`` (``entry``: the committed manifest entry as JSON).
    """

    def __init__(self, teacher_path: str, identity: dict[str, str], config: dict[str, Any],
                 extra: dict[str, Any], use_gpu: bool, precision: str, resize: dict[str, int],
                 batch_size: int, max_samples_per_tar: int, category_prompt: dict[str, Any] | None = None,
                 prompt_path: str | None = None, prompt_sha256: str | None = None):
        from labeling.teacher import load_teacher

        device = "cuda" if use_gpu else "cpu"
        teacher = load_teacher(teacher_path, TeacherIdentity.from_dict(identity), device=device, precision=precision)
        if prompt_path is not None:
            attach_tuned_prompt(teacher, prompt_path, prompt_sha256)
        self.labeler = ShardLabeler(teacher, FilterConfig(**config), extra, TeacherResize(**resize),
                                    batch_size, max_samples_per_tar, category_prompt=category_prompt)
        self.ready_at = time.time()     # wall clock: lets the driver separate model loading from labeling

    def __call__(self, batch):
        import pyarrow as pa

        from storage.manifest import read_commit

        rows = []
        for spec_json in batch.column("spec").to_pylist():
            spec = json.loads(spec_json)
            entry, error = "", ""
            try:
                # a retried block (its actor died) skips what it committed before dying
                done = read_commit(spec["out_dir"], spec["shard"]["name"])
                entry = json.dumps(done if done is not None else self.labeler.label_shard(spec))
            except self.labeler._device_error as exc:
                # Replace this process: Ray restarts the actor and retries the shard elsewhere.
                log.error("teacher device failure on shard %s, restarting the actor: %s", spec["shard"]["name"], exc)
                os._exit(3)
            except Exception as exc:  # noqa: BLE001 - one shard's failure must not end the run
                error = format_exception(exc)[:2000]
            rows.append({"shard": spec["shard"]["name"], "entry": entry, "error": error, "ready_at": self.ready_at})
        return pa.Table.from_pylist(rows, schema=pa.schema([("shard", pa.string()), ("entry", pa.string()),
                                                            ("error", pa.string()), ("ready_at", pa.float64())]))


def attach_tuned_prompt(teacher, path: str, sha256: str | None) -> None:
    """Put the tuned prompt at ``path`` (read here: a URI is copied to this node) into the GLIP
    ``teacher``'s model; ``RuntimeError`` when its files are no longer the ones the driver recorded."""
    from labeling.prompts import TunedPrompt

    tuned = TunedPrompt.read(path)
    if sha256 is not None and tuned.sha256 != sha256:
        raise RuntimeError(f"--prompt {path} changed since the run started (sha256 {tuned.sha256[:12]}, "
                           f"recorded {sha256[:12]})")
    tuned.attach(teacher.model)


def build_dataset(specs: list[dict[str, Any]], *, worker_cls: type, worker_kwargs: dict[str, Any],
                  workers: int, gpus_per_worker: float, actor_cpus: float):
    """The lazy Ray Dataset of one result row per shard spec."""
    import ray

    blocks = max(1, min(len(specs), BLOCKS_PER_WORKER * max(1, workers)))
    ds = ray.data.from_items([{"spec": json.dumps(s)} for s in specs], override_num_blocks=blocks)
    # The dataset's own copy of the DataContext: other Ray Data users in this process keep theirs.
    ctx = ds.context
    ctx.max_errored_blocks = -1   # a shard that keeps killing its actor costs that shard, not the run
    ctx.enable_progress_bars = False          # the command draws its own (images/s, boxes/s)
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    use_gpu = gpus_per_worker > 0
    size = max(1, workers)
    with warnings.catch_warnings():
        # max_task_retries has no named parameter yet (Ray 2.60 deprecates **ray_remote_args
        # for 2.64); without it a shard that kills its actor every time is retried forever.
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            worker_cls, fn_constructor_kwargs={**worker_kwargs, "use_gpu": use_gpu},
            batch_size=1, batch_format="pyarrow",
            # autoscaling pool: a lost node shrinks it instead of deadlocking (DESIGN.md); it
            # starts at full size (no ramp-up while the first teachers load)
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=min(size, len(specs))),
            num_gpus=gpus_per_worker if use_gpu else None, num_cpus=actor_cpus,
            # a dead actor is restarted (a preempted node); a shard that kills it 3 times is dropped
            max_restarts=-1, max_task_retries=3)


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
    workers: int | None = None               # None: GPUs / gpus_per_worker on a GPU cluster, else its CPUs
    batch_size: int = 8
    gpus_per_worker: float | None = None     # None: 1 when the cluster has GPUs, else 0
    precision: str = "fp32"                  # "bf16": autocast (GPU)
    max_samples_per_tar: int = 10000
    caption_field: str = "caption"
    overwrite: bool = False
    prompt: str | None = None                # a tuned prompt folder (labeling.prompts.TunedPrompt)
    prompt_template: str | None = None       # storage.prompt_template JSON as given (a file, URI or inline)

    @property
    def filter_config(self) -> FilterConfig:
        return FilterConfig(self.threshold, self.nms_iou, self.max_boxes_per_phrase, self.min_box_size)


# Options that change what is written: a resumed run must use the same ones.
OUTPUT_OPTIONS = ("threshold", "nms_iou", "max_boxes_per_phrase", "min_box_size", "teacher_sha256",
                  "teacher_min_size", "teacher_max_size", "precision", "max_samples_per_tar",
                  "prompt_sha256", "prompt_template")


@dataclass(frozen=True)
class LabelPrompt:
    """The category prompt a ``--prompt`` / ``--prompt-template`` run grounds in every image
    (``labeling.prompts.category_prompt``), resolved once on the driver."""
    caption: str
    phrases: list[dict[str, Any]]      # {text, start, end, root}: one per category, the span its name
    template: Any = None               # JSON of the template in effect (the tuned prompt's own with --prompt)
    path: str | None = None            # the tuned prompt folder as given: each actor reads its own copy
    sha256: str | None = None          # the tuned prompt's (TunedPrompt.sha256)

    def to_worker(self) -> dict[str, Any]:
        return {"category_prompt": {"caption": self.caption, "phrases": self.phrases},
                "prompt_path": self.path, "prompt_sha256": self.sha256}


def resolve_prompt(options: "PseudoLabelOptions", identity: TeacherIdentity | None = None) -> LabelPrompt | None:
    """The run's ``LabelPrompt`` (None without --prompt / --prompt-template); ``InputError`` for a folder
    that is no tuned prompt, a bad template, a template that disagrees with the prompt's, and, given the
    teacher's ``identity``, a teacher that is not GLIP or not the prompt's base model."""
    from labeling.prompts import TunedPrompt, category_prompt, effective_template
    from labeling.teacher import HF_KIND
    from storage.errors import InputError
    from storage.prompt_template import PromptTemplate

    if not options.prompt and not options.prompt_template:
        return None
    tuned = TunedPrompt.read(options.prompt) if options.prompt else None
    template = effective_template(tuned, PromptTemplate.load(options.prompt_template)
                                  if options.prompt_template else None)
    caption, phrases = category_prompt(tuned, template)
    if tuned is not None and identity is not None:
        if identity.kind == HF_KIND:
            raise InputError(f"--prompt {options.prompt}: only a GLIP teacher takes a tuned prompt; "
                             f"{identity.path} is a {identity.model_type} model")
        tuned.check_base(identity.path, identity.sha256)
    return LabelPrompt(caption, phrases, template.to_json() if template is not None else None,
                       fs.normalize(options.prompt) if tuned is not None else None,
                       tuned.sha256 if tuned is not None else None)


@dataclass
class PseudoLabelResult:
    manifest: Manifest
    done: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    images: int = 0
    boxes: int = 0
    seconds: float = 0.0
    workers: int = 0
    teacher_ready_seconds: float | None = None   # from the start until the first teacher had loaded

    def totals(self) -> dict[str, Any]:
        """Summed over every shard in the manifest (this run and earlier ones)."""
        totals = self.manifest.totals()
        totals["boxes"] = sum(int((e.get("counts") or {}).get("boxes", 0)) for e in self.manifest.shards.values())
        totals["without_boxes"] = sum(int((e.get("counts") or {}).get("without_boxes", 0))
                                      for e in self.manifest.shards.values())
        return totals


def _output_options(options: PseudoLabelOptions, identity: TeacherIdentity, resize: TeacherResize,
                    prompt: LabelPrompt | None = None) -> dict[str, Any]:
    """What changes the written labels. ``prompt_template`` is the template in effect as JSON (not the
    file name it came from), so that a resumed run with an edited file is refused too."""
    return {"threshold": options.threshold, "nms_iou": options.nms_iou,
            "max_boxes_per_phrase": options.max_boxes_per_phrase, "min_box_size": options.min_box_size,
            "teacher_sha256": identity.sha256, "teacher_min_size": resize.min_size,
            "teacher_max_size": resize.max_size, "precision": options.precision,
            "max_samples_per_tar": options.max_samples_per_tar,
            "prompt_sha256": prompt.sha256 if prompt is not None else None,
            "prompt_template": prompt.template if prompt is not None else None}


def open_manifest(out_dir: str, options: PseudoLabelOptions, identity: TeacherIdentity,
                  resize: TeacherResize, prompt: LabelPrompt | None = None) -> Manifest:
    """The manifest to resume from, or a fresh one; ``InputError`` when options changed.

    ``--overwrite`` forgets every shard of an earlier run (commit records first, then outputs).
    """
    recorded = dict(asdict(options), **_output_options(options, identity, resize, prompt))
    if not options.overwrite:
        old = Manifest.resumable(out_dir, STAGE, recorded, OUTPUT_OPTIONS)
        if old is not None:
            return Manifest(stage=STAGE, options=recorded, model=identity.to_dict(), shards=old.shards)
    else:
        try:
            old = Manifest.load(out_dir)
        except ValueError:
            old = None          # unreadable: nothing of it to keep
        for name, entry in (old.shards.items() if old is not None and old.stage == STAGE else ()):
            clear_shard(out_dir, name, (entry.get("outputs") or []) + (entry.get("labels") or []))
    return Manifest(stage=STAGE, options=recorded, model=identity.to_dict())


def check_options(options: PseudoLabelOptions) -> None:
    """Cheap checks of the user's paths (no Ray): ``InputError`` naming the bad one."""
    from labeling.teacher import HF_KIND, check_teacher, teacher_resize
    from storage.errors import InputError

    if options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision!r}: expected one of {', '.join(PRECISIONS)}")
    kind = check_teacher(options.teacher)  # not found, not a checkpoint, or a file torch cannot read
    resolve_prompt(options)               # not a prompt folder, a bad template (the base model: run_pseudo_label)
    if options.prompt and kind == HF_KIND:
        raise InputError(f"--prompt {options.prompt}: only a GLIP teacher takes a tuned prompt; {options.teacher} "
                         f"is a transformers model")
    teacher_resize(options.teacher, options.image_size)            # an unreadable config.json is exit 2
    if fs.kind_of(options.phrases) != "dir":
        raise InputError(f"{options.phrases}: phrases folder not found (the --out of parse-captions)")


def _actor_cpus(workers: int, cluster_cpus: float, use_gpu: bool) -> float:
    """CPUs per teacher actor: one (half beside a GPU) unless that leaves the cluster no slack.

    DESIGN.md: whole-CPU actors filling the cluster deadlock after a node loss (the restarting
    actor waits for CPUs the survivors hold); asking slightly less keeps a slot free.
    """
    want = 0.5 if use_gpu else 1.0
    return max(0.1, min(want, (cluster_cpus - 0.1) / max(1, workers)))


def default_workers(cluster: dict[str, float], gpus_per_worker: float) -> int:
    """Teacher actors when ``--workers`` is not given: one per GPU share, else one per CPU."""
    if gpus_per_worker > 0:
        return max(1, int(cluster.get("GPU", 0) / gpus_per_worker))
    return max(1, int(cluster.get("CPU", 1)))


def run_pseudo_label(shards: list[CrawledShard], out_dir: str, options: PseudoLabelOptions,
                     on_progress: Callable[[int, int, int, int], None] | None = None,
                     worker_cls: type | None = None) -> PseudoLabelResult:
    """Label every input shard not yet done into ``out_dir``; Ray must already be initialised.

    ``on_progress(images_so_far, boxes_so_far, shards_finished, shards_total)`` is called as
    shards finish. The manifest summary is saved every few seconds and at the end (the commit
    records the workers write are the truth). ``worker_cls`` replaces ``TeacherWorker`` (a
    subclass, e.g. for fault injection in tests).
    """
    import ray

    from labeling.teacher import normalize_teacher, teacher_identity, teacher_resize
    from storage.errors import InputError

    out_dir = fs.normalize(out_dir)
    phrases_dir = fs.normalize(options.phrases)
    teacher_path = normalize_teacher(options.teacher)
    identity = teacher_identity(teacher_path)
    resize = teacher_resize(teacher_path, options.image_size)
    if not fs.is_dir(phrases_dir):
        raise InputError(f"{phrases_dir}: phrases folder not found (the --out of parse-captions)")
    prompt = resolve_prompt(options, identity)     # the base model is checked here, against the teacher's sha256
    fs.makedirs(out_dir)
    manifest = open_manifest(out_dir, options, identity, resize, prompt)
    result = PseudoLabelResult(manifest)

    phrase_files = {e.name for e in fs.list_dir(phrases_dir) if not e.is_dir}
    pending, missing = [], []
    for shard in shards:
        if manifest.is_done(shard.name):
            result.resumed.append(shard.name)
        elif f"{shard.name}.parquet" not in phrase_files:
            missing.append(shard)
        else:
            pending.append(shard)
    if missing and not pending and not result.resumed:
        raise InputError(f"{phrases_dir}: no phrase file for any input shard (expected e.g. "
                         f"{missing[0].name}.parquet); run parse-captions first")
    for shard in missing:
        manifest.mark(shard.name, "failed", counts={}, error=f"no phrase file "
                      f"{phrase_file_for(phrases_dir, shard)}; run parse-captions on this shard")
        result.failed.append(shard.name)
    _remove_unfinished_local_files(out_dir, {s.name for s in pending})
    manifest.save(out_dir)
    if not pending:
        return result

    cluster = ray.cluster_resources()
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if gpus > cluster.get("GPU", 0):      # Ray would wait for such an actor forever
        raise InputError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {cluster.get('GPU', 0):g} GPUs; "
                         f"pass --gpus-per-worker 0 to label on CPUs")
    workers = options.workers or default_workers(cluster, gpus)
    result.workers = workers
    config = options.filter_config
    extra = {**identity.sample_extra(), "teacher_source": identity.source, **config.to_dict(),
             "teacher_min_size": resize.min_size, "teacher_max_size": resize.max_size,
             "precision": options.precision}
    if prompt is not None and prompt.sha256:
        extra["prompt_sha256"] = prompt.sha256
    specs = [{"shard": s.to_dict(), "phrase_file": phrase_file_for(phrases_dir, s), "out_dir": out_dir}
             for s in pending]
    worker_kwargs = {"teacher_path": teacher_path, "identity": identity.to_dict(), "config": config.to_dict(),
                     "extra": extra, "precision": options.precision,
                     "resize": resize.to_dict(),
                     "batch_size": options.batch_size, "max_samples_per_tar": options.max_samples_per_tar,
                     **(prompt.to_worker() if prompt is not None else {})}
    started, started_wall = time.perf_counter(), time.time()
    saver = _SummarySaver(manifest, out_dir)
    finished: set[str] = set()

    def record(row: dict[str, Any]) -> None:
        name = row["shard"]
        if name in finished:            # a retried block delivered twice
            return
        finished.add(name)
        if row["entry"]:
            entry = json.loads(row["entry"])
            entry.pop("stage", None)
            manifest.shards[name] = entry
            result.done.append(name)
            result.images += int(entry["counts"].get("written", 0))
            result.boxes += int(entry["counts"].get("boxes", 0))
        else:
            log.warning("shard %s failed: %s", name, row["error"])
            manifest.mark(name, "failed", counts={}, error=row["error"])
            result.failed.append(name)
        if row.get("ready_at") and result.teacher_ready_seconds is None:
            result.teacher_ready_seconds = max(0.0, row["ready_at"] - started_wall)
        saver.maybe_save()
        if on_progress is not None:
            on_progress(result.images, result.boxes, len(finished), len(pending))

    error = "results lost in the pipeline (the shard's task failed repeatedly; see Ray logs)"
    todo = specs
    try:
        for attempt in range(1 + LOST_SHARD_RETRIES):
            # A task whose actor vanished with its node is an errored block to Ray Data, not a
            # retry: its shards come back in another pass (a committed one is only read back).
            if attempt:
                log.warning("%d shards lost their results (a worker or node was lost); running them again",
                            len(todo))
            ds = build_dataset(todo, worker_cls=worker_cls or TeacherWorker, worker_kwargs=worker_kwargs,
                               workers=workers, gpus_per_worker=gpus,
                               actor_cpus=_actor_cpus(workers, cluster.get("CPU", 1.0), gpus > 0))
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        record(row)
            except Exception as exc:   # the pipeline itself broke (e.g. the teacher cannot load)
                error = f"pipeline error: {format_exception(exc)}"[:2000]
                break
            todo = [s for s in todo if s["shard"]["name"] not in finished]
            if not todo:
                break
    finally:
        manifest.save(out_dir)     # interrupted too: what finished stays recorded
    for shard in pending:
        if shard.name not in finished:
            manifest.mark(shard.name, "failed", counts={}, error=error)
            result.failed.append(shard.name)
    manifest.save(out_dir)
    result.seconds = time.perf_counter() - started
    return result


class _SummarySaver:
    """Rewrites ``_manifest.json`` now and then while shards finish (the commit records are the truth)."""

    def __init__(self, manifest: Manifest, out_dir: str):
        self.manifest, self.out_dir = manifest, out_dir
        self.last = time.perf_counter()
        self.pause = MANIFEST_SAVE_INTERVAL_S

    def maybe_save(self) -> None:
        now = time.perf_counter()
        if now - self.last < self.pause:
            return
        self.manifest.save(self.out_dir)
        self.last = time.perf_counter()
        self.pause = max(MANIFEST_SAVE_INTERVAL_S, (self.last - now) / MANIFEST_SAVE_SHARE)


def _remove_unfinished_local_files(out_dir: str, names: set[str]) -> None:
    """Temporary files a crash left in a local --out for the shards about to be redone."""
    if fs.is_remote(out_dir):
        return     # object stores: an unfinished upload is no object; commits decide the rest
    for entry in fs.list_dir(out_dir):
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and \
                entry.name[1:].split("-", 1)[0] in names:
            fs.delete(entry.path)


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
