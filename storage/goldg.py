"""MDETR GoldG annotations (``final_flickr_separateGT_*.json``, ``final_mixed_train_no_coco.json``).

COCO-style JSON read with pycocotools: each *image* entry is one (image, caption)
pair carrying ``caption``, ``dataset_name``, ``tokens_negative``, ``original_img_id``
and (Flickr) ``sentence_id``; each *annotation* is a box ``[x, y, w, h]`` in pixels
with ``tokens_positive``: the character spans of the caption it grounds, possibly
several (``[[0, 5], [20, 27]]`` for "a man ... his hat").

Each image entry becomes one ``GroundedSample``:

- key ``"<source>/<original_img_id>/<sentence_id>"`` (the entry's id when there is no sentence id);
- source ``"goldg/flickr"`` for dataset_name ``flickr``, else ``"goldg/mixed"``;
- phrases: one per distinct span named by any box, in caption order; each box points
  (``phrase``) at the phrase of its first span and keeps all its spans;
- ``extra``: ``image_path`` (image root / file_name), ``image_id``, ``sentence_id``,
  ``dataset_name``, ``tokens_negative``.

The annotation file and the image root are local paths or URIs (``storage.fs``); an
``image_path`` is in the same form as its root (absolute locally), so it can be read by a
worker on another node.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from storage import fs
from storage.errors import InputError
from storage.records import Box, GroundedSample, Phrase
from storage.shards import validated
from storage.skips import StageCounts


def load_coco_api(ann_json: str | Path, counts: StageCounts | None = None):
    """``pycocotools.coco.COCO`` for ``ann_json``, quietly; InputError when unreadable.

    Annotations that pycocotools cannot index (not an object, no ``image_id`` or
    ``category_id``) are removed first and counted as ``malformed_annotation``.
    """
    from pycocotools.coco import COCO

    path = fs.normalize(ann_json)
    try:
        data = fs.read_bytes(path) if fs.is_file(path) else None
    except OSError as exc:
        raise InputError(f"{ann_json}: annotation file cannot be read ({exc})") from None
    if data is None:
        raise InputError(f"{ann_json}: annotation file not found")
    try:
        dataset = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise InputError(f"{path}: not a COCO-style file (no 'images' list)")
    needs_category = "categories" in dataset   # pycocotools indexes catToImgs then

    def indexable(a: Any) -> bool:
        return isinstance(a, dict) and "image_id" in a and ("category_id" in a or not needs_category)

    anns = dataset.get("annotations") or []
    good = [a for a in anns if indexable(a)]
    if len(good) != len(anns) and counts is not None:
        for a in anns:
            if not indexable(a):
                counts.skip("malformed_annotation", str(path), str(a)[:120])
    dataset["annotations"] = good
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: malformed COCO-style file (missing field {exc})") from None
    return coco


def count_orphan_annotations(coco, counts: StageCounts, ann_json: str | Path) -> None:
    """Annotations whose image_id names no image: counted, they cannot be used."""
    for ann in coco.dataset.get("annotations") or []:
        if ann.get("image_id") not in coco.imgs:
            counts.skip("annotation_missing_image", str(ann_json),
                        f"annotation {ann.get('id')} -> image_id {ann.get('image_id')}")


class ImageRoot:
    """The folder an annotation file's ``file_name`` entries are relative to: a local path or a URI.

    ``has(file_name)`` answers without one request per image on object stores: each
    sub-folder named by the entries is listed once (a listing returns 1,000 names per
    request), locally it is one ``stat``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = fs.normalize(root)
        self.remote = fs.is_remote(self.root)
        self._listed: dict[str, frozenset[str]] = {}

    def __str__(self) -> str:
        return self.root

    def path(self, file_name: str) -> str:
        """The image's full path (absolute local path or URI)."""
        return fs.join(self.root, file_name)

    def has(self, file_name: str) -> bool:
        if not self.remote:
            return os.path.isfile(self.path(file_name))
        folder, _, name = file_name.strip("/").rpartition("/")
        if folder not in self._listed:
            try:
                entries = fs.list_dir(fs.join(self.root, folder) if folder else self.root)
            except FileNotFoundError:
                entries = []
            self._listed[folder] = frozenset(e.name for e in entries if not e.is_dir)
        return name in self._listed[folder]


def check_image_root(image_root: str | os.PathLike | None) -> ImageRoot | None:
    """The image folder, checked to exist; InputError when it does not."""
    if image_root is None:
        return None
    root = ImageRoot(image_root)
    if fs.kind_of(root.root) != "dir":
        raise InputError(f"{image_root}: image folder not found")
    return root


def source_of(dataset_name: str | None) -> str:
    return "goldg/flickr" if (dataset_name or "").lower() == "flickr" else "goldg/mixed"


def _sample_from_entry(img: dict[str, Any], anns: list[dict[str, Any]], image_root: ImageRoot | None,
                       counts: StageCounts, where: str) -> GroundedSample | None:
    caption = img.get("caption")
    if not isinstance(caption, str) or not caption:
        counts.skip("missing_caption", where)
        return None
    source = source_of(img.get("dataset_name"))
    image_id = img.get("original_img_id", img["id"])
    sentence_id = img.get("sentence_id", img["id"])
    spans = sorted({(int(s), int(e)) for a in anns for s, e in (a.get("tokens_positive") or [])})
    index_of = {span: i for i, span in enumerate(spans)}
    phrases = [Phrase(caption[s:e], s, e) for s, e in spans]   # validation fixes/drops bad spans
    boxes = []
    for a in anns:
        tp = [[int(s), int(e)] for s, e in (a.get("tokens_positive") or [])]
        if not tp:
            counts.skip("box_without_span", where, f"annotation {a.get('id')}")
            continue
        boxes.append(Box([float(v) for v in a.get("bbox") or []], tp, index_of[tuple(tp[0])], 1.0))
    extra = {"image_id": image_id, "sentence_id": sentence_id,
             "dataset_name": img.get("dataset_name"), "file_name": img.get("file_name"),
             "tokens_negative": img.get("tokens_negative") or []}
    if image_root is not None:
        extra["image_path"] = image_root.path(str(img.get("file_name", "")))
    sample = GroundedSample(f"{source}/{image_id}/{sentence_id}", caption, int(img.get("width") or 0),
                            int(img.get("height") or 0), phrases, boxes, source, extra)
    return validated(sample, counts, where)


def load_mdetr(ann_json: str | Path, image_root: str | Path | None, counts: StageCounts,
               check_images: bool = True) -> Iterator[GroundedSample]:
    """Stream the GoldG samples of one MDETR annotation file (see the module docstring).

    ``image_root``: the folder the entries' ``file_name`` are relative to (each file
    has its own). With ``check_images`` an entry whose image file is absent is a
    counted ``missing_image`` skip. A file that does not parse, or a missing image
    root, raises ``InputError``; bad spans and boxes are counted drops.
    """
    coco = load_coco_api(ann_json, counts)
    yield from iter_mdetr(coco, ann_json, image_root, counts, check_images)


def is_mdetr(coco) -> bool:
    """True when the loaded file is MDETR-style (its image entries carry captions)."""
    return any("caption" in img for img in coco.imgs.values())


def iter_mdetr(coco, ann_json: str | Path, image_root: str | Path | None, counts: StageCounts,
               check_images: bool = True) -> Iterator[GroundedSample]:
    """``load_mdetr`` on an already loaded ``COCO`` object (``load_coco_api``)."""
    root = check_image_root(image_root)
    count_orphan_annotations(coco, counts, ann_json)
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        counts.read += 1
        where = f"{ann_json} image {img_id}"
        file_name = str(img.get("file_name", ""))
        if root is not None and check_images and not root.has(file_name):
            counts.skip("missing_image", where, root.path(file_name))
            continue
        try:
            sample = _sample_from_entry(img, coco.imgToAnns.get(img_id, []), root, counts, where)
        except (TypeError, ValueError, KeyError) as exc:   # a field of the wrong type
            counts.skip("malformed_record", where, repr(exc))
            continue
        if sample is not None:
            yield sample


def _dataset_name(sample: GroundedSample) -> str:
    name = sample.extra.get("dataset_name")
    if name:
        return str(name)
    return "flickr" if sample.source == "goldg/flickr" else "mixed"


def relative_file_name(image_path: str, image_root: str | os.PathLike | None) -> str:
    """``image_path`` relative to ``image_root`` when it lies under it, else its base name."""
    if image_root is not None:
        root = fs.normalize(image_root).rstrip("/") + ("/" if fs.is_remote(image_root) else os.sep)
        path = fs.normalize(image_path)
        if path.startswith(root):
            return path[len(root):].replace(os.sep, "/")
    return fs.name_of(image_path)


def _file_name(sample: GroundedSample, image_root: str | Path | None) -> str:
    if sample.extra.get("image_path"):
        return relative_file_name(str(sample.extra["image_path"]), image_root)
    if sample.extra.get("file_name"):
        return str(sample.extra["file_name"])
    return f"{sample.key.replace('/', '_')}.jpg"


def mdetr_dict(samples: Iterable[GroundedSample], image_root: str | Path | None = None) -> dict[str, Any]:
    """The MDETR JSON object for ``samples`` (one image entry per sample)."""
    images, annotations = [], []
    for entry_id, s in enumerate(samples, start=1):
        images.append({
            "id": entry_id, "file_name": _file_name(s, image_root), "width": int(s.width),
            "height": int(s.height), "caption": s.caption, "dataset_name": _dataset_name(s),
            "original_img_id": s.extra.get("image_id", entry_id),
            "sentence_id": s.extra.get("sentence_id", 0),
            "tokens_negative": s.extra.get("tokens_negative") or [],
            "tokens_positive_eval": [b.tokens_positive for b in s.boxes],
        })
        for b in s.boxes:
            x, y, w, h = (float(v) for v in b.bbox)
            annotations.append({"id": len(annotations) + 1, "image_id": entry_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "category_id": 1,
                                "tokens_positive": [[int(a), int(e)] for a, e in b.tokens_positive]})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}


def write_mdetr(samples: Iterable[GroundedSample], path: str | Path,
                image_root: str | Path | None = None) -> None:
    """Write ``samples`` as an MDETR GoldG JSON file (local path or URI), atomically.

    ``file_name`` is ``extra["image_path"]`` relative to ``image_root`` (or its base
    name), else ``extra["file_name"]``; ``(original_img_id, sentence_id)`` come from
    ``extra["image_id"]``/``extra["sentence_id"]`` when present, so a loaded file
    written back keeps its keys.
    """
    fs.write_json(path, mdetr_dict(samples, image_root))


__all__ = ["ImageRoot", "check_image_root", "load_mdetr", "iter_mdetr", "is_mdetr", "write_mdetr", "mdetr_dict", "load_coco_api", "source_of"]
