"""Packed training data: gold grounding and detection datasets as grounded-sample shards.

``glipctl pack`` writes them and ``train-student`` streams them, so one reader serves every
source (DESIGN.md: "Gold and detection data for training at scale are packed").

A packed folder holds the same WebDataset tars as pseudo-label output (``storage.shards``:
original image bytes + sample JSON, a label table beside each tar), a manifest of stage
``pack`` whose per-shard commit records carry ``kind`` (``"grounding"`` or ``"detection"``)
and ``dataset``, and, per detection dataset, its vocabulary in ``_vocabulary/<dataset>.json``.

A detection image is stored as a grounding sample of its own categories: caption
``"cat. dog."`` (the image's category names, sorted), one phrase per name, each box grounding
its name's span, and ``extra["vocabulary"]`` naming the dataset whose whole vocabulary the
training prompt draws its negatives from at every visit (``detection_boxes`` reads it back).
"""
from __future__ import annotations

from typing import Any

from storage import fs
from storage.errors import InputError
from storage.records import Box, GroundedSample, Phrase

STAGE = "pack"
KINDS = ("grounding", "detection")
VOCABULARY_DIR = "_vocabulary"
_SEPARATOR = ". "


def detection_sample(key: str, width: int, height: int, boxes: list[tuple[list[float], str]],
                     source: str, vocabulary: str, extra: dict[str, Any] | None = None) -> GroundedSample:
    """A detection image as a grounded sample (module docstring); ``boxes``: ``([x, y, w, h] px, name)``."""
    names = sorted({name for _, name in boxes})
    spans: dict[str, tuple[int, int]] = {}
    caption = ""
    for name in names:
        if caption:
            caption += _SEPARATOR
        spans[name] = (len(caption), len(caption) + len(name))
        caption += name
    caption += "."
    phrases = [Phrase(name, *spans[name]) for name in names]
    index = {name: i for i, name in enumerate(names)}
    return GroundedSample(
        key=key, caption=caption, width=width, height=height, phrases=phrases,
        boxes=[Box(list(map(float, bbox)), [list(spans[name])], phrase=index[name]) for bbox, name in boxes],
        source=source, extra={**(extra or {}), "vocabulary": vocabulary})


def detection_boxes(sample: GroundedSample) -> list[tuple[list[float], str]]:
    """``([x, y, w, h] px, category name)`` per box of a ``detection_sample``."""
    out = []
    for box in sample.boxes:
        start, end = box.tokens_positive[0]
        out.append((list(box.bbox), sample.caption[start:end]))
    return out


def vocabulary_path(folder: str, dataset: str) -> str:
    return fs.join(folder, VOCABULARY_DIR, f"{dataset}.json")


def write_vocabulary(folder: str, dataset: str, names: list[str]) -> None:
    """Record a detection dataset's category names (in the dataset's order)."""
    fs.write_json(vocabulary_path(folder, dataset), {"dataset": dataset, "names": list(names)})


def read_vocabulary(folder: str, dataset: str) -> tuple[str, ...]:
    """The category names of ``dataset`` packed in ``folder``; InputError when missing or bad."""
    path = vocabulary_path(folder, dataset)
    try:
        names = fs.read_json(path)["names"]
    except FileNotFoundError:
        raise InputError(f"{path}: the vocabulary of detection dataset {dataset!r} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable vocabulary ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"{path}: 'names' must be a list of category names")
    return tuple(names)


def packed_shards(paths: list[str], kind: str, option: str) -> list[str]:
    """The committed ``.tar`` shards of ``kind`` in the packed folders (or tar files) ``paths``.

    A folder must hold a ``pack`` manifest; tar files are taken as they are. Raises InputError
    naming ``option`` for a missing path, a folder that is not packed data, or no shard of
    ``kind`` (saying which kind the folder does hold).
    """
    from storage.manifest import Manifest

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    out: list[str] = []
    for raw in paths:
        path = fs.normalize(raw)
        found = fs.kind_of(path)
        if found is None:
            raise InputError(f"{option} {raw}: no such file or folder")
        if found == "file":
            if not path.endswith(".tar"):
                raise InputError(f"{option} {raw}: expected a packed folder (glipctl pack), a .tar shard, "
                                 f"or ANN.json=IMAGE_DIR")
            out.append(path)
            continue
        try:
            manifest = Manifest.load(path)
        except ValueError as exc:
            raise InputError(f"{option} {raw}: {exc}") from None
        if manifest is None or manifest.stage != STAGE:
            what = "no manifest" if manifest is None else f"the output of `{manifest.stage}`"
            raise InputError(f"{option} {raw}: not a packed folder ({what}); pack it with `glipctl pack`")
        kinds_here, before = set(), len(out)
        for name in sorted(manifest.shards):
            entry = manifest.shards[name]
            if not manifest.is_done(name):
                continue
            kinds_here.add(entry.get("kind"))
            if entry.get("kind") == kind:
                out.extend(fs.join(path, o) for o in entry.get("outputs") or [] if o.endswith(".tar"))
        if len(out) == before:
            held = ", ".join(sorted(k for k in kinds_here if k)) or "no finished shard"
            raise InputError(f"{option} {raw}: no {kind} shards in this packed folder (it holds {held})")
    return out
