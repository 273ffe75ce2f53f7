"""`glipctl demo` (the whole teacher -> student loop on a generated world) and `glipctl demo-world`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def main(
    out: Annotated[Path, typer.Option("--out", help="Folder for the world, every stage's output, "
                                                    "report.md (commands, tables, PNGs) and report.json.")] = Path("demo_out"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated world and of training.")] = 0,
    small: Annotated[bool, typer.Option("--small", help="A small world and a few steps: checks the plumbing "
                                                        "in about two minutes, proves nothing.")] = False,
    teacher_steps: Annotated[int | None, typer.Option(
        "--teacher-steps", min=1, help="Optimizer steps of the teacher (default: 800, or 6 with --small).")] = None,
    student_steps: Annotated[int | None, typer.Option(
        "--student-steps", min=1, help="Optimizer steps of the student and of its gold-only control "
                                       "(default: 700, or 6 with --small).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (default: a local "
                                                "Ray, or RAY_ADDRESS).")] = None,
) -> None:
    """Run the teacher -> pseudo-label -> bigger student loop (and a gold-only control) on a generated world
    and compare AP; every stage is a glipctl command, listed in report.md."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray starts its workers at nice 15; the demo is a foreground job whose minutes are measured
    os.environ.setdefault("RAY_worker_niceness", "0")
    from pipelines.common import console, ensure_ray
    from pipelines.demo import DemoOptions, print_report, run_demo

    options = (DemoOptions.small if small else DemoOptions.full)(out=str(out), seed=seed)
    options.address = address
    if teacher_steps is not None:
        options.teacher_steps = teacher_steps
    if student_steps is not None:
        options.student_steps = student_steps
    ensure_ray(address)
    from rich.markup import escape

    report = run_demo(options, say=lambda line: console.print(f"[bold]{escape(line)}[/]", highlight=False))
    print_report(report)
    console.print(f"wrote {out / 'report.md'} and {out / 'report.json'}")


def world_main(
    out: Annotated[Path, typer.Option("--out", help="Folder for the world (replaced if it holds one): "
                                                    "gold/ (MDETR JSON + images), crawled/ (img2dataset tars), "
                                                    "eval/ (COCO + MDETR JSON + images), crawled_truth.json, "
                                                    "world.json.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed writes the same bytes.")] = 0,
    small: Annotated[bool, typer.Option("--small", help="48 gold, 48 crawled and 16 eval images "
                                                        "(default: 800 / 1200 / 120).")] = False,
) -> None:
    """Generate the demo's world of coloured shapes: gold grounding data where two shapes are rare, a crawl
    of images with noisy alt-text where they are common, and an evaluation set where all are equal."""
    from pipelines.common import console
    from pipelines.world import WorldSpec, generate_world

    spec = WorldSpec.small(seed) if small else WorldSpec(seed=seed)
    world = generate_world(out, spec)
    images = world.summary["images"]
    console.print(f"demo-world: {images['gold']} gold, {images['crawled']} crawled and {images['eval']} eval "
                  f"images in {out} (rare in gold: {', '.join(spec.rare_shapes)})")
