"""COCO detection JSON as grounding samples, and back.

GLIP's unification: a detection image becomes a grounding sample whose caption
lists category names, ``"person. bicycle. car."``; each name is a phrase and each
box grounds the span of its category's name. When all the names do not fit the
text encoder's token limit they are split over several prompts, and the image
yields one sample per prompt that has at least one of its boxes.

Boxes stay COCO ``[x, y, w, h]`` in pixels. ``extra`` carries ``image_path``,
``image_id``, ``file_name`` and ``category_ids`` (one per phrase, aligned with
``phrases``). Crowd boxes (``iscrowd=1``) are dropped and counted, as GLIP does.
Files and image folders are local paths or URIs (``storage.fs``).

The way back, grounding samples to detection: ``box_category`` names a box's category
(its phrase's root noun, or a name of a given vocabulary) and ``CocoDetectionWriter``
writes any number of images in bounded memory.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from storage import fs
from storage.goldg import check_image_root, count_orphan_annotations, load_coco_api
from storage.records import Box, GroundedSample, Phrase
from storage.shards import validated
from storage.errors import InputError
from storage.skips import StageCounts

SEPARATOR = ". "
_PIECES = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def estimate_tokens(text: str) -> int:
    """A conservative WordPiece count for ``text``, [CLS] and [SEP] included.

    Each punctuation mark is one token and each word at most one piece per 4
    characters (real BERT vocabularies hold most category words whole), so the
    estimate errs high: a prompt that fits by this count fits the real tokenizer.
    """
    return 2 + sum(1 if not p[0].isalnum() else max(1, math.ceil(len(p) / 4)) for p in _PIECES.findall(text))


def category_name(category: dict[str, Any]) -> str:
    """The text of a category: LVIS-style ``aerosol_can`` reads as ``aerosol can``."""
    return str(category["name"]).replace("_", " ").strip()


def category_prompts(categories: list[dict[str, Any]], max_tokens: int = 256,
                     count_tokens: Callable[[str], int] | None = None, template=None
                     ) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """Pack category names into as few prompts as fit ``max_tokens``.

    Returns ``[(caption, [(start, end, category_id), ...]), ...]`` with character spans
    into ``caption`` (end exclusive). Names keep the categories' order (by id). A single
    name longer than the limit gets a prompt of its own (the model truncates it).
    ``count_tokens(text) -> int`` should include special tokens; default ``estimate_tokens``.
    ``template``: a ``storage.prompt_template.PromptTemplate``: the words around each name (the
    span still covers the name only).
    """
    from storage.prompt_template import CategoryText, category_texts, render

    count = count_tokens or estimate_tokens
    ordered = [c for c in sorted(categories, key=lambda c: c["id"]) if category_name(c)]
    texts = category_texts([category_name(c) for c in ordered], template)
    prompts: list[tuple[str, list[tuple[int, int, int]]]] = []
    chunk: list[tuple[int, CategoryText]] = []

    def finish() -> None:
        caption, spans = render([t for _, t in chunk])
        prompts.append((caption, [(s, e, cat_id) for (s, e), (cat_id, _) in zip(spans, chunk)]))

    for cat, text in zip(ordered, texts):
        if chunk and count(render([t for _, t in chunk] + [text])[0]) > max_tokens:
            finish()
            chunk = []
        chunk.append((int(cat["id"]), text))
    if chunk:
        finish()
    return prompts


def load_coco_detection(ann_json: str | Path, image_root: str | Path | None, counts: StageCounts,
                        max_tokens: int = 256, count_tokens: Callable[[str], int] | None = None,
                        name: str | None = None, check_images: bool = True) -> Iterator[GroundedSample]:
    """Stream the grounding samples of a COCO detection file (see the module docstring).

    ``name``: the dataset's name in ``source = "det/<name>"`` (default: the file stem).
    Keys are ``"det/<name>/<image_id>/<prompt index>"``. Images without any usable box,
    images missing on disk (``check_images``), orphan annotations and crowd boxes are
    counted skips; a file that does not parse raises ``InputError``.
    """
    coco = load_coco_api(ann_json, counts)
    yield from iter_coco_detection(coco, ann_json, image_root, counts, max_tokens, count_tokens, name,
                                   check_images)


def iter_coco_detection(coco, ann_json: str | Path, image_root: str | Path | None, counts: StageCounts,
                        max_tokens: int = 256, count_tokens: Callable[[str], int] | None = None,
                        name: str | None = None, check_images: bool = True) -> Iterator[GroundedSample]:
    """``load_coco_detection`` on an already loaded ``COCO`` object (``load_coco_api``)."""
    root = check_image_root(image_root)
    count_orphan_annotations(coco, counts, ann_json)
    source = f"det/{name or Path(fs.name_of(ann_json)).stem}"
    prompts = category_prompts(list(coco.cats.values()), max_tokens, count_tokens)
    prompt_of = {cat_id: (p, j) for p, (_, spans) in enumerate(prompts)
                 for j, (_, _, cat_id) in enumerate(spans)}
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        counts.read += 1
        where = f"{ann_json} image {img_id}"
        file_name = str(img.get("file_name", ""))
        if root is not None and check_images and not root.has(file_name):
            counts.skip("missing_image", where, root.path(file_name))
            continue
        by_prompt: dict[int, list[Box]] = defaultdict(list)
        for ann in coco.imgToAnns.get(img_id, []):
            if ann.get("iscrowd"):
                counts.skip("box_iscrowd", where, f"annotation {ann.get('id')}")
                continue
            if ann.get("category_id") not in prompt_of:
                counts.skip("box_unknown_category", where, f"annotation {ann.get('id')}")
                continue
            p, j = prompt_of[ann["category_id"]]
            s, e, _ = prompts[p][1][j]
            try:
                bbox = [float(v) for v in ann.get("bbox") or []]
            except (TypeError, ValueError):
                bbox = []   # validation counts it as box_malformed
            by_prompt[p].append(Box(bbox, [[s, e]], j, 1.0))
        emitted = 0
        for p in sorted(by_prompt):
            caption, spans = prompts[p]
            phrases = [Phrase(caption[s:e], s, e) for s, e, _ in spans]
            extra = {"image_id": img_id, "file_name": file_name, "category_ids": [c for _, _, c in spans]}
            if root is not None:
                extra["image_path"] = root.path(file_name)
            sample = GroundedSample(f"{source}/{img_id}/{p}", caption, int(img.get("width") or 0),
                                    int(img.get("height") or 0), phrases, by_prompt[p], source, extra)
            sample = validated(sample, counts, where)
            if sample is not None and sample.boxes:
                emitted += 1
                yield sample
        if not emitted:
            counts.skip("no_boxes", where)


def coco_detection_dict(samples: Iterable[GroundedSample],
                        categories: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A COCO detection object from grounding samples.

    A box's category is ``extra["category_ids"][box.phrase]`` when the sample has it,
    else the category whose name is the box's phrase text (categories are made from
    the distinct phrase texts when ``categories`` is None). Samples sharing
    ``extra["image_id"]`` (the prompts of one image) merge into one image entry.
    Boxes with no category are left out.
    """
    samples = list(samples)
    if categories is None:
        names = sorted({s.phrases[b.phrase].text for s in samples for b in s.boxes
                        if 0 <= b.phrase < len(s.phrases) and "category_ids" not in s.extra})
        categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]
    by_name = {category_name(c): int(c["id"]) for c in categories}
    images: dict[Any, dict[str, Any]] = {}
    annotations: list[dict[str, Any]] = []
    for s in samples:
        image_id = s.extra.get("image_id", len(images) + 1)
        if image_id not in images:
            file_name = s.extra.get("file_name") or (fs.name_of(s.extra["image_path"])
                                                     if s.extra.get("image_path") else f"{image_id}.jpg")
            images[image_id] = {"id": image_id, "file_name": file_name, "width": int(s.width),
                                "height": int(s.height)}
        for b in s.boxes:
            if not 0 <= b.phrase < len(s.phrases):
                continue
            cat_ids = s.extra.get("category_ids")
            cat = cat_ids[b.phrase] if cat_ids else by_name.get(s.phrases[b.phrase].text)
            if cat is None:
                continue
            x, y, w, h = (float(v) for v in b.bbox)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cat),
                   "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            if b.score != 1.0:
                ann["score"] = float(b.score)
            annotations.append(ann)
    return {"images": list(images.values()), "annotations": annotations, "categories": categories}


def write_coco_detection(samples: Iterable[GroundedSample], path: str | Path,
                         categories: list[dict[str, Any]] | None = None) -> None:
    """Write ``samples`` as a COCO detection JSON file (local path or URI), atomically
    (see ``coco_detection_dict``)."""
    fs.write_json(path, coco_detection_dict(samples, categories))


# ----------------------------------------------------------------------------- grounding -> detection

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def normalize_category(name: str) -> str:
    """A category name as matched: lower case, ``_`` as a space, single spaces."""
    return " ".join(name.replace("_", " ").lower().split())


def root_noun(sample: GroundedSample, box: Box) -> str | None:
    """The category a box's phrase names, lower case: the phrase's ``root`` when it holds one
    (parse-captions' head-noun lemma), the whole phrase for detection samples (their phrases
    are category names: ``extra["vocabulary"]`` or a ``det/`` source), else the phrase's last
    word. A box without a phrase reads its ``tokens_positive`` text. None when there is no word."""
    phrase = sample.phrases[box.phrase] if 0 <= box.phrase < len(sample.phrases) else None
    if phrase is not None and phrase.root:
        return normalize_category(phrase.root) or None
    text = phrase.text if phrase is not None else " ".join(sample.caption[s:e] for s, e in box.tokens_positive)
    if "vocabulary" in sample.extra or sample.source.startswith("det/"):
        return normalize_category(text) or None
    words = _WORD.findall(text)
    return words[-1].lower() if words else None


def box_category(sample: GroundedSample, box: Box, vocabulary: frozenset[str] | None = None) -> str | None:
    """The category of ``box``: its ``root_noun``; with a ``vocabulary`` (normalized names,
    ``normalize_category``) the root noun when listed, else the longest listed name the phrase
    ends with at a word boundary ("traffic light" for "the red traffic light"), else None."""
    root = root_noun(sample, box)
    if vocabulary is None or root in vocabulary:
        return root
    phrase = sample.phrases[box.phrase] if 0 <= box.phrase < len(sample.phrases) else None
    text = normalize_category(phrase.text if phrase is not None
                              else " ".join(sample.caption[s:e] for s, e in box.tokens_positive))
    words = text.split()
    for k in range(len(words), 0, -1):        # the longest tail first
        tail = " ".join(words[-k:])
        if tail in vocabulary:
            return tail
    return None


class CocoDetectionWriter:
    """A COCO detection JSON file written image by image in bounded memory.

    Usage::

        with CocoDetectionWriter(path, categories=["cat", "dog"]) as w:
            w.add("abc.jpg", 640, 480, [([x, y, w, h], "cat", 0.8), ...], key="...", source="...")

    ``categories``: the vocabulary, ids 1..N in this order (a box of another name is left
    out; ``add`` returns how many were); None: every name added, ids 1..N in sorted order.
    Boxes are ``[x, y, w, h]`` pixels; ``area`` is w * h, ``iscrowd`` 0, ``score`` written
    when not 1.0. Extra keyword fields go into the image entry (COCO readers ignore them).
    Images and annotations spool to a local temporary folder; on leaving the ``with`` block
    the file is written through ``fs.open_output`` (local path or URI, complete or absent);
    by an exception, nothing is.
    """

    def __init__(self, path: str | Path, categories: list[str] | None = None,
                 description: str = "grounded samples as COCO detection"):
        self.path = path
        self.fixed = categories is not None
        self.category_ids: dict[str, int] = {c: i + 1 for i, c in enumerate(categories or [])}
        self.description = description
        self.images = 0
        self.annotations = 0
        self._dir: str | None = None
        self._images_fh = None
        self._anns_fh = None

    def __enter__(self) -> "CocoDetectionWriter":
        self._dir = tempfile.mkdtemp(prefix=".coco-spool-")
        self._images_fh = open(os.path.join(self._dir, "images.jsonl"), "w", encoding="utf-8")
        self._anns_fh = open(os.path.join(self._dir, "annotations.jsonl"), "w", encoding="utf-8")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._images_fh.close()
            self._anns_fh.close()
            if exc_type is None:
                self._write()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def add(self, file_name: str, width: int, height: int,
            boxes: Iterable[tuple[list[float], str, float]], **fields: Any) -> int:
        """One image and its boxes ``([x, y, w, h] px, category name, score)``; returns the
        number of boxes left out because their name is not in a fixed vocabulary."""
        self.images += 1
        image_id = self.images
        image = {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height), **fields}
        self._images_fh.write(json.dumps(image, ensure_ascii=False) + "\n")
        left_out = 0
        for bbox, name, score in boxes:
            if self.fixed and name not in self.category_ids:
                left_out += 1
                continue
            if not self.fixed:
                self.category_ids.setdefault(name, 0)     # ids are given in sorted order at the end
            x, y, w, h = (float(v) for v in bbox)
            self._anns_fh.write(json.dumps([image_id, name, x, y, w, h, float(score)], ensure_ascii=False) + "\n")
            self.annotations += 1
        return left_out

    def _write(self) -> None:
        if not self.fixed:
            self.category_ids = {name: i + 1 for i, name in enumerate(sorted(self.category_ids))}
        categories = [{"id": i, "name": name, "supercategory": "object"} for name, i in self.category_ids.items()]
        head = {"info": {"description": self.description}, "licenses": [], "categories": categories}
        with fs.open_output(self.path) as out:
            out.write(json.dumps(head, ensure_ascii=False)[:-1].encode("utf-8"))
            out.write(b', "images": [')
            with open(os.path.join(self._dir, "images.jsonl"), encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    out.write(((", " if n else "") + line.rstrip("\n")).encode("utf-8"))
            out.write(b'], "annotations": [')
            with open(os.path.join(self._dir, "annotations.jsonl"), encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    image_id, name, x, y, w, h, score = json.loads(line)
                    ann = {"id": n + 1, "image_id": image_id, "category_id": self.category_ids[name],
                           "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
                    if score != 1.0:
                        ann["score"] = score
                    out.write(((", " if n else "") + json.dumps(ann)).encode("utf-8"))
            out.write(b"]}\n")


# ----------------------------------------------------------------------------- few-shot subsets

def few_shot_image_ids(coco, shots: int, seed: int) -> list[int]:
    """Images of a ``K``-shot subset, the GLIP paper's way: visit the images in a seeded random
    order and keep one while any of its categories has fewer than ``shots`` kept images; every
    category then has at least ``shots`` images (all it has, when fewer), and some more through
    images they share. Crowd and category-less annotations do not count."""
    import random

    if shots < 1:
        raise InputError(f"--shots must be >= 1 (got {shots})")
    ids = sorted(coco.getImgIds())
    random.Random(seed).shuffle(ids)
    needed = {c: shots for c in coco.getCatIds()}
    kept = []
    for img_id in ids:
        cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
                if not a.get("iscrowd") and a.get("category_id") in needed}
        if any(needed[c] > 0 for c in cats):
            kept.append(img_id)
            for c in cats:
                needed[c] -= 1
    return sorted(kept)


def write_few_shot_subset(ann_json: str | Path, shots: int, seed: int,
                          out_path: str | Path) -> tuple[int, dict[str, int]]:
    """Write the ``few_shot_image_ids`` subset of ``ann_json`` (same categories, the kept images and
    their annotations) to ``out_path`` atomically; returns (images kept, per category name its images)."""
    from storage.goldg import load_coco_api

    coco = load_coco_api(ann_json)
    if not coco.getCatIds():
        raise InputError(f"{ann_json}: no categories to sample shots of")
    kept = set(few_shot_image_ids(coco, shots, seed))
    data = dict(coco.dataset)
    data["images"] = [im for im in coco.dataset["images"] if im.get("id") in kept]
    data["annotations"] = [a for a in coco.dataset.get("annotations", []) if a.get("image_id") in kept]
    fs.write_json(out_path, data, indent=None)
    per_category = {category_name(coco.cats[c]): 0 for c in sorted(coco.cats)}
    for img_id in kept:
        for c in {a["category_id"] for a in coco.imgToAnns.get(img_id, [])}:
            if c in coco.cats:
                per_category[category_name(coco.cats[c])] += 1
    return len(kept), per_category
