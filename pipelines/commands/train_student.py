"""`glipctl train-student`: Ray Train DDP on gold grounding + pseudo-label shards (+ detection data)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def main(
    out: Annotated[str, typer.Option("--out", help="Output folder, local or a URI (s3://, gs://): the final "
                                     "checkpoint at its top (GLIP.from_pretrained(OUT)), checkpoints/, metrics.jsonl, "
                                     "_manifest.json; on object stores latest.json commits each checkpoint.",
                                     show_default=False)],
    gold: Annotated[Optional[list[str]], typer.Option(
        "--gold", help="Gold grounding data: a folder (or .tar) packed by `glipctl pack`, or MDETR/GoldG "
                       "ANN.json=IMAGE_DIR, which the run packs into OUT/_packed first; local paths or URIs "
                       "(repeatable).")] = None,
    pseudo: Annotated[Optional[list[str]], typer.Option(
        "--pseudo", help="Pseudo-label shard folder or .tar from `glipctl pseudo-label`, local or a URI; a folder "
                     "gives the shards its manifest commits (repeatable).")] = None,
    detection: Annotated[Optional[list[str]], typer.Option(
        "--detection", help="Detection data: a folder packed by `glipctl pack`, or COCO ANN.json=IMAGE_DIR "
                            "(packed into OUT/_packed first); trained as prompts of category names with random "
                            "negative categories drawn at every visit (repeatable).")] = None,
    mix: Annotated[Optional[str], typer.Option(
        help="Sampling weight per source, e.g. gold=1,pseudo=2,detection=1 (sources left out weigh 1).")] = None,
    preset: Annotated[str, typer.Option(
        help="Model preset when not resuming or --init: tiny (CPU tests), demo-t / demo-l (the demo's teacher "
             "and bigger student: deep fusion at 112-160 px), glip-t, glip-l.")] = "tiny",
    text_encoder: Annotated[Optional[str], typer.Option(
        help="Local BERT folder for the text encoder (default: the preset's).")] = None,
    init: Annotated[Optional[str], typer.Option(
        help="Start from these weights: a glipctl checkpoint folder or an official GLIP .pth (local or a URI).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in total (a resumed run continues to it).")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step per worker.")] = 4,
    lr: Annotated[float, typer.Option(
        help="Peak learning rate of everything but the text encoder (AdamW). 1e-4 fine-tunes a pretrained GLIP "
             "(the official recipe); a model trained from scratch on small data wants more (the demo's 2e-3: "
             "measured there, lower rates did not converge in its step budget).")] = 1e-4,
    text_lr: Annotated[float, typer.Option(
        help="Peak learning rate of the text encoder (official 1e-5). 0 freezes it and skips its backward pass "
             "(~40% of a tiny CPU step); with little data a frozen pretrained encoder keeps the words' meaning "
             "(the demo).")] = 1e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")] = 0.05,
    warmup: Annotated[int, typer.Option(min=0, help="Linear warm-up steps (short runs: a few percent of "
                                                      "--steps; the demo uses 30).")] = 100,
    schedule: Annotated[str, typer.Option(help="Decay after warm-up: cosine, or step (x0.1 at 67% and 89%).")] = "cosine",
    grad_clip: Annotated[float, typer.Option(help="Clip the gradients' global L2 norm to this (0: off).")] = 1.0,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP processes).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(
        min=0.0, help="GPUs per worker; > 0 trains on GPU with NCCL, 0 on CPU with gloo.")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(min=0.1, help="CPUs per worker (also its torch threads).")] = 1.0,
    amp: Annotated[bool, typer.Option("--amp", help="bf16 autocast (GPU only).")] = False,
    pseudo_min_score: Annotated[float, typer.Option(
        help="Drop pseudo-label boxes scored below this; a sample left without boxes is skipped.")] = 0.0,
    pseudo_unboxed: Annotated[str, typer.Option(
        help="Pseudo-label phrases the teacher found no box for (or whose boxes --pseudo-min-score dropped): "
             "'negative' teaches them as absent everywhere, as GLIP treats every word of a caption; 'ignore' "
             "leaves their tokens out of the classification loss (a teacher's miss is not an absence). Measured on "
             "the demo world: with a well-trained teacher (78% of rare objects found) negatives won; with a "
             "short-trained one (44-54% found) 'ignore' did (+3 AP), so the demo uses it.")] = "negative",
    min_size: Annotated[Optional[int], typer.Option(
        help="Training/inference shorter side in pixels (default: the preset's).")] = None,
    max_size: Annotated[Optional[int], typer.Option(
        help="Longer side at most, in pixels (default: the preset's).")] = None,
    loader_workers: Annotated[int, typer.Option(
        min=0, help="Processes per training worker that read, decode and augment its data ahead of the step "
                    "(each streams its own shards; a resume with another value re-splits them). 0: in the "
                    "training thread, the step waits on them.")] = 1,
    group_shards: Annotated[int, typer.Option(
        min=1, help="Shards of a source each data reader reads at once, interleaved: the span of the shuffle, "
                    "and the most a resume re-reads.")] = 4,
    shuffle_buffer: Annotated[int, typer.Option(
        min=1, help="Samples held per source and data reader for shuffling (memory: this many images).")] = 256,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Write a checkpoint every N steps (0: only at the end).")] = 500,
    keep: Annotated[int, typer.Option(min=1, help="Checkpoints kept in OUT/checkpoints (newest).")] = 2,
    log_every: Annotated[int, typer.Option(min=1, help="Write a metrics.jsonl row every N steps.")] = 10,
    eval: Annotated[Optional[list[str]], typer.Option(
        "--eval", help="Held-out data ANN.json=IMAGE_DIR: COCO detection (AP) or MDETR grounding (Recall@k), "
                       "plus held-out loss (repeatable).")] = None,
    eval_every: Annotated[int, typer.Option(
        min=0, help="Evaluate every N steps (needs --eval; 0: once, at the end).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUT.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Delete a previous run's checkpoints and metrics in OUT and start over.")] = False,
    max_failures: Annotated[int, typer.Option(
        min=0, help="Restart the worker group this many times when a worker fails (a lost process or node); "
                    "each restart resumes from the newest checkpoint in OUT by itself and the run still ends at "
                    "--steps (steps since that checkpoint are trained again). 0: the first failure stops the run "
                    "(then --resume). Bad input and divergence are never retried.")] = 3,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: RAY_ADDRESS or local).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling, augmentation and initialisation.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skip reason.")] = False,
) -> None:
    """Train a GLIP student on gold grounding data plus pseudo-label shards (gold only: a teacher) with Ray Train."""
    from pipelines.common import console, setup_logging
    from pipelines.training import AnnotatedImages, TrainOptions, parse_mix, train
    from pipelines.training.options import parse_source
    from pipelines.training.loop import TrainingFailed

    setup_logging(verbose)
    overrides = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
    options = TrainOptions(
        out=out, gold=[parse_source(v, "--gold") for v in gold or []], pseudo=list(pseudo or []),
        detection=[parse_source(v, "--detection") for v in detection or []], mix=parse_mix(mix),
        preset=preset, text_encoder=text_encoder, init=init, model_overrides=overrides, steps=steps,
        batch_size=batch_size, lr=lr, text_lr=text_lr, weight_decay=weight_decay, warmup=warmup,
        schedule=schedule, grad_clip=grad_clip, workers=workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, amp=amp, pseudo_min_score=pseudo_min_score,
        pseudo_unboxed=pseudo_unboxed, loader_workers=loader_workers, group_shards=group_shards,
        shuffle_buffer=shuffle_buffer, checkpoint_every=checkpoint_every, keep=keep, log_every=log_every,
        eval=[AnnotatedImages.parse(v, "--eval") for v in eval or []], eval_every=eval_every,
        resume=resume, overwrite=overwrite, max_failures=max_failures, address=address, seed=seed)
    try:
        result = train(options)
    except TrainingFailed as exc:   # diverged, or a worker died: not the input's fault, exit 1
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=1) from None
    _print_summary(console, result)


def _print_summary(console, result, title: str = "train-student", output: str = "model") -> None:
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{result.start_step} -> {result.step}")
    if result.final_loss is not None:
        table.add_row("final loss", f"{result.final_loss:.4f}")
    if result.samples_per_s:
        table.add_row("samples/s", f"{result.samples_per_s:.2f}")
    for source, c in result.counts.items():
        table.add_row(f"{source}: read / trained on", f"{c.get('read', 0):,} / {c.get('written', 0):,}")
        for reason, n in c.get("skipped", {}).items():
            table.add_row(f"{source}: skipped {reason}", f"{n:,}")
    table.add_row(output, str(result.out))
    console.print(table)
