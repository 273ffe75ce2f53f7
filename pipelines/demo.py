"""`glipctl demo`: the paper's loop on a generated world, on a CPU, as the ``glipctl`` commands a user runs.

Each stage is one ``glipctl`` command line, run in-process through the CLI's own parser, and
``report.md`` lists them: running them by hand (same folder) reproduces the demo.

1. ``world``     glipctl demo-world: gold (MDETR), crawled (img2dataset tars), eval (COCO)
2. ``parse``     glipctl parse-captions: spaCy noun phrases of the crawled alt-text
3. ``pack``      glipctl pack: the gold set as WebDataset shards, once for the three models
4. ``teacher``   glipctl train-student on gold only, ``demo-t`` preset (how a teacher is made)
5. ``pseudo``    glipctl pseudo-label: the teacher grounds the parsed phrases in the crawled images
6. ``student``   glipctl train-student on gold + pseudo-labels, ``demo-l`` preset (bigger, as GLIP-T -> GLIP-L)
7. ``control``   glipctl train-student on gold only, ``demo-l``: what the pseudo-labels are worth
8. ``evaluate``  glipctl evaluate: zero-shot COCO AP of the three models on the eval set, per shape

then a table on stdout, ``report.md`` (commands, tables, pictures) and ``report.json``.

Comparisons: student vs teacher is the paper's claim (a bigger student on gold + pseudo-labels beats
its teacher); student vs control isolates the pseudo-labels (same model, steps, batch, lr and
initialisation seed; the control sees gold only).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from storage.atomic import atomic_write, write_json_atomic

log = logging.getLogger("glipctl.demo")

STAGES = ("world", "parse", "pack", "teacher", "pseudo", "student", "control", "evaluate")
MODELS = ("teacher", "student", "control")


@dataclass
class DemoOptions:
    """Sizes of one demo run. ``full()`` fits 15 minutes on 2 CPU cores; ``small()`` is for tests.

    Every field ends up as a ``glipctl`` option in a stage's command line (``demo_commands``).
    """
    out: str = "demo_out"
    seed: int = 0
    small_world: bool = False
    teacher_preset: str = "demo-t"
    student_preset: str = "demo-l"
    # Optimizer steps: what 15 minutes on 2 cores allow with margin (demo-t 0.13 s, demo-l 0.24 s a step
    # there). Too few for the paper's claims on this world: see BENCHMARKS.md "demo" for what was measured.
    teacher_steps: int = 800
    student_steps: int = 700          # student and control alike
    batch_size: int = 8
    lr: float = 2e-3                  # from scratch on small data (1e-4 is the fine-tuning default)
    text_lr: float = 0.0              # frozen MiniLM: shape words keep their pretrained meaning; 40% faster
    warmup: int = 30
    gold_samples_per_shard: int = 64  # glipctl pack --samples-per-shard
    # The student's recipe for a teacher this short-trained (rare-shape pseudo boxes 69-81% right, half the
    # rare objects missed; measured, seed 0): gold twice as often as pseudo-labels, and the phrases the
    # teacher found nothing for left out of the loss, not taught as absent (AP 23.8 -> 29.5 at 800 steps).
    mix: str = "gold=2,pseudo=1"
    pseudo_unboxed: str = "ignore"
    pseudo_threshold: float = 0.5     # teacher score a pseudo box needs (pseudo-label's default)
    pseudo_max_boxes: int = 1         # per phrase: alt-text names one object per phrase
    eval_batch_size: int = 16
    cpus_per_worker: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))  # torch threads
    address: str | None = None
    picture_samples: int = 8

    @classmethod
    def full(cls, out: str = "demo_out", seed: int = 0) -> "DemoOptions":
        return cls(out=out, seed=seed)

    @classmethod
    def small(cls, out: str = "demo_out", seed: int = 0) -> "DemoOptions":
        """A few steps on a small world: checks the plumbing end to end, not the science."""
        return cls(out=out, seed=seed, small_world=True, teacher_steps=6, student_steps=6, batch_size=2,
                   warmup=1, eval_batch_size=8, picture_samples=4, pseudo_threshold=0.0)


@dataclass
class DemoCommand:
    stage: str
    argv: list[str]

    @property
    def line(self) -> str:
        return "glipctl " + " ".join(shlex.quote(a) for a in self.argv)


@dataclass
class DemoReport:
    models: dict[str, dict[str, Any]]          # teacher / student / control: AP, AP50, AP75, per_category
    rare: dict[str, dict[str, float]]          # rare shape (and "mean") -> model -> AP
    common_mean: dict[str, float]              # model -> mean AP of the common shapes
    seconds: dict[str, float]
    counts: dict[str, Any]
    options: dict[str, Any]
    paths: dict[str, str]
    commands: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the commands

def demo_paths(o: DemoOptions) -> dict[str, str]:
    """Where each stage writes (the layout ``generate_world`` uses under ``world``)."""
    out = Path(o.out)
    world = out / "world"
    return {"out": str(out), "world": str(world), "crawled": str(world / "crawled"),
            "gold": f"{world / 'gold' / 'mdetr_gold.json'}={world / 'gold' / 'images'}",
            "eval": f"{world / 'eval' / 'coco_eval.json'}={world / 'eval' / 'images'}",
            "truth": str(world / "crawled_truth.json"), "phrases": str(out / "phrases"),
            "gold_packed": str(out / "gold_packed"), "pseudo": str(out / "pseudo"),
            **{who: str(out / who) for who in MODELS},
            **{f"eval_{who}": str(out / "eval" / f"{who}.json") for who in MODELS}}


def demo_commands(o: DemoOptions) -> list[DemoCommand]:
    """The demo as ``glipctl`` command lines, in order. Nothing here runs them."""
    p = demo_paths(o)
    ray = ["--address", o.address] if o.address else []

    def train(who: str, preset: str, steps: int, pseudo: bool) -> DemoCommand:
        argv = ["train-student", "--out", p[who], "--gold", p["gold_packed"]]
        if pseudo:
            argv += ["--pseudo", p["pseudo"], "--mix", o.mix, "--pseudo-unboxed", o.pseudo_unboxed]
        argv += ["--preset", preset, "--steps", str(steps), "--batch-size", str(o.batch_size),
                 "--lr", str(o.lr), "--text-lr", str(o.text_lr), "--warmup", str(o.warmup),
                 "--cpus-per-worker", str(o.cpus_per_worker), "--checkpoint-every", "0", "--keep", "1",
                 "--log-every", str(max(1, steps // 20)), "--seed", str(o.seed), "--overwrite"] + ray
        return DemoCommand(who, argv)

    world = ["demo-world", "--out", p["world"], "--seed", str(o.seed)] + (["--small"] if o.small_world else [])
    commands = [
        DemoCommand("world", world),
        DemoCommand("parse", ["parse-captions", p["crawled"], "--out", p["phrases"], "--overwrite"] + ray),
        # small shards, as train-student packs ANN=IMAGES itself: 800 samples in one shard would be read in
        # order through the shuffle buffer; 13 shards are interleaved in a new order every epoch
        DemoCommand("pack", ["pack", "--gold", p["gold"], "--out", p["gold_packed"], "--samples-per-shard",
                             str(o.gold_samples_per_shard), "--overwrite"] + ray),
        train("teacher", o.teacher_preset, o.teacher_steps, pseudo=False),
        DemoCommand("pseudo", ["pseudo-label", p["crawled"], "--phrases", p["phrases"], "--teacher", p["teacher"],
                               "--out", p["pseudo"], "--threshold", str(o.pseudo_threshold),
                               "--max-boxes-per-phrase", str(o.pseudo_max_boxes),
                               "--batch-size", str(o.eval_batch_size), "--overwrite"] + ray),
        train("student", o.student_preset, o.student_steps, pseudo=True),
        train("control", o.student_preset, o.student_steps, pseudo=False),
    ]
    commands += [DemoCommand("evaluate", ["evaluate", "--model", p[who], "--coco", p["eval"],
                                          "--batch-size", str(o.eval_batch_size), "--out", p[f"eval_{who}"]])
                 for who in MODELS]
    return commands


class DemoStageFailed(RuntimeError):
    pass


def run_glipctl(argv: list[str]) -> None:
    """Run one ``glipctl`` command line in this process (shares its Ray); raise if it fails."""
    import typer.main

    from pipelines.cli import app

    code = typer.main.get_command(app).main(args=list(argv), prog_name="glipctl", standalone_mode=False)
    if code not in (None, 0):
        raise DemoStageFailed(f"`glipctl {' '.join(argv)}` exited with code {code}")


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


# ----------------------------------------------------------------------------- runner

def run_demo(o: DemoOptions, say: Callable[[str], None] = print) -> DemoReport:
    """Run every stage's command into ``o.out``; return (and write) the report. Ray must be initialised."""
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    p = demo_paths(o)
    seconds: dict[str, float] = {}
    commands = demo_commands(o)
    ran: list[dict[str, Any]] = []
    for command in commands:
        say(f"demo [{command.stage}]: {command.line}")
        t0 = time.perf_counter()
        run_glipctl(command.argv)
        took = time.perf_counter() - t0
        seconds[command.stage] = round(seconds.get(command.stage, 0.0) + took, 1)
        ran.append({"stage": command.stage, "command": command.line, "seconds": round(took, 1)})
    seconds["total"] = round(sum(v for k, v in seconds.items()), 1)

    world = json.loads((Path(p["world"]) / "world.json").read_text())
    rare_names = list(world["rare_shapes"])
    coco = {who: json.loads(Path(p[f"eval_{who}"]).read_text())["coco"] for who in MODELS}
    rare = {name: {who: coco[who]["per_category"].get(name, -1.0) for who in MODELS} for name in rare_names}
    rare["mean"] = {who: _mean([rare[n][who] for n in rare_names]) for who in MODELS}
    common = [n for n in coco["teacher"]["per_category"] if n not in rare_names]
    counts = {"world": {"images": world["images"], "shapes": world["shapes"]},
              "parse": _manifest_counts(p["phrases"]), "pseudo": _manifest_counts(p["pseudo"]),
              "pseudo_quality": score_pseudo_labels(Path(p["pseudo"]), Path(p["truth"]), tuple(rare_names)),
              **{who: _train_counts(p[who]) for who in MODELS}}
    report = DemoReport(
        models={who: _summary(coco[who]) for who in MODELS}, rare=rare,
        common_mean={who: _mean([coco[who]["per_category"][n] for n in common]) for who in MODELS},
        seconds=seconds, counts=counts, options=_jsonable(asdict(o)),
        paths={k: v for k, v in p.items() if not k.startswith("eval_")}, commands=ran)
    write_json_atomic(out / "report.json", report.to_dict())
    pictures = _pictures(o, p)
    write_report_md(out / "report.md", report, pictures)
    return report


def _manifest_counts(folder: str) -> dict[str, Any]:
    """Every count a stage's shards committed, summed (read, written, skipped by reason, phrases, boxes...)."""
    from storage.manifest import Manifest

    manifest = Manifest.load(folder)
    totals: dict[str, Any] = {"skipped": {}}
    for entry in (manifest.shards.values() if manifest else []):
        for key, value in (entry.get("counts") or {}).items():
            if key == "skipped":
                for reason, n in value.items():
                    totals["skipped"][reason] = totals["skipped"].get(reason, 0) + int(n)
            elif isinstance(value, (int, float)):
                totals[key] = totals.get(key, 0) + value
    return totals


def _train_counts(folder: str) -> dict[str, Any]:
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else {}
    return {"steps": last.get("step", 0), "final_loss": last.get("loss"), "samples_per_s": last.get("samples_per_s")}


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and v >= 0]
    return sum(values) / len(values) if values else -1.0


def _summary(coco: dict[str, Any]) -> dict[str, Any]:
    keep = ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_category", "images", "detections")
    return {k: coco[k] for k in keep if k in coco}


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- pictures

def _pictures(o: DemoOptions, p: dict[str, str]) -> dict[str, str]:
    """PNGs for the report: pseudo-labelled crawled samples, and each model's detections."""
    import io

    from PIL import Image

    from pipelines.drawing import draw_boxes, grid
    from storage.shards import iter_shard_samples
    from storage.skips import StageCounts

    out = Path(o.out)
    pics: dict[str, str] = {}
    tiles = []
    for sample, image in iter_shard_samples([p["pseudo"]], StageCounts()):
        if not sample.boxes:
            continue
        boxes = [{"bbox": b.bbox, "label": sample.caption[b.tokens_positive[0][0]:b.tokens_positive[0][1]],
                  "score": b.score, "colour": k} for k, b in enumerate(sample.boxes)]
        tiles.append(draw_boxes(Image.open(io.BytesIO(image)), boxes, scale=2))
        if len(tiles) >= o.picture_samples:
            break
    if tiles:
        pics["pseudo"] = _save_png(grid(tiles, 4), out / "pseudo_samples.png")
    annotations, images = p["eval"].split("=", 1)
    for who in MODELS:
        tiles = _prediction_tiles(Path(p[who]), Path(annotations), Path(images), o.picture_samples)
        if tiles:
            pics[who] = _save_png(grid(tiles, 4), out / f"{who}_predictions.png")
    return pics


def _prediction_tiles(model_dir: Path, coco_json: Path, image_dir: Path, n: int, min_score: float = 0.2):
    """The first ``n`` eval images with each model's detections (category prompt) drawn."""
    from PIL import Image

    from labeling.evaluation import category_prompts, load_model, model_token_counter
    from pipelines.drawing import draw_boxes

    coco = json.loads(coco_json.read_text())
    model = load_model(model_dir)
    prompts = category_prompts(coco["categories"], model.config.max_query_len, model_token_counter(model))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = [Image.open(image_dir / im["file_name"]).convert("RGB") for im in coco["images"][:n]]
    per_image: list[list[dict[str, Any]]] = [[] for _ in images]
    for caption, spans in prompts:
        results = model.ground(images, [caption] * len(images), [[(s, e) for s, e, _ in spans]] * len(images),
                               threshold=min_score, max_per_phrase=3)
        for i, per_phrase in enumerate(results):
            for (_, _, cat), dets in zip(spans, per_phrase):
                per_image[i] += [{"bbox": d["bbox"], "label": names[cat], "score": d["score"], "colour": cat}
                                 for d in dets]
    return [draw_boxes(img, _class_agnostic_top(dets), scale=2) for img, dets in zip(images, per_image)]


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


def _diff(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or a < 0 or b < 0 else f"{100 * (a - b):+.1f}"


def report_rows(r: DemoReport) -> list[tuple[str, ...]]:
    """(what, teacher, student, control, student - teacher, student - control) rows (stdout and report.md)."""
    def row(name: str, values: dict[str, float]) -> tuple[str, ...]:
        return (name, *(_pct(values[who]) for who in MODELS),
                _diff(values["student"], values["teacher"]), _diff(values["student"], values["control"]))

    rows = [row(name, {who: r.models[who][k] for who in MODELS})
            for name, k in (("COCO AP, all shapes", "AP"), ("AP50", "AP50"), ("AP75", "AP75"))]
    rows += [row(f"AP {name} (rare)", v) for name, v in r.rare.items() if name != "mean"]
    rows.append(row("AP rare, mean", r.rare["mean"]))
    rows.append(row("AP common, mean", r.common_mean))
    return rows


REPORT_COLUMNS = ("", "teacher", "student", "control", "student - teacher", "student - control")
SHORT_COLUMNS = ("", "teacher", "student", "control", "vs teacher", "vs control")   # the terminal table


def count_rows(r: DemoReport) -> list[tuple[str, str]]:
    w = r.counts["world"]["images"]
    rows = [("gold images (MDETR)", str(w["gold"])), ("crawled images (img2dataset)", str(w["crawled"])),
            ("eval images (COCO)", str(w["eval"])),
            ("phrases parsed from crawled captions", str(r.counts["parse"].get("phrases", "?"))),
            ("pseudo-labelled images", str(r.counts["pseudo"].get("written", "?"))),
            ("pseudo boxes", str(r.counts["pseudo"].get("boxes", "?")))]
    q = r.counts.get("pseudo_quality")
    if q:
        rows += [("pseudo boxes on shape phrases: correct (IoU>=0.5)", f"{100 * q['precision']:.0f}%"),
                 ("  on rare shapes: correct (precision)", f"{100 * q['rare_precision']:.0f}% of {q['rare_boxes']}"),
                 ("  rare-shape objects found (recall)", f"{100 * q['rare_recall']:.0f}%"),
                 ("pseudo boxes on phrases naming no shape", str(q["noise_boxes"]))]
    for who in MODELS:
        c = r.counts.get(who, {})
        rows.append((f"{who}: preset, steps", f"{_preset_of(r, who)}, {c.get('steps', '?')}"))
    for k, v in r.seconds.items():
        rows.append((f"seconds: {k}", f"{v:.1f}"))
    return rows


def _preset_of(r: DemoReport, who: str) -> str:
    return r.options["teacher_preset"] if who == "teacher" else r.options["student_preset"]


def print_report(r: DemoReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="AP (%): teacher (gold) / student (bigger; gold + pseudo-labels) / control (student's "
                    "size; gold); 'vs': student minus the other")
    for col in SHORT_COLUMNS:
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
    o = r.options
    lines = ["# glipctl demo report", "",
             f"Seed {o['seed']}. A teacher GLIP (`{o['teacher_preset']}` preset) trained on gold only "
             f"pseudo-labels the crawled images; a bigger student (`{o['student_preset']}`) trains on gold + "
             "those pseudo-labels, and a control of the student's size on gold only, with the same steps, batch, "
             "learning rate and seed. All three are compared on a COCO-format evaluation set where every shape "
             "is equally common. Rare shapes: " + ", ".join(f"`{s}`" for s in r.rare if s != "mean") + ".", "",
             "| " + " | ".join(REPORT_COLUMNS) + " |", "|---|" + "---:|" * (len(REPORT_COLUMNS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in report_rows(r)]
    lines += ["", "| data and time | |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in count_rows(r)]
    lines += ["", "## The commands", "",
              "Each stage was this `glipctl` command. Run them in order from the same folder to reproduce "
              "the demo stage by stage (the `--cpus-per-worker` value sets torch's threads; another value "
              "changes float sums, so AP can move within the seed-to-seed spread). `glipctl evaluate "
              "--out` writes the JSON the tables above are made from.", "", "```bash"]
    lines += [c["command"] for c in r.commands]
    lines += ["```", "", "Objects per shape in each split:", "", "| shape | gold | crawled | eval |",
              "|---|---:|---:|---:|"]
    for s in sorted(set(shapes["eval"]) | set(shapes["gold"]) | set(shapes["crawled"])):
        lines.append(f"| {s} | {shapes['gold'].get(s, 0)} | {shapes['crawled'].get(s, 0)} | {shapes['eval'].get(s, 0)} |")
    captions = {"pseudo": "Pseudo-labelled crawled samples (teacher boxes, phrase and score)",
                "teacher": "Teacher detections on eval images (prompt: all shape names)",
                "student": "Student detections on the same images",
                "control": "Control detections on the same images"}
    for key, title in captions.items():
        if key in pictures:
            lines += ["", f"## {title}", "", f"![{key}]({pictures[key]})"]
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def commands_from_report(report_md: str | Path) -> list[str]:
    """The ``glipctl`` lines of a report.md's command block (what a user copies)."""
    lines = Path(report_md).read_text(encoding="utf-8").splitlines()
    start = lines.index("## The commands")
    block = lines[lines.index("```bash", start) + 1:]
    return [line for line in block[:block.index("```")] if line.startswith("glipctl ")]
