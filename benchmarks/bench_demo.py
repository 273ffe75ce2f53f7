"""`glipctl demo` over 3 seeds: teacher vs student AP (mean and spread) and seconds per stage.

Each seed runs ``glipctl demo --seed S --out bench_out/demo/seed<S>`` in its own process
(a fresh Ray each time, as a user would run it). ``GLIPCTL_BENCH_DEMO_REUSE=1`` builds the
section from report.json files already there (runs made earlier, e.g. one seed at a time).
Quick mode (``GLIPCTL_BENCH_QUICK``) runs one ``--small`` demo: plumbing only, no science.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench_out" / "demo"
SEEDS = (0, 1, 2)


FINDINGS = """What was measured to find out why (seed-0 world, a plain single-process loop with the demo's model and
learning rates, AP in percent, teacher 46.1 overall / 18.6 rare after 1500 steps):

- The pseudo-labels are good: 90% of the teacher's boxes on rare-shape phrases overlap (IoU >= 0.5) a
  true object of the named shape and 81% of the crawled rare objects get one (`report.json`,
  `counts.pseudo_quality`, scored against the world's hidden truth), so the threshold (0.5) is not it;
  0.4-0.5 keeps 98% of them and drops half of the boxes on phrases that name nothing ("the weekend").
- Student from scratch, same 1500 steps, mix gold=1,pseudo=1: AP 42.6, rare 25.0 (+6.4). With
  gold=2,pseudo=1: AP 43.1, rare 23.6. The common shapes lose what the rare ones gain: half the
  gold steps, and the student's mistakes are rare shapes named as common ones (hearts as "circle",
  stars as "cross"; `student_predictions.png`).
- Student initialised from the teacher, +750 steps on gold+pseudo vs the teacher +750 steps on gold
  only: AP 49.1 vs 49.1, rare 23.8 vs 22.7: the pseudo-labels add little beyond more steps.
- Crawled phrases that name the colour less often (30% instead of 90%, so the shape word has to
  carry the box): AP 40.8, rare 20.8: not it either.
- Deep fusion: with one fusion layer the bi-attention's text update collapses token features (cosine
  similarity of "red"/"blue"/"circle"/"star" 0.3-0.8 before training, 0.8-0.94 after) and every word
  scores the same (AP 16); the demo therefore runs the tiny model without fusion (late fusion).

Open: per-token sigmoid targets never make a common word ("circle") negative on a rare shape unless the
two co-occur in one caption, and crawled rare shapes mostly appear next to other rare shapes; a world
that pairs rare with common shapes in crawled images, or more (compute-matched) student steps, are the
next things to try."""


def _run_seed(seed: int, small: bool) -> dict:
    out = OUT / (f"small{seed}" if small else f"seed{seed}")
    report = out / "report.json"
    if os.environ.get("GLIPCTL_BENCH_DEMO_REUSE") and report.exists():
        return json.loads(report.read_text())
    cmd = [str(REPO / ".venv" / "bin" / "glipctl"), "demo", "--seed", str(seed), "--out", str(out)]
    if small:
        cmd.append("--small")
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "pipelines.cli"] + cmd[1:]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"demo seed {seed} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(report.read_text())
    data["wall_s"] = round(time.time() - t0, 1)
    return data


def _stat(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def run(quick: bool) -> str:
    seeds = SEEDS[:1] if quick else SEEDS
    reports = {s: _run_seed(s, small=quick) for s in seeds}
    load = os.getloadavg()[0]
    rows = [
        ("COCO AP, all shapes", [r["teacher"]["AP"] for r in reports.values()], [r["student"]["AP"] for r in reports.values()]),
        ("AP50", [r["teacher"]["AP50"] for r in reports.values()], [r["student"]["AP50"] for r in reports.values()]),
        ("AP, rare shapes (mean)", [r["rare"]["mean"]["teacher"] for r in reports.values()],
         [r["rare"]["mean"]["student"] for r in reports.values()]),
        ("AP, common shapes (mean)", [r["counts"]["common_mean"]["teacher"] for r in reports.values()],
         [r["counts"]["common_mean"]["student"] for r in reports.values()]),
    ]
    lines = ["## demo: teacher (gold only) vs student (gold + pseudo-labels)", "",
             f"`glipctl demo{' --small' if quick else ''}` on seeds {', '.join(map(str, seeds))} "
             "(generated world, `tiny` GLIP, same steps/batch/lr for both models; AP in percent, "
             "mean ± sample standard deviation over seeds). Baseline: the teacher.", "",
             "| metric | teacher | student | student - teacher |", "|---|---:|---:|---:|"]
    for name, t, s in rows:
        diff = [b - a for a, b in zip(t, s)]
        lines.append(f"| {name} | {_stat(t)} | {_stat(s)} | {_stat(diff)} |")
    lines += ["", "Per seed (AP / rare AP, teacher -> student; pseudo-label correctness on rare shapes):", ""]
    for seed, r in reports.items():
        q = r["counts"].get("pseudo_quality", {})
        lines.append(f"- seed {seed}: AP {100 * r['teacher']['AP']:.1f} -> {100 * r['student']['AP']:.1f}, "
                     f"rare {100 * r['rare']['mean']['teacher']:.1f} -> {100 * r['rare']['mean']['student']:.1f}; "
                     f"rare pseudo boxes correct {100 * q.get('rare_precision', 0):.0f}%, "
                     f"rare objects found {100 * q.get('rare_recall', 0):.0f}%")
    stages = [k for k in next(iter(reports.values()))["seconds"]]
    lines += ["", "| seconds per stage | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for seed, r in reports.items():
        lines.append(f"| seed {seed} | " + " | ".join(f"{r['seconds'].get(k, 0):.0f}" for k in stages) + " |")
    d_all = [r["student"]["AP"] - r["teacher"]["AP"] for r in reports.values()]
    d_rare = [r["rare"]["mean"]["student"] - r["rare"]["mean"]["teacher"] for r in reports.values()]
    verdict = (f"**Does the student beat the teacher?** Overall on {sum(d > 0 for d in d_all)} of {len(d_all)} "
               f"seeds, on the rare shapes on {sum(d > 0 for d in d_rare)} of {len(d_rare)}: "
               + ("yes." if all(d > 0 for d in d_all + d_rare) else "no, not as the issue asks."))
    lines += ["", verdict, "", FINDINGS]
    lines += ["", f"Budget: 15 minutes (900 s) on 2 CPU cores. Load average when this section was written: "
              f"{load:.1f} (above 2 means other work shared the cores and the seconds are pessimistic)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(bool(os.environ.get("GLIPCTL_BENCH_QUICK"))))
