"""pseudo-label: the real Ray pipeline with a real tiny GLIP teacher on generated images.

The inputs are an img2dataset-style folder (tars of {key}.jpg/.txt/.json) with every kind
of bad record the issue lists, and phrase files written with storage.phrase_files. The
teacher is ``GLIP.from_preset("tiny")`` with random weights saved to disk: its boxes are
random, so the tests use a low threshold and check structure, not accuracy.
"""
from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.phrase_files import write_phrase_file
from storage.records import span_is_valid
from storage.skips import StageCounts

IMAGE_SIZE = 64          # --image-size: the teacher sees 64 px images (fast on CPU)
THRESHOLD = 0.05         # random weights: a low threshold so that boxes exist


# ----------------------------------------------------------------------------- inputs
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _scene(seed: int, w: int = 96, h: int = 80) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y:y + h // 3, x:x + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 30000 x 30000 pixels."""
    data = bytearray(_encode(Image.new("L", (16, 16)), "PNG"))
    i = data.index(b"IHDR")
    data[i + 4:i + 12] = struct.pack(">II", 30000, 30000)
    data[i + 17:i + 21] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 17])))
    return bytes(data)


def _alpha_png(seed: int) -> bytes:
    img = _scene(seed).convert("RGBA")
    img.putalpha(Image.new("L", img.size, 128))
    return _encode(img, "PNG")


def _phrases(caption: str, words: list[str]) -> list[dict]:
    out = []
    for w in words:
        s = caption.index(w)
        out.append({"text": w, "start": s, "end": s + len(w), "root": w.split()[-1]})
    return out


GOOD_CAPTIONS = ["a red square on a blue background", "a green box next to a yellow wall",
                 "the purple block and the grey floor", "an orange tile above a white sky"]
GOOD_PHRASES = [["a red square", "a blue background"], ["a green box", "a yellow wall"],
                ["the purple block", "the grey floor"], ["an orange tile", "a white sky"]]


def build_inputs(root: Path, n_shards: int = 2, good_per_shard: int = 4, bad: bool = True) -> dict:
    """img2dataset-style crawled folder + phrase folder. Returns paths and expected counts."""
    crawled, phrases = root / "crawled", root / "phrases"
    crawled.mkdir(parents=True)
    phrases.mkdir(parents=True)
    expected_skips: Counter = Counter()
    good_keys = []
    for s in range(n_shards):
        shard = f"{s:05d}"
        members: list[tuple[str, bytes, str]] = []     # (key, image bytes, caption)
        rows = []
        for i in range(good_per_shard):
            key = f"{shard}{i:04d}"
            j = (s * good_per_shard + i) % len(GOOD_CAPTIONS)
            members.append((key, _encode(_scene(100 * s + i), "JPEG", quality=85), GOOD_CAPTIONS[j]))
            rows.append({"key": key, "caption": GOOD_CAPTIONS[j],
                         "phrases": _phrases(GOOD_CAPTIONS[j], GOOD_PHRASES[j])})
            good_keys.append(key)
        if bad and s == 0:
            # decodable oddities that must be labeled: PNG alpha, grayscale, CMYK
            for suffix, data in (("alpha", _alpha_png(7)), ("gray", _encode(_scene(8).convert("L"), "JPEG")),
                                 ("cmyk", _encode(_scene(9).convert("CMYK"), "JPEG"))):
                key = f"{shard}{suffix}"
                members.append((key, data, GOOD_CAPTIONS[0]))
                rows.append({"key": key, "caption": GOOD_CAPTIONS[0],
                             "phrases": _phrases(GOOD_CAPTIONS[0], GOOD_PHRASES[0])})
                good_keys.append(key)
            noise = np.random.default_rng(10).integers(0, 255, (96, 96, 3), dtype=np.uint8)
            full = _encode(Image.fromarray(noise), "JPEG", quality=90)   # cut in the scan data
            for suffix, data, reason in (
                    ("corrupt", b"\xff\xd8\xff\xe0 this is not really a jpeg", "corrupt_image"),
                    ("truncated", full[: len(full) // 2], "truncated_image"),
                    ("onepixel", _encode(Image.new("RGB", (1, 1)), "PNG"), "image_too_small"),
                    ("bomb", _bomb_png(), "decompression_bomb")):
                key = f"{shard}{suffix}"
                members.append((key, data, GOOD_CAPTIONS[0]))
                rows.append({"key": key, "caption": GOOD_CAPTIONS[0],
                             "phrases": _phrases(GOOD_CAPTIONS[0], GOOD_PHRASES[0])})
                expected_skips[reason] += 1
            members.append((f"{shard}nophraserow", _encode(_scene(11), "JPEG"), "an image nobody parsed"))
            expected_skips["no_phrase_row"] += 1
            members.append((f"{shard}nophrases", _encode(_scene(12), "JPEG"), "hello world"))
            rows.append({"key": f"{shard}nophrases", "caption": "hello world", "phrases": []})
            expected_skips["no_phrases"] += 1
            rows.append({"key": f"{shard}noimage", "caption": GOOD_CAPTIONS[1],
                         "phrases": _phrases(GOOD_CAPTIONS[1], GOOD_PHRASES[1])})
            expected_skips["phrase_row_without_image"] += 1
            # a phrase file row with one span past the end of its caption: that phrase is dropped
            key = f"{shard}badspan"
            members.append((key, _encode(_scene(13), "JPEG"), GOOD_CAPTIONS[2]))
            rows.append({"key": key, "caption": GOOD_CAPTIONS[2],
                         "phrases": _phrases(GOOD_CAPTIONS[2], GOOD_PHRASES[2][:1])
                         + [{"text": "ghost", "start": 30, "end": 99}]})
            expected_skips["phrase_span_invalid"] += 1
            good_keys.append(key)
        with tarfile.open(crawled / f"{shard}.tar", "w") as tar:
            for key, data, caption in members:
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode()),
                                      (f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        for r in rows:
            r.update(url=f"http://x/{r['key']}", source_shard=shard)
        write_phrase_file(phrases / f"{shard}.parquet", rows)
    originals = {}
    for tar_path in sorted(crawled.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    originals[m.name[:-4]] = tar.extractfile(m).read()
    return {"crawled": crawled, "phrases": phrases, "skips": expected_skips, "good_keys": good_keys,
            "originals": originals}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return build_inputs(tmp_path_factory.mktemp("pseudo_inputs"))


# ----------------------------------------------------------------------------- pure stages (no Ray)
def by_key_of(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: r for r in rows}


def test_read_shard_joins_by_key_and_counts_orphans(inputs):
    from pipelines.pseudo_label import read_shard

    spec = {"shard": {"name": "00000", "path": str(inputs["crawled"] / "00000.tar"), "kind": "img2dataset_tar"},
            "phrase_file": str(inputs["phrases"] / "00000.parquet")}
    chunks = list(read_shard(spec, chunk=3))
    rows = [r for c in chunks for r in c]
    samples = [r for r in rows if r["kind"] == "sample"]
    end = rows[-1]
    assert end["kind"] == "end" and end["detail"] == "" and end["expected"] == len(samples)
    assert all(len(c) <= 4 for c in chunks)     # streamed in small chunks (+ the end row)
    counts = json.loads(end["counts"])
    assert counts["skipped"] == {"no_phrase_row": 1, "no_phrases": 1, "phrase_row_without_image": 1,
                                 "phrase_span_invalid": 1}
    assert counts["read"] == len(samples) + 2
    assert [p["text"] for p in json.loads(by_key_of(samples)["00000badspan"]["phrases"])] == ["the purple block"]
    by_key = by_key_of(samples)
    assert json.loads(by_key["000000000"]["phrases"])[0]["text"] == "a red square"
    assert by_key["000000000"]["image"] == inputs["originals"]["000000000"]


def test_read_shard_reports_errors_instead_of_raising(tmp_path):
    from pipelines.pseudo_label import read_shard

    spec = {"shard": {"name": "x", "path": str(tmp_path / "x.tar"), "kind": "img2dataset_tar"},
            "phrase_file": str(tmp_path / "missing.parquet")}
    rows = [r for c in read_shard(spec) for r in c]
    assert len(rows) == 1 and rows[0]["kind"] == "end" and rows[0]["detail"]


def test_decode_rows_turns_bad_images_into_counted_skips(inputs):
    from labeling.teacher import TeacherResize
    from pipelines.pseudo_label import decode_rows, read_shard

    spec = {"shard": {"name": "00000", "path": str(inputs["crawled"] / "00000.tar"), "kind": "img2dataset_tar"},
            "phrase_file": str(inputs["phrases"] / "00000.parquet")}
    rows = [r for c in read_shard(spec) for r in c]
    out = decode_rows(rows, TeacherResize(IMAGE_SIZE, 2 * IMAGE_SIZE))
    skips = Counter(r["reason"] for r in out if r["kind"] == "skip")
    assert skips == Counter({k: v for k, v in inputs["skips"].items()
                             if k not in ("no_phrase_row", "no_phrases", "phrase_row_without_image",
                                          "phrase_span_invalid")})
    for r in out:
        if r["kind"] == "sample":
            assert min(r["ph"], r["pw"]) == IMAGE_SIZE and len(r["pixels"]) == r["ph"] * r["pw"] * 3
            assert (r["width"], r["height"]) == Image.open(io.BytesIO(r["image"])).size


# ----------------------------------------------------------------------------- the real pipeline
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A real tiny GLIP, random weights, saved like any checkpoint.

    ``score_threshold=0``: the official pre-NMS cut (0.05 on the phrase score) removes every
    candidate of an untrained head (its prior is 0.01); with 0 the random boxes reach our filter.
    """
    from glip import GLIP

    d = tmp_path_factory.mktemp("teacher") / "tiny"
    GLIP.from_preset("tiny", score_threshold=0.0).save_pretrained(d)
    return d


def _args(inputs, teacher_dir, out, *extra):
    return ["pseudo-label", str(inputs["crawled"]), "--phrases", str(inputs["phrases"]),
            "--teacher", str(teacher_dir), "--out", str(out), "--threshold", str(THRESHOLD),
            "--image-size", str(IMAGE_SIZE), "--batch-size", "1", "--max-samples-per-tar", "2", *extra]


def _samples_by_key(out: Path) -> dict[str, tuple[dict, bytes]]:
    from storage.shards import iter_shard_samples

    counts = StageCounts()
    found: dict[str, tuple[dict, bytes]] = {}
    for sample, image in iter_shard_samples([out], counts):
        assert sample.key not in found, f"duplicate sample {sample.key}"
        found[sample.key] = (sample.to_dict(), image)
    assert counts.skipped == {} and counts.read == len(found)
    return found


@pytest.fixture(scope="module")
def labeled(inputs, teacher_dir, tmp_path_factory, ray_session):
    """One uninterrupted CLI run: (output folder, CliRunner result)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = tmp_path_factory.mktemp("pseudo_out")
    result = CliRunner().invoke(app, _args(inputs, teacher_dir, out))
    return out, result


def test_cli_labels_every_good_image_and_counts_every_bad_one(inputs, labeled):
    out, result = labeled
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output and "boxes written" in result.output
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["stage"] == "pseudo-label"
    assert manifest["options"]["threshold"] == THRESHOLD and manifest["options"]["teacher_min_size"] == IMAGE_SIZE
    from labeling.teacher import checkpoint_sha256
    sha = manifest["model"]["sha256"]
    assert sha == checkpoint_sha256(manifest["model"]["path"])
    assert {s["status"] for s in manifest["shards"].values()} == {"done"}
    totals = manifest["totals"]
    assert totals["skipped"] == dict(inputs["skips"])
    assert totals["written"] == len(inputs["good_keys"])
    samples = _samples_by_key(out)
    assert sorted(samples) == sorted(inputs["good_keys"])
    n_boxes = sum(len(d["boxes"]) for d, _ in samples.values())
    assert n_boxes > 0 and n_boxes == sum(e["counts"]["boxes"] for e in manifest["shards"].values())
    for key, (d, image) in samples.items():
        assert image == inputs["originals"][key]                    # original bytes, never re-encoded
        assert (d["width"], d["height"]) == Image.open(io.BytesIO(image)).size
        assert d["source"] == f"pseudo/{sha[:12]}"
        assert d["extra"]["teacher_sha256"] == sha and d["extra"]["threshold"] == THRESHOLD
        assert len(d["phrases"]) == (1 if key.endswith("badspan") else 2)   # grounded or not, all kept
        for b in d["boxes"]:
            x, y, w, h = b["bbox"]
            assert 0 <= x and 0 <= y and w >= 2 and h >= 2
            assert x + w <= d["width"] + 1e-3 and y + h <= d["height"] + 1e-3
            assert b["score"] >= THRESHOLD and 0 <= b["phrase"] < len(d["phrases"])
            p = d["phrases"][b["phrase"]]
            assert b["tokens_positive"] == [[p["start"], p["end"]]]
            assert span_is_valid(p["start"], p["end"], d["caption"])
            assert d["caption"][p["start"]:p["end"]] == p["text"]
        per_phrase = Counter(b["phrase"] for b in d["boxes"])
        assert all(n <= 10 for n in per_phrase.values())
    assert (out / "00000-00000.tar").exists() and (out / "00000-00003.tar").exists()   # 7 samples, 2 per tar


def test_shards_are_readable_by_glipctl_inspect(inputs, labeled, cli):
    out, _ = labeled
    r = cli("inspect", str(out), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    manifest = json.loads((out / "_manifest.json").read_text())
    boxes = sum(e["counts"]["boxes"] for e in manifest["shards"].values())
    assert summary["samples"] == len(inputs["good_keys"]) and summary["boxes"] == boxes
    assert summary["skipped"] == {}


def test_shards_are_readable_by_webdataset_and_ray_data(inputs, labeled, ray_session):
    import ray
    import webdataset as wds

    out, _ = labeled
    tars = sorted(str(p) for p in out.glob("*.tar"))
    keys = []
    for s in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        image = s.get("jpg") or s.get("png")
        assert image.size == (s["json"]["width"], s["json"]["height"])
        keys.append(s["json"]["key"])
    assert sorted(keys) == sorted(inputs["good_keys"])
    # decoder=None: Ray's default decoder makes grayscale JPEGs 2-D arrays and colour ones 3-D,
    # which it cannot put in one block; the original bytes are what we promise.
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert sorted(json.loads(r["json"])["key"] for r in rows) == sorted(inputs["good_keys"])
    for r in rows:
        image = next(r[ext] for ext in ("jpg", "png") if isinstance(r.get(ext), bytes))   # absent: NaN
        assert image == inputs["originals"][json.loads(r["json"])["key"]]


def test_rerun_resumes_and_changed_options_are_refused(inputs, teacher_dir, labeled, cli):
    out, _ = labeled
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = cli(*_args(inputs, teacher_dir, out))
    assert again.exit_code == 0, again.output
    assert "2 already done" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    changed = cli(*_args(inputs, teacher_dir, out)[:-2], "--max-samples-per-tar", "2", "--nms", "0.3")
    assert changed.exit_code == 2 and "--overwrite" in changed.output


def test_bad_teacher_and_missing_phrases_are_exit_2(inputs, tmp_path, cli):
    r = cli("pseudo-label", str(inputs["crawled"]), "--phrases", str(inputs["phrases"]),
            "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "empty").mkdir()
    r = cli("pseudo-label", str(inputs["crawled"]), "--phrases", str(tmp_path / "empty"),
            "--teacher", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2


def _crash_once_worker(marker: Path):
    """A TeacherWorker whose process dies (os._exit) on its first batch: Ray must restart and retry."""
    import os

    import ray.cloudpickle

    from pipelines.pseudo_label import TeacherWorker

    class CrashOnceWorker(TeacherWorker):
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests
    return CrashOnceWorker


def test_interrupted_run_resumes_to_the_same_samples(inputs, teacher_dir, labeled, tmp_path, ray_session):
    """Ctrl-C after the first shard finished, then the same command again (whose teacher worker
    dies on its first batch and is restarted by Ray): the same samples as one run."""
    from pipelines.pseudo_label import PseudoLabelOptions, run_pseudo_label
    from storage.crawled import discover_crawled_shards

    reference = _samples_by_key(labeled[0])
    shards = discover_crawled_shards([str(inputs["crawled"])])
    options = PseudoLabelOptions(phrases=str(inputs["phrases"]), teacher=str(teacher_dir), threshold=THRESHOLD,
                                 nms_iou=0.6, max_boxes_per_phrase=10, min_box_size=2.0, image_size=IMAGE_SIZE,
                                 batch_size=1, max_samples_per_tar=2)

    def interrupt(images, boxes, finished, total):
        if finished >= 1:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_pseudo_label(shards, out, options, on_progress=interrupt)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sum(e["status"] == "done" for e in manifest["shards"].values()) == 1
    assert not list(out.glob(".*.tmp"))                       # no unfinished file left behind
    marker = tmp_path / "crashed"
    result = run_pseudo_label(shards, out, options, worker_cls=_crash_once_worker(marker))
    assert marker.exists()                                    # the worker did die once
    assert len(result.resumed) == 1 and len(result.done) == 1 and not result.failed
    resumed = _samples_by_key(out)
    assert sorted(resumed) == sorted(reference)
    for key, (d, image) in resumed.items():
        ref, ref_image = reference[key]
        assert image == ref_image
        assert [b["phrase"] for b in d["boxes"]] == [b["phrase"] for b in ref["boxes"]]
        for b, rb in zip(d["boxes"], ref["boxes"]):
            assert b["bbox"] == pytest.approx(rb["bbox"], abs=1e-3) and b["score"] == pytest.approx(rb["score"], abs=1e-5)
    assert json.loads((out / "_manifest.json").read_text())["totals"] == \
        json.loads((labeled[0] / "_manifest.json").read_text())["totals"]


# ----------------------------------------------------------------------------- failures, no Ray needed
def _sample_row(shard: str, key: str, boxes: int = 1) -> dict:
    from pipelines.pseudo_label import _row
    from storage.records import GroundedSample

    sample = GroundedSample(key, "a cat", 32, 32, source="pseudo/x")
    return _row("sample", shard, key=key, sample=json.dumps(sample.to_dict()), image=b"img", ext="jpg",
                boxes=boxes, dropped="{}")


def test_sink_fails_a_shard_whose_read_broke_and_removes_its_tars(tmp_path):
    from pipelines.pseudo_label import ShardSink, _row
    from storage.manifest import Manifest

    manifest = Manifest(stage="pseudo-label")
    sink = ShardSink(tmp_path, manifest, ["a", "b"], max_samples=1)
    for i in range(2):
        sink.add(_sample_row("a", f"a{i}"))
        sink.add(_sample_row("b", f"b{i}", boxes=0))
    assert (tmp_path / "a-00000.tar").exists()          # finished parts exist while streaming
    sink.add(_row("end", "a", expected=2, counts=json.dumps({"read": 3, "skipped": {"x": 1}}),
                  detail="OSError: disk on fire"))
    sink.add(_row("end", "b", expected=2, counts=json.dumps({"read": 2})))
    assert manifest.shards["a"]["status"] == "failed" and "disk on fire" in manifest.shards["a"]["error"]
    assert not list(tmp_path.glob("a-*.tar"))
    assert manifest.shards["b"]["status"] == "done"
    assert manifest.shards["b"]["outputs"] == ["b-00000.tar", "b-00001.tar"]
    assert manifest.shards["b"]["counts"]["without_boxes"] == 2
    assert json.loads((tmp_path / "_manifest.json").read_text())["shards"]["b"]["status"] == "done"


def test_sink_ignores_repeated_rows_and_fails_shards_short_of_rows(tmp_path):
    from pipelines.pseudo_label import ShardSink, _row
    from storage.manifest import Manifest

    manifest = Manifest(stage="pseudo-label")
    sink = ShardSink(tmp_path, manifest, ["a", "b"], max_samples=10)
    sink.add(_sample_row("a", "a0"))
    sink.add(_sample_row("a", "a0"))                    # a retried block delivered twice
    sink.add(_row("end", "a", expected=2, counts=json.dumps({"read": 2})))
    assert "a" not in manifest.shards                   # still waiting for a1
    sink.add(_sample_row("a", "a1"))
    assert manifest.shards["a"]["status"] == "done" and manifest.shards["a"]["counts"]["written"] == 2
    sink.add(_sample_row("a", "a1"))                    # late duplicate after the shard closed
    sink.add(_sample_row("b", "b0"))
    sink.add(_row("end", "b", expected=3, counts=json.dumps({"read": 3})))
    assert sink.fail_unfinished("lost") == ["b"]
    assert manifest.shards["b"]["status"] == "failed" and "1 of 3" in manifest.shards["b"]["error"]
    assert not list(tmp_path.glob("b-*.tar")) and not list(tmp_path.glob(".*.tmp"))


def test_a_shard_without_phrase_file_is_recorded_failed(inputs, labeled, tmp_path, ray_session):
    import shutil

    from pipelines.pseudo_label import PseudoLabelOptions, run_pseudo_label
    from storage.crawled import discover_crawled_shards

    out, phrases = tmp_path / "out", tmp_path / "phrases"
    shutil.copytree(labeled[0], out)
    shutil.copytree(inputs["phrases"], phrases)
    (phrases / "00001.parquet").unlink()
    manifest = json.loads((out / "_manifest.json").read_text())
    del manifest["shards"]["00001"]
    (out / "_manifest.json").write_text(json.dumps(manifest))
    opts = json.loads((labeled[0] / "_manifest.json").read_text())["options"]
    options = PseudoLabelOptions(phrases=str(phrases), teacher=opts["teacher"], threshold=THRESHOLD,
                                 nms_iou=0.6, max_boxes_per_phrase=10, min_box_size=2.0, image_size=IMAGE_SIZE,
                                 batch_size=1, max_samples_per_tar=2)
    result = run_pseudo_label(discover_crawled_shards([str(inputs["crawled"])]), out, options)
    assert result.resumed == ["00000"] and result.failed == ["00001"]
    entry = json.loads((out / "_manifest.json").read_text())["shards"]["00001"]
    assert entry["status"] == "failed" and "parse-captions" in entry["error"]


def test_read_shard_takes_images_from_img2dataset_parquet_mode(tmp_path):
    """img2dataset's parquet output mode: image bytes in a ``jpg`` column, failed downloads skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.pseudo_label import read_shard
    from storage.crawled import discover_crawled_shards

    jpg = _encode(_scene(1), "JPEG")
    pq.write_table(pa.table({"key": ["a", "b"], "caption": [GOOD_CAPTIONS[0], GOOD_CAPTIONS[1]],
                             "url": ["http://x/a", "http://x/b"], "status": ["success", "failed_to_download"],
                             "jpg": [jpg, None]}), tmp_path / "00007.parquet")
    write_phrase_file(tmp_path / "phrases.parquet",
                      [{"key": k, "caption": c, "phrases": _phrases(c, p)}
                       for k, c, p in (("a", GOOD_CAPTIONS[0], GOOD_PHRASES[0]), ("b", GOOD_CAPTIONS[1], GOOD_PHRASES[1]))])
    (shard,) = discover_crawled_shards([str(tmp_path / "00007.parquet")])
    spec = {"shard": {"name": shard.name, "path": shard.path, "kind": shard.kind},
            "phrase_file": str(tmp_path / "phrases.parquet")}
    rows = [r for c in read_shard(spec) for r in c]
    assert [r["key"] for r in rows if r["kind"] == "sample"] == ["a"]
    assert rows[0]["image"] == jpg and rows[0]["url"] == "http://x/a"
    skipped = json.loads(rows[-1]["counts"])["skipped"]
    assert skipped.get("phrase_row_without_image") == 1 and sum(skipped.values()) == 2   # + the failed download
