"""The per-worker training loop: one process per Ray Train worker, DDP between them.

``ray_train_worker(config)`` is what ``TorchTrainer`` runs; it reads rank and device from
Ray Train's context and calls ``run_worker``, which also runs alone in-process (world size
1, no process group), the way the unit tests and the benchmark's reference drive it.

Every step: draw ``batch_size`` examples from this worker's ``MixedFeed``, forward with
losses, all-reduce the loss terms (so every rank sees the same numbers and stops together
when one is NaN/inf), backward (DDP averages the gradients), clip, AdamW step, LR step.
The losses' normalisers (positive anchors, centerness targets) are the global batch's
(``glip.losses``: summed over the workers, divided by their number), so the reported mean
of the workers' terms is the global batch's loss and DDP's averaged gradient is its
gradient, whatever the worker count and each worker's share of the boxes.
Rank 0 logs ``metrics.jsonl``, evaluates, and writes checkpoints holding every rank's
data position and RNG states.

A worker group that Ray Train restarts after a failure (``FailureConfig(max_failures)``)
finds the newest committed checkpoint of ``out`` itself (``find_checkpoint`` in the config)
and continues from it: metrics rows after that step are cut and written again, and the run
ends at ``options.steps`` as an undisturbed one. An error that a restart cannot cure
(``InputError``, ``TrainingDiverged``) is recorded in ``stop_file`` first; a restarted group
that finds it returns it at once (``run_restartable_worker``) instead of training into it again.

Test hook (nothing sets it outside tests): ``GLIPCTL_TEST_EXIT_AT_STEP=STEP:MARKER`` makes the
first worker process to finish step STEP exit on the spot (``os._exit``, after that step's
metrics row, before its checkpoint, once the checkpoints before it are written), as a lost
machine would; creating the local file MARKER is the claim, so it happens once per marker.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from storage import fs
from storage.atomic import atomic_write
from storage.errors import InputError
from storage.skips import StageCounts

from pipelines.training.checkpointing import RunOutput, checkpoint_dir, latest_checkpoint, load_train_state
from pipelines.training.loader import FeedSpec, WorkerBatches
from pipelines.training.options import TrainOptions
from pipelines.training.schedule import build_optimizer, lr_factor, text_parameter_ids
from pipelines.training.tuning import PromptCheckpoint, prepare_model, prompt_positions

log = logging.getLogger("glipctl.train")

METRICS = "metrics.jsonl"
FAULT_ENV = "GLIPCTL_TEST_EXIT_AT_STEP"


class TrainingFailed(RuntimeError):
    """The run stopped for a reason that is not bad input; checkpoints written before it stay."""


class TrainingDiverged(TrainingFailed):
    """The loss (or the gradient norm) became NaN or infinite; the run stops."""

    def __init__(self, step: int, what: str, value: float, checkpoint: str | None):
        self.step, self.what, self.value, self.checkpoint = step, what, value, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written before it"
        super().__init__(f"training diverged: {what} is {value} at step {step}; stopped ({kept}). "
                         f"Try a lower --lr or a longer --warmup.")

    def __reduce__(self):
        return (type(self), (self.step, self.what, self.value, self.checkpoint))


def stop_record(exc: InputError | TrainingDiverged) -> dict[str, Any]:
    """A JSON-ready record of an error that retrying cannot cure (``error_from_stop_record`` rebuilds it)."""
    if isinstance(exc, TrainingDiverged):
        return {"error": "TrainingDiverged", "step": exc.step, "what": exc.what, "value": exc.value,
                "checkpoint": exc.checkpoint}
    return {"error": "InputError", "message": str(exc)}


def error_from_stop_record(record: dict[str, Any]) -> InputError | TrainingDiverged:
    if record.get("error") == "TrainingDiverged":
        return TrainingDiverged(record["step"], record["what"], record["value"], record["checkpoint"])
    return InputError(record.get("message", "training stopped"))


@dataclass
class WorkerContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")


def ray_train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point of each Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    import os

    import ray.train
    import ray.train.torch

    # a worker on a cluster node may not have the driver's environment: never download
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = ray.train.get_context()
    use_gpu = config["options"].gpus_per_worker > 0 and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    return run_restartable_worker(config, WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device))


def run_restartable_worker(config: dict[str, Any], ctx: WorkerContext = WorkerContext()) -> dict[str, Any] | None:
    """``run_worker`` in a worker group that Ray Train restarts on any error: an error no restart cures
    (``InputError``, ``TrainingDiverged``) is written to ``config["stop_file"]`` before it is raised, and a
    group that finds that file returns ``{"stopped": record}`` at once (``error_from_stop_record``)."""
    stop_file = config.get("stop_file")
    if stop_file and fs.is_file(stop_file):
        return {"stopped": fs.read_json(stop_file)}
    try:
        return run_worker(config, ctx)
    except (InputError, TrainingDiverged) as exc:
        if stop_file:    # before raising: Ray Train restarts the group as soon as it sees the error
            fs.write_json(stop_file, stop_record(exc))
        raise


# ----------------------------------------------------------------------------- model

def build_model(options: TrainOptions, checkpoint: str | None = None):
    """The model to train: a resumed checkpoint, else ``--init`` (checkpoint dir or official
    .pth), else the preset; ``model_overrides`` apply to the preset, and its ``min_size`` /
    ``max_size`` (training resolution) also to a loaded model. Checkpoints, ``--init`` and
    ``--text-encoder`` may be URIs: each machine loads its own cached copy."""
    from glip import GLIP, load_teacher
    from storage.checkpoints import local_model

    if checkpoint and options.tune != "prompt":   # resuming: the whole folder is copied anyway (train_state.pt)
        return GLIP.from_pretrained(fs.local_copy(checkpoint))   # (a prompt checkpoint holds the prompt only)
    if options.init:
        model = load_teacher(local_model(options.init), preset=options.preset if options.preset != "tiny" else None)
        sizes = {k: v for k, v in options.model_overrides.items() if k in ("min_size", "max_size")}
        if sizes:
            model.config = model.config.replace(**sizes)
        return model
    overrides = dict(options.model_overrides)
    if options.text_encoder:
        overrides["text_encoder"] = fs.local_copy(options.text_encoder) if fs.is_remote(options.text_encoder) \
            else options.text_encoder
    return GLIP.from_preset(options.preset, **overrides)


# ----------------------------------------------------------------------------- helpers

def _newest_checkpoint(out: str, rank: int, world: int, device: torch.device) -> str | None:
    """The newest committed checkpoint of ``out`` (``latest_checkpoint``: the pointer on object
    stores, the whole ``step-N`` folders locally) as rank 0 finds it, on every rank."""
    found = latest_checkpoint(out) if rank == 0 else None
    choice = [str(found) if found is not None else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0, device=device if device.type == "cuda" else None)
    return choice[0]


def _injected_fault(step: int, run: RunOutput | None) -> None:
    """The test hook of the module docstring (``FAULT_ENV``)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if step != int(at):
        return
    if run is not None:   # which checkpoint the restart finds must not depend on the writer thread's pace
        run.wait()
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log.warning("%s: worker process exits at step %d", FAULT_ENV, step)
    os._exit(1)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory, the largest of its finished data-loader processes'
    (``loader_rss``, once ``WorkerBatches.close`` joined them) and, on a GPU, the peak CUDA
    allocation, in MiB."""
    import resource

    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}   # Linux: KiB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if children:
        peak["loader_rss"] = children
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak


def merge_counts(per_rank: list[dict[str, dict]]) -> dict[str, dict]:
    """Sum the per-source counts of every rank (``MixedFeed.all_counts`` dicts)."""
    total: dict[str, StageCounts] = {}
    for counts in per_rank:
        for name, c in counts.items():
            total.setdefault(name, StageCounts()).merge(c)
    return {name: c.to_dict() for name, c in sorted(total.items())}


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, appended and flushed as it comes.

    An append-only log (not rewritten atomically per line); a torn last line from a crash is
    ignored by ``read_metrics``. On resume the rows after the resumed step are cut (one atomic
    rewrite) so the curve continues without duplicates. With ``--out`` on an object store the
    log is kept in ``RunOutput``'s staging folder and uploaded from time to time.
    """

    def __init__(self, run: RunOutput, start_step: int):
        self.run, self.path = run, run.metrics_path
        source = fs.join(run.out, METRICS) if run.remote else self.path
        rows = [r for r in read_metrics(source) if r.get("step", 0) <= start_step]
        with atomic_write(self.path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        run.upload_metrics(force=True)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        self.run.upload_metrics()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, local or a URI (a torn last line is skipped)."""
    try:
        text = fs.read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# ----------------------------------------------------------------------------- the loop

def run_worker(config: dict[str, Any], ctx: WorkerContext = WorkerContext()) -> dict[str, Any] | None:
    """Train until ``options.steps``; rank 0 returns a summary dict, other ranks None.

    ``config``: ``options`` (TrainOptions), ``sources`` (TrainingSources), ``out`` (absolute
    output folder or URI), ``resume_from`` (checkpoint folder or None), ``heldout`` (HeldOutSets);
    optional ``find_checkpoint`` (True: resume from the newest checkpoint of ``out``, if any,
    instead of ``resume_from``: what a restarted worker group needs), ``stop_file``
    (``run_restartable_worker``), ``fixed_prompt`` (``tuning.fixed_category_prompt``: prompt-tune runs)
    and ``model`` (in-process only: train this model object instead of building one).
    """
    options: TrainOptions = config["options"]
    rank, world, device = ctx.rank, ctx.world, ctx.device
    out = fs.normalize(config["out"])
    run = RunOutput(out) if rank == 0 else None
    try:
        return _train_worker(config, ctx, out, run)
    finally:
        if run is not None:
            run.close()


def _train_worker(config: dict[str, Any], ctx: WorkerContext, out: str,
                  run: RunOutput | None) -> dict[str, Any] | None:
    options: TrainOptions = config["options"]
    rank, world, device = ctx.rank, ctx.world, ctx.device
    torch.set_num_threads(max(1, int(options.cpus_per_worker)))
    resume_from = config.get("resume_from")
    if config.get("find_checkpoint"):
        resume_from = _newest_checkpoint(out, rank, world, device)
        if resume_from and rank == 0:
            log.info("resuming from %s", resume_from)
    state = load_train_state(resume_from) if resume_from else None
    torch.manual_seed(options.seed + 1000 * rank)
    random.seed(options.seed + 1000 * rank)

    # an in-process caller (tests, benchmarks) may hand its own model in, and look at it afterwards
    model = config["model"] if config.get("model") is not None else build_model(options, resume_from)
    model = model.to(device)
    prepare_model(model, options.tune, fs.local_copy(resume_from) if resume_from and options.tune == "prompt" else None)
    model.train()
    if options.text_lr == 0:   # a text encoder that cannot move needs no gradients (~40% of a tiny CPU step)
        frozen = text_parameter_ids(model)
        for p in model.parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
    optimizer, scheduler = build_optimizer(model, options.lr, options.text_lr, options.weight_decay,
                                           options.steps, options.warmup, options.schedule)
    cfg = model.config
    fixed_prompt = config.get("fixed_prompt")
    saved = model
    if options.tune == "prompt":    # checkpoints hold the prompt and what it was tuned for, not the model
        saved = PromptCheckpoint(model, dict(options.prompt_meta, **fixed_prompt, mode="prompt"))
    elif fixed_prompt is not None:
        prompt_positions(model, fixed_prompt["caption"])   # refuse a prompt the model would truncate
    batches = WorkerBatches(FeedSpec(config["sources"], options, cfg.min_size, cfg.max_size, cfg.max_query_len,
                                     fixed_prompt), rank, world, options.batch_size, options.loader_workers)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        # the saved rates follow the saved run's schedule; a longer --steps reshapes the decay
        factor = lr_factor(start_step, options.steps, options.warmup, options.schedule)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor
        ranks = state.get("ranks") or []
        batches.load([r.get("feed") for r in ranks])
        if state.get("world_size") == world and rank < len(ranks):
            _set_rng_state(ranks[rank]["rng"], device)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = options.amp and device.type == "cuda"
    if options.amp and not amp and rank == 0:
        log.warning("--amp needs a GPU: training in float32")

    metrics = MetricsLog(run, start_step) if rank == 0 else None
    evaluator = None
    if rank == 0 and config.get("heldout"):
        from pipelines.training.heldout import HeldOutEvaluator
        evaluator = HeldOutEvaluator(config["heldout"], cfg.min_size, cfg.max_size, cfg.max_query_len,
                                     options.eval_samples, options.batch_size, options.seed)
    last_checkpoint = latest_checkpoint(out) if resume_from else None
    params = [p for p in model.parameters() if p.requires_grad]
    names: list[str] | None = None
    window_start, window_samples = time.perf_counter(), 0
    run_start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    for step in range(start_step, options.steps):
        batch = batches.next_batch()
        images = [e.image.to(device, non_blocking=True) for e in batch]
        targets = [{"boxes": e.boxes.to(device), "tokens_positive": e.tokens_positive,
                    "tokens_ignore": e.tokens_ignore} for e in batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = train_model(images, [e.caption for e in batch], targets)
        if names is None:
            names = ["loss"] + sorted(k for k in losses if k != "loss")
        terms = torch.stack([losses[n].detach().float() for n in names])
        if world > 1:
            dist.all_reduce(terms)
            terms /= world
        done = step + 1
        if not torch.isfinite(terms).all():
            bad = next(n for n, v in zip(names, terms.tolist()) if not math.isfinite(v))
            raise TrainingDiverged(done, bad, float(terms[names.index(bad)]),
                                   str(last_checkpoint) if last_checkpoint else None)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = None
        if options.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, options.grad_clip))
            if not math.isfinite(grad_norm):   # identical on every rank: DDP averaged the gradients
                raise TrainingDiverged(done, "the gradient norm", grad_norm,
                                       str(last_checkpoint) if last_checkpoint else None)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}   # the rates this step used
        optimizer.step()
        scheduler.step()
        window_samples += len(batch) * world

        log_now = done % options.log_every == 0 or done == options.steps
        eval_now = evaluator is not None and (
            (options.eval_every and done % options.eval_every == 0) or done == options.steps)
        if rank == 0 and (log_now or eval_now):
            elapsed = time.perf_counter() - window_start
            row = {"step": done, **{n: round(float(v), 6) for n, v in zip(names, terms.tolist())}}
            row["lr"] = lrs.get("main", next(iter(lrs.values())))
            if "text" in lrs:
                row["text_lr"] = lrs["text"]
            if grad_norm is not None:
                row["grad_norm"] = round(grad_norm, 4)
            row["samples_per_s"] = round(window_samples / elapsed, 3) if elapsed > 0 else None
            row["elapsed_s"] = round(time.perf_counter() - run_start, 2)
            if eval_now:
                row.update(evaluator(model))
            metrics.write(row)
            rows.append(row)
            window_start, window_samples = time.perf_counter(), 0
        _injected_fault(done, run)

        if (options.checkpoint_every and done % options.checkpoint_every == 0) or done == options.steps:
            rank_states = _gather({"feed": batches.state_dict(), "rng": _rng_state(device)}, world)
            if rank == 0:
                train_state = {"step": done, "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "world_size": world,
                               "ranks": rank_states, "loss_terms": names, "options": options.to_dict()}
                run.save_checkpoint_in_background(done, saved, train_state, options.keep)
            last_checkpoint = checkpoint_dir(out, done)
            window_start = time.perf_counter()   # samples/s measures training, not checkpoint writes

    batches.close()
    all_counts = _gather(batches.counts(), world)
    peaks = _gather(peak_memory_mb(device), world)
    if rank != 0:
        return None
    run.publish_final()
    seconds = time.perf_counter() - run_start
    trained = (options.steps - start_step) * options.batch_size * world
    return {"step": options.steps, "start_step": start_step, "counts": merge_counts(all_counts),
            "rows": rows, "seconds": seconds, "samples_per_s": trained / seconds if seconds > 0 else 0.0,
            "peak_memory_mb": peaks}
