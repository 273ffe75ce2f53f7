"""What a run trains: the whole model, only the head's last projections, or only a prompt.

``--mode`` of ``glipctl prompt-tune`` (``TrainOptions.tune``), after the GLIP paper's transfer study:

* ``full``: every weight (fine-tuning; the text encoder at ``text_lr``).
* ``linear``: the official linear probe: only the head's final projections train (box and
  centerness convs, the text projection of the dot product, its scale and biases).
* ``prompt``: the official prompt tuning (``language_prompt_v2``): every weight frozen; a
  zero-initialised offset per token position (``glip.prompt.PromptOffset``) added to the
  text encoder's output is all that learns. Checkpoints then hold the prompt, not the model.

The prompt offset is only meaningful for the one prompt it was tuned on, so prompt tuning
trains on a fixed prompt: the task's whole category list in the dataset's order
(``fixed_category_prompt``), the very text ``glipctl evaluate`` builds for the same
categories and template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from storage.errors import InputError

TUNE_MODES = ("full", "linear", "prompt")
# Parameter names of the linear probe (official linear_prob: bbox_pred, cls_logits, centerness,
# dot_product_projection_text, log_scale, bias_lang, bias0).
LINEAR_PROBE = ("head.bbox_pred.", "head.centerness.", "head.dot_product_projection_text.",
                "head.log_scale", "head.bias_lang", "head.bias0")


def is_linear_probe_param(name: str) -> bool:
    return name.removeprefix("module.").startswith(LINEAR_PROBE)


def fixed_category_prompt(vocabulary: tuple[str, ...], template_json: Any = None) -> dict[str, Any]:
    """``{"caption", "categories": [{"name", "start", "end"}], "template"}``: the one prompt of a
    detection dataset's whole vocabulary, in its order, with ``template_json`` applied
    (``storage.prompt_template``), exactly as ``storage.coco.category_prompts`` writes one prompt
    (the model checks its length: ``prompt_positions``)."""
    from storage.prompt_template import PromptTemplate, names_prompt

    template = PromptTemplate.from_json(template_json) if template_json is not None else None
    caption, spans = names_prompt(list(vocabulary), template)
    return {"caption": caption, "template": template.to_json() if template is not None else None,
            "categories": [{"name": n, "start": s, "end": e} for n, (s, e) in zip(vocabulary, spans)]}


def prompt_positions(model, caption: str) -> int:
    """Token positions of ``caption`` in ``model`` ([CLS] and [SEP] included); InputError when the
    model would truncate it (its offsets would then tune a prompt it never reads whole)."""
    from glip.positive_map import tokenize

    tok = tokenize(model.tokenizer, [caption], model.config.max_query_len, False)
    if tok.truncated_at[0] is not None:
        raise InputError(f"the category prompt ({len(caption)} characters) is longer than the model's "
                         f"{model.config.max_query_len} text tokens; use fewer categories or a shorter template")
    # a model that pads every caption to max_query_len (official glip-t) adds offsets at every row
    return model.config.max_query_len if model.config.pad_to_max else int(tok.attention_mask[0].sum())


def prepare_model(model, mode: str, prompt_checkpoint: str | Path | None = None) -> None:
    """Freeze what ``mode`` does not train; ``prompt``: attach a new offset, or the one saved in
    ``prompt_checkpoint`` (a resumed run)."""
    if mode not in TUNE_MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(TUNE_MODES)}")
    if mode == "full":
        return
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "linear" and is_linear_probe_param(name))
    if mode == "prompt":
        from glip.prompt import PromptOffset, load_prompt

        if prompt_checkpoint is not None:
            prompt, _ = load_prompt(prompt_checkpoint, model.config.max_query_len)
        else:
            prompt = PromptOffset(model.config.max_query_len, model.language_backbone.hidden_size)
        model.attach_prompt(prompt)


class PromptCheckpoint:
    """What the checkpoint writer saves in ``prompt`` mode: the offset rows of the tuned prompt and
    its description (``prompt.json``), duck-typed as the model (``state_dict``, ``save_pretrained``)."""

    def __init__(self, model, meta: dict[str, Any]):
        self.model, self.meta = model, meta
        self.positions = prompt_positions(model, meta["caption"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"offset": self.model.prompt.offset}

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from glip.prompt import save_prompt

        offset = (state_dict or self.state_dict())["offset"]
        save_prompt(folder, offset, self.positions, self.meta)
