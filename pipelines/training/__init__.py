"""``glipctl train-student`` as a library: ``train(TrainOptions(...)) -> TrainResult``.

Modules: ``options`` (what to do), ``sources`` (loading gold/detection/pseudo on the driver),
``sampling`` + ``feed`` (per-worker mixing and streaming), ``augment`` (transforms v2),
``schedule`` (AdamW + LR schedule), ``checkpointing`` (atomic checkpoints, resume),
``loop`` (the per-worker train loop), ``runner`` (Ray Train orchestration).
Importing this package imports neither torch nor Ray.
"""
from pipelines.training.options import AnnotatedImages, TrainOptions, TrainResult, parse_mix


def train(options: TrainOptions, progress: bool = True) -> TrainResult:
    """Run a training (Ray Train, DDP) as ``glipctl train-student`` does; see ``runner.train``."""
    from pipelines.training.runner import train as _train
    return _train(options, progress=progress)


__all__ = ["AnnotatedImages", "TrainOptions", "TrainResult", "parse_mix", "train"]
