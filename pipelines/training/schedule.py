"""Optimizer and learning-rate schedule: AdamW with two learning rates, warm-up then decay.

The text side (the pretrained BERT and the BERT layers of the fusion head) gets its own,
usually smaller, learning rate: GLIP fine-tunes the language side gently so it keeps what it
knows about words (and on ``tiny`` the fusion's BERT layers at the image rate collapse every
token to one vector, measured by the model engineer).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

# Parameter-name prefixes of the language backbone, whatever the model calls it.
TEXT_ENCODER_PREFIXES = ("language_backbone.", "text_encoder.", "language_encoder.", "language_model.",
                         "backbone.language.", "text_backbone.")
# Fraction of the peak learning rate at step 0 of the warm-up.
WARMUP_START = 0.001
# Step decay: multiply by 0.1 at these fractions of the run (GLIP's 0.67 / 0.89 milestones).
STEP_MILESTONES = (0.67, 0.89)
STEP_GAMMA = 0.1


def is_text_encoder_param(name: str) -> bool:
    """True for parameters of the language backbone (name as in ``model.named_parameters()``)."""
    name = name.removeprefix("module.")   # DDP wrapper
    return name.startswith(TEXT_ENCODER_PREFIXES)


def text_parameter_ids(model: torch.nn.Module) -> set[int]:
    """``id()`` of every parameter on the text side of ``model``.

    The model says which those are when it can (``GLIP.parameter_groups``: the language
    backbone and the BERT layers inside the fusion head); otherwise the name prefixes above.
    """
    groups = getattr(model, "parameter_groups", None)
    if callable(groups):
        probe_lr, probe_text_lr = 1.0, 0.5
        return {id(p) for g in groups(probe_lr, probe_text_lr) if g["lr"] == probe_text_lr for p in g["params"]}
    return {id(p) for name, p in model.named_parameters() if is_text_encoder_param(name)}


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float, text_lr: float,
                 weight_decay: float, text_ids: set[int] | None = None) -> list[dict]:
    """AdamW groups: (text side | rest) x (decayed | not decayed).

    ``text_ids`` (from ``text_parameter_ids``) picks the text side; without it, the name
    prefixes do. Biases and normalization weights (1-D tensors) get no weight decay, as usual
    for AdamW. Each group carries ``name`` so logs and tests can find it; frozen parameters
    are left out.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        text = id(p) in text_ids if text_ids is not None else is_text_encoder_param(name)
        key = (text, p.ndim > 1)
        groups.setdefault(key, []).append(p)
    result = []
    for (text, decay), params in sorted(groups.items()):
        result.append({"params": params, "lr": text_lr if text else lr,
                       "weight_decay": weight_decay if decay else 0.0,
                       "name": f"{'text' if text else 'main'}{'' if decay else '_no_decay'}"})
    return result


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from ``WARMUP_START`` over ``warmup`` steps, then either cosine decay to 0
    at ``total_steps`` or x0.1 steps at ``STEP_MILESTONES`` of the run.
    """
    if warmup > 0 and step < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    if schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        passed = sum(step >= int(m * total_steps) for m in STEP_MILESTONES)
        return STEP_GAMMA ** passed
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(model: torch.nn.Module, lr: float, text_lr: float, weight_decay: float,
                    total_steps: int, warmup: int, schedule: str
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups`` and a LambdaLR stepping once per optimizer step."""
    groups = param_groups(model.named_parameters(), lr, text_lr, weight_decay, text_parameter_ids(model))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    factor: Callable[[int], float] = lambda step: lr_factor(step, total_steps, warmup, schedule)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler
