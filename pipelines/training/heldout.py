"""Periodic evaluation during training (rank 0): held-out loss, plus AP or Recall@k.

``--eval ANN.json=IMAGE_DIR`` takes either format: a COCO detection file (its images get the
prompt of all category names; metrics: COCO AP through ``labeling.evaluation``) or an MDETR
grounding file (the captions; metrics: phrase Recall@k). The held-out loss uses the first
``eval_samples`` images, resized only (no flip, no jitter), so it is comparable across steps.
The AP / Recall@k runs over the whole file every time: keep ``--eval`` sets small.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage import fs
from storage.skips import StageCounts

from pipelines.training.augment import TrainAugment
from pipelines.training.feed import TrainExample, detection_prompt, make_example
from pipelines.training.options import AnnotatedImages
from pipelines.training.sources import DetectionImage, load_detection, load_gold


def is_detection_file(path: str) -> bool:
    """True for COCO detection JSON, False for MDETR grounding JSON (images carry captions);
    ``path`` local or a URI."""
    images = fs.read_json(path).get("images") or [{}]
    return "caption" not in images[0]


@dataclass
class HeldOutSet:
    """One ``--eval`` file with its records loaded on the driver (picklable)."""
    spec: AnnotatedImages
    detection: bool
    records: list      # GroundedSample (grounding) or DetectionImage (detection)

    @classmethod
    def load(cls, spec: AnnotatedImages, counts: StageCounts) -> "HeldOutSet":
        detection = is_detection_file(spec.annotations)
        if detection:
            return cls(spec, True, load_detection([spec], counts))
        return cls(spec, False, load_gold([spec], counts))

    def examples(self, augment: TrainAugment, samples: int, max_tokens: int, seed: int) -> list[TrainExample]:
        """The first ``samples`` usable records as examples (detection: every category named,
        none at random: the whole vocabulary as negatives); unreadable images are skipped."""
        from labeling.images import ImageSkip, decode_image

        rng, counts, out = np.random.default_rng(seed), StageCounts(), []
        for record in self.records:
            if len(out) >= samples:
                break
            path = record.image_path if isinstance(record, DetectionImage) else record.extra["image_path"]
            try:
                decoded = decode_image(fs.read_bytes(path))
            except OSError as exc:
                counts.skip("missing_image", path, str(exc))
                continue
            if isinstance(decoded, ImageSkip):
                counts.skip(decoded.reason, path, decoded.detail)
                continue
            if isinstance(record, DetectionImage):
                caption, boxes, spans = detection_prompt(record, rng, None, max_tokens)
                example = make_example(augment, decoded.image, caption, boxes, spans, "detection", record.key, counts)
            else:
                example = make_example(augment, decoded.image, record.caption, [b.bbox for b in record.boxes],
                                       [b.tokens_positive for b in record.boxes], "gold", record.key, counts)
            if example is not None:
                out.append(example)
        return out


class HeldOutEvaluator:
    """Evaluates ``model`` on the held-out sets; examples are prepared once."""

    def __init__(self, sets: list[HeldOutSet], min_size: int, max_size: int, max_tokens: int,
                 samples: int, batch_size: int, seed: int = 0):
        self.sets, self.batch_size = sets, batch_size
        augment = TrainAugment(min_size, max_size, train=False)
        self.examples = []
        for held in sets:
            self.examples.extend(held.examples(augment, samples, max_tokens, seed))

    @torch.no_grad()
    def __call__(self, model) -> dict[str, Any]:
        """``{"eval_loss": .., "eval_loss_cls": .., ..., "eval_AP": .., "eval_R@1": ..}``."""
        was_training = model.training
        model.eval()
        try:
            totals: dict[str, float] = {}
            for i in range(0, len(self.examples), self.batch_size):
                batch = self.examples[i:i + self.batch_size]
                losses = model([e.image for e in batch], [e.caption for e in batch],
                               [{"boxes": e.boxes, "tokens_positive": e.tokens_positive} for e in batch])
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * len(batch)
            row: dict[str, Any] = {f"eval_{k}": v / max(1, len(self.examples)) for k, v in totals.items()}
            row.update(self.metrics(model))
            return row
        finally:
            model.train(was_training)

    def metrics(self, model) -> dict[str, float]:
        """AP (detection files) or Recall@k (grounding files), from ``labeling.evaluation``."""
        from labeling.evaluation import evaluate_coco, evaluate_grounding

        row: dict[str, float] = {}
        for held in self.sets:
            # one set: eval_AP; several: eval_<file stem>_AP
            prefix = "eval_" if len(self.sets) == 1 else f"eval_{Path(fs.name_of(held.spec.annotations)).stem}_"
            if held.detection:
                result = evaluate_coco(model, held.spec.annotations, held.spec.image_root, batch_size=self.batch_size)
                row.update({f"{prefix}{k}": float(result[k]) for k in ("AP", "AP50")})
            else:
                result = evaluate_grounding(model, held.spec.annotations, held.spec.image_root,
                                            batch_size=self.batch_size)
                row.update({f"{prefix}{k}": float(v) for k, v in result.items() if k.startswith("R@")})
        return {k: float(np.round(v, 6)) for k, v in row.items()}
