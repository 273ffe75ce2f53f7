"""Late vs deep fusion on the demo world (gold only, 3 seeds): does deep fusion train on small data?

Each run trains the demo's model (the ``tiny`` preset at the demo's resolution and anchors, no
deformable conv) on the world's gold data alone with the demo's recipe (batch 8, lr 2e-3, frozen
text encoder), in one process (``run_worker``, no Ray: the comparison is the model, not the
pipeline), then evaluates zero-shot COCO AP on the world's eval set. Configurations differ only in
the fusion tower:

* ``late``: no fusion layer (the dot product of FPN features and MiniLM tokens; GLIP's ablation).
* ``deep 1`` / ``deep 2``: 1 or 2 fusion layers with the small-data image side (DyConv with a residual,
  visual tokens not LayerNormed before the bi-attention: ``GLIPConfig.fusion_image_residual=True`` /
  ``fusion_norm_visual=False``).
* ``deep 1, official image side``: 1 layer with the official image side (no residual, LayerNorm), the
  configuration that lost before.

Two runs at a time (one thread each) on a 2-core machine. Also reported: the mean pairwise cosine of
the projected text features of the six shape names (1.0: every word scores alike).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench_out" / "fusion"
# The demo's model when this ablation was measured (the `tiny` preset at 160/224 px, anchors for the
# world's 20-60 px objects, no deformable conv); the demo now trains the `demo-t` / `demo-l` presets.
DEMO_MODEL = {"min_size": 160, "max_size": 224, "anchor_sizes": (32, 64, 128, 256), "use_deform": False,
              "num_fusion_layers": 0}
SMALL_DATA = {"fusion_image_residual": True, "fusion_norm_visual": False}
CONFIGS = {   # name -> model overrides on top of the demo's
    "late": {"num_fusion_layers": 0},
    "deep 1": {"num_fusion_layers": 1, **SMALL_DATA},
    "deep 2": {"num_fusion_layers": 2, **SMALL_DATA},
    "deep 1, official image side": {"num_fusion_layers": 1, "fusion_image_residual": False, "fusion_norm_visual": True},
}
SHAPES = "circle. square. triangle. star. heart. cross."

FINDINGS = """How the fix was found (seed 0, 1 fusion layer, 1000 steps, demo recipe; COCO AP in percent; each
row a separate run in which one piece of the fusion layer was changed for the diagnosis):

| fusion layer | AP | AP50 |
|---|---:|---:|
| none (late fusion) | 35.2 | 42.3 |
| as built for official weights (random BERT layer frozen by `--text-lr 0`) | 17.3 | 21.7 |
| BERT layer initialised as the identity (zero output projections) | 17.0 | 21.4 |
| ... and trained at the image lr (the official grouping) | 15.4 | 19.9 |
| ... frozen, and the text update's layer scale frozen at 0.01 | 16.7 | 20.9 |
| ... that, without the DyConv | 25.2 | 30.8 |
| ... that, without the LayerNorm of the visual tokens | 23.4 | 28.8 |
| random BERT layer, DyConv with a residual | 27.8 | 33.7 |
| identity BERT layer, text scale frozen, DyConv residual | 31.1 | 37.6 |
| identity BERT layer, text scale frozen, DyConv residual, no visual LayerNorm | 39.3 | 47.9 |
| **random BERT layer, DyConv residual, no visual LayerNorm** (the variant kept) | **39.8** | **50.9** |

The text features do collapse with the official image side: the mean cosine of the six shape names'
projected features is 0.995, against 0.685 for late fusion. The collapse is not made on the text
side, though. An identity BERT layer, or the text update held at its initial scale, leaves the fused
tokens about as distinct as the encoder made them (cosine 0.56, against 0.45 raw), yet AP stays at
17. What held the detector back was the image side: a freshly initialised DyConv without a residual
(its 0.01-std convs and GroupNorm replace the FPN features outright) and a channel LayerNorm of every
visual token. Both starve the word-region alignment for the first thousand steps, and the projection
then learns one vector for every word. With a residual around DyConv and no visual LayerNorm, the
same layer beats late fusion. Both switches default to the official behaviour (`make reference`
unchanged); a model opts in through its config (`GLIPConfig.fusion_image_residual` /
`fusion_norm_visual`). The demo's presets `demo-t` and `demo-l` train one such layer (at 112/160 px;
see "demo")."""


def one_run(name: str, seed: int, steps: int, world_seed_dir: Path) -> dict:
    """Train and evaluate one configuration (runs in a fresh process: ``python -m benchmarks.bench_fusion``)."""
    import pickle
    import time

    import torch
    import torch.nn.functional as F

    from glip import GLIP
    from pipelines.commands.evaluate import evaluate_model
    from pipelines.training.loop import run_worker
    from pipelines.training.options import TrainOptions
    from pipelines.training.sources import TrainingSources

    world = pickle.loads((world_seed_dir / "world.pkl").read_bytes())
    files = sorted(str(p) for p in (world_seed_dir / "gold").glob("*.tar"))
    out = world_seed_dir / name.replace(" ", "_").replace(",", "")
    out.mkdir(parents=True, exist_ok=True)
    options = TrainOptions(out=str(out), preset="tiny", model_overrides={**DEMO_MODEL, **CONFIGS[name]},
                           steps=steps, batch_size=8, lr=2e-3, text_lr=0.0, warmup=30, checkpoint_every=0,
                           keep=1, log_every=max(1, steps // 10), seed=seed, cpus_per_worker=1, loader_workers=0,
                           overwrite=True)
    start = time.perf_counter()
    run_worker({"options": options, "sources": TrainingSources(gold_files=files), "out": str(out),
                "resume_from": None, "heldout": []})
    seconds = time.perf_counter() - start
    coco = evaluate_model(out, coco=world.eval_coco_arg, batch_size=16, show_progress=False)["coco"]
    model = GLIP.from_pretrained(out).eval()
    tok = model.tokenizer(SHAPES, return_offsets_mapping=True)
    words = [i for i, (s, e) in enumerate(tok["offset_mapping"]) if e > s and SHAPES[s:e].isalpha()]
    with torch.no_grad():
        from PIL import Image
        image = Image.open(world.eval_images / json.loads(world.eval_coco_json.read_text())["images"][0]["file_name"])
        fused = model.encode([model.prepare_image(image.convert("RGB"))], [SHAPES]).head.text_hidden
        proj = F.normalize(model.head.dot_product_projection_text(F.normalize(fused, dim=-1) / 2)[0, words], dim=-1)
    n = len(words)
    cosine = float(((proj @ proj.T).sum() - n) / (n * n - n))
    return {"config": name, "seed": seed, "steps": steps, "AP": coco["AP"], "AP50": coco["AP50"],
            "cosine": cosine, "train_s": seconds}


def _prepare(seed: int, root: Path) -> Path:
    import pickle

    from pipelines.world import WorldSpec, generate_world
    from storage.records import GroundedSample  # noqa: F401  (the pickled world refers to nothing else)
    from storage.shards import ShardWriter
    from storage.goldg import load_mdetr
    from storage.skips import StageCounts

    folder = root / f"seed{seed}"
    if (folder / "world.pkl").exists():
        return folder
    world = generate_world(folder / "world", WorldSpec(seed=seed))
    samples = list(load_mdetr(world.gold_json, world.gold_images, StageCounts()))
    for start in range(0, len(samples), 64):
        with ShardWriter(folder / "gold", f"gold-{start // 64:05d}") as writer:
            for s in samples[start:start + 64]:
                writer.write(s, Path(s.extra.pop("image_path")).read_bytes())
    (folder / "world.pkl").write_bytes(pickle.dumps(world))
    return folder


def run(quick: bool) -> str:
    seeds, steps = ((0,), 60) if quick else ((0, 1, 2), 1000)
    OUT.mkdir(parents=True, exist_ok=True)
    folders = {seed: _prepare(seed, OUT) for seed in seeds}
    # the official image side was measured on seed 0 only (it is the configuration that lost: see FINDINGS)
    jobs = [(name, seed) for seed in seeds for name in CONFIGS if seed == seeds[0] or "official" not in name]

    def launch(job: tuple[str, int]) -> dict:
        name, seed = job
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_fusion", name, str(seed), str(steps),
                               str(folders[seed])], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(launch, jobs))
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    return section(rows, steps, seeds)


def section(rows: list[dict], steps: int, seeds: tuple[int, ...]) -> str:
    def stat(values: list[float]) -> str:
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * spread:.1f}"

    lines = ["## Fusion: late vs deep on the demo world (gold only)", "", __doc__.split("\n\n", 1)[1].strip(), "",
             f"{steps} steps, seeds {', '.join(map(str, seeds))}; AP in percent (mean ± stdev over seeds), "
             "per seed in brackets.", "",
             "| configuration | COCO AP | AP50 | per seed | text cosine (shape names) | train s per run |",
             "|---|---:|---:|---|---:|---:|"]
    for name in CONFIGS:
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        per_seed = " / ".join(f"{100 * r['AP']:.1f}" for r in mine)
        lines.append(f"| {name} | {stat([r['AP'] for r in mine])} | {stat([r['AP50'] for r in mine])} | "
                     f"{per_seed} | "
                     f"{statistics.mean(r['cosine'] for r in mine):.3f} | "
                     f"{statistics.mean(r['train_s'] for r in mine):.0f} |")
    return "\n".join(lines + ["", FINDINGS]) + "\n"


if __name__ == "__main__":
    name, seed, steps, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(one_run(name, seed, steps, folder)))
