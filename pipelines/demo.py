"""`glipctl demo`: the whole teacher -> student loop on a generated world, on a CPU.

Stages, each through the same Python entry point as its CLI command:

1. ``world``    generate_world: gold (MDETR), crawled (img2dataset tars), eval (COCO)
2. ``parse``    run_parse_captions: spaCy noun phrases of the crawled alt-text
3. ``teacher``  train: train-student on gold only (how a teacher is made)
4. ``pseudo``   pseudo-label: the teacher grounds the parsed phrases in the crawled images
5. ``student``  train: train-student on gold + pseudo-label shards
6. ``evaluate`` zero-shot COCO AP of both models on the eval set, per shape

then a table on stdout, ``report.md`` (with pictures) and ``report.json``.

Fair comparison: teacher and student have the same architecture, the same number of
optimizer steps, batch size and learning rate, and both start from the same random
initialisation (seed); the only difference is the student's extra (pseudo-labelled) data.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.world import WorldPaths, WorldSpec, generate_world
from storage.atomic import atomic_write, write_json_atomic

log = logging.getLogger("glipctl.demo")

# The model: the `tiny` preset at the world's resolution, anchors scaled to its 20-60 px objects,
# and no deep-fusion layer. Measured on this world (gold 800, 800 steps, batch 8, one thread):
# with one fusion layer the bi-attention's text update pulls every token towards one vector
# (cosine similarity of "red"/"blue"/"circle"/"star" features 0.3-0.8 before training,
# 0.8-0.94 after), every word then scores the same on every object and COCO AP stays at 0.16;
# without fusion (GLIP's late-fusion ablation) AP is 0.31 after 800 steps and 0.46 after 1500,
# and a step costs 0.10 s instead of 0.21 s. No deformable convolution either (it was 3/4 of a
# CPU step when measured).
DEMO_MODEL: dict[str, Any] = {"min_size": 160, "max_size": 224, "anchor_sizes": (32, 64, 128, 256),
                              "use_deform": False, "num_fusion_layers": 0}
STAGES = ("world", "parse", "teacher", "pseudo", "student", "evaluate")


@dataclass
class DemoOptions:
    """Sizes of one demo run. ``full()`` fits 15 minutes on 2 CPU cores; ``small()`` is for tests."""
    out: str = "demo_out"
    seed: int = 0
    world: WorldSpec = field(default_factory=WorldSpec)
    model_overrides: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL))
    steps: int = 3000                 # optimizer steps, teacher and student alike (at 1500 the teacher was far
                                      # from converged: AP 43 -> 55 from 1500 to 3000 steps on gold alone)
    batch_size: int = 8
    lr: float = 2e-3
    text_lr: float = 0.0              # frozen MiniLM: shape words keep their pretrained meaning; 40% faster
    warmup: int = 30
    mix: str = "gold=1,pseudo=1"      # student's sampling weights
    pseudo_threshold: float = 0.5     # teacher score a pseudo box needs (pseudo-label's default;
                                      # measured here: keeps 98% of rare-shape boxes, half the noise)
    pseudo_max_boxes: int = 1         # per phrase: alt-text names one object per phrase
    pseudo_min_score: float = 0.0     # student-side filter (train-student --pseudo-min-score)
    pseudo_unboxed: str = "negative"  # train-student --pseudo-unboxed (measured: "ignore" loses the negatives
                                      # the missed phrase gives on the image's other objects)
    eval_batch_size: int = 16
    workers: int = 1                  # Ray Train workers (DDP); 1 is fastest on 2 cores
    cpus_per_worker: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))  # torch threads
    picture_samples: int = 8
    quiet: bool = False

    @classmethod
    def full(cls, out: str = "demo_out", seed: int = 0) -> "DemoOptions":
        return cls(out=out, seed=seed, world=WorldSpec(seed=seed))

    @classmethod
    def small(cls, out: str = "demo_out", seed: int = 0) -> "DemoOptions":
        """A few steps on a small world: checks the plumbing end to end, not the science."""
        return cls(out=out, seed=seed, world=WorldSpec.small(seed), steps=6, batch_size=2, warmup=1,
                   eval_batch_size=8, picture_samples=4, pseudo_threshold=0.0,
                   model_overrides=dict(DEMO_MODEL, min_size=128, max_size=192))


@dataclass
class DemoReport:
    teacher: dict[str, Any]
    student: dict[str, Any]
    rare: dict[str, Any]
    seconds: dict[str, float]
    counts: dict[str, Any]
    options: dict[str, Any]
    paths: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- stages

def stage_parse(world: WorldPaths, out_dir: Path) -> dict[str, Any]:
    from pipelines.parse_captions import ParseOptions, run_parse_captions
    from storage.crawled import discover_crawled_shards

    shards = discover_crawled_shards([str(world.crawled_dir)])
    result = run_parse_captions(shards, out_dir, ParseOptions(overwrite=True))
    totals = result.manifest.totals()
    return {"captions": totals.get("read", 0), "phrases": totals.get("phrases", 0),
            "written": totals.get("written", 0), "skipped": totals.get("skipped", {})}


def stage_train(o: DemoOptions, world: WorldPaths, out_dir: Path, pseudo_dir: Path | None) -> dict[str, Any]:
    from pipelines.training.options import AnnotatedImages, TrainOptions, parse_mix
    from pipelines.training.runner import train

    options = TrainOptions(
        out=str(out_dir), gold=[AnnotatedImages(str(world.gold_json), str(world.gold_images))],
        pseudo=[str(pseudo_dir)] if pseudo_dir else [], mix=parse_mix(o.mix if pseudo_dir else None),
        preset="tiny", model_overrides=dict(o.model_overrides), steps=o.steps, batch_size=o.batch_size,
        lr=o.lr, text_lr=o.text_lr, warmup=o.warmup, workers=o.workers, cpus_per_worker=o.cpus_per_worker,
        checkpoint_every=0, keep=1, overwrite=True,   # a demo re-run starts its models over
        log_every=max(1, o.steps // 20), seed=o.seed, pseudo_min_score=o.pseudo_min_score,
        pseudo_unboxed=o.pseudo_unboxed,
    )
    result = train(options)
    return {"steps": result.step, "final_loss": result.final_loss, "samples_per_s": result.samples_per_s,
            "counts": result.counts}


def stage_pseudo(o: DemoOptions, world: WorldPaths, phrases_dir: Path, teacher_dir: Path,
                 out_dir: Path) -> dict[str, Any]:
    from labeling.filters import DEFAULT_MIN_BOX_SIZE, DEFAULT_NMS_IOU
    from pipelines.pseudo_label import PseudoLabelOptions, run_pseudo_label
    from storage.crawled import discover_crawled_shards

    shards = discover_crawled_shards([str(world.crawled_dir)])
    result = run_pseudo_label(shards, out_dir, PseudoLabelOptions(
        phrases=str(phrases_dir), teacher=str(teacher_dir), threshold=o.pseudo_threshold,
        nms_iou=DEFAULT_NMS_IOU, max_boxes_per_phrase=o.pseudo_max_boxes, min_box_size=DEFAULT_MIN_BOX_SIZE,
        batch_size=o.eval_batch_size, overwrite=True))
    totals = result.totals()
    return {"images": totals.get("written", 0), "boxes": totals.get("boxes", 0),
            "without_boxes": totals.get("without_boxes", 0), "skipped": totals.get("skipped", {}),
            "failed": result.failed}


def score_pseudo_labels(pseudo_dir: Path, truth_json: Path, rare_shapes: tuple[str, ...]) -> dict[str, Any]:
    """How right the teacher's pseudo-labels are, against the world's hidden crawled truth.

    A box is *correct* when its phrase names a shape and the box has IoU >= 0.5 with a true
    object of that shape. ``rare_recall``: share of the crawled images' rare-shape objects
    that received a correct box. Boxes on phrases naming no shape ("the weekend") are counted
    apart: they are the alt-text noise the threshold should reject.
    """
    from labeling.evaluation import iou_xywh
    from pipelines.world import SHAPES
    from storage.shards import iter_shard_samples
    from storage.skips import StageCounts

    truth = json.loads(Path(truth_json).read_text())
    stats = {"boxes": 0, "named": 0, "correct": 0, "noise_boxes": 0, "rare_boxes": 0, "rare_correct": 0}
    found_rare: set[tuple[str, int]] = set()
    for sample, _ in iter_shard_samples([str(pseudo_dir)], StageCounts()):
        crawled_key = sample.extra.get("source_key", sample.key)   # the truth is keyed by crawled key
        objects = truth.get(crawled_key, [])
        for b in sample.boxes:
            stats["boxes"] += 1
            s, e = b.tokens_positive[0]
            words = sample.caption[s:e].lower().split()
            named = next((w for w in reversed(words) if w in SHAPES), None)
            if named is None:
                stats["noise_boxes"] += 1
                continue
            stats["named"] += 1
            rare = named in rare_shapes
            stats["rare_boxes"] += rare
            for k, o in enumerate(objects):
                if o["shape"] == named and iou_xywh([b.bbox], [o["bbox"]])[0, 0] >= 0.5:
                    stats["correct"] += 1
                    stats["rare_correct"] += rare
                    if rare:
                        found_rare.add((crawled_key, k))
                    break
    rare_total = sum(1 for objs in truth.values() for o in objs if o["shape"] in rare_shapes)
    stats["precision"] = stats["correct"] / stats["named"] if stats["named"] else 0.0
    stats["rare_precision"] = stats["rare_correct"] / stats["rare_boxes"] if stats["rare_boxes"] else 0.0
    stats["rare_recall"] = len(found_rare) / rare_total if rare_total else 0.0
    return stats


def stage_evaluate(world: WorldPaths, model_dir: Path, batch_size: int) -> dict[str, Any]:
    from pipelines.commands.evaluate import evaluate_model

    report = evaluate_model(model_dir, coco=world.eval_coco_arg, batch_size=batch_size, show_progress=False)
    return report["coco"]


# ----------------------------------------------------------------------------- runner

def run_demo(o: DemoOptions, say: Callable[[str], None] = print) -> DemoReport:
    """Run every stage into ``o.out``; return (and write) the report. Ray must be initialised."""
    import torch

    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    counts: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        say(f"demo: {name} ...")
        t0 = time.perf_counter()
        value = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        say(f"demo: {name} done in {seconds[name]:.1f} s")
        return value

    torch.manual_seed(o.seed)
    world = timed("world", lambda: generate_world(out / "world", o.world))
    counts["world"] = {"images": world.summary["images"], "shapes": world.summary["shapes"]}
    counts["parse"] = timed("parse", lambda: stage_parse(world, out / "phrases"))
    counts["teacher"] = timed("teacher", lambda: stage_train(o, world, out / "teacher", None))
    counts["pseudo"] = timed("pseudo", lambda: stage_pseudo(o, world, out / "phrases", out / "teacher",
                                                            out / "pseudo"))
    counts["pseudo_quality"] = score_pseudo_labels(out / "pseudo", world.crawled_truth, o.world.rare_shapes)
    counts["student"] = timed("student", lambda: stage_train(o, world, out / "student", out / "pseudo"))

    def evaluate_both():
        return (stage_evaluate(world, out / "teacher", o.eval_batch_size),
                stage_evaluate(world, out / "student", o.eval_batch_size))
    teacher_eval, student_eval = timed("evaluate", evaluate_both)
    seconds["total"] = round(sum(seconds.values()), 1)

    rare_names = list(o.world.rare_shapes)
    rare = {name: {"teacher": teacher_eval["per_category"].get(name, -1.0),
                   "student": student_eval["per_category"].get(name, -1.0)} for name in rare_names}
    rare["mean"] = {who: _mean([rare[n][who] for n in rare_names]) for who in ("teacher", "student")}
    common = [n for n in teacher_eval["per_category"] if n not in rare_names]
    counts["common_mean"] = {"teacher": _mean([teacher_eval["per_category"][n] for n in common]),
                             "student": _mean([student_eval["per_category"][n] for n in common])}
    report = DemoReport(
        teacher=_summary(teacher_eval), student=_summary(student_eval), rare=rare, seconds=seconds,
        counts=counts, options=_jsonable(asdict(o)),
        paths={"world": str(out / "world"), "teacher": str(out / "teacher"), "student": str(out / "student"),
               "pseudo": str(out / "pseudo"), "phrases": str(out / "phrases")},
    )
    write_json_atomic(out / "report.json", report.to_dict())
    pictures = _pictures(o, world, out)
    write_report_md(out / "report.md", report, pictures)
    return report


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and v >= 0]
    return sum(values) / len(values) if values else -1.0


def _summary(coco: dict[str, Any]) -> dict[str, Any]:
    keep = ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_category", "images", "detections")
    return {k: coco[k] for k in keep if k in coco}


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- pictures

def _pictures(o: DemoOptions, world: WorldPaths, out: Path) -> dict[str, str]:
    """PNGs for the report: pseudo-labelled crawled samples, and both models' detections."""
    from PIL import Image

    from pipelines.drawing import draw_boxes, grid
    from storage.shards import iter_shard_samples
    from storage.skips import StageCounts
    import io

    pics: dict[str, str] = {}
    tiles = []
    for sample, image in iter_shard_samples([str(out / "pseudo")], StageCounts()):
        if not sample.boxes:
            continue
        boxes = [{"bbox": b.bbox, "label": sample.caption[b.tokens_positive[0][0]:b.tokens_positive[0][1]],
                  "score": b.score, "colour": k} for k, b in enumerate(sample.boxes)]
        tiles.append(draw_boxes(Image.open(io.BytesIO(image)), boxes, scale=2))
        if len(tiles) >= o.picture_samples:
            break
    if tiles:
        pics["pseudo"] = _save_png(grid(tiles, 4), out / "pseudo_samples.png")
    for who in ("teacher", "student"):
        tiles = _prediction_tiles(out / who, world, o.picture_samples)
        if tiles:
            pics[who] = _save_png(grid(tiles, 4), out / f"{who}_predictions.png")
    return pics


def _prediction_tiles(model_dir: Path, world: WorldPaths, n: int, min_score: float = 0.2):
    """The first ``n`` eval images with each model's detections (category prompt) drawn."""
    from PIL import Image

    from labeling.evaluation import category_prompts, load_model, model_token_counter
    from pipelines.drawing import draw_boxes

    coco = json.loads(world.eval_coco_json.read_text())
    model = load_model(model_dir)
    prompts = category_prompts(coco["categories"], model.config.max_query_len, model_token_counter(model))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = [Image.open(world.eval_images / im["file_name"]).convert("RGB") for im in coco["images"][:n]]
    per_image: list[list[dict[str, Any]]] = [[] for _ in images]
    for caption, spans in prompts:
        results = model.ground(images, [caption] * len(images), [[(s, e) for s, e, _ in spans]] * len(images),
                               threshold=min_score, max_per_phrase=3)
        for i, per_phrase in enumerate(results):
            for (_, _, cat), dets in zip(spans, per_phrase):
                per_image[i] += [{"bbox": d["bbox"], "label": names[cat], "score": d["score"], "colour": cat}
                                 for d in dets]
    tiles = []
    for img, dets in zip(images, per_image):
        dets = _class_agnostic_top(dets)
        tiles.append(draw_boxes(img, dets, scale=2))
    return tiles


def _class_agnostic_top(dets: list[dict[str, Any]], iou: float = 0.5, limit: int = 6) -> list[dict[str, Any]]:
    """Best-scoring label per object for a readable picture: greedy NMS across categories."""
    from labeling.evaluation import iou_xywh

    kept: list[dict[str, Any]] = []
    for d in sorted(dets, key=lambda d: -d["score"]):
        if all(iou_xywh([d["bbox"]], [k["bbox"]])[0, 0] < iou for k in kept):
            kept.append(d)
        if len(kept) == limit:
            break
    return kept


def _save_png(img, path: Path) -> str:
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")
    return path.name


# ----------------------------------------------------------------------------- report

def _pct(v: float | None) -> str:
    return "n/a" if v is None or v < 0 else f"{100 * v:.1f}"


def report_rows(r: DemoReport) -> list[tuple[str, str, str]]:
    """(what, teacher, student) rows shared by the stdout table and report.md."""
    rows = [("COCO AP (eval set, all shapes)", _pct(r.teacher["AP"]), _pct(r.student["AP"])),
            ("AP50", _pct(r.teacher["AP50"]), _pct(r.student["AP50"])),
            ("AP75", _pct(r.teacher["AP75"]), _pct(r.student["AP75"]))]
    for name, v in r.rare.items():
        if name != "mean":
            rows.append((f"AP {name} (rare in gold)", _pct(v["teacher"]), _pct(v["student"])))
    rows.append(("AP rare shapes, mean", _pct(r.rare["mean"]["teacher"]), _pct(r.rare["mean"]["student"])))
    cm = r.counts.get("common_mean", {})
    rows.append(("AP common shapes, mean", _pct(cm.get("teacher")), _pct(cm.get("student"))))
    return rows


def count_rows(r: DemoReport) -> list[tuple[str, str]]:
    w = r.counts["world"]["images"]
    rows = [("gold images (MDETR)", str(w["gold"])), ("crawled images (img2dataset)", str(w["crawled"])),
            ("eval images (COCO)", str(w["eval"])),
            ("phrases parsed from crawled captions", str(r.counts["parse"].get("phrases", "?"))),
            ("pseudo-labelled images", str(r.counts["pseudo"].get("images", "?"))),
            ("pseudo boxes", str(r.counts["pseudo"].get("boxes", "?")))]
    q = r.counts.get("pseudo_quality")
    if q:
        rows += [("pseudo boxes on shape phrases: correct (IoU>=0.5)", f"{100 * q['precision']:.0f}%"),
                 ("  on rare shapes: correct", f"{100 * q['rare_precision']:.0f}% of {q['rare_boxes']}"),
                 ("  rare-shape objects found (recall)", f"{100 * q['rare_recall']:.0f}%"),
                 ("pseudo boxes on phrases naming no shape", str(q["noise_boxes"]))]
    for k, v in r.seconds.items():
        rows.append((f"seconds: {k}", f"{v:.1f}"))
    return rows


def print_report(r: DemoReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="teacher (gold only) vs student (gold + pseudo-labels)")
    for col in ("", "teacher", "student"):
        t.add_column(col, justify="right" if col else "left")
    for row in report_rows(r):
        t.add_row(*row)
    console.print(t)
    c = Table(title="data and time")
    c.add_column("")
    c.add_column("", justify="right")
    for row in count_rows(r):
        c.add_row(*row)
    console.print(c)


def write_report_md(path: Path, r: DemoReport, pictures: dict[str, str]) -> None:
    shapes = r.counts["world"]["shapes"]
    lines = ["# glipctl demo report", "",
             f"Seed {r.options['seed']}. A teacher GLIP (`tiny` preset) trained on gold only pseudo-labels the "
             "crawled images; a student trained on gold + those pseudo-labels, with the same steps, batch "
             "and learning rate, is compared on a COCO-format evaluation set where every shape is equally "
             "common. Rare shapes: " + ", ".join(f"`{s}`" for s in r.rare if s != "mean") + ".", "",
             "| | teacher | student |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in report_rows(r)]
    lines += ["", "| data and time | |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in count_rows(r)]
    lines += ["", "Objects per shape in each split:", "", "| shape | gold | crawled | eval |", "|---|---:|---:|---:|"]
    for s in sorted(set(shapes["eval"]) | set(shapes["gold"]) | set(shapes["crawled"])):
        lines.append(f"| {s} | {shapes['gold'].get(s, 0)} | {shapes['crawled'].get(s, 0)} | {shapes['eval'].get(s, 0)} |")
    captions = {"pseudo": "Pseudo-labelled crawled samples (teacher boxes, phrase and score)",
                "teacher": "Teacher detections on eval images (prompt: all shape names)",
                "student": "Student detections on the same images"}
    for key, title in captions.items():
        if key in pictures:
            lines += ["", f"## {title}", "", f"![{key}]({pictures[key]})"]
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
