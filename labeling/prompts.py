"""Prompts for a frozen GLIP: a tuned prompt folder (``glipctl prompt-tune --mode prompt``) as the
stages that ground category lists (evaluate, predict, pseudo-label) use it.

A tuned prompt is ``prompt.json`` + ``prompt.safetensors`` (``glip.prompt``). Its offsets are
tied to token positions of one text, so it is honoured only where that text is read: the
category prompt it was tuned on (``caption``, with its ``template``), on the base model it was
tuned for (``base_model.sha256``, ``labeling.teacher.checkpoint_sha256`` of the model folder or
``.pth``). Anything else is refused with an ``InputError`` that says what differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.errors import InputError

PROMPT_FORMAT = "glipctl-prompt/1"


@dataclass(frozen=True)
class TunedPrompt:
    path: str                 # local folder (a URI is copied first)
    meta: dict[str, Any]
    option: str = "--prompt"  # the command-line option it came from, named in every refusal

    @classmethod
    def read(cls, path: str, option: str = "--prompt") -> "TunedPrompt":
        """The prompt folder at ``path`` (local or a URI); ``InputError`` when it is not one."""
        from glip.prompt import PROMPT_META, PROMPT_WEIGHTS
        from storage import fs
        from storage.checkpoints import local_model

        if not fs.is_file(fs.join(path, PROMPT_META)) or not fs.is_file(fs.join(path, PROMPT_WEIGHTS)):
            raise InputError(f"{option} {path}: not a tuned prompt (needs {PROMPT_META} and {PROMPT_WEIGHTS}; "
                             f"`glipctl prompt-tune --mode prompt` writes them)")
        local = local_model(fs.normalize(path))
        try:
            meta = fs.read_json(fs.join(local, PROMPT_META))
        except ValueError as exc:
            raise InputError(f"{option} {path}: unreadable {PROMPT_META} ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != PROMPT_FORMAT:
            raise InputError(f"{option} {path}: {PROMPT_META} is not a {PROMPT_FORMAT} prompt")
        for key in ("caption", "categories", "base_model"):
            if key not in meta:
                raise InputError(f"{option} {path}: {PROMPT_META} has no {key!r}")
        _check_meta(meta, f"{option} {path}: {PROMPT_META}")
        return cls(str(local), meta, option)

    @property
    def caption(self) -> str:
        return str(self.meta["caption"])

    @property
    def category_names(self) -> list[str]:
        return [str(c["name"]) for c in self.meta["categories"]]

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(int(c["start"]), int(c["end"])) for c in self.meta["categories"]]

    @property
    def base_sha256(self) -> str:
        return str(self.meta["base_model"].get("sha256", ""))

    @property
    def template(self):
        """The ``storage.prompt_template.PromptTemplate`` it was tuned with, or None."""
        from storage.prompt_template import PromptTemplate

        data = self.meta.get("template")
        return PromptTemplate.from_json(data, f"{self.path} template") if data is not None else None

    @property
    def sha256(self) -> str:
        """Identifies the prompt (its files), as a teacher's sha256 identifies the teacher."""
        from labeling.teacher import checkpoint_sha256

        return checkpoint_sha256(self.path)

    def check_base(self, model_path: str, model_sha256: str | None = None) -> None:
        """Refuse a model other than the one the prompt was tuned for."""
        from labeling.teacher import checkpoint_sha256

        have = model_sha256 or checkpoint_sha256(model_path)
        if have != self.base_sha256:
            tuned_on = self.meta["base_model"].get("path", "?")
            raise InputError(f"{self.option} {self.path} was tuned for base model sha256 {self.base_sha256[:12]} "
                             f"({tuned_on}); {model_path} is {have[:12]}: use the model it was tuned on")

    def check_categories(self, names: list[str], where: str) -> None:
        """Refuse a category list other than the one the prompt was tuned on (same names, same order)."""
        if list(names) != self.category_names:
            raise InputError(f"{self.option} {self.path} was tuned on the categories {', '.join(self.category_names)}; "
                             f"{where} has {', '.join(names)}: the offsets are tied to that prompt's tokens")

    def attach(self, model) -> None:
        """Load the offsets into ``model`` (a GLIP of the base model) so every forward reads them."""
        from glip.prompt import load_prompt

        if not hasattr(model, "attach_prompt"):
            raise InputError(f"{self.option} {self.path}: only GLIP models take a tuned prompt")
        try:
            prompt, _ = load_prompt(self.path, model.config.max_query_len)
            model.attach_prompt(prompt)
        except ValueError as exc:
            raise InputError(f"{self.option} {self.path}: {exc}") from None

    def phrases(self) -> list[dict[str, Any]]:
        """The categories as caption phrases (``{text, start, end, root}``) of ``caption``."""
        return category_phrases(self.caption, self.spans, self.category_names)


def template_prompt(template) -> tuple[str, list[dict[str, Any]]]:
    """``(caption, phrases)`` naming the categories of a template alone (``--prompt-template``
    without ``--prompt``): the manual prompt ``pseudo-label`` and ``predict`` ground in every image."""
    from storage.prompt_template import names_prompt

    names = template.category_names()
    if not names:
        raise InputError(f"{template.source}: names no category (alone, a template is the list of categories "
                         f"to find)")
    caption, spans = names_prompt(names, template)
    return caption, category_phrases(caption, spans, names)


def category_phrases(caption: str, spans: list[tuple[int, int]], names: list[str]) -> list[dict[str, Any]]:
    """Categories as caption phrases (``{text, start, end, root}``, root = the category name)."""
    return [{"text": caption[s:e], "start": s, "end": e, "root": n} for (s, e), n in zip(spans, names)]


def category_prompt(tuned: TunedPrompt | None, template) -> tuple[str, list[dict[str, Any]]] | None:
    """``(caption, phrases)``: the category prompt grounded in every image instead of a caption's own
    phrases (``pseudo-label --prompt`` / ``--prompt-template``): the tuned prompt's caption and
    categories, else the template's (``template_prompt``); None without either. ``InputError`` when a
    template disagrees with the tuned prompt's own (``effective_template``)."""
    template = effective_template(tuned, template)
    if tuned is not None:
        return tuned.caption, tuned.phrases()
    if template is not None:
        return template_prompt(template)
    return None


def effective_template(tuned: TunedPrompt | None, template):
    """The template a category prompt is built with: a tuned prompt's own (it was tuned on that text),
    else ``template`` (a ``storage.prompt_template.PromptTemplate`` or None).

    With both, ``template`` must give the tuned prompt's categories the words its own template gives
    them (no template: the bare names); anything else is an ``InputError``, since the offsets would
    then be added to another text.
    """
    if tuned is None:
        return template
    own = tuned.template
    if template is None:
        return own
    from storage.coco import category_name
    from storage.prompt_template import category_texts

    names = [category_name({"name": n}) for n in tuned.category_names]
    wanted = category_texts(names, own)
    try:
        given = template.texts(names)
    except InputError:      # another category list: certainly not the tuned text
        given = None
    if given != wanted:
        said = "no template (the bare category names)" if own is None else f"the template {own.to_json()}"
        raise InputError(f"{template.source} differs from what {tuned.option} {tuned.path} was tuned with "
                         f"({said}); leave the template out: a tuned prompt brings its own")
    return own


def _check_meta(meta: dict[str, Any], where: str) -> None:
    """``InputError`` unless ``meta`` describes a usable prompt: a base model with a sha256, categories
    ``{name, start, end}`` whose spans lie in the caption, and a readable template (or none)."""
    from storage.prompt_template import PromptTemplate
    from storage.records import span_is_valid

    base, caption, categories = meta["base_model"], meta["caption"], meta["categories"]
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str) or not base["sha256"]:
        raise InputError(f"{where}: 'base_model' needs the sha256 of the model it was tuned on")
    if not isinstance(caption, str) or not isinstance(categories, list) or not categories:
        raise InputError(f"{where}: needs a caption and a non-empty list of categories")
    for c in categories:
        ok = isinstance(c, dict) and isinstance(c.get("name"), str) and all(
            isinstance(c.get(k), int) for k in ("start", "end"))
        if not ok or not span_is_valid(c["start"], c["end"], caption):
            raise InputError(f"{where}: category {c!r} is not {{name, start, end}} with a span in its caption")
    if meta.get("template") is not None:
        PromptTemplate.from_json(meta["template"], f"{where} template")
