"""What one training run is asked to do: ``TrainOptions`` and the parsing of CLI-shaped values.

Pure Python (no torch, no Ray) so the CLI, the demo and the tests build options cheaply.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage import fs
from storage.errors import InputError

SOURCES = ("gold", "pseudo", "detection")


_JSON_THEN_EQUALS = re.compile(r"\.jsonl?=", re.IGNORECASE)


def split_annotated(value: str, option: str) -> tuple[str, str]:
    """``ANN.json=IMAGE_DIR`` -> (annotations, image folder), as given; InputError naming ``option``.

    Split after ``.json=`` / ``.jsonl=`` when there is one, else at the first ``=``, so a URI
    with ``=`` in it (``s3://b/date=2024/ann.json=s3://b/images``) parses.
    """
    m = _JSON_THEN_EQUALS.search(value)
    if m:
        ann, sep, root = value[:m.end() - 1], "=", value[m.end():]
    else:
        ann, sep, root = value.partition("=")
    if not sep or not ann or not root:
        raise InputError(f"{option} {value!r}: expected ANN.json=IMAGE_DIR")
    return ann, root


@dataclass(frozen=True)
class AnnotatedImages:
    """An annotation file and the folder its ``file_name`` entries are relative to (local paths or URIs)."""
    annotations: str
    image_root: str

    @classmethod
    def parse(cls, value: str, option: str) -> "AnnotatedImages":
        """``ANN.json=IMAGE_DIR`` -> AnnotatedImages (paths normalized); raises InputError naming ``option``.

        Split after ``.json=`` when there is one, else at the first ``=``, so a URI with ``=``
        in it (``s3://b/date=2024/ann.json=s3://b/images``) parses.
        """
        ann, root = split_annotated(value, option)
        try:
            ann_there, root_there = fs.is_file(ann), fs.is_dir(root)
        except OSError as exc:
            raise InputError(f"{option} {value!r}: cannot be read ({exc})") from None
        if not ann_there:
            raise InputError(f"{option}: annotation file {ann} does not exist")
        if not root_there:
            raise InputError(f"{option}: image folder {root} does not exist")
        return cls(fs.normalize(ann), fs.normalize(root))


def parse_source(value: str, option: str) -> "AnnotatedImages | str":
    """A ``--gold`` / ``--detection`` value: ``ANN.json=IMAGE_DIR`` (packed by the run itself),
    or a packed folder / ``.tar`` shard from ``glipctl pack`` (normalized path or URI)."""
    if _JSON_THEN_EQUALS.search(value):
        return AnnotatedImages.parse(value, option)
    kind = fs.kind_of(value)
    if kind is None:
        hint = "" if "=" in value else " (or ANN.json=IMAGE_DIR)"
        raise InputError(f"{option} {value}: no such packed folder or shard{hint}")
    return fs.normalize(value)


def parse_mix(value: str | None) -> dict[str, float]:
    """``"gold=1,pseudo=2"`` -> ``{"gold": 1.0, "pseudo": 2.0}``; sources left out weigh 1."""
    weights = {name: 1.0 for name in SOURCES}
    if not value:
        return weights
    for part in value.split(","):
        name, sep, number = part.strip().partition("=")
        if not sep or name not in SOURCES:
            raise InputError(f"--mix {value!r}: expected NAME=WEIGHT with NAME in {', '.join(SOURCES)}")
        try:
            weight = float(number)
        except ValueError:
            raise InputError(f"--mix {value!r}: weight {number!r} is not a number") from None
        if not weight >= 0:   # also rejects NaN
            raise InputError(f"--mix {value!r}: weight of {name} must be >= 0")
        weights[name] = weight
    return weights


@dataclass
class TrainOptions:
    """Everything ``train`` needs; field names follow the ``glipctl train-student`` options.

    ``batch_size`` is per worker (the global batch is ``batch_size * workers``). ``lr`` is
    the peak learning rate of everything but the text encoder, which gets ``text_lr``.
    ``model_overrides`` are passed to ``GLIP.from_preset`` (tests shrink ``min_size`` there).
    """
    out: str
    gold: list[AnnotatedImages | str] = field(default_factory=list)        # ANN=IMAGES, or packed folders/shards
    pseudo: list[str] = field(default_factory=list)
    detection: list[AnnotatedImages | str] = field(default_factory=list)
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(None))
    preset: str = "tiny"
    text_encoder: str | None = None
    init: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    text_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup: int = 100
    schedule: str = "cosine"           # "cosine" | "step"
    grad_clip: float = 1.0             # max global L2 norm of the gradients; 0 disables
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    amp: bool = False                  # bf16 autocast, GPU only
    pseudo_min_score: float = 0.0
    pseudo_unboxed: str = "negative"   # phrases the teacher found no box for: "negative" (GLIP) or "ignore" (no loss)
    detection_negatives: int = 8       # at most this many absent categories per detection prompt
    shuffle_buffer: int = 256          # samples held for shuffling, per source and data reader
    group_shards: int = 4              # shards of a source read at once, interleaved (the shuffle's span)
    loader_workers: int = 1            # processes decoding + augmenting per training worker; 0: in the training thread
    checkpoint_every: int = 500
    keep: int = 2
    log_every: int = 10
    eval: list[AnnotatedImages] = field(default_factory=list)
    eval_every: int = 0
    eval_samples: int = 64
    resume: bool = False
    overwrite: bool = False            # delete a previous run's checkpoints and metrics in ``out`` first
    max_failures: int = 3              # worker-group restarts (from the newest checkpoint) before the run fails
    address: str | None = None
    seed: int = 0
    augment: bool = True
    # glipctl prompt-tune (pipelines.training.tuning): what trains, and the task's one prompt
    tune: str = "full"                 # "full" | "linear" | "prompt"
    fixed_prompt: bool = False         # detection images read the dataset's whole category list, in order
    prompt_template: Any = None        # JSON of a storage.prompt_template applied to that list
    prompt_meta: dict[str, Any] = field(default_factory=dict)   # recorded in prompt.json (base model, shots)

    def validate(self) -> None:
        """Raise InputError for option combinations that cannot run."""
        if not (self.gold or self.pseudo or self.detection):
            raise InputError("nothing to train on: give --gold, --pseudo or --detection")
        for name, value in [("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--workers", self.workers), ("--keep", self.keep), ("--log-every", self.log_every),
                            ("--group-shards", self.group_shards), ("--shuffle-buffer", self.shuffle_buffer)]:
            if value < 1:
                raise InputError(f"{name} must be >= 1 (got {value})")
        if self.loader_workers < 0:
            raise InputError(f"--loader-workers must be >= 0 (got {self.loader_workers})")
        if self.warmup < 0 or self.checkpoint_every < 0 or self.eval_every < 0 or self.max_failures < 0:
            raise InputError("--warmup, --checkpoint-every, --eval-every and --max-failures must be >= 0")
        if self.pseudo_unboxed not in ("ignore", "negative"):
            raise InputError(f"--pseudo-unboxed {self.pseudo_unboxed!r}: expected ignore or negative")
        if self.schedule not in ("cosine", "step"):
            raise InputError(f"--schedule {self.schedule!r}: expected cosine or step")
        if not (self.lr > 0 and self.text_lr >= 0):
            raise InputError("--lr must be > 0 and --text-lr >= 0")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite contradict each other: choose one")
        if self.eval_every and not self.eval:
            raise InputError("--eval-every needs --eval ANN.json=IMAGE_DIR")
        if self.tune not in ("full", "linear", "prompt"):
            raise InputError(f"--mode {self.tune!r}: expected full, linear or prompt")
        if self.tune != "full" and not self.init:
            raise InputError(f"--mode {self.tune} tunes a trained model: give it (--model)")
        if (self.tune == "prompt" or self.fixed_prompt) and (self.gold or self.pseudo or not self.detection):
            raise InputError("a fixed category prompt (prompt tuning) trains on detection data only: give --detection "
                             "and no --gold / --pseudo")
        if self.tune == "prompt" and not self.fixed_prompt:
            raise InputError("--mode prompt tunes the offsets of one prompt: it needs the fixed category prompt")
        present = {"gold": bool(self.gold), "pseudo": bool(self.pseudo), "detection": bool(self.detection)}
        if not any(self.mix.get(name, 0) > 0 for name, there in present.items() if there):
            raise InputError(f"--mix gives weight 0 to every source given ({', '.join(k for k, v in present.items() if v)})")
        for name, paths in [("--init", [self.init]), ("--text-encoder", [self.text_encoder]),
                            ("--pseudo", self.pseudo)]:
            for path in paths:
                if path and not _exists(path, name):
                    raise InputError(f"{name} {path} does not exist")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options, recorded in the manifest."""
        return asdict(self)


def _exists(path: str, option: str) -> bool:
    try:
        return fs.exists(path)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot be read ({exc})") from None


@dataclass
class TrainResult:
    """What a finished run produced: ``out`` loads with ``GLIP.from_pretrained`` (after
    ``storage.checkpoints.local_model`` when it is a URI)."""
    out: Path | str                          # a local folder, or a URI string
    step: int
    start_step: int
    metrics: list[dict[str, Any]]            # the metrics.jsonl rows written by this run
    counts: dict[str, dict[str, Any]]        # per source: read, written (= trained on), skipped by reason
    checkpoints: list[Path | str]
    seconds: float
    samples_per_s: float                     # trained samples / seconds of the loop (all workers)
    peak_memory_mb: list[dict[str, float]] = field(default_factory=list)   # per rank: rss (+ cuda)

    @property
    def final_loss(self) -> float | None:
        return self.metrics[-1]["loss"] if self.metrics else None
