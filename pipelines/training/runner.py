"""The driver side of ``glipctl train-student``: check inputs, start Ray Train, show progress.

``train(options)`` checks every source here and packs ``ANN.json=IMAGES`` inputs into
``OUT/_packed`` (``sources.prepare_sources``; bad input fails before any training worker
starts, with exit 2 from the CLI), then runs one ``TorchTrainer`` fit: ``options.workers``
workers, DDP over gloo (CPU) or NCCL (GPU). Rank 0 writes checkpoints and ``metrics.jsonl``
straight into ``--out`` (see ``checkpointing`` for why not Ray Train's own checkpoints);
the driver follows ``metrics.jsonl`` for the progress bar and writes ``_manifest.json``.

Self-healing: a worker group that fails (a worker process or its node lost) is restarted by
Ray Train up to ``--max-failures`` times (``FailureConfig``; preempted nodes are Ray's own
budget), and its workers resume from the newest checkpoint of ``--out`` themselves
(``loop``), so the run ends at ``--steps`` without anyone re-running ``--resume``. The
driver only decides, before the fit, that the checkpoints there are this run's: none (a
fresh or ``--overwrite`` run) or the ones ``--resume`` continues. Bad input found by a
worker and divergence are not retried (``loop``: the stop file).

Every path may be a local path or a URI (``storage.fs``); local ones are made absolute
before they enter the train config. On a cluster, local paths must be on storage every
node sees; an ``s3://`` / ``gs://`` ``--out`` needs nothing shared: rank 0 uploads and
commits its checkpoints there (``checkpointing.RunOutput``) and Ray Train's own run state
goes to ``OUT/_ray`` through the same filesystem. The train config carries shard lists and
options only (kilobytes, whatever the size of the data); each worker streams its own part of
every source (``loader``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from storage import fs
from storage.checkpoints import CONFIG, RUN_FILES
from storage.errors import InputError
from storage.manifest import Manifest
from storage.skips import StageCounts

from pipelines.training.checkpointing import (Location, checkpoint_step, clear_run, latest_checkpoint,
                                              list_checkpoints, publish_checkpoint)
from pipelines.training.options import AnnotatedImages, TrainOptions, TrainResult
from pipelines.training.feed import READER_PREFIX
from pipelines.training.sources import PACKED_DIR, prepare_sources

log = logging.getLogger("glipctl.train")

STAGE = "train-student"


# What a run writes into --out; --overwrite deletes exactly these (and nothing else there).
RUN_OUTPUTS = RUN_FILES + (CONFIG, "model.safetensors", "tokenizer",
                           "prompt.json", "prompt.safetensors")   # glip.prompt's files (prompt-tune)


def _clear_previous_run(out: str) -> None:
    clear_run(out, RUN_OUTPUTS)


def normalized_options(options: TrainOptions) -> TrainOptions:
    """``options`` with every local path absolute (URIs as given): what Ray workers receive."""
    def spec(s: AnnotatedImages | str) -> AnnotatedImages | str:
        if isinstance(s, str):
            return fs.normalize(s)
        return AnnotatedImages(fs.normalize(s.annotations), fs.normalize(s.image_root))

    def path(p: str | None) -> str | None:
        return fs.normalize(p) if p else p

    return dataclasses.replace(
        options, out=fs.normalize(options.out), gold=[spec(g) for g in options.gold],
        detection=[spec(d) for d in options.detection], eval=[spec(e) for e in options.eval],
        pseudo=[fs.normalize(p) for p in options.pseudo], init=path(options.init),
        text_encoder=path(options.text_encoder))


def _resume_point(options: TrainOptions, out: str) -> Location | None:
    try:
        existing = latest_checkpoint(out)
    except ValueError as exc:      # an unreadable pointer on an object store
        raise InputError(f"{exc}; pass --overwrite to start over") from None
    if existing is not None and not options.resume and not options.overwrite:
        raise InputError(f"{out} already holds checkpoints (newest {fs.name_of(existing)}); "
                         f"pass --resume to continue that run, --overwrite to start over, or choose another --out")
    if options.resume and existing is None:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", out)
    return existing if options.resume else None


def _model_identity(options: TrainOptions, resume_from: Location | None) -> dict[str, Any]:
    return {"preset": options.preset, "init": options.init, "text_encoder": options.text_encoder,
            "overrides": options.model_overrides, "resumed_from": str(resume_from) if resume_from else None}


def _write_manifest(out: str, options: TrainOptions, resume_from: Location | None, status: str,
                    counts: dict[str, dict], step: int, error: str | None = None) -> None:
    manifest = Manifest(stage=STAGE, options=options.to_dict(), model=_model_identity(options, resume_from))
    for name, c in counts.items():
        manifest.mark(name, status, counts=c, error=error)
    manifest.options["reached_step"] = step
    manifest.save(out)


def _driver_counts(sources_counts: dict[str, StageCounts], worker_counts: dict[str, dict]) -> dict[str, dict]:
    """Per source: ``read`` = samples the workers read from its shards (every visit),
    ``written`` = examples trained on, ``skipped`` = every reason, from packing
    ``ANN.json=IMAGES`` inputs (``sources_counts``), reading and drawing."""
    total: dict[str, StageCounts] = {}
    for name, c in sources_counts.items():
        if c.skipped:   # the records packing read are the shards' samples: only its skips add here
            total.setdefault(name, StageCounts()).skipped.update(c.skipped)
    for name, c in worker_counts.items():
        drawn = StageCounts.from_dict(c)
        merged = total.setdefault(name.removeprefix(READER_PREFIX), StageCounts())
        if name.startswith(READER_PREFIX):    # the shard reader: what was read from the tars
            merged.read += drawn.read
        else:                             # the feed: its "read" are draws, not input records
            merged.written += drawn.written
        merged.skipped.update(drawn.skipped)
    return {name: c.to_dict() for name, c in sorted(total.items())}


class _Progress:
    """Follows ``metrics.jsonl`` from a thread: step, loss terms, samples/s, ETA (rich)."""

    def __init__(self, path: str, start_step: int, steps: int, enabled: bool):
        self.path, self.start_step, self.steps, self.enabled = path, start_step, steps, enabled
        self.interval = 5.0 if fs.is_remote(path) else 1.0     # one GET per poll on object stores
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from pipelines.common import console
        from pipelines.training.loop import read_metrics

        columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"))
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("train", total=self.steps, completed=self.start_step, info="starting workers")
            shown = None
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    rows = [r for r in read_metrics(self.path) if r.get("step", 0) > self.start_step]
                except OSError:       # an object store's hiccup costs one update, not the bar
                    rows = []
                # the newest row, not the row count: a restarted worker group cuts the rows after its checkpoint
                if rows and rows[-1] != shown:
                    shown = row = rows[-1]
                    losses = " ".join(f"{k.removeprefix('loss_') if k != 'loss' else 'loss'}={row[k]:.3f}"
                                      for k in row if k.startswith("loss"))
                    speed = f"{row['samples_per_s']:.1f} samples/s" if row.get("samples_per_s") else ""
                    bar.update(task, completed=row["step"], info=f"{losses} {speed}")
                if stopping:
                    break


def _check_resources(options: TrainOptions) -> None:
    """Refuse a worker group the Ray cluster cannot hold (Ray Train would wait for it forever).

    Only a cluster without an address (a local Ray) is held to its current size; a joined
    cluster may autoscale, so there it is a warning.
    """
    import os

    import ray

    total = ray.cluster_resources()
    wanted = {"CPU": options.workers * options.cpus_per_worker, "GPU": options.workers * options.gpus_per_worker}
    for kind, need in wanted.items():
        have = float(total.get(kind, 0.0))
        if need > have + 1e-9:
            message = (f"--workers {options.workers} x {kind.lower()}s per worker needs {need:g} {kind} "
                       f"but this Ray cluster has {have:g}")
            if options.address or os.environ.get("RAY_ADDRESS"):
                log.warning("%s: waiting for the cluster to grow", message)
            else:
                raise InputError(message)


def _unwrap_worker_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside a Ray Train failure (InputError, TrainingDiverged), if any."""
    from pipelines.training.loop import TrainingDiverged

    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        error = failures[rank]
        for candidate in (error, getattr(error, "cause", None), getattr(error, "__cause__", None)):
            if isinstance(candidate, (InputError, TrainingDiverged)):
                return candidate
    return None


def _fixed_prompt(options: TrainOptions, sources) -> dict[str, Any] | None:
    """The one category prompt of a prompt-tune run (``tuning.fixed_category_prompt``); None otherwise."""
    if not options.fixed_prompt:
        return None
    from pipelines.training.tuning import fixed_category_prompt

    vocabularies = sorted(set(sources.vocabularies.values()))
    if len(vocabularies) != 1:
        raise InputError(f"a fixed category prompt needs one detection vocabulary; the --detection data has "
                         f"{len(vocabularies)}: " + "; ".join(", ".join(v) for v in vocabularies))
    return fixed_category_prompt(vocabularies[0], options.prompt_template)


def train(options: TrainOptions, progress: bool = True) -> TrainResult:
    """Train as ``glipctl train-student`` does; returns where the model is and what happened.

    Raises InputError for bad input (before Ray starts when it can be seen on the driver),
    ``TrainingDiverged`` when the loss becomes NaN/inf and ``TrainingFailed`` when workers
    died more than ``options.max_failures`` times (checkpoints written before either stay;
    ``--resume`` continues from them).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.common import ensure_ray
    from pipelines.training.heldout import HeldOutSet
    from pipelines.training.loop import (FAULT_ENV, METRICS, TrainingDiverged, TrainingFailed, error_from_stop_record,
                                         ray_train_worker, read_metrics)

    options.validate()
    options = normalized_options(options)
    out = options.out
    fs.makedirs(out)
    resume_from = _resume_point(options, out)
    result_out: Path | str = out if fs.is_remote(out) else Path(out)
    started = time.perf_counter()
    start_step = checkpoint_step(resume_from) if resume_from is not None else 0
    if resume_from is not None and start_step >= options.steps:
        publish_checkpoint(resume_from, out)
        log.warning("%s is already at step %d (>= --steps %d): nothing to train", out, start_step, options.steps)
        return TrainResult(result_out, start_step, start_step, [], {}, [p for _, p in list_checkpoints(out)],
                           0.0, 0.0)

    ensure_ray(options.address)
    _check_resources(options)
    sources = prepare_sources(options.gold, options.detection, options.pseudo, out)
    fixed_prompt = _fixed_prompt(options, sources)
    eval_counts = StageCounts()
    heldout = [HeldOutSet.load(spec, eval_counts) for spec in options.eval]
    if options.overwrite:   # only now: bad input must not cost the previous run
        _clear_previous_run(out)
    _write_manifest(out, options, resume_from, "running", _driver_counts(sources.counts, {}), start_step)

    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = options.gpus_per_worker
    run_name = f"train-student-{int(time.time() * 1000)}"
    # every worker group, the first and any Ray Train restarts, starts from the newest checkpoint of
    # OUT: the driver made sure above that those are this run's (none, or the ones --resume continues)
    config = {"options": options, "sources": sources, "out": out, "resume_from": None, "find_checkpoint": True,
              "stop_file": fs.join(out, "_ray", f"{run_name}.stopped.json"), "heldout": heldout,
              "fixed_prompt": fixed_prompt}
    env = fs.worker_environment()
    if os.environ.get(FAULT_ENV):        # the loop's test hook (tests only)
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    if fs.is_remote(out):   # Ray Train's run state through the same filesystem (its endpoint, its keys)
        ray_fs, ray_path = fs.resolve(fs.join(out, "_ray"))
        storage = {"storage_path": ray_path, "storage_filesystem": ray_fs}
    else:
        storage = {"storage_path": fs.join(out, "_ray")}
    trainer = TorchTrainer(
        ray_train_worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, **storage,
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             # the workers resolve URIs as the driver does, even in a Ray started
                             # before this process had its storage environment
                             worker_runtime_env={"env_vars": env}),
    )
    try:
        with _Progress(fs.join(out, METRICS), start_step, options.steps, progress):
            result = trainer.fit()
    except Exception as exc:   # Ray Train wraps worker errors; surface ours as they are
        inner = _unwrap_worker_error(exc)
        reached = max([start_step] + [s for s, _ in list_checkpoints(out)])
        _write_manifest(out, options, resume_from, "failed", _driver_counts(sources.counts, {}), reached,
                        error=str(inner or exc)[:2000])
        if isinstance(inner, (InputError, TrainingDiverged)):
            raise inner from None
        newest = latest_checkpoint(out)
        first = next(iter((getattr(exc, "worker_failures", None) or {}).values()), exc)
        retried = f" (restarts allowed by --max-failures: {options.max_failures})" if options.max_failures else ""
        raise TrainingFailed(f"training failed{retried}: {type(first).__name__}: {str(first).strip()[:500]}; "
                             + (f"the newest checkpoint is {newest}: rerun with --resume to continue"
                                if newest else "no checkpoint was written")) from exc
    summary = result.return_value or {}
    if "stopped" in summary:   # a restarted group found the error its predecessor recorded
        error = error_from_stop_record(summary["stopped"])
        reached = max([start_step] + [s for s, _ in list_checkpoints(out)])
        _write_manifest(out, options, resume_from, "failed", _driver_counts(sources.counts, {}), reached,
                        error=str(error)[:2000])
        raise error
    counts = _driver_counts(sources.counts, summary.get("counts", {}))
    _write_manifest(out, options, resume_from, "done", counts, options.steps)
    rows = [r for r in read_metrics(fs.join(out, METRICS)) if r.get("step", 0) > start_step]
    return TrainResult(out=result_out, step=int(summary.get("step", options.steps)), start_step=start_step, metrics=rows,
                       counts=counts, checkpoints=[p for _, p in list_checkpoints(out)],
                       seconds=time.perf_counter() - started,
                       samples_per_s=float(summary.get("samples_per_s", 0.0)),
                       peak_memory_mb=list(summary.get("peak_memory_mb", [])))
