"""``glipctl pack`` throughput: images/s of ``pipelines.pack.run_pack`` on a generated gold set.

The gold set is the generated world's (``pipelines.world``: MDETR JSON + JPEGs of 128-192 px,
1-3 boxes each), packed with 1 and 2 workers (the actor pool's maximum), locally (local
annotations and images -> local packed folder) and against SeaweedFS S3 on loopback
(``benchmarks/s3.py``): local input -> S3 output, and S3 input -> S3 output (the images read
from the object store). Every run packs into a fresh folder (``overwrite``), after one
unreported warm-up pack (Ray Data's first-use start-up), and its output is checked with
``storage.packed.packed_shards`` (every image packed once). *Wall*: the whole ``run_pack``
call (annotation parsing and planning on the driver, Ray Data and actor start-up, the shards,
the manifest); *pipeline*: ``PackResult.seconds`` (the Ray Data run, start-up included); *per
actor*: images over the sum of the shards' own ``seconds`` (their commit records).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

FULL_IMAGES, QUICK_IMAGES = 2000, 300
FULL_SHARD, QUICK_SHARD = 100, 50


def _world(root: Path, images: int):
    from pipelines.world import WorldSpec, generate_world

    return generate_world(root / "world", WorldSpec.small().scaled(gold_images=images, crawled_images=4,
                                                                   eval_images=4))


def _pack(annotations: str, image_root: str, out: str, workers: int, per_shard: int) -> dict:
    from pipelines.pack import PackOptions, PackSpec, run_pack
    from storage.manifest import Manifest
    from storage.packed import packed_shards

    t0 = time.perf_counter()
    result = run_pack([PackSpec("gold", annotations, image_root)], out,
                      PackOptions(samples_per_shard=per_shard, workers=workers, overwrite=True))
    wall = time.perf_counter() - t0
    shards = packed_shards([out], "grounding", "--gold")
    manifest = Manifest.load(out)
    totals = manifest.totals()
    shard_s = sum(float(e.get("seconds") or 0) for e in manifest.shards.values() if e.get("status") == "done")
    return {"images": result.images, "wall": wall, "pipeline": result.seconds, "shards": len(shards),
            "shard_s": shard_s, "written": totals["written"], "failed": len(result.failed),
            "skipped": totals["skipped"]}


def _row(where: str, workers: int, r: dict, image_bytes: int, n: int) -> str:
    ok = "yes" if r["written"] == n and r["images"] == n and not r["failed"] else \
        f"NO ({r['written']} of {n}, {r['failed']} failed, skipped {r['skipped']})"
    pipeline = r["pipeline"] or float("nan")
    shard_s = r["shard_s"] or float("nan")
    return (f"| {where} | {workers} | {r['images']:,} | {r['shards']} | {r['wall']:.1f} | "
            f"{r['images'] / r['wall']:,.0f} | {r['images'] / pipeline:,.0f} | "
            f"{image_bytes / 2 ** 20 / pipeline:,.1f} | {r['written'] / shard_s:,.0f} | {ok} |")


def run(quick: bool) -> str:
    from benchmarks.s3 import seaweedfs
    from pipelines.common import ensure_ray
    from storage import fs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n, per_shard = (QUICK_IMAGES, QUICK_SHARD) if quick else (FULL_IMAGES, FULL_SHARD)
    worker_counts = (1, 2)
    root = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    try:
        world = _world(root, n)
        ann, images = str(world.gold_json), str(world.gold_images)
        image_bytes = sum(p.stat().st_size for p in world.gold_images.iterdir())
        ensure_ray(None)
        warm = _world(root / "warm", 20)
        _pack(str(warm.gold_json), str(warm.gold_images), str(root / "warm-out"), 2, 10)
        rows = []
        local = {}
        for workers in worker_counts:
            local[workers] = _pack(ann, images, str(root / f"local-{workers}"), workers, per_shard)
            rows.append(_row("local -> local", workers, local[workers], image_bytes, n))
        s3_note = ""
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(seaweedfs())
            except Exception as exc:  # noqa: BLE001 - no weed binary: the local numbers stand alone
                print(f"bench pack: no SeaweedFS ({exc}); S3 rows left out", file=sys.stderr)
                server, s3_note = None, f"S3 rows left out: SeaweedFS did not start ({exc})."
            if server is not None:
                for workers in worker_counts:
                    r = _pack(ann, images, server.uri(f"packed-local-in-{workers}"), workers, per_shard)
                    rows.append(_row("local -> S3", workers, r, image_bytes, n))
                t0 = time.perf_counter()
                fs.upload_tree(world.gold_json.parent, server.uri("gold"))
                upload_s = time.perf_counter() - t0
                s3_ann = server.uri("gold", world.gold_json.name)
                s3_images = server.uri("gold", world.gold_images.name)
                for workers in (worker_counts if not quick else (2,)):
                    r = _pack(s3_ann, s3_images, server.uri(f"packed-s3-in-{workers}"), workers, per_shard)
                    rows.append(_row("S3 -> S3", workers, r, image_bytes, n))
                s3_note = (f"S3: SeaweedFS `weed mini` on loopback, the same machine (uploading the gold set to "
                           f"it took {upload_s:.1f} s, not counted).")
        speedup = (local[2]["images"] / local[2]["pipeline"]) / (local[1]["images"] / local[1]["pipeline"])
        cores = os.cpu_count() or 1
        return "\n".join([
            "## pack",
            "",
            f"`run_pack` of one gold (MDETR) file: {n:,} generated images (128-192 px JPEGs, "
            f"{image_bytes / 2 ** 20:.1f} MiB, ~{image_bytes / n / 1000:.0f} KB each), {per_shard} samples a shard "
            f"({-(-n // per_shard)} shards), workers = the actor pool's maximum. Each shard: its records, the image "
            "bytes (a few reads in flight), header + reduced-size decode check, the tar + label table, the "
            "commit record.",
            "",
            "| input -> output | workers | images | shards | wall s | images/s (wall) | images/s (pipeline) | "
            "image MiB/s (pipeline) | images/s per actor (shard time) | every image packed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            *rows,
            "",
            f"2 workers vs 1, local, pipeline: {speedup:.2f}x on {cores} cores (load average "
            f"{os.getloadavg()[0]:.1f} at the end; the driver and Ray's own processes share those cores). "
            + s3_note,
            "",
            "*Per actor (shard time)*: images over the sum of the shards' own `seconds` (commit records: "
            "records, image reads, checks, tar + table, commit), i.e. what one actor does once running. "
            "The gap between it (times the workers) and the pipeline rate is the fixed cost of a run (Ray Data "
            "and actor start-up, the driver's planning and manifest), which dominates at these sizes and "
            "shrinks with the data; on this 2-core machine 2 actors also share their cores with the driver "
            "and Ray's own processes.",
        ])
    finally:
        shutil.rmtree(root, ignore_errors=True)
