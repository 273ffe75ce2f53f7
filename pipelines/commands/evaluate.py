"""`glipctl evaluate`: COCO detection AP (zero-shot, category names as the prompt, optionally with a
manual template or, for GLIP, a tuned prompt) and phrase-grounding Recall@k of a checkpoint (GLIP, or
a transformers zero-shot detector)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, Any

import typer

from storage.errors import InputError


def evaluate_model(model_path: str | Path, coco: str | None = None, grounding: str | None = None, *,
                   batch_size: int = 8, threshold: float | None = None, merge_boxes: bool = False,
                   model=None, show_progress: bool = True, device: str | None = None,
                   prompt: str | None = None, prompt_template: str | None = None,
                   detections: str | None = None) -> dict[str, Any]:
    """The numbers `glipctl evaluate` prints: ``{"model": path, "coco": {...}, "grounding": {...}}``.

    ``coco`` / ``grounding`` are ``ANN.json=IMAGE_DIR``; every path a local path or a URI.
    ``model`` may pass an already loaded model (the demo evaluates in-process). ``device``: where the
    model runs ("cpu", "cuda", "cuda:1"; None: where it is, the CPU for a loaded checkpoint).
    ``prompt``: a tuned prompt folder (``labeling.prompts.TunedPrompt``), attached to the GLIP model
    it was tuned for, COCO detection only; ``prompt_template``: a ``storage.prompt_template`` JSON
    (file, URI or inline) applied to the COCO category prompt. ``detections``: write the COCO
    detections there too (COCO's results format).
    """
    from pipelines.training.options import AnnotatedImages
    from labeling.evaluation import evaluate_coco, evaluate_grounding, load_model, move_model
    from labeling.prompts import TunedPrompt, effective_template
    from storage.prompt_template import PromptTemplate

    if not coco and not grounding:
        raise InputError("give --coco ANN.json=IMAGE_DIR or --grounding ANN.json=IMAGE_DIR")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {batch_size})")
    coco_set = AnnotatedImages.parse(coco, "--coco") if coco else None
    grounding_set = AnnotatedImages.parse(grounding, "--grounding") if grounding else None
    tuned = TunedPrompt.read(prompt) if prompt else None
    template = effective_template(tuned, PromptTemplate.load(prompt_template) if prompt_template else None)
    if tuned is not None and grounding_set:
        raise InputError(f"--prompt {prompt}: a tuned prompt is for COCO detection (--coco) only; grounding "
                         f"Recall@k reads each caption, and the offsets are tied to the category prompt's tokens. "
                         f"Evaluate --grounding in a run without --prompt")
    if detections is not None and not coco_set:
        raise InputError("--detections writes the --coco detections: give --coco ANN.json=IMAGE_DIR")
    if template is not None and not coco_set:
        raise InputError("--prompt-template applies to the category prompt of --coco; grounding reads each "
                         "caption as it is")
    if model is not None:
        net = model if device is None else move_model(model, device)
    else:
        net = load_model(model_path, device=device)
    report: dict[str, Any] = {"model": str(model_path)}
    if device is not None:
        report["device"] = device
    before = getattr(net, "prompt", None)
    if tuned is not None:
        if not hasattr(net, "attach_prompt"):
            raise InputError(f"--prompt {prompt}: only a GLIP --model takes a tuned prompt; {model_path} is not one")
        tuned.check_base(str(model_path))
        tuned.attach(net)
        report["prompt"] = {"path": str(prompt), "sha256": tuned.sha256, "caption": tuned.caption}
    if template is not None:
        report["prompt_template"] = template.to_json()
    try:
        with _progress(show_progress) as advance:
            if coco_set:
                report["coco"] = evaluate_coco(net, coco_set.annotations, coco_set.image_root,
                                               batch_size=batch_size, threshold=threshold, template=template,
                                               tuned_prompt=tuned, detections_out=detections,
                                               progress=advance("coco"))
                report["coco"]["annotations"] = coco_set.annotations
            if grounding_set:
                report["grounding"] = evaluate_grounding(net, grounding_set.annotations, grounding_set.image_root,
                                                         batch_size=batch_size, merge_boxes=merge_boxes,
                                                         progress=advance("grounding"))
                report["grounding"]["annotations"] = grounding_set.annotations
    finally:
        if tuned is not None and model is not None:
            net.attach_prompt(before)        # a model the caller lent us goes back as it came
    return report


class _progress:
    """A rich progress bar per evaluation (images/s), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress

            from pipelines.common import console
            self.bar = Progress(console=console, transient=True)
            self.bar.__enter__()

        def advance(name: str):
            if self.bar is None:
                return None
            task = self.bar.add_task(f"evaluate {name}", total=None)
            return lambda n: self.bar.advance(task, n)
        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def metrics_table(report: dict[str, Any]):
    """A rich Table of the report's numbers (AP in percent, as COCO papers print them)."""
    from rich.table import Table

    table = Table(title=f"evaluation of {report.get('model', '')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    coco = report.get("coco")
    if coco:
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            table.add_row(f"COCO {name}", _pct(coco[name]))
        for cat, ap in coco["per_category"].items():
            table.add_row(f"  AP {cat}", _pct(ap))
        table.add_row("images", str(coco["images"]))
    ground = report.get("grounding")
    if ground:
        for name in ("R@1", "R@5", "R@10"):
            table.add_row(f"grounding {name} ({ground['protocol']})", _pct(ground[name]))
        table.add_row("phrases", str(ground["phrases"]))
    return table


def _pct(v: float) -> str:
    return "n/a" if v is None or v < 0 else f"{100 * v:.1f}"


def main(
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory (train-student, convert-official), "
                                                       "an official GLIP .pth, or a transformers zero-shot detector "
                                                       "(Grounding DINO, MM Grounding DINO, OWLv2: its folder or a "
                                                       "hub id); a local path or a URI.")],
    coco: Annotated[str | None, typer.Option("--coco", help="COCO detection set ANN.json=IMAGE_DIR: zero-shot "
                                             "detection with the category names as the prompt (split over "
                                             "the token limit); COCOeval AP, AP50, AP75, APs/m/l.")] = None,
    grounding: Annotated[str | None, typer.Option("--grounding", help="MDETR/GoldG set ANN.json=IMAGE_DIR: "
                                                  "Recall@1/5/10 at IoU 0.5 (any-box protocol).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Write the same numbers (and per-category AP) "
                                            "to this JSON file (local path or URI).")] = None,
    detections: Annotated[str | None, typer.Option("--detections", help="Also write the --coco detections "
                                                   "COCOeval scored to this JSON file (COCO's results format: "
                                                   "image_id, category_id, bbox [x, y, w, h] pixels, score; local "
                                                   "path or URI).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 8,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Keep every detection scoring at "
                                             "least this for COCOeval. Default: the official GLIP protocol "
                                             "(0.05 candidate cut, the best 100 boxes per image).")] = None,
    merge_boxes: Annotated[bool, typer.Option("--merge-boxes", help="Grounding: compare against the union of a "
                                              "phrase's gold boxes (Flickr30K 'merged' protocol) instead of "
                                              "any one of them.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where the model runs: 'cpu', 'cuda', 'cuda:1', "
                                                         "...")] = "cpu",
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "--tuned-prompt", help="A tuned prompt folder (prompt.json + prompt.safetensors from "
        "`glipctl prompt-tune --mode prompt`; local or a URI): its offsets are added to the text features in every "
        "forward. Only with the GLIP --model it was tuned on (refused unless that model's sha256 is the one "
        "recorded), and only for --coco (not --grounding): the data's category prompt, built with the prompt's "
        "own template, must be exactly the one prompt it was tuned on (the same categories in the same order), "
        "else the command stops naming both.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(
        "--prompt-template", help="Words around each category name in the --coco prompt, JSON (a file, a URI "
        "or inline): {\"hand\": {\"suffix\": \" of a person\"}} (categories it leaves out keep their "
        "name) or the official list [{\"prefix\", \"name\", \"suffix\"}, ...], one entry per category in id "
        "order. A category's span (what its boxes are scored on) covers its name only; the words around it "
        "change what the model reads. With --prompt the prompt's own template is used, and a different one "
        "here is an error.")] = None,
) -> None:
    """Evaluate a checkpoint: COCO AP (zero-shot detection) and/or grounding Recall@k."""
    from rich.console import Console

    from storage import fs

    report = evaluate_model(model, coco, grounding, batch_size=batch_size, threshold=threshold,
                            merge_boxes=merge_boxes, device=device, prompt=prompt, prompt_template=prompt_template,
                            detections=detections)
    Console().print(metrics_table(report))
    if out is not None:
        fs.write_json(out, report)
