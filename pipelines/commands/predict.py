"""`glipctl predict`: ground a prompt's phrases in a few images; print the boxes, draw them.

The text is ``--prompt``, a category list with ``--prompt-template`` words around its names, or
the categories of a tuned prompt: ``--prompt DIR`` (a folder holding ``prompt.json``, as evaluate and
pseudo-label take it) or ``--tuned-prompt DIR`` (the same, beside a ``--prompt`` text)."""
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


def prompt_and_spans(prompt: str | None, phrases: str = "auto", spacy_model: str | None = None, *,
                     template=None, tuned=None) -> tuple[str, list[tuple[int, int]]]:
    """The text the model reads and the character spans of it to ground.

    ``tuned`` (a ``labeling.prompts.TunedPrompt``): its caption, and with ``phrases`` "auto" its
    categories' spans (one phrase per category, the name only); a ``prompt`` that is neither that
    caption nor a category list that becomes it (``category_list_prompt`` with the prompt's own
    template) is refused. ``template`` (a ``storage.prompt_template.PromptTemplate``; with ``tuned``
    it must agree with the prompt's own, ``labeling.prompts.effective_template``): applied to the
    names of a category-list ``prompt``, or, with no ``prompt``, the template's own categories
    (``labeling.prompts.template_prompt``). Neither: ``phrase_spans(prompt, phrases)``.
    """
    from labeling.prompts import effective_template, template_prompt

    template = effective_template(tuned, template)
    if tuned is not None:
        caption = tuned.caption
        if prompt is not None and prompt != caption and not _becomes(prompt, template, caption):
            raise InputError(f"--prompt {prompt!r} is not the text {tuned.option} {tuned.path} was tuned on "
                             f"({caption!r}): the offsets are tied to its tokens; leave --prompt out to ground "
                             f"its categories")
        if phrases.strip() == "auto":
            return caption, tuned.spans
        return caption, phrase_spans(caption, phrases, spacy_model)
    if template is not None:
        if phrases.strip() != "auto":
            raise InputError("--phrases cannot be combined with --prompt-template: the phrases are the category "
                             "names the template is applied to")
        if prompt is None:
            caption, found = template_prompt(template)
            return caption, [(p["start"], p["end"]) for p in found]
        rendered = category_list_prompt(prompt, template)
        if rendered is None:
            raise InputError(f"--prompt-template applies to a category-list --prompt ('star. heart. circle.': two "
                             f"or more names separated by '. '); {prompt!r} is not one. Give the template alone "
                             f"to ground the categories it names")
        return rendered
    if prompt is None:
        raise InputError("give --prompt TEXT (or --tuned-prompt DIR, or --prompt-template JSON)")
    return prompt, phrase_spans(prompt, phrases, spacy_model)


def _becomes(prompt: str, template, caption: str) -> bool:
    """Whether the category list ``prompt`` with ``template`` is written as ``caption``."""
    try:
        rendered = category_list_prompt(prompt, template)
    except InputError:            # the template names a category the list lacks
        return False
    return rendered is not None and rendered[0] == caption


def category_list_prompt(prompt: str, template=None) -> tuple[str, list[tuple[int, int]]] | None:
    """A category-list ``prompt`` (``labeling.phrases.category_list_spans``) as the category prompt
    ``storage.coco.category_prompts`` writes for its names, ``template``'s words around each (None:
    the bare names): ``(caption, span of each name)``; None when ``prompt`` is not a category list."""
    from labeling.phrases import category_list_spans
    from storage.prompt_template import names_prompt

    listed = category_list_spans(prompt)
    if listed is None:
        return None
    return names_prompt([prompt[s:e] for s, e in listed], template)


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


def is_prompt_folder(value: str) -> bool:
    """Whether ``value`` names a tuned prompt folder (holds ``prompt.json``) rather than prompt text."""
    from glip.prompt import PROMPT_META
    from storage import fs

    if "\n" in value or len(value) > 4096:
        return False
    try:
        return fs.is_file(fs.join(value, PROMPT_META))
    except (OSError, ValueError):
        return False


def main(
    images: Annotated[list[str], typer.Argument(help="Image files (JPEG, PNG, ...): local paths or URIs.")],
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory (train-student, convert-official) "
                                                       "or an official GLIP .pth; a local path or a URI.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="The text the model reads, e.g. 'a red star and "
                                                                "a blue circle'; or a tuned prompt folder (one "
                                                                "holding prompt.json: as --tuned-prompt). May be "
                                                                "left out with --tuned-prompt or --prompt-template.")] = None,
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
    tuned_prompt: Annotated[str | None, typer.Option(
        "--tuned-prompt", help="A tuned prompt folder (prompt.json + prompt.safetensors from `glipctl prompt-tune "
        "--mode prompt`; local or a URI), added to the text features in every forward. Only with the GLIP --model "
        "it was tuned on (refused unless that model's sha256 is the one recorded) and only on the text it was "
        "tuned on: without --prompt it grounds that text's categories (one phrase per category; a span covers "
        "the name only, not the template's words around it); a --prompt that is not that text (or a category "
        "list that its template makes that text) is refused.")] = None,
    prompt_template: Annotated[str | None, typer.Option(
        "--prompt-template", help="Words around each category name, JSON (a file, a URI or inline): "
        "{\"hand\": {\"suffix\": \" of a person\"}} or the official list [{\"prefix\", \"name\", "
        "\"suffix\"}, ...] in category order. Applied to the names of a category-list --prompt ('hand. dog.' "
        "reads 'hand of a person. dog.'); without --prompt it grounds the categories the template names. Each "
        "name is one phrase and its span covers the name only; not with --phrases. With --tuned-prompt the "
        "prompt's own template is used, and a different one here is an error.")] = None,
) -> None:
    """Ground the phrases of a prompt in images: print the boxes and write PNGs with them drawn.

    A prompt that lists category names ("star. heart. circle.") grounds each name as its own phrase; a sentence gets its noun phrases (spaCy). --phrases names them explicitly. --prompt-template puts words around the names; --tuned-prompt grounds the categories of a prompt tuned for this model.
    """
    import io

    from rich.console import Console
    from rich.table import Table

    from labeling.evaluation import load_model
    from labeling.prompts import TunedPrompt, effective_template
    from pipelines.drawing import draw_boxes
    from storage import fs
    from storage.prompt_template import PromptTemplate

    if prompt is not None and tuned_prompt is None and is_prompt_folder(prompt):
        tuned_prompt, prompt = prompt, None          # --prompt DIR, as evaluate and pseudo-label take it
    images = [fs.normalize(p) for p in images]
    out = fs.normalize(out)
    for p in images:
        if fs.kind_of(p) != "file":
            raise InputError(f"{p}: no such image")
    check_device(device)
    tuned = TunedPrompt.read(tuned_prompt, option="--tuned-prompt") if tuned_prompt else None
    template = effective_template(tuned, PromptTemplate.load(prompt_template) if prompt_template else None)
    prompt, spans = prompt_and_spans(prompt, phrases, spacy_model, template=template, tuned=tuned)
    net = load_model(model)
    if tuned is not None:
        if not hasattr(net, "attach_prompt"):
            raise InputError(f"--tuned-prompt {tuned_prompt}: only a GLIP --model takes a tuned prompt; {model} "
                             f"is not one")
        tuned.check_base(model)
        tuned.attach(net)
    net = to_device(net, device)
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
    written: dict[str, Any] = {"prompt": prompt, "phrases": [prompt[s:e] for s, e in spans]}
    if tuned is not None:
        written["tuned_prompt"] = {"path": tuned_prompt, "sha256": tuned.sha256}
    if template is not None:
        written["prompt_template"] = template.to_json()
    fs.write_json(fs.join(out, "predictions.json"), {**written, "threshold": threshold, "device": device,
                                                     "images": results})
    stdout.print(f"wrote {len(results)} PNG(s) and predictions.json to {out}")
