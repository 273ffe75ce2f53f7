"""``make bench``: run every benchmark module and write BENCHMARKS.md.

Each ``benchmarks/bench_<name>.py`` exposes ``run(quick: bool) -> str`` returning a
Markdown section (numbers with their baseline beside them). Sections are written to
``bench_out/<name>.md`` as they finish, then joined into BENCHMARKS.md, so one
benchmark can be re-run alone: ``python -m benchmarks.run NAME``.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench_out"
ORDER = ["storage", "model", "parse_captions", "pseudo_label", "teachers", "pack", "train_student", "fusion", "demo",
         "prompt_tune"]


def machine_card() -> str:
    import torch
    cpus = os.cpu_count()
    return (f"Machine: {platform.machine()}, {cpus} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}.")


def main(argv: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = argv or [n for n in ORDER if (REPO / "benchmarks" / f"bench_{n}.py").exists()]
    OUT.mkdir(exist_ok=True)
    for name in names:
        t0 = time.time()
        print(f"== bench {name}", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        section = module.run(quick=bool(os.environ.get("GLIPCTL_BENCH_QUICK")))
        (OUT / f"{name}.md").write_text(section.rstrip() + f"\n\n_(bench took {time.time() - t0:.0f} s)_\n")
    parts = ["# Benchmarks\n", "Written by `make bench` (`python -m benchmarks.run`). " + machine_card() + "\n"]
    for name in ORDER:
        f = OUT / f"{name}.md"
        if f.exists():
            parts.append(f.read_text())
    (REPO / "BENCHMARKS.md").write_text("\n".join(parts))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main(sys.argv[1:])
