"""Manual prompts: the words written around each category name in a detection prompt.

GLIP's prompt engineering (ODinW's ``CAPTION_PROMPT``): category ``hand`` read as
``"hand of a person"`` took EgoHands from 22.1 to 50.0 AP zero-shot. A template gives a
category a ``prefix``, a ``name`` (the text that replaces the category's own name) and a
``suffix``; the prompt is ``prefix + name + suffix`` per category, joined by ``". "``, ended by
``"."``, and a category's span covers its ``name`` only (official ``create_queries_and_maps``),
so boxes are scored on the name's tokens while the words around it shape them through
attention and fusion.

Two JSON shapes, as a file (local or a URI) or inline text:

* an object keyed by category name: ``{"hand": {"suffix": " of a person"}}``; categories it
  leaves out keep their name as it is; every field is optional.
* the official list, one entry per category in the dataset's order (by id):
  ``[{"prefix": "", "name": "hand", "suffix": " of a person"}, ...]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from storage import fs
from storage.errors import InputError

_FIELDS = ("prefix", "name", "suffix")


@dataclass(frozen=True)
class CategoryText:
    """What the prompt says for one category; the span covers ``name``."""
    prefix: str
    name: str
    suffix: str


@dataclass(frozen=True)
class PromptTemplate:
    """``by_name``: the object form (category -> its text); ``in_order``: the list form."""
    by_name: tuple[tuple[str, CategoryText], ...] = ()
    in_order: tuple[CategoryText, ...] | None = None
    source: str = ""

    @classmethod
    def load(cls, value: str, option: str = "--prompt-template") -> "PromptTemplate":
        """A template from JSON text or a JSON file; ``InputError`` naming ``option`` and the problem."""
        text, source = value, "inline JSON"
        if not value.lstrip().startswith(("{", "[")):
            try:
                text, source = fs.read_text(value), value
            except (FileNotFoundError, IsADirectoryError):
                raise InputError(f"{option} {value}: no such file (give a JSON file or inline JSON)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{option} {source}: not valid JSON ({exc})") from None
        return cls.from_json(data, f"{option} {source}")

    @classmethod
    def from_json(cls, data: Any, where: str = "prompt template") -> "PromptTemplate":
        if isinstance(data, dict):
            entries = tuple((str(k), _entry(v, str(k), f"{where}: {k!r}")) for k, v in data.items())
            return cls(by_name=entries, source=where)
        if isinstance(data, list):
            if not data:
                raise InputError(f"{where}: an empty list")
            return cls(in_order=tuple(_entry(v, None, f"{where}: entry {i}") for i, v in enumerate(data)),
                       source=where)
        raise InputError(f"{where}: expected a JSON object (category -> {{prefix, name, suffix}}) or a list")

    def to_json(self) -> Any:
        """The JSON this template was read from (normalized: every field present)."""
        as_dict = lambda t: {"prefix": t.prefix, "name": t.name, "suffix": t.suffix}  # noqa: E731
        if self.in_order is not None:
            return [as_dict(t) for t in self.in_order]
        return {name: as_dict(t) for name, t in self.by_name}

    def texts(self, names: list[str]) -> list[CategoryText]:
        """The text of each of ``names`` (the categories in prompt order)."""
        if self.in_order is not None:
            if len(self.in_order) != len(names):
                raise InputError(f"{self.source}: {len(self.in_order)} entries for {len(names)} categories "
                                 f"({', '.join(names)}); the list form needs one per category, in order")
            return list(self.in_order)
        table = dict(self.by_name)
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise InputError(f"{self.source}: no category named {', '.join(map(repr, unknown))} "
                             f"(categories: {', '.join(names)})")
        return [table.get(n, CategoryText("", n, "")) for n in names]

    def category_names(self) -> list[str]:
        """The categories this template names: what a template alone asks ``pseudo-label`` to find."""
        if self.in_order is not None:
            return [t.name for t in self.in_order]
        return [name for name, _ in self.by_name]


def _entry(value: Any, category: str | None, where: str) -> CategoryText:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected an object with prefix / name / suffix")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)} (fields: {', '.join(_FIELDS)})")
    if any(not isinstance(value.get(f, ""), str) for f in _FIELDS):
        raise InputError(f"{where}: prefix, name and suffix must be strings")
    name = value.get("name", category if category is not None else "")
    if not name or not name.strip():
        raise InputError(f"{where}: needs a non-empty name")
    return CategoryText(value.get("prefix", ""), name, value.get("suffix", ""))


def category_texts(names: list[str], template: PromptTemplate | None = None) -> list[CategoryText]:
    """What the prompt says for each of ``names``: ``template``'s words, or the bare names."""
    return template.texts(names) if template is not None else [CategoryText("", n, "") for n in names]


def names_prompt(names: list[str], template: PromptTemplate | None = None) -> tuple[str, list[tuple[int, int]]]:
    """``(caption, span of each name)``: one prompt of ``names`` in order, ``template`` applied."""
    return render(category_texts(names, template))


def render(texts: list[CategoryText]) -> tuple[str, list[tuple[int, int]]]:
    """``(caption, span of each name)`` for one prompt of ``texts``, GLIP's way (module docstring)."""
    from storage.coco import SEPARATOR

    caption, spans = "", []
    for i, t in enumerate(texts):
        if i:
            caption += SEPARATOR
        caption += t.prefix
        spans.append((len(caption), len(caption) + len(t.name)))
        caption += t.name + t.suffix
    return caption + ".", spans
