"""Tuned prompts for the tests: the folder `glipctl prompt-tune --mode prompt` writes (prompt.json +
prompt.safetensors), here with random offsets, so that a prompt visibly changes what a tiny GLIP finds.

tests/ is on sys.path (the rootdir conftest): ``from prompt_helpers import save_tuned_prompt``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def category_caption(names: list[str], template_json: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """The one category prompt of ``names`` (in this order) with the template, as
    ``storage.coco.category_prompts`` writes it, and its categories ``{name, start, end}``."""
    from storage.coco import category_prompts
    from storage.prompt_template import PromptTemplate

    template = PromptTemplate.from_json(template_json) if template_json is not None else None
    ((caption, spans),) = category_prompts([{"id": i + 1, "name": n} for i, n in enumerate(names)], 10 ** 9,
                                           template=template)
    return caption, [{"name": names[cat_id - 1], "start": s, "end": e} for s, e, cat_id in spans]


def save_tuned_prompt(folder: str | Path, model_dir: str | Path, names: list[str], template_json: Any = None,
                      seed: int = 0, scale: float = 1.0) -> Path:
    """A prompt for the GLIP checkpoint ``model_dir`` tuned (here: drawn, N(0, scale^2), seeded) on the
    category prompt of ``names``; its base model is ``model_dir``'s ``checkpoint_sha256``."""
    import torch

    from glip import GLIP
    from glip.prompt import save_prompt
    from labeling.teacher import checkpoint_sha256

    model = GLIP.from_pretrained(model_dir)
    caption, categories = category_caption(names, template_json)
    positions = len(model.tokenizer(caption, add_special_tokens=True)["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    offset = scale * torch.randn(model.config.max_query_len, model.language_backbone.hidden_size,
                                 generator=generator)
    meta = {"format": "glipctl-prompt/1", "caption": caption, "categories": categories,
            "template": template_json if template_json is None else _normalized(template_json),
            "base_model": {"path": str(model_dir), "sha256": checkpoint_sha256(model_dir)}}
    save_prompt(folder, offset, positions, meta)
    return Path(folder)


def prompted_model(model_dir: str | Path, prompt_dir: str | Path):
    """``model_dir``'s GLIP with the prompt attached by hand (``glip.prompt.load_prompt`` + ``attach_prompt``)."""
    from glip import GLIP
    from glip.prompt import load_prompt

    model = GLIP.from_pretrained(model_dir)
    prompt, _ = load_prompt(prompt_dir, model.config.max_query_len)
    model.attach_prompt(prompt)
    return model.eval()


def other_model(model_dir: str | Path, dest: str | Path) -> Path:
    """A copy of the checkpoint with another ``score_threshold``: the same weights, another model (sha256)."""
    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["score_threshold"] = 0.5 if config.get("score_threshold") != 0.5 else 0.25
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _normalized(template_json: Any) -> Any:
    from storage.prompt_template import PromptTemplate

    return PromptTemplate.from_json(template_json).to_json()
