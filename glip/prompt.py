"""A learned prompt: one offset per token position, added to the text encoder's output before fusion.

GLIP's prompt tuning (the official ``language_prompt_v2``): every weight of the model stays
frozen and a zero-initialised ``[positions, hidden]`` tensor is added to the language
backbone's features, so the fusion layers and the dot product read a shifted text. The offset
is tied to positions, so it means something only for the one prompt it was tuned on (a task's
category names); the file keeps the rows of that prompt's tokens, every later row is zero.

``GLIP.attach_prompt(PromptOffset)`` puts it in the model's forward; ``save_prompt`` /
``load_prompt`` write and read it beside a JSON description the caller fills (the base model,
the prompt text): this module knows tensors, not tasks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROMPT_META = "prompt.json"
PROMPT_WEIGHTS = "prompt.safetensors"
OFFSET_KEY = "offset"


class PromptOffset(nn.Module):
    """``text [B, T, H] -> text + offset[:T]``; ``positions`` is the model's ``max_query_len``."""

    def __init__(self, positions: int, hidden: int):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(positions, hidden))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        length = text.shape[1]
        if length > self.offset.shape[0]:
            raise ValueError(f"{length} text tokens but the prompt has {self.offset.shape[0]} positions")
        return text + self.offset[:length].to(text.dtype)


def save_prompt(path: str | Path, offset: torch.Tensor, positions: int, meta: dict[str, Any]) -> None:
    """Write rows ``[:positions]`` of ``offset`` and ``meta`` into the folder ``path`` (each file atomically;
    ``prompt.json`` last, so a folder with it is complete)."""
    from safetensors.torch import save_file

    from storage.atomic import atomic_path, atomic_write

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = offset.detach()[:positions].contiguous().cpu().float()
    with atomic_path(path / PROMPT_WEIGHTS) as tmp:
        save_file({OFFSET_KEY: rows}, str(tmp), metadata={"format": "pt"})
    full = dict(meta, positions=int(positions), hidden_size=int(rows.shape[1]))
    with atomic_write(path / PROMPT_META, "w") as fh:
        json.dump(full, fh, indent=2, sort_keys=True)


def read_prompt_meta(path: str | Path) -> dict[str, Any]:
    """The ``prompt.json`` of a prompt folder; FileNotFoundError when there is none."""
    return json.loads((Path(path) / PROMPT_META).read_text(encoding="utf-8"))


def load_prompt(path: str | Path, max_positions: int) -> tuple[PromptOffset, dict[str, Any]]:
    """The prompt in folder ``path`` as a ``PromptOffset`` of ``max_positions`` rows (zeros after the
    saved ones), and its description."""
    from safetensors.torch import load_file

    meta = read_prompt_meta(path)
    rows = load_file(str(Path(path) / PROMPT_WEIGHTS))[OFFSET_KEY]
    if rows.shape[0] > max_positions:
        raise ValueError(f"{path}: a prompt of {rows.shape[0]} positions for a model of {max_positions}")
    module = PromptOffset(max_positions, rows.shape[1])
    with torch.no_grad():
        module.offset[:rows.shape[0]] = rows
    return module, meta
