"""``glipctl prompt-tune``: adapt a trained GLIP to a detection task through its prompt.

The GLIP paper's transfer result: with deep fusion, learning only the prompt (an offset per
token position added to the text features, every weight frozen) comes close to fine-tuning
the whole model, and one frozen model then serves many tasks, each carried by a prompt of a
few kilobytes. ``--mode linear`` (the head's last projections) and ``--mode full`` (every
weight) run through the same command so the three can be compared on equal terms.

Every mode trains on one fixed prompt: the task's whole category list in the dataset's order,
with ``--prompt-template`` applied (``pipelines.training.tuning``), which is exactly what
``glipctl evaluate`` reads for the same data and template. The run is a ``train-student`` run
underneath (Ray Train DDP, checkpoints, ``--resume``, self-healing); ``--shots K`` first writes
the ``K``-shot subset of the annotations into ``OUT/_shots`` (``storage.coco.few_shot_image_ids``).

Output: ``--mode prompt``: ``OUT/prompt.json`` + ``OUT/prompt.safetensors`` (the offsets, the
prompt text and template, the base model's sha256); ``linear`` / ``full``: a model checkpoint
at ``OUT`` (``GLIP.from_pretrained``), evaluated with the same ``--prompt-template``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from storage import fs
from storage.errors import InputError

log = logging.getLogger("glipctl.prompt_tune")

SHOTS_DIR = "_shots"
# (lr, weight decay) per mode: the official prompt tuning (SOLVER.BASE_LR 0.05, WEIGHT_DECAY 0.25),
# its fine-tuning rate, and a linear-probe rate measured on the demo world (BENCHMARKS.md "Prompt tuning").
MODE_DEFAULTS: dict[str, tuple[float, float]] = {"prompt": (0.05, 0.25), "linear": (0.01, 0.05), "full": (1e-4, 0.05)}


@dataclass
class PromptTuneOptions:
    model: str
    detection: str                       # ANN.json=IMAGE_DIR, or a folder / .tar packed by glipctl pack
    out: str
    mode: str = "prompt"
    shots: int | None = None
    steps: int = 500
    batch_size: int = 4
    lr: float | None = None              # None: MODE_DEFAULTS
    weight_decay: float | None = None
    text_lr: float | None = None         # --mode full only; None: lr / 10 (the official ratio)
    warmup: int = 20
    prompt_template: str | None = None   # JSON file or inline JSON (storage.prompt_template)
    min_size: int | None = None
    max_size: int | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    amp: bool = False
    loader_workers: int = 1
    checkpoint_every: int = 500
    keep: int = 2
    log_every: int = 10
    max_failures: int = 3
    resume: bool = False
    overwrite: bool = False
    augment: bool = True
    address: str | None = None
    seed: int = 0


def base_model_identity(model: str) -> dict[str, str]:
    """``{path, sha256, kind}`` of a GLIP ``--model``; InputError for anything else."""
    from labeling.teacher import teacher_identity

    identity = teacher_identity(model)
    if identity.kind not in ("glipctl", "official"):
        raise InputError(f"--model {model}: prompt tuning needs a GLIP model (a glipctl checkpoint folder or an "
                         f"official .pth), not a {identity.model_type} model")
    return {"path": identity.path, "sha256": identity.sha256, "kind": identity.kind}


def shots_subset(detection, shots: int, seed: int, out: str):
    """``detection`` (AnnotatedImages) cut to its ``shots``-shot subset, written once per (file, K, seed)
    under ``OUT/_shots``; a resumed run finds the same file."""
    import hashlib

    from storage.coco import write_few_shot_subset
    from pipelines.training.options import AnnotatedImages

    digest = hashlib.sha256(detection.annotations.encode()).hexdigest()[:8]
    stem = fs.name_of(detection.annotations).rsplit(".", 1)[0]
    path = fs.join(out, SHOTS_DIR, f"{stem}-{digest}-{shots}shot-seed{seed}.json")
    images, per_category = write_few_shot_subset(detection.annotations, shots, seed, path)
    thin = {name: n for name, n in per_category.items() if n < shots}
    if thin:
        log.warning("--shots %d: fewer images than that for %s (the data has no more)", shots,
                    ", ".join(f"{k} ({v})" for k, v in thin.items()))
    log.info("--shots %d (seed %d): %d images in %s", shots, seed, images, path)
    return AnnotatedImages(path, detection.image_root)


def train_options(options: PromptTuneOptions):
    """The ``TrainOptions`` of a prompt-tune run (checks the model, the template and the data)."""
    from storage.prompt_template import PromptTemplate

    from pipelines.training import AnnotatedImages, TrainOptions
    from pipelines.training.options import parse_source
    from pipelines.training.tuning import TUNE_MODES

    if options.mode not in TUNE_MODES:
        raise InputError(f"--mode {options.mode!r}: expected one of {', '.join(TUNE_MODES)}")
    base = base_model_identity(options.model)
    template = PromptTemplate.load(options.prompt_template) if options.prompt_template else None
    detection = parse_source(options.detection, "--detection")
    out = fs.normalize(options.out)
    if options.shots is not None:
        if not isinstance(detection, AnnotatedImages):
            raise InputError("--shots samples from the annotations: give --detection ANN.json=IMAGE_DIR "
                             "(packed shards are used whole)")
        detection = shots_subset(detection, options.shots, options.seed, out)
    lr_default, wd_default = MODE_DEFAULTS[options.mode]
    lr = options.lr if options.lr is not None else lr_default
    text_lr = (options.text_lr if options.text_lr is not None else lr / 10) if options.mode == "full" else 0.0
    weight_decay = options.weight_decay if options.weight_decay is not None else wd_default
    meta: dict[str, Any] = {"format": "glipctl-prompt/1", "base_model": base, "shots": options.shots,
                            "seed": options.seed, "steps": options.steps, "lr": lr, "weight_decay": weight_decay,
                            "detection": options.detection}
    overrides = {k: v for k, v in (("min_size", options.min_size), ("max_size", options.max_size)) if v is not None}
    return TrainOptions(
        out=out, detection=[detection], init=options.model, model_overrides=overrides, tune=options.mode,
        fixed_prompt=True, prompt_template=template.to_json() if template is not None else None, prompt_meta=meta,
        steps=options.steps, batch_size=options.batch_size, lr=lr, text_lr=text_lr, weight_decay=weight_decay,
        warmup=options.warmup, workers=options.workers, gpus_per_worker=options.gpus_per_worker,
        cpus_per_worker=options.cpus_per_worker, amp=options.amp, loader_workers=options.loader_workers,
        checkpoint_every=options.checkpoint_every, keep=options.keep, log_every=options.log_every,
        max_failures=options.max_failures, resume=options.resume, overwrite=options.overwrite,
        augment=options.augment, address=options.address, seed=options.seed)


def prompt_tune(options: PromptTuneOptions, progress: bool = True):
    """Run it; returns the ``TrainResult`` (``out`` holds the prompt or the model)."""
    from pipelines.training import train

    return train(train_options(options), progress=progress)
