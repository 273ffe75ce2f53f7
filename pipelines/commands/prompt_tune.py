"""`glipctl prompt-tune`: adapt a frozen GLIP to a detection task by learning only its prompt."""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def main(
    model: Annotated[str, typer.Option(
        "--model", help="The GLIP to adapt: a glipctl checkpoint folder or an official .pth, local or a URI. "
                        "A tuned prompt only works on this exact model (its sha256 is recorded).",
        show_default=False)],
    detection: Annotated[str, typer.Option(
        "--detection", help="The task's training data: COCO ANN.json=IMAGE_DIR (packed into OUT/_packed first), or "
                            "a folder / .tar packed by `glipctl pack` (one detection dataset).", show_default=False)],
    out: Annotated[str, typer.Option(
        "--out", help="Output folder, local or a URI. --mode prompt: OUT/prompt.json + OUT/prompt.safetensors "
                      "(use with --prompt OUT); linear / full: a checkpoint at OUT (use as --model OUT). Also "
                      "checkpoints/, metrics.jsonl, _manifest.json, as train-student.", show_default=False)],
    mode: Annotated[str, typer.Option(
        help="What trains. prompt: only an offset per token position added to the text features before fusion "
             "(GLIP's prompt tuning; every weight frozen; a few KB per task). linear: only the head's last "
             "projections (box, centerness, text projection, its scale and biases: the official linear probe). "
             "full: every weight (fine-tuning; the text encoder at --text-lr).")] = "prompt",
    shots: Annotated[Optional[int], typer.Option(
        min=1, help="Train on a K-shot subset, sampled as the GLIP paper does: images in a seeded order (--seed), "
                    "each kept while one of its categories has fewer than K images, so every category gets at "
                    "least K (needs --detection ANN.json=IMAGE_DIR; written to OUT/_shots). Default: all.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps in total.")] = 500,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step per worker.")] = 4,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate. Default per mode: prompt 0.05 (official), linear 0.01, full 1e-4 (official "
             "fine-tuning).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help="AdamW weight decay. Default: prompt 0.25 (official: keeps the offsets small), else 0.05.")] = None,
    text_lr: Annotated[Optional[float], typer.Option(
        help="--mode full: learning rate of the text side (default --lr / 10, the official ratio).")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 20,
    prompt_template: Annotated[Optional[str], typer.Option(
        help="Words around each category name in the prompt, JSON (a file, a URI or inline): "
             "{\"hand\": {\"prefix\": \"\", \"suffix\": \" of a person\"}} or the official list "
             "[{\"prefix\", \"name\", \"suffix\"}, ...] in category order. The span of a category covers its name "
             "only. The prompt is tuned on this text: --mode prompt records it; for linear / full pass the same "
             "template to evaluate.")] = None,
    min_size: Annotated[Optional[int], typer.Option(help="Shorter side in pixels (default: the model's).")] = None,
    max_size: Annotated[Optional[int], typer.Option(help="Longer side at most (default: the model's).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP processes).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, help="GPUs per worker (0: CPU, gloo).")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(min=0.1, help="CPUs per worker (also its torch threads).")] = 1.0,
    amp: Annotated[bool, typer.Option("--amp", help="bf16 autocast (GPU only).")] = False,
    loader_workers: Annotated[int, typer.Option(
        min=0, help="Processes per worker that decode and augment ahead of the step (0: in the training thread).")] = 1,
    augment: Annotated[bool, typer.Option(
        "--augment/--no-augment", help="Random resize and horizontal flip of training images.")] = True,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps (0: only at the end).")] = 500,
    keep: Annotated[int, typer.Option(min=1, help="Checkpoints kept in OUT/checkpoints.")] = 2,
    log_every: Annotated[int, typer.Option(min=1, help="A metrics.jsonl row every N steps.")] = 10,
    max_failures: Annotated[int, typer.Option(
        min=0, help="Worker-group restarts (each resumes from the newest checkpoint) before the run fails.")] = 3,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUT.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over, deleting a previous run in OUT.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: RAY_ADDRESS or local).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shot sampling, data order and augmentation.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every skip reason.")] = False,
) -> None:
    """Adapt a trained GLIP to a detection task by learning only its prompt (or, to compare, its last layer or
    all of it), on Ray Train; the prompt is tuned on the task's whole category list."""
    from pipelines.common import console, setup_logging
    from pipelines.commands.train_student import _print_summary
    from pipelines.prompt_tune import PromptTuneOptions, prompt_tune
    from pipelines.training.loop import TrainingFailed

    setup_logging(verbose)
    options = PromptTuneOptions(
        model=model, detection=detection, out=out, mode=mode, shots=shots, steps=steps, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, text_lr=text_lr, warmup=warmup, prompt_template=prompt_template,
        min_size=min_size, max_size=max_size, workers=workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, amp=amp, loader_workers=loader_workers, checkpoint_every=checkpoint_every,
        keep=keep, log_every=log_every, max_failures=max_failures, resume=resume, overwrite=overwrite,
        augment=augment, address=address, seed=seed)
    try:
        result = prompt_tune(options)
    except TrainingFailed as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=1) from None
    _print_summary(console, result, title=f"prompt-tune ({mode})",
                   output="prompt (use with --prompt)" if mode == "prompt" else "model")
