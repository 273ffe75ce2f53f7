"""Training: ``glipctl train-student`` (Ray Train) vs a plain loop; the streamed data path; scale.

Three sections.

1. *Throughput*: the plain loop is the same model, the same data (``WorkerBatches`` over
   ``MixedFeed``: shard streams, decode + augment), the same AdamW and clipping, in one process
   without Ray, DDP, metrics or checkpoints: what the Ray Train path costs on top of the
   training itself. Both with ``--loader-workers 0`` (data in the training thread) so the
   comparison is the one made before the streamed data path existed.
2. *Data path*: ``--loader-workers 1`` (each training worker decodes + augments in a
   DataLoader process) vs ``0`` (in the training thread), 2 Ray Train workers, same settings;
   and in the plain loop (1 process) the share of the step spent waiting in
   ``WorkerBatches.next_batch``, loader 0 vs 1.
3. *Scale*: 10k vs 200k gold records (packed folders, 1000 records a shard): per-worker peak
   RSS, the driver's shard lists (pickled ``TrainingSources``) and start-up seconds, beside
   what the old design shipped in the Ray Train config (the records themselves).

Every process runs ``torch.set_num_threads(1)`` (one CPU per worker). Throughput is measured
after the first ``WARM`` steps (start-up, first-call allocations, the DataLoader's start) and
excludes Ray Train's start-up, which is reported apart. Peak memory is each process's max RSS.

With a GPU: ``glip-t`` at 800 px, bf16 autocast, samples/s of the plain loop.
"""
from __future__ import annotations

import io
import os
import pickle
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

WARM = 2
REPO = Path(__file__).resolve().parents[1]
CAPTIONS_TSV = Path("/work/shared/data/flickr8k_captions.tsv")
SCALE_SHARD = 1000                   # records per packed shard in the scale section (glipctl pack's default)
SCALE_SIZES = (10_000, 200_000)
PHOTO = (640, 480)                   # the data-path-alone rows: photo-sized JPEGs at the GPU resolution
FEED_SIZE = (800, 1333)


# ----------------------------------------------------------------------------- packed data

def write_packed(folder: Path, samples: Iterable[tuple[object, bytes]], per_shard: int, dataset: str,
                 labels: bool = False) -> list[str]:
    """Write ``(GroundedSample, image bytes)`` as a packed gold folder, the way ``glipctl pack``
    lays it out (``storage.packed``): ``{dataset}-{i:05d}-00000.tar`` per shard of ``per_shard``
    samples, each shard's commit record (kind "grounding"), then the ``pack`` manifest.
    Returns the shard names. ``labels=False`` leaves out the label tables (training never reads them)."""
    from storage.manifest import Manifest, commit_shard
    from storage.packed import STAGE
    from storage.shards import ShardWriter

    manifest = Manifest(stage=STAGE, options={"samples_per_shard": per_shard, "bench": True})
    names: list[str] = []
    it = iter(samples)
    while True:
        name = f"{dataset}-{len(names):05d}"
        writer = ShardWriter(folder, name, max_samples=per_shard + 1, labels=labels)
        written = 0
        with writer:
            for sample, data in it:
                writer.write(sample, data)
                written += 1
                if written == per_shard:
                    break
        if not written:
            break
        entry = {"status": "done", "stage": STAGE, "kind": "grounding", "dataset": dataset,
                 "outputs": writer.outputs, "labels": writer.labels,
                 "counts": {"read": written, "written": written, "skipped": {}},
                 "records": [len(names) * per_shard, len(names) * per_shard + written]}
        commit_shard(str(folder), name, entry)
        manifest.shards[name] = entry
        names.append(name)
        if written < per_shard:
            break
    manifest.save(str(folder))
    return names


def _tiny_jpeg(width: int = 64, height: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (40, 120, 200))
    ImageDraw.Draw(image).rectangle([8, 8, 40, 30], fill=(220, 60, 30))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _captions() -> list[str]:
    if CAPTIONS_TSV.exists():
        rows = CAPTIONS_TSV.read_text(encoding="utf-8").splitlines()[1:]
        caps = [r.split("\t", 1)[1].strip() for r in rows if "\t" in r]
        caps = [c for c in caps if len(c) >= 8]
        if caps:
            return caps
    return [f"a red box on a blue wall number {i}" for i in range(1000)]


def synthetic_gold(n: int, with_image_path: str | None = None, jpeg: bytes | None = None,
                   size: tuple[int, int] = (64, 48)) -> Iterator[tuple[object, bytes]]:
    """``n`` gold records on one JPEG (default: 64x48) reused for every record: real Flickr8k
    captions, one box on the first word."""
    from storage.records import Box, GroundedSample, Phrase

    jpeg, captions = jpeg or _tiny_jpeg(*size), _captions()
    w, h = size
    box = [w / 8, h / 6, w / 2, h / 2]
    for i in range(n):
        caption = captions[i % len(captions)]
        end = caption.find(" ", 2)
        end = end if 0 < end <= 24 else min(len(caption), 12)
        extra = {"image_path": f"{with_image_path}/{i:09d}.jpg"} if with_image_path else {}
        yield GroundedSample(f"bench/{i}/0", caption, w, h, [Phrase(caption[:end], 0, end)],
                             [Box(list(box), [[0, end]], 0, 1.0)], "goldg/flickr", extra), jpeg


def _data(root: Path, quick: bool) -> tuple[Path, Path]:
    """The generated world's gold set, packed (16 a shard), and its pseudo-label twin."""
    from pipelines.world import WorldSpec, generate_world
    from storage.goldg import load_mdetr
    from storage.records import Box, GroundedSample
    from storage.shards import ShardWriter
    from storage.skips import StageCounts

    world = generate_world(root / "world", WorldSpec.small().scaled(gold_images=32 if quick else 64,
                                                                    crawled_images=4, eval_images=4))
    samples = []
    for s in load_mdetr(world.gold_json, world.gold_images, StageCounts()):
        samples.append((s, Path(s.extra.pop("image_path")).read_bytes()))   # as `glipctl pack` stores them
    write_packed(root / "gold", samples, 16, "mdetr_gold")
    with ShardWriter(root / "pseudo", "00000", max_samples=16) as writer:
        for s, data in samples:
            boxes = [Box(b.bbox, b.tokens_positive, b.phrase, 0.8) for b in s.boxes]
            writer.write(GroundedSample("p-" + s.key.replace("/", "_"), s.caption, s.width, s.height, s.phrases,
                                        boxes, "pseudo/bench", {}), data)
    return root / "gold", root / "pseudo"


def _options(gold: list[str], pseudo: list[str], root: Path, out: str, steps: int, workers: int,
             size: tuple[int, int], batch: int, loader_workers: int):
    from pipelines.training import TrainOptions

    return TrainOptions(out=str(root / out), gold=list(gold), pseudo=list(pseudo),
                        model_overrides={"min_size": size[0], "max_size": size[1]},
                        steps=steps, batch_size=batch, warmup=0, workers=workers, checkpoint_every=0,
                        log_every=1, seed=0, loader_workers=loader_workers, overwrite=True)


# ----------------------------------------------------------------------------- the plain loop

def plain_loop(options, device: str = "cpu", amp: bool = False) -> dict:
    """The reference: build, then ``options.steps`` steps of batch -> forward -> backward -> AdamW,
    the batches from ``WorkerBatches`` (rank 0 of 1, ``options.loader_workers``) as a training
    worker gets them. Times ``next_batch`` apart: the share of the step spent waiting for data."""
    import torch

    from pipelines.training.loader import FeedSpec, WorkerBatches
    from pipelines.training.loop import build_model
    from pipelines.training.schedule import build_optimizer
    from pipelines.training.sources import prepare_sources

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sources = prepare_sources(options.gold, options.detection, options.pseudo, options.out)
    model = build_model(options).to(device).train()
    optimizer, scheduler = build_optimizer(model, options.lr, options.text_lr, options.weight_decay,
                                           options.steps, options.warmup, options.schedule)
    cfg = model.config
    batches = WorkerBatches(FeedSpec(sources, options, cfg.min_size, cfg.max_size, cfg.max_query_len),
                            0, 1, options.batch_size, options.loader_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    start, waited = None, 0.0
    try:
        for step in range(options.steps):
            if step == WARM:
                if device == "cuda":
                    torch.cuda.synchronize()
                start, waited = time.perf_counter(), 0.0
            t0 = time.perf_counter()
            batch = batches.next_batch()
            waited += time.perf_counter() - t0
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                losses = model([e.image.to(device) for e in batch], [e.caption for e in batch],
                               [{"boxes": e.boxes.to(device), "tokens_positive": e.tokens_positive,
                                 "tokens_ignore": e.tokens_ignore} for e in batch])
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            optimizer.step()
            scheduler.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        batches.close()
    steps = options.steps - WARM
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    return {"samples_per_s": steps * options.batch_size / seconds, "peak_mb": peak,
            "wait_share": waited / seconds, "wait_ms": 1000 * waited / steps, "step_ms": 1000 * seconds / steps}


def feed_rate(options, batches_timed: int = 30) -> dict:
    """The data path alone: ``WorkerBatches.next_batch`` of rank 0 of 1 with ``options.loader_workers``,
    no model (the training resolution from ``options.model_overrides``), timed after ``WARM`` batches."""
    import torch

    from pipelines.training.loader import FeedSpec, WorkerBatches
    from pipelines.training.sources import prepare_sources

    torch.set_num_threads(1)
    sources = prepare_sources(options.gold, options.detection, options.pseudo, options.out)
    o = options.model_overrides
    batches = WorkerBatches(FeedSpec(sources, options, o["min_size"], o["max_size"], 256), 0, 1,
                            options.batch_size, options.loader_workers)
    try:
        for _ in range(WARM):
            batches.next_batch()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(batches_timed):
            batch = batches.next_batch()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        batches.close()
    samples = batches_timed * options.batch_size
    return {"samples_per_s": samples / seconds, "ms_per_sample": 1000 * seconds / samples,
            "main_cpu_ms_per_sample": 1000 * cpu / samples, "shape": list(batch[0].image.shape)}


def _photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-sized JPEG with smooth structure (decode cost ~ a real photo's: it is the pixel count)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _in_subprocess(function: str, options) -> dict:
    """``function(options)`` of this module in a fresh process (``_plain_in_subprocess``)."""
    import json
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as fh:
        pickle.dump(options, fh)
    code = (f"import json, pickle, sys; from benchmarks.bench_train_student import {function}; "
            f"print(json.dumps({function}(pickle.load(open({fh.name!r}, 'rb')))))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=str(REPO), start_new_session=True)
    finally:
        os.unlink(fh.name)
    if done.returncode:
        raise RuntimeError(f"{function} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plain_in_subprocess(options) -> dict:
    """The plain loop in a fresh process, so its peak RSS is its own.

    Like a Ray worker it gets ``OMP_NUM_THREADS=1`` (one CPU) and a session of its own (the
    kernel's autogroup scheduling shares the CPU between sessions, and Ray's processes run in
    theirs), so both sides are scheduled alike.
    """
    return _in_subprocess("plain_loop", options)


# ----------------------------------------------------------------------------- Ray Train runs

class _PeakWatch:
    """Polls the peak RSS (``VmHWM``) of this process's Ray Train workers and of their own child
    processes (the DataLoader workers of ``--loader-workers``, which ``TrainResult.peak_memory_mb``
    does not see: it is each training process's own ``getrusage``). Pages a loader process shares
    with its parent after the fork count in both."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks: dict[int, tuple[str, float]] = {}    # pid -> ("worker" | "loader", MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_PeakWatch":
        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _hwm_mb(pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval):
            try:
                procs = me.children(recursive=True)
            except psutil.Error:
                continue
            workers = set()
            for p in procs:
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()) and p.ppid() not in workers:
                        parent = psutil.Process(p.ppid())
                        if "RayTrainWorker" not in " ".join(parent.cmdline()):
                            workers.add(p.pid)
                except psutil.Error:
                    continue
            for p in procs:
                try:
                    role = "worker" if p.pid in workers else ("loader" if p.ppid() in workers else None)
                except psutil.Error:
                    continue
                if role is None:
                    continue
                mb = self._hwm_mb(p.pid)
                if mb is not None:
                    self.peaks[p.pid] = (role, max(mb, self.peaks.get(p.pid, (role, 0.0))[1]))

    def max_of(self, role: str) -> float | None:
        values = [mb for r, mb in self.peaks.values() if r == role]
        return max(values) if values else None


def _ray_run(options) -> dict:
    """One ``train()``: steady samples/s, wall, start-up outside the loop, per-worker peaks."""
    from pipelines.training import train

    with _PeakWatch() as watch:
        t0 = time.perf_counter()
        result = train(options, progress=False)
        wall = time.perf_counter() - t0
    rows = [r for r in result.metrics if r["step"] >= WARM]
    first, last = rows[0], rows[-1]
    rate = (last["step"] - first["step"]) * options.batch_size * options.workers / (last["elapsed_s"] - first["elapsed_s"])
    loop_s = result.metrics[-1]["elapsed_s"]
    return {"rate": rate, "wall": wall, "outside_loop_s": wall - loop_s,
            "first_step_s": result.metrics[0]["elapsed_s"],
            "peak": max(p["rss"] for p in result.peak_memory_mb),
            "peaks": [p["rss"] for p in result.peak_memory_mb],
            "watch_worker": watch.max_of("worker"), "watch_loader": watch.max_of("loader")}


# ----------------------------------------------------------------------------- sections

def _throughput_and_loader(root: Path, quick: bool) -> list[str]:
    steps, size, batch = (10, (96, 128), 2) if quick else (30, (128, 192), 2)
    gold, pseudo = _data(root, quick)
    g, p = [str(gold)], [str(pseudo)]
    plain0 = _options(g, p, root, "plain0", steps, 1, size, batch, 0)
    plain1 = _options(g, p, root, "plain1", steps, 1, size, batch, 1)
    plains0 = [_plain_in_subprocess(plain0)]
    plains1 = [_plain_in_subprocess(plain1)]
    ray0 = {}
    if not quick:    # quick mode (a smoke run) leaves out the 1-worker run and the second baseline
        ray0[1] = _ray_run(_options(g, p, root, "ray1-l0", steps, 1, size, batch, 0))
        plains0.append(_plain_in_subprocess(plain0))    # the baseline again, between the Ray runs: load drifts
    ray0[2] = _ray_run(_options(g, p, root, "ray2-l0", steps, 2, size, batch, 0))
    ray1 = {2: _ray_run(_options(g, p, root, "ray2-l1", steps, 2, size, batch, 1))}
    if not quick:
        ray1[1] = _ray_run(_options(g, p, root, "ray1-l1", steps, 1, size, batch, 1))
        plains1.append(_plain_in_subprocess(plain1))
    photo = root / "photo"
    write_packed(photo, synthetic_gold(64, jpeg=_photo_jpeg(*PHOTO), size=PHOTO), 16, "photo")
    feeds = {loader: _in_subprocess("feed_rate", _options([str(photo)], [], root, f"feed{loader}", 1, 1,
                                                          FEED_SIZE, 2, loader))
             for loader in ((0, 1) if quick else (0, 1, 2))}
    load = os.getloadavg()[0]
    # the faster baseline run: the conservative choice for the ratios below
    plain = max(plains0, key=lambda r: r["samples_per_s"])
    p1 = max(plains1, key=lambda r: r["samples_per_s"])
    plain_runs = " / ".join(f"{r['samples_per_s']:.2f}" for r in plains0)

    lines = [
        "## train-student",
        "",
        "### Throughput: Ray Train vs a plain loop",
        "",
        f"Tiny preset, images {size[0]}-{size[1]} px (shorter side / max), batch {batch} per worker, "
        f"{steps} steps (throughput over steps {WARM + 1}-{steps}), gold (packed, 16 a shard) + pseudo mixed 1:1, "
        "1 CPU thread per process, CPU only, `--loader-workers 0` on both sides (the data in the training "
        "thread, as before the streamed data path).",
        "",
        "| path | samples/s | vs plain loop | wall s (incl. start-up) | peak RSS MiB per process |",
        "|---|---:|---:|---:|---:|",
        f"| plain single-process loop (baseline, best of {len(plains0)}: {plain_runs}) | "
        f"{plain['samples_per_s']:.2f} | 1.00x | - | {plain['peak_mb']:.0f} |",
    ]
    for workers, r in sorted(ray0.items()):
        lines.append(f"| train-student, {workers} worker{'s' if workers > 1 else ''} (Ray Train, gloo DDP) | "
                     f"{r['rate']:.2f} | {r['rate'] / plain['samples_per_s']:.2f}x | {r['wall']:.0f} | {r['peak']:.0f} |")
    lines += ["", "Goal: 1 worker >= 0.9x the plain loop." + (" (Quick mode: no 1-worker run.)" if quick else ""), ""]

    lines += [
        "### Data path: decode + augment in a DataLoader process (`--loader-workers 1`) vs the training thread (`0`)",
        "",
        "Same data and settings as above. Ray Train rows: steady samples/s of the whole job; the peak RSS column "
        "is each training process's own (`TrainResult.peak_memory_mb`), the loader column the DataLoader "
        "process's peak (VmHWM polled from /proc; it shares the training process's pages from the fork, so "
        "the two do not add up). Plain-loop rows: one process, time spent in `WorkerBatches.next_batch` "
        "against the whole step.",
        "",
        "| run | loader workers | samples/s | vs loader 0 | waiting for data (share of step) | "
        "ms per step (of which waiting) | peak RSS MiB (training / loader) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| plain loop, 1 process | 0 | {plain['samples_per_s']:.2f} | 1.00x | {100 * plain['wait_share']:.0f}% | "
        f"{plain['step_ms']:.0f} ({plain['wait_ms']:.0f}) | {plain['peak_mb']:.0f} / - |",
        f"| plain loop, 1 process | 1 | {p1['samples_per_s']:.2f} | {p1['samples_per_s'] / plain['samples_per_s']:.2f}x | "
        f"{100 * p1['wait_share']:.0f}% | {p1['step_ms']:.0f} ({p1['wait_ms']:.0f}) | {p1['peak_mb']:.0f} / - |",
    ]
    for workers in sorted(ray1, reverse=True):
        base, new = ray0[workers], ray1[workers]
        name = f"train-student, {workers} worker{'s' if workers > 1 else ''}"
        loader_mb = f"{new['watch_loader']:.0f}" if new["watch_loader"] else "?"
        lines.append(f"| {name} | 0 | {base['rate']:.2f} | 1.00x | - | - | {base['peak']:.0f} / - |")
        lines.append(f"| {name} | 1 | {new['rate']:.2f} | {new['rate'] / base['rate']:.2f}x | - | - | "
                     f"{new['peak']:.0f} / {loader_mb} |")
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"This machine has {cores} cores (load average {load:.1f} at the end of these runs). A DataLoader "
        "process can only take decode + augment off the step when there is a core for it. The 1-process "
        "plain loop has a spare core; 2 Ray Train workers with `--loader-workers 1` are 4 busy processes on "
        f"{cores} cores, "
        + ("so there is no spare core for the loaders on this machine and no gain is to be expected there "
           "(they can only add their IPC and scheduling). "
           if cores <= 2 else "so their gain depends on the spare cores beside the workers. ")
        + f"And at this resolution there is little to hide anyway: in the plain loop with loader 0 the data "
        f"is {plain['wait_ms']:.0f} ms of a {plain['step_ms']:.0f} ms step ({100 * plain['wait_share']:.0f}%), "
        "the tiny model's CPU forward/backward is the rest. The loader matters where the step is fast and "
        "the images large (a GPU at 800 px): the next table.",
        "",
        f"*The data path alone* (no model: `WorkerBatches.next_batch` in a loop, 1 process): {PHOTO[0]}x{PHOTO[1]} "
        f"JPEGs decoded and augmented to the GPU training resolution ({FEED_SIZE[0]}-{FEED_SIZE[1]} px, "
        f"tensors {'x'.join(map(str, feeds[0]['shape']))}), batch 2. What one training worker can be fed: "
        "with loader processes this is the rate the GPU step must not exceed for the wait to stay hidden.",
        "",
        "| loader workers | samples/s | ms per sample | training-process CPU ms per sample | vs loader 0 |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {loader} | {r['samples_per_s']:.1f} | {r['ms_per_sample']:.1f} | {r['main_cpu_ms_per_sample']:.1f} | "
          f"{r['samples_per_s'] / feeds[0]['samples_per_s']:.2f}x |" for loader, r in feeds.items()],
        "",
        "The CPU column is what the training process itself still spends per sample (with loaders: "
        "receiving the batch from the loader process, shared-memory tensors); the rest of the decode and "
        "augment is off its thread. Loader 2 can only beat loader 1 with a second free core.",
        "",
    ]
    return lines


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _old_design(n: int) -> tuple[int, float]:
    """What the old design cost for ``n`` gold records (``load_gold``'s ``GroundedSample``s with
    ``extra["image_path"]``): their pickled size (they travelled in the Ray Train config) and the
    resident memory of holding them unpickled (every worker did), in MiB."""
    import gc

    gc.collect()
    before = _rss_mb()
    records = [s for s, _ in synthetic_gold(n, with_image_path="/data/flickr30k/flickr30k-images")]
    held = _rss_mb() - before
    size = len(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
    del records
    gc.collect()
    return size, held


def _scale(root: Path, quick: bool) -> list[str]:
    from pipelines.training.sources import prepare_sources
    from storage.packed import packed_shards

    steps, size, batch = (4, (96, 128), 2) if quick else (12, (96, 128), 2)
    info = {}
    for n in SCALE_SIZES:
        folder = root / f"gold{n // 1000}k"
        t0 = time.perf_counter()
        names = write_packed(folder, synthetic_gold(n), SCALE_SHARD, f"flickr{n // 1000}k")
        write_s = time.perf_counter() - t0
        listed = packed_shards([str(folder)], "grounding", "--gold")
        assert len(listed) == len(names) == -(-n // SCALE_SHARD), (len(listed), len(names))
        prepare_sources([str(folder)], [], [], str(root / "unused"))    # imports, page cache: untimed
        t0 = time.perf_counter()
        sources = prepare_sources([str(folder)], [], [], str(root / "unused"))
        prepare_s = time.perf_counter() - t0
        old_bytes, old_held = _old_design(n)
        info[n] = {"folder": folder, "n": n, "shards": len(names), "write_s": write_s, "prepare_s": prepare_s,
                   "config": len(pickle.dumps(sources, protocol=pickle.HIGHEST_PROTOCOL)),
                   "old": old_bytes, "old_held": old_held}
    # sizes interleaved, and in full mode loader 0 twice (start-up is noisy on a shared machine)
    plan = [(n, 0) for n in SCALE_SIZES]
    if not quick:
        plan += [(n, 1) for n in SCALE_SIZES] + [(n, 0) for n in SCALE_SIZES]
    rows = []
    for i, (n, loader) in enumerate(plan):
        r = _ray_run(_options([str(info[n]["folder"])], [], root, f"scale{n}-l{loader}-{i}", steps, 2, size,
                              batch, loader))
        rows.append({**info[n], "loader": loader, **r})
    for n in SCALE_SIZES:
        shutil.rmtree(info[n]["folder"], ignore_errors=True)
    loaders = sorted({loader for _, loader in plan})
    lines = [
        f"### Scale: {SCALE_SIZES[0] // 1000}k vs {SCALE_SIZES[1] // 1000}k gold records",
        "",
        f"Packed gold folders written by the bench ({SCALE_SHARD:,} records a shard, pack manifest + commit "
        "records as `glipctl pack` writes them, checked with `storage.packed.packed_shards`; every record "
        "one 64x48 JPEG and a real Flickr8k caption), trained with `train()` for "
        f"{steps} steps, 2 workers, batch {batch}, images {size[0]}-{size[1]} px. *Shard lists*: the pickled "
        "`TrainingSources` the Ray Train config carries; *old design*: the pickled `GroundedSample` list "
        "(`extra.image_path` set, as `load_gold` made it) that used to travel in the config instead, and "
        "the resident memory of holding it unpickled (the driver's RSS growth while building it), which "
        "every worker paid on top of its model. "
        "*Start-up*: wall time of `train()` minus the loop's own clock (the last metrics row's `elapsed_s`): "
        "driver checks + `prepare_sources` + starting the worker group + building the model, and the final "
        "checkpoint + shutdown; *first step*: the first row's `elapsed_s` (first batch included, DataLoader "
        "start with loader workers). Peak RSS per worker: `TrainResult.peak_memory_mb` (max over ranks).",
        "",
        "| gold records | shards | loader workers | shard lists (config) | old design: records in config / "
        "held per worker | `prepare_sources` ms | start-up s | first step s | peak RSS MiB per worker | "
        "loader process MiB | samples/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loader_mb = f"{r['watch_loader']:.0f}" if r["loader"] and r["watch_loader"] else "-"
        lines.append(f"| {r['n']:,} | {r['shards']} | {r['loader']} | {r['config'] / 1024:,.1f} KiB | "
                     f"{r['old'] / 2 ** 20:,.1f} MiB / {r['old_held']:,.0f} MiB | {1000 * r['prepare_s']:,.1f} | "
                     f"{r['outside_loop_s']:.1f} | "
                     f"{r['first_step_s']:.1f} | {r['peak']:.0f} | {loader_mb} | {r['rate']:.2f} |")
    verdicts = []
    for loader in loaders:
        runs = {n: [r for r in rows if r["n"] == n and r["loader"] == loader] for n in SCALE_SIZES}
        small, big = (runs[n] for n in SCALE_SIZES)
        rss = max(r["peak"] for r in big) / max(r["peak"] for r in small) - 1
        start = min(r["outside_loop_s"] for r in big) / min(r["outside_loop_s"] for r in small) - 1
        best = f" (best of {len(small)})" if len(small) > 1 else " (one run each)"
        verdicts.append(f"loader {loader}: peak RSS per worker {100 * rss:+.1f}%, start-up{best} {100 * start:+.1f}% "
                        f"({'within' if abs(rss) <= 0.10 and abs(start) <= 0.10 else 'NOT within'} 10%)")
    write = ", ".join(f"{n // 1000}k in {info[n]['write_s']:.0f} s" for n in SCALE_SIZES)
    lines += ["", f"{SCALE_SIZES[1] // 1000}k vs {SCALE_SIZES[0] // 1000}k: " + "; ".join(verdicts)
              + f". Writing the folders took {write}. Start-up on this shared 2-core machine moves by several "
              "seconds from run to run whatever the data (it is almost all Ray Train starting the worker "
              "group; `prepare_sources` is milliseconds), so compare it over repeated, interleaved runs "
              "(full mode) before reading a difference as real.", ""]
    return lines


def run(quick: bool) -> str:
    import torch

    from pipelines.common import ensure_ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        ensure_ray(None)
        lines = _throughput_and_loader(root, quick)
        lines += _scale(root, quick)
        if torch.cuda.is_available():
            gold, pseudo = root / "gold", root / "pseudo"
            options = _options([str(gold)], [str(pseudo)], root, "gpu", 12, 1, (800, 1333), 2, 1)
            options.preset, options.model_overrides = "glip-t", {}
            gpu = plain_loop(options, device="cuda", amp=True)
            lines += [f"GPU ({torch.cuda.get_device_name()}): glip-t, 800 px, bf16 autocast, batch 2, "
                      f"`--loader-workers 1`: {gpu['samples_per_s']:.2f} samples/s, peak CUDA memory "
                      f"{gpu['peak_mb']:.0f} MiB, {100 * gpu['wait_share']:.0f}% of the step waiting for data."]
        else:
            lines += ["No GPU in this run: the glip-t / 800 px / bf16 number is not measured."]
        return "\n".join(lines)
    finally:
        shutil.rmtree(root, ignore_errors=True)
