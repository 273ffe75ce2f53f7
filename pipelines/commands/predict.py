"""`glipctl predict`: ground a prompt's phrases in a few images; print the boxes, draw them."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from storage.errors import InputError


def phrase_spans(prompt: str, phrases: str, spacy_model: str | None = None) -> list[tuple[int, int]]:
    """Character spans of the phrases to ground in ``prompt``.

    ``phrases`` is ``"auto"`` or ``"text;text;..."``. Auto: a category-list prompt
    (``"star. heart. circle."``, ``labeling.phrases.category_list_spans``) grounds each name as
    its own phrase, as the official GLIP / Grounding DINO demos do; any other prompt gets its
    spaCy noun phrases (the same extractor as parse-captions; the whole prompt when it has
    none). ``"text;text;..."``: each text found in the prompt, searching left to right from
    the end of the previous one.
    """
    if not prompt.strip():
        raise InputError("--prompt is empty")
    if phrases.strip() == "auto":
        from labeling.phrases import DEFAULT_SPACY_MODEL, PhraseExtractor, category_list_spans, load_spacy

        listed = category_list_spans(prompt)
        if listed is not None:
            return listed
        found = PhraseExtractor(load_spacy(spacy_model or DEFAULT_SPACY_MODEL)).extract(prompt)
        spans = [(int(p["start"]), int(p["end"])) for p in found]
        return spans or [(0, len(prompt))]
    spans, cursor = [], 0
    for text in (t.strip() for t in phrases.split(";")):
        if not text:
            continue
        start = prompt.find(text, cursor)
        if start < 0:
            start = prompt.find(text)
        if start < 0:
            raise InputError(f"--phrases: {text!r} does not occur in the prompt {prompt!r}")
        spans.append((start, start + len(text)))
        cursor = start + len(text)
    if not spans:
        raise InputError("--phrases names no phrase")
    return spans


def check_device(device: str) -> None:
    """InputError unless torch can run on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...): checked
    before the model is loaded."""
    from labeling.teacher import TeacherDeviceError
    from labeling.teacher import check_device as check_teacher_device

    try:
        check_teacher_device(device)
    except (TeacherDeviceError, RuntimeError, ValueError) as exc:
        raise InputError(f"--device {device}: {exc}") from None


def to_device(model, device: str):
    """``model`` (GLIP or a transformers teacher: ``nn.Module``-like) moved to ``device``."""
    try:
        moved = model.to(device)
    except (RuntimeError, AssertionError) as exc:   # a torch built without that backend
        raise InputError(f"--device {device}: cannot move the model there ({exc})") from None
    return model if moved is None else moved


def predict_images(model, paths: list[str], prompt: str, spans: list[tuple[int, int]],
                   threshold: float | None, max_per_phrase: int | None = None) -> list[dict[str, Any]]:
    """Ground ``spans`` of ``prompt`` in each image (local paths or URIs). Returns, per image,
    ``{"image": path, "width", "height", "boxes": [{"phrase", "span", "bbox" (xywh px), "score"}]}``."""
    import io

    from PIL import Image, UnidentifiedImageError

    from storage import fs

    images = []
    for p in paths:
        try:
            with Image.open(io.BytesIO(fs.read_bytes(p))) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"{p}: not a readable image ({exc})") from None
    results = model.ground(images, [prompt] * len(images), [spans] * len(images), threshold=threshold,
                           max_per_phrase=max_per_phrase)
    out = []
    for path, img, per_phrase in zip(paths, images, results):
        boxes = []
        for k, ((s, e), dets) in enumerate(zip(spans, per_phrase)):
            for d in dets:
                boxes.append({"phrase": prompt[s:e], "phrase_index": k, "span": [s, e],
                              "bbox": [round(float(v), 2) for v in d["bbox"]], "score": round(float(d["score"]), 4)})
        out.append({"image": str(path), "width": img.width, "height": img.height, "boxes": boxes, "_pil": img})
    return out


def main(
    images: Annotated[list[str], typer.Argument(help="Image files (JPEG, PNG, ...): local paths or URIs.")],
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory (train-student, convert-official) "
                                                       "or an official GLIP .pth; a local path or a URI.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The text the model reads, e.g. 'a red star and a "
                                                         "blue circle'.")],
    phrases: Annotated[str, typer.Option("--phrases", help="'auto': a category-list prompt ('star. heart. "
                                                           "circle.': two or more names of up to four words, "
                                                           "separated by '. ', optional final '.') grounds each "
                                                           "name as its own phrase, as the official GLIP / "
                                                           "Grounding DINO demos do; any other prompt its spaCy "
                                                           "noun phrases (as parse-captions). Or phrases to "
                                                           "ground separated by ';', each a substring of the "
                                                           "prompt.")] = "auto",
    threshold: Annotated[float | None, typer.Option("--threshold", help="Keep boxes scoring at least this "
                                                    "(default: the model's score_threshold).")] = None,
    max_per_phrase: Annotated[int, typer.Option("--max-per-phrase", help="At most this many boxes per "
                                                "phrase, best first.")] = 3,
    out: Annotated[str, typer.Option("--out", help="Folder (local path or URI) for one PNG per image with the "
                                                   "boxes and phrase labels drawn, and predictions.json.")] = "predictions",
    spacy_model: Annotated[str | None, typer.Option("--spacy-model", help="spaCy pipeline for --phrases auto "
                                                    "(installed name or path).")] = None,
    device: Annotated[str, typer.Option("--device", help="Where the model runs: 'cpu', 'cuda', 'cuda:1', "
                                                         "...")] = "cpu",
) -> None:
    """Ground the phrases of a prompt in images: print the boxes and write PNGs with them drawn.

    A prompt that lists category names ("star. heart. circle.") grounds each name as its own phrase; a sentence gets its noun phrases (spaCy). --phrases names them explicitly.
    """
    import io

    from rich.console import Console
    from rich.table import Table

    from labeling.evaluation import load_model
    from pipelines.drawing import draw_boxes
    from storage import fs

    images = [fs.normalize(p) for p in images]
    out = fs.normalize(out)
    for p in images:
        if fs.kind_of(p) != "file":
            raise InputError(f"{p}: no such image")
    check_device(device)
    spans = phrase_spans(prompt, phrases, spacy_model)
    net = to_device(load_model(model), device)
    results = predict_images(net, images, prompt, spans, threshold, max_per_phrase)

    stdout = Console()
    table = Table(title=f"predictions for {prompt!r}")
    for col in ("image", "phrase", "score", "box x,y,w,h (px)"):
        table.add_column(col)
    fs.makedirs(out)
    used: set[str] = set()
    for r in results:
        pil = r.pop("_pil")
        shown = fs.name_of(r["image"])
        for b in r["boxes"]:
            table.add_row(shown, b["phrase"], f"{b['score']:.3f}", ", ".join(f"{v:.0f}" for v in b["bbox"]))
        if not r["boxes"]:
            table.add_row(shown, "(no box above the threshold)", "", "")
        drawn = draw_boxes(pil, [{"bbox": b["bbox"], "label": b["phrase"], "score": b["score"],
                                  "colour": b["phrase_index"]} for b in r["boxes"]],
                           scale=max(1, 384 // max(pil.width, pil.height)))
        name = Path(shown).stem
        while name in used:                         # two inputs with one stem: keep both
            name += "_"
        used.add(name)
        r["png"] = fs.join(out, f"{name}.png")
        png = io.BytesIO()
        drawn.save(png, format="PNG")
        fs.write_bytes(r["png"], png.getvalue())
    stdout.print(table)
    fs.write_json(fs.join(out, "predictions.json"), {"prompt": prompt, "phrases": [prompt[s:e] for s, e in spans],
                                                     "threshold": threshold, "device": device, "images": results})
    stdout.print(f"wrote {len(results)} PNG(s) and predictions.json to {out}")
