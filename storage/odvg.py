"""ODVG JSONL (Open-GroundingDino's format), both variants, read and write.

One JSON object per line; boxes are ``[x1, y1, x2, y2]`` in pixels (converted to
and from our ``[x, y, w, h]``)::

    grounding:  {"filename", "height", "width",
                 "grounding": {"caption": str,
                               "regions": [{"bbox": xyxy (or a list of xyxy), "phrase": str,
                                            "tokens_positive": [[s, e], ...]}]}}
    detection:  {"filename", "height", "width",
                 "detection": {"instances": [{"bbox": xyxy, "label": int, "category": str}]}}

Detection lines become category-name captions exactly like COCO (``storage.coco``),
with the label map (``{"label": "name"}``) from a file, a dict, or the instances'
``category`` fields. A region without ``tokens_positive`` grounds the first
occurrence of its phrase in the caption.

Our writer adds ``key``, ``source`` and ``phrases`` (every phrase of the sample,
``{text, start, end[, root]}``, grounded or not) to each line (ODVG readers, MMDetection's
and Open-GroundingDino's, ignore unknown fields) so a written file reads back with the same
keys and phrases; a region then belongs to the listed phrase whose span is its first
``tokens_positive`` span. Files, label maps and image
folders are local paths or URIs (``storage.fs``); the file is streamed, not read whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from storage import fs
from storage.coco import category_name, category_prompts
from storage.errors import InputError
from storage.goldg import check_image_root, relative_file_name
from storage.records import Box, GroundedSample, Phrase
from storage.shards import validated
from storage.skips import StageCounts


def xyxy_to_xywh(b: list[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in b)
    return [x0, y0, x1 - x0, y1 - y0]


def xywh_to_xyxy(b: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


_CHUNK = 1 << 20


def _raw_lines(path: str) -> Iterator[bytes]:
    """The lines of a file read in large chunks (object-store streams have no ``readline``)."""
    with fs.open_input_stream(path) as fh:
        rest = b""
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest


def _iter_lines(path: str, counts: StageCounts) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each parsable line; bad lines are counted skips."""
    for n, raw in enumerate(_raw_lines(path), start=1):
        if not raw.strip():
            continue
        counts.read += 1
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            counts.skip("bad_json", f"{path} line {n}", str(exc)[:120])
            continue
        yield n, obj


def _label_map(path: str, label_map: dict | str | Path | None) -> dict[int, str]:
    if isinstance(label_map, (str, Path)):
        try:
            label_map = fs.read_json(label_map)
        except (OSError, ValueError) as exc:
            raise InputError(f"{label_map}: unreadable label map ({exc})") from None
    if label_map:
        return {int(k): str(v) for k, v in label_map.items()}
    found: dict[int, str] = {}   # no map given: collect it from the instances (one extra pass)
    for _, obj in _iter_lines(path, StageCounts()):
        for inst in (obj.get("detection") or {}).get("instances") or []:
            if isinstance(inst, dict) and "label" in inst and inst.get("category"):
                found.setdefault(int(inst["label"]), str(inst["category"]))
    return found


def load_odvg(path: str | Path, image_root: str | Path | None, counts: StageCounts,
              label_map: dict | str | Path | None = None, max_tokens: int = 256,
              count_tokens: Callable[[str], int] | None = None, name: str | None = None,
              check_images: bool = True) -> Iterator[GroundedSample]:
    """Stream grounded samples from an ODVG JSONL file (either variant, even mixed).

    Keys are the line's ``key`` or ``"<source>/<filename>/<line>"``; sources the line's
    ``source`` or ``goldg/<name>`` (grounding) / ``det/<name>`` (detection), ``name``
    defaulting to the file stem. ``extra["image_path"]`` when ``image_root`` is given.
    """
    path = fs.normalize(path)
    if fs.kind_of(path) != "file":
        raise InputError(f"{path}: ODVG file not found")
    root = check_image_root(image_root)
    name = name or Path(fs.name_of(path)).stem
    labels: dict[int, str] | None = None
    prompts: list | None = None
    prompt_of: dict[int, tuple[int, int]] = {}
    for n, obj in _iter_lines(path, counts):
        where = f"{path} line {n}"
        file_name = str(obj.get("filename") or "")
        if root is not None and check_images and not root.has(file_name):
            counts.skip("missing_image", where, root.path(file_name))
            continue
        try:
            if isinstance(obj.get("grounding"), dict):
                samples = [_grounding_sample(obj, name, n, counts, where)]
            elif isinstance(obj.get("detection"), dict):
                if prompts is None:
                    labels = _label_map(path, label_map)
                    prompts = category_prompts([{"id": k, "name": v} for k, v in labels.items()],
                                               max_tokens, count_tokens)
                    prompt_of = {c: (p, j) for p, (_, spans) in enumerate(prompts)
                                 for j, (_, _, c) in enumerate(spans)}
                samples = _detection_samples(obj, name, n, prompts, prompt_of, counts, where)
            else:
                counts.skip("malformed_record", where, "neither 'grounding' nor 'detection'")
                continue
        except (TypeError, ValueError, KeyError) as exc:
            counts.skip("malformed_record", where, repr(exc)[:120])
            continue
        for sample in samples:
            if sample is None:
                continue
            sample.extra["file_name"] = file_name
            if root is not None:
                sample.extra["image_path"] = root.path(file_name)
            sample = validated(sample, counts, where)
            if sample is not None:
                yield sample


def _base(obj: dict[str, Any], default_source: str, n: int) -> tuple[str, str]:
    source = str(obj.get("source") or default_source)
    return str(obj.get("key") or f"{source}/{obj.get('filename')}/{n}"), source


def _grounding_sample(obj: dict[str, Any], name: str, n: int, counts: StageCounts,
                      where: str) -> GroundedSample | None:
    g = obj["grounding"]
    caption = g.get("caption")
    if not isinstance(caption, str) or not caption:
        counts.skip("missing_caption", where)
        return None
    key, source = _base(obj, f"goldg/{name}", n)
    phrases: list[Phrase] = []
    index_of: dict[tuple[int, int], int] = {}
    boxes: list[Box] = []
    for p in obj.get("phrases") or []:     # our writer's list (validation drops bad spans)
        start, end = int(p["start"]), int(p["end"])
        if (start, end) not in index_of:
            index_of[(start, end)] = len(phrases)
            phrases.append(Phrase(caption[start:end], start, end, p.get("root")))
    for region in g.get("regions") or []:
        spans = [[int(s), int(e)] for s, e in region.get("tokens_positive") or []]
        if not spans:
            text = str(region.get("phrase") or "")
            at = caption.find(text) if text else -1
            if at < 0:
                counts.skip("phrase_not_in_caption", where, text[:60])
                continue
            spans = [[at, at + len(text)]]
        first = tuple(spans[0])
        if first not in index_of:
            index_of[first] = len(phrases)
            phrases.append(Phrase(caption[first[0]:first[1]], first[0], first[1]))
        bb = region.get("bbox") or []
        many = bb if bb and isinstance(bb[0], (list, tuple)) else [bb]
        for b in many:
            boxes.append(Box(xyxy_to_xywh(b) if len(b) == 4 else [], spans, index_of[first],
                             float(region.get("score", 1.0))))
    return GroundedSample(key, caption, int(obj.get("width") or 0), int(obj.get("height") or 0),
                          phrases, boxes, source)


def _detection_samples(obj: dict[str, Any], name: str, n: int, prompts: list,
                       prompt_of: dict[int, tuple[int, int]], counts: StageCounts,
                       where: str) -> list[GroundedSample]:
    key, source = _base(obj, f"det/{name}", n)
    by_prompt: dict[int, list[Box]] = {}
    for inst in obj["detection"].get("instances") or []:
        label = int(inst.get("label", -1))
        if label not in prompt_of:
            counts.skip("box_unknown_category", where, f"label {label}")
            continue
        p, j = prompt_of[label]
        s, e, _ = prompts[p][1][j]
        bb = inst.get("bbox") or []
        by_prompt.setdefault(p, []).append(Box(xyxy_to_xywh(bb) if len(bb) == 4 else [], [[s, e]], j,
                                               float(inst.get("score", 1.0))))
    out = []
    for p in sorted(by_prompt):
        caption, spans = prompts[p]
        out.append(GroundedSample(key if len(prompts) == 1 else f"{key}/{p}", caption,
                                  int(obj.get("width") or 0), int(obj.get("height") or 0),
                                  [Phrase(caption[s:e], s, e) for s, e, _ in spans], by_prompt[p], source,
                                  {"category_ids": [c for _, _, c in spans]}))
    if not out:
        counts.skip("no_boxes", where)
    return out


def _odvg_file_name(s: GroundedSample, image_root: str | Path | None) -> str:
    if s.extra.get("image_path"):
        return relative_file_name(str(s.extra["image_path"]), image_root)
    return str(s.extra.get("file_name") or f"{s.key.replace('/', '_')}.jpg")


def _phrase_text(s: GroundedSample, b: Box) -> str:
    if 0 <= b.phrase < len(s.phrases):
        return s.phrases[b.phrase].text
    return " ".join(s.caption[a:e] for a, e in b.tokens_positive)


def odvg_line(s: GroundedSample, variant: str = "grounding", image_root: str | Path | None = None,
              label_of: Callable[[GroundedSample, Box], tuple[int, str] | None] | None = None,
              file_name: str | None = None) -> dict[str, Any]:
    """One ODVG object for ``s`` (``variant`` "grounding" or "detection").

    ``filename`` is ``file_name`` when given, else the sample's image path relative to
    ``image_root``, its ``extra["file_name"]``, or ``<key>.jpg``.
    """
    line: dict[str, Any] = {"filename": file_name or _odvg_file_name(s, image_root), "height": int(s.height),
                            "width": int(s.width), "key": s.key, "source": s.source}
    if variant == "grounding":
        line["phrases"] = [p.to_dict() for p in s.phrases]
        regions = []
        for b in s.boxes:
            r = {"bbox": xywh_to_xyxy(b.bbox), "phrase": _phrase_text(s, b),
                 "tokens_positive": [[int(a), int(e)] for a, e in b.tokens_positive]}
            if b.score != 1.0:
                r["score"] = float(b.score)
            regions.append(r)
        line["grounding"] = {"caption": s.caption, "regions": regions}
    elif variant == "detection":
        instances = []
        for b in s.boxes:
            lc = label_of(s, b) if label_of else None
            if lc is None:
                continue
            inst = {"bbox": xywh_to_xyxy(b.bbox), "label": lc[0], "category": lc[1]}
            if b.score != 1.0:
                inst["score"] = float(b.score)
            instances.append(inst)
        line["detection"] = {"instances": instances}
    else:
        raise ValueError(f"unknown ODVG variant {variant!r}")
    return line


class OdvgWriter:
    """ODVG JSONL written line by line to a local path or URI, complete or absent (``fs.open_output``).

    Usage::

        with OdvgWriter(path) as w:
            w.write(sample, file_name="abc.jpg")

    Leaving the ``with`` block by an exception leaves no file. Arguments as ``odvg_line``.
    """

    def __init__(self, path: str | Path, variant: str = "grounding", image_root: str | Path | None = None,
                 label_of: Callable[[GroundedSample, Box], tuple[int, str] | None] | None = None):
        if variant not in ("grounding", "detection"):
            raise ValueError(f"unknown ODVG variant {variant!r}")
        self.path, self.variant, self.image_root, self.label_of = path, variant, image_root, label_of
        self.lines = 0
        self._output = None
        self._fh = None

    def __enter__(self) -> "OdvgWriter":
        self._output = fs.open_output(self.path)
        self._fh = self._output.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        output, self._output, self._fh = self._output, None, None
        return output.__exit__(exc_type, exc, tb)

    def write(self, s: GroundedSample, file_name: str | None = None) -> None:
        line = odvg_line(s, self.variant, self.image_root, self.label_of, file_name)
        self._fh.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        self.lines += 1


def write_odvg(samples: Iterable[GroundedSample], path: str | Path, variant: str = "grounding",
               image_root: str | Path | None = None, label_map_path: str | Path | None = None) -> dict[int, str]:
    """Write ``samples`` as ODVG JSONL (local path or URI), atomically; returns the label map
    (detection only).

    Detection labels are ``extra["category_ids"][box.phrase]`` when present, else a
    label per distinct phrase text in order of appearance. The label map is written
    to ``label_map_path`` when given.
    """
    labels: dict[int, str] = {}
    by_text: dict[str, int] = {}

    def label_of(s: GroundedSample, b: Box) -> tuple[int, str] | None:
        text = _phrase_text(s, b)
        cat_ids = s.extra.get("category_ids")
        if cat_ids and 0 <= b.phrase < len(cat_ids):
            label = int(cat_ids[b.phrase])
        else:
            label = by_text.setdefault(text, len(by_text))
        labels.setdefault(label, category_name({"name": text}))
        return label, labels[label]

    with OdvgWriter(path, variant, image_root, label_of) as w:
        for s in samples:
            w.write(s)
    if variant == "detection" and label_map_path is not None:
        fs.write_bytes(label_map_path, json.dumps({str(k): v for k, v in sorted(labels.items())},
                                                  indent=1).encode("utf-8"))
    return labels
