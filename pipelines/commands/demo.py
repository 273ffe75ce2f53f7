"""`glipctl demo`: generate a world, run the whole teacher -> student loop on it, report."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def main(
    out: Annotated[Path, typer.Option("--out", help="Folder for the world, every stage's output, "
                                                    "report.md (with PNGs) and report.json.")] = Path("demo_out"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated world and of training.")] = 0,
    small: Annotated[bool, typer.Option("--small", help="A small world and a few steps: checks the plumbing "
                                                        "in about a minute, proves nothing.")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps for the teacher and the "
                                              "student alike (default: 3000, or 6 with --small).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (default: a local "
                                                "Ray, or RAY_ADDRESS).")] = None,
) -> None:
    """Run the teacher -> pseudo-label -> student loop on a generated world and compare AP."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray starts its workers at nice 15; the demo is a foreground job whose minutes are measured
    os.environ.setdefault("RAY_worker_niceness", "0")
    from pipelines.common import console, ensure_ray
    from pipelines.demo import DemoOptions, print_report, run_demo

    options = (DemoOptions.small if small else DemoOptions.full)(out=str(out), seed=seed)
    if steps is not None:
        if steps < 1:
            from storage.errors import InputError
            raise InputError(f"--steps must be >= 1 (got {steps})")
        options.steps = steps
    ensure_ray(address)
    report = run_demo(options, say=lambda line: console.print(line))
    print_report(report)
    console.print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
