"""pseudo-label: the real Ray pipeline with a real tiny GLIP teacher on generated images.

The inputs are an img2dataset-style folder (tars of {key}.jpg/.txt/.json) with every kind
of bad record the issue lists, and phrase files written with storage.phrase_files. The
teacher is ``GLIP.from_preset("tiny")`` with random weights saved to disk: its boxes are
random, so the tests use a low threshold and check structure, not accuracy.
"""
from __future__ import annotations

import hashlib
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


def sample_keys(keys: list[str]) -> list[str]:
    """Pseudo-label keys of crawled keys: ``<input shard>/<key>`` (every test key starts with its shard)."""
    return [f"{k[:5]}/{k}" for k in keys]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return build_inputs(tmp_path_factory.mktemp("pseudo_inputs"))


# ----------------------------------------------------------------------------- pure stages (no Ray)
def _spec(inputs, shard="00000", out=""):
    from storage.crawled import discover_crawled_shards

    (crawled,) = [c for c in discover_crawled_shards([str(inputs["crawled"])]) if c.name == shard]
    return {"shard": crawled.to_dict(), "phrase_file": str(inputs["phrases"] / f"{shard}.parquet"),
            "out_dir": str(out)}


def test_iter_joined_joins_by_key_and_counts_orphans(inputs):
    from pipelines.pseudo_label import iter_joined

    counts = StageCounts()
    items = list(iter_joined(_spec(inputs), counts))
    assert counts.skipped == {"no_phrase_row": 1, "no_phrases": 1, "phrase_row_without_image": 1,
                              "phrase_span_invalid": 1}
    assert counts.read == len(items) + 2
    by_key = {it["key"]: it for it in items}
    assert [p["text"] for p in by_key["00000badspan"]["phrases"]] == ["the purple block"]
    assert by_key["000000000"]["phrases"][0]["text"] == "a red square"
    assert by_key["000000000"]["image"] == inputs["originals"]["000000000"]
    assert [it["source_index"] for it in items] == sorted(it["source_index"] for it in items)   # input order


def test_iter_joined_raises_when_the_phrase_file_is_missing(tmp_path):
    from pipelines.pseudo_label import iter_joined

    spec = {"shard": {"name": "x", "path": str(tmp_path / "x.tar"), "kind": "img2dataset_tar"},
            "phrase_file": str(tmp_path / "missing.parquet")}
    with pytest.raises(FileNotFoundError):
        list(iter_joined(spec, StageCounts()))


def test_decode_item_turns_bad_images_into_skips(inputs):
    from labeling.teacher import TeacherResize
    from pipelines.pseudo_label import decode_item, iter_joined

    resize = TeacherResize(IMAGE_SIZE, 2 * IMAGE_SIZE)
    out = [decode_item(it, resize) for it in iter_joined(_spec(inputs), StageCounts())]
    skips = Counter(it["skip"] for it in out if "skip" in it)
    assert skips == Counter({k: v for k, v in inputs["skips"].items()
                             if k not in ("no_phrase_row", "no_phrases", "phrase_row_without_image",
                                          "phrase_span_invalid")})
    for it in out:
        if "skip" not in it:
            assert min(it["pixels"].shape[:2]) == IMAGE_SIZE and it["pixels"].dtype == np.uint8
            assert (it["width"], it["height"]) == Image.open(io.BytesIO(it["image"])).size


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
    assert sorted(samples) == sorted(sample_keys(inputs["good_keys"]))
    n_boxes = sum(len(d["boxes"]) for d, _ in samples.values())
    assert n_boxes > 0 and n_boxes == sum(e["counts"]["boxes"] for e in manifest["shards"].values())
    for key, (d, image) in samples.items():
        assert key == f"{d['extra']['source_shard']}/{d['extra']['source_key']}"   # traceable to its shard
        assert image == inputs["originals"][d["extra"]["source_key"]]   # original bytes, never re-encoded
        assert (d["width"], d["height"]) == Image.open(io.BytesIO(image)).size
        assert d["source"] == f"pseudo/{sha[:12]}"
        assert d["extra"]["teacher_sha256"] == sha and d["extra"]["threshold"] == THRESHOLD
        assert d["extra"]["precision"] == "fp32" == manifest["options"]["precision"]
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
    for name, entry in manifest["shards"].items():     # every output committed, with its checksum
        commit = json.loads((out / "_shards" / f"{name}.json").read_text())
        assert commit["outputs"] == entry["outputs"] and commit["checksums"] == entry["checksums"]
        for o in entry["outputs"] + entry["labels"]:
            assert hashlib.sha256((out / o).read_bytes()).hexdigest() == entry["checksums"][o]


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
    assert sorted(keys) == sorted(sample_keys(inputs["good_keys"]))
    # decoder=None: Ray's default decoder makes grayscale JPEGs 2-D arrays and colour ones 3-D,
    # which it cannot put in one block; the original bytes are what we promise.
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert sorted(json.loads(r["json"])["key"] for r in rows) == sorted(sample_keys(inputs["good_keys"]))
    for r in rows:
        image = next(r[ext] for ext in ("jpg", "png") if isinstance(r.get(ext), bytes))   # absent: NaN
        assert image == inputs["originals"][json.loads(r["json"])["extra"]["source_key"]]


def test_rerun_resumes_and_changed_options_are_refused(inputs, teacher_dir, labeled, cli):
    out, _ = labeled
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = cli(*_args(inputs, teacher_dir, out))
    assert again.exit_code == 0, again.output
    assert "2 already done" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    changed = cli(*_args(inputs, teacher_dir, out)[:-2], "--max-samples-per-tar", "2", "--nms", "0.3")
    assert changed.exit_code == 2 and "--overwrite" in changed.output


def test_bad_teacher_and_missing_phrases_are_exit_2(inputs, teacher_dir, tmp_path, cli, ray_session):
    r = cli("pseudo-label", str(inputs["crawled"]), "--phrases", str(inputs["phrases"]),
            "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not found" in r.output
    # a valid teacher and a phrases folder that exists but holds no file for any input shard
    (tmp_path / "empty").mkdir()
    r = cli("pseudo-label", str(inputs["crawled"]), "--phrases", str(tmp_path / "empty"),
            "--teacher", str(teacher_dir), "--out", str(tmp_path / "o"))
    said = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert "no phrase file for any input shard (expected e.g. 00000.parquet); run parse-captions first" in said
    assert "config.json" not in said and "Traceback" not in r.output


def test_teachers_no_actor_could_load_are_refused_by_the_driver(inputs, tmp_path, cli):
    """A .ckpt (or .pth) that is not an official GLIP checkpoint, or GPUs the cluster lacks: exit 2
    before any actor starts."""
    import torch

    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": {"layer": "a Lightning checkpoint of something else"}}, tmp_path / "lightning.ckpt")
    for bad, message in (("garbage.ckpt", "cannot read checkpoint"), ("lightning.ckpt", "holds no tensors")):
        r = cli("pseudo-label", str(inputs["crawled"]), "--phrases", str(inputs["phrases"]),
                "--teacher", str(tmp_path / bad), "--out", str(tmp_path / "o"))
        assert r.exit_code == 2 and message in r.output, r.output
        assert not (tmp_path / "o").exists()
    torch.save({"model": {"module.layer.weight": torch.zeros(2)}}, tmp_path / "other.pth")   # tensors, not GLIP's
    r = cli("pseudo-label", str(inputs["crawled"]), "--phrases", str(inputs["phrases"]),
            "--teacher", str(tmp_path / "other.pth"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not an official GLIP" in r.output, r.output


def test_gpus_the_cluster_lacks_are_an_input_error(inputs, teacher_dir, tmp_path, cli, ray_session):
    r = cli(*_args(inputs, teacher_dir, tmp_path / "o"), "--gpus-per-worker", "1")
    assert r.exit_code == 2 and "has 0 GPUs" in r.output, r.output


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
    # The worker may have committed the other shard before the interrupt reached it (workers
    # write their own output). Make it a shard whose worker died mid-write instead: no commit
    # record, and a cut-short object under a final name, as an object store can show.
    done = next(n for n, e in manifest["shards"].items() if e["status"] == "done")
    other = next(s.name for s in shards if s.name != done)
    (out / "_shards" / f"{other}.json").unlink(missing_ok=True)
    (out / f"{other}-00000.tar").write_bytes(b"half a tar")
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
    # samples are written in input order: the resumed run's files are the uninterrupted run's, byte for byte
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == \
        {p.name: p.read_bytes() for p in labeled[0].glob("*.tar")}


# ----------------------------------------------------------------------------- one shard, no Ray
class _PoisonedTeacher:
    """The real tiny teacher, made to raise on the images whose caption contains ``poison``
    (fault injection: one record that breaks the model, or a device that breaks on everything)."""

    def __init__(self, teacher, poison: str):
        self.teacher, self.poison = teacher, poison
        self.calls: list[int] = []

    def bucket_of(self, pixels):
        return self.teacher.bucket_of(pixels)

    def ground(self, images, sizes, captions, spans, **kw):
        self.calls.append(len(images))
        if any(self.poison in c for c in captions):
            raise RuntimeError("poisoned caption")
        return self.teacher.ground(images, sizes, captions, spans, **kw)


def _labeler(teacher, batch_size=4, max_buffered=None):
    from labeling.filters import FilterConfig
    from labeling.teacher import TeacherResize
    from pipelines.pseudo_label import ShardLabeler

    config = FilterConfig(THRESHOLD, 0.6, 10, 2.0)
    extra = {"teacher_source": "pseudo/test", "threshold": THRESHOLD}
    return ShardLabeler(teacher, config, extra, TeacherResize(IMAGE_SIZE, 2 * IMAGE_SIZE), batch_size,
                        max_samples_per_tar=100, max_buffered=max_buffered)


@pytest.fixture(scope="module")
def tiny_teacher(teacher_dir):
    from labeling.teacher import GLIPTeacher

    return GLIPTeacher.load(teacher_dir)


def _mixed_size_inputs(root: Path, n: int = 10, first: int = 0) -> dict:
    """One shard of images of several sizes (so several padded shapes) and their phrase file."""
    crawled, phrases = root / "crawled", root / "phrases"
    crawled.mkdir(parents=True)
    phrases.mkdir()
    rows = []
    with tarfile.open(crawled / "00000.tar", "w") as tar:
        for i in range(n):
            key, caption = f"00000{i:04d}", GOOD_CAPTIONS[(first + i) % 4]
            data = _encode(_scene(first * 100 + i, w=64 + 24 * (i % 3), h=64 + 40 * (i % 2)), "JPEG")
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            rows.append({"key": key, "caption": caption, "phrases": _phrases(caption, GOOD_PHRASES[(first + i) % 4])})
    write_phrase_file(phrases / "00000.parquet", rows)
    return {"crawled": crawled, "phrases": phrases}


def test_labels_do_not_depend_on_batch_composition(tiny_teacher, tmp_path):
    """Batches of 1 and of 8 (neighbours of other sizes, other buffering) give the same labels, in order."""
    from storage.shards import iter_shard_samples

    mixed = _mixed_size_inputs(tmp_path / "in")
    results = {}
    for batch_size, buffered in ((1, None), (8, 3), (8, None)):
        out = tmp_path / f"out{batch_size}_{buffered}"
        entry = _labeler(tiny_teacher, batch_size, buffered).label_shard(_spec(mixed, out=out))
        assert entry["counts"]["written"] == 10 and (out / "_shards" / "00000.json").exists()
        results[(batch_size, buffered)] = [s.to_dict() for s, _ in iter_shard_samples([str(out)], StageCounts())]
    reference = results[(1, None)]
    assert [d["key"] for d in reference] == [f"00000/00000{i:04d}" for i in range(10)]   # input order
    assert sum(len(d["boxes"]) for d in reference) > 0
    for got in results.values():
        assert [d["key"] for d in got] == [d["key"] for d in reference]
        for d, ref in zip(got, reference):
            assert [b["phrase"] for b in d["boxes"]] == [b["phrase"] for b in ref["boxes"]]
            for b, rb in zip(d["boxes"], ref["boxes"]):
                assert b["bbox"] == pytest.approx(rb["bbox"], abs=1e-3)
                assert b["score"] == pytest.approx(rb["score"], abs=1e-5)


def test_one_bad_record_is_a_skip_and_a_failing_device_is_an_error(tiny_teacher, inputs, tmp_path):
    from labeling.teacher import TeacherDeviceError

    poisoned = _PoisonedTeacher(tiny_teacher, poison="purple")    # one caption of the good ones
    entry = _labeler(poisoned, batch_size=4).label_shard(_spec(inputs, out=tmp_path / "a"))
    assert entry["counts"]["skipped"]["teacher_error"] == 2        # 00000002 and 00000badspan
    assert entry["counts"]["written"] == sum(k.startswith("00000") for k in inputs["good_keys"]) - 2
    broken = _PoisonedTeacher(tiny_teacher, poison="a")             # every caption: the device is broken
    with pytest.raises(TeacherDeviceError):
        _labeler(broken, batch_size=4).label_shard(_spec(inputs, out=tmp_path / "b"))
    assert not (tmp_path / "b" / "_shards").exists()                # nothing committed


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
    (out / "_shards" / "00001.json").unlink()          # its commit record: the shard is not done
    opts = json.loads((labeled[0] / "_manifest.json").read_text())["options"]
    options = PseudoLabelOptions(phrases=str(phrases), teacher=opts["teacher"], threshold=THRESHOLD,
                                 nms_iou=0.6, max_boxes_per_phrase=10, min_box_size=2.0, image_size=IMAGE_SIZE,
                                 batch_size=1, max_samples_per_tar=2)
    result = run_pseudo_label(discover_crawled_shards([str(inputs["crawled"])]), out, options)
    assert result.resumed == ["00000"] and result.failed == ["00001"]
    entry = json.loads((out / "_manifest.json").read_text())["shards"]["00001"]
    assert entry["status"] == "failed" and "parse-captions" in entry["error"]


def test_iter_joined_takes_images_from_img2dataset_parquet_mode(tmp_path):
    """img2dataset's parquet output mode: image bytes in a ``jpg`` column, failed downloads skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.pseudo_label import iter_joined
    from storage.crawled import discover_crawled_shards

    jpg = _encode(_scene(1), "JPEG")
    pq.write_table(pa.table({"key": ["a", "b"], "caption": [GOOD_CAPTIONS[0], GOOD_CAPTIONS[1]],
                             "url": ["http://x/a", "http://x/b"], "status": ["success", "failed_to_download"],
                             "jpg": [jpg, None]}), tmp_path / "00007.parquet")
    write_phrase_file(tmp_path / "phrases.parquet",
                      [{"key": k, "caption": c, "phrases": _phrases(c, p)}
                       for k, c, p in (("a", GOOD_CAPTIONS[0], GOOD_PHRASES[0]), ("b", GOOD_CAPTIONS[1], GOOD_PHRASES[1]))])
    (shard,) = discover_crawled_shards([str(tmp_path / "00007.parquet")])
    counts = StageCounts()
    items = list(iter_joined({"shard": shard.to_dict(), "phrase_file": str(tmp_path / "phrases.parquet")}, counts))
    assert [it["key"] for it in items] == ["a"]
    assert items[0]["image"] == jpg and items[0]["url"] == "http://x/a"
    assert counts.skipped.get("phrase_row_without_image") == 1 and sum(counts.skipped.values()) == 2   # + the failed download


def test_keys_are_unique_across_two_crawls_merged_into_one_input(tiny_teacher, tmp_path, ray_session):
    """Two img2dataset runs both start at key 000000000: each sample keeps its own shard's caption."""
    from pipelines.pseudo_label import PseudoLabelOptions, run_pseudo_label
    from storage.crawled import discover_crawled_shards

    roots = [_mixed_size_inputs(tmp_path / "crawlA", n=2, first=0),
             _mixed_size_inputs(tmp_path / "crawlB", n=2, first=1)]
    shards = discover_crawled_shards([str(r["crawled"]) for r in roots])
    names = [s.name for s in shards]
    assert names == ["crawled_00000_1", "crawled_00000_2"]    # same folder and file names: numbered
    phrases = tmp_path / "phrases"
    phrases.mkdir()
    for mixed, name in zip(roots, names):                      # as parse-captions names them
        (phrases / f"{name}.parquet").write_bytes((mixed["phrases"] / "00000.parquet").read_bytes())
    opts = PseudoLabelOptions(phrases=str(phrases), teacher=tiny_teacher.identity.path, threshold=THRESHOLD,
                              nms_iou=0.6, max_boxes_per_phrase=10, min_box_size=2.0, image_size=IMAGE_SIZE,
                              batch_size=2, workers=1)
    result = run_pseudo_label(shards, str(tmp_path / "out"), opts)
    assert sorted(result.done) == names
    samples = _samples_by_key(tmp_path / "out")       # asserts no key twice
    assert sorted(samples) == [f"{n}/00000{i:04d}" for n in names for i in range(2)]
    for key, (d, image) in samples.items():           # each image with its own crawl's caption
        shard, crawled_key = key.split("/")
        crawl = roots[names.index(shard)]
        with tarfile.open(crawl["crawled"] / "00000.tar") as tar:
            assert image == tar.extractfile(f"{crawled_key}.jpg").read()
            assert d["caption"] == tar.extractfile(f"{crawled_key}.txt").read().decode()


# ----------------------------------------------------------------------------- a category prompt in every image
PROMPT_NAMES = ["square", "tile"]
PROMPT_TEMPLATE = {"tile": {"prefix": "an orange "}}


@pytest.fixture(scope="module")
def prompt_inputs(tmp_path_factory) -> dict:
    """One shard of three images; the last caption has no parsed phrase (a category prompt labels it anyway)."""
    from storage.phrase_files import iter_phrase_rows

    mixed = _mixed_size_inputs(tmp_path_factory.mktemp("prompt_inputs"), n=3)
    rows = [dict(r) for r in iter_phrase_rows(str(mixed["phrases"] / "00000.parquet"))]
    rows[-1]["phrases"] = []
    write_phrase_file(mixed["phrases"] / "00000.parquet", rows)
    return {**mixed, "captions": {r["key"]: r["caption"] for r in rows}}


@pytest.fixture(scope="module")
def teacher_prompts(teacher_dir, tmp_path_factory) -> list[Path]:
    """Two tuned prompts for the teacher on PROMPT_NAMES with PROMPT_TEMPLATE (other random offsets)."""
    from prompt_helpers import save_tuned_prompt

    root = tmp_path_factory.mktemp("teacher_prompts")
    return [save_tuned_prompt(root / f"prompt{seed}", teacher_dir, PROMPT_NAMES, PROMPT_TEMPLATE, seed=seed)
            for seed in (0, 1)]


@pytest.fixture(scope="module")
def prompt_labeled(prompt_inputs, teacher_dir, teacher_prompts, tmp_path_factory, ray_session):
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = tmp_path_factory.mktemp("prompt_out")
    result = CliRunner().invoke(app, _args(prompt_inputs, teacher_dir, out, "--prompt", str(teacher_prompts[0])))
    return out, result


def _grounded_by_hand(teacher, d: dict, image: bytes) -> list[dict]:
    """The boxes ``teacher`` grounds for sample ``d``'s caption and phrases in ``image``, through the stage's
    resize and filters."""
    from labeling.filters import FilterConfig, pseudo_sample
    from labeling.images import decode_image
    from labeling.teacher import teacher_resize

    decoded = decode_image(image)
    pixels = teacher_resize(teacher.identity.path, IMAGE_SIZE)(decoded.image)     # what --image-size asks
    (dets,) = teacher.ground([pixels], [(decoded.width, decoded.height)], [d["caption"]],
                             [[(p["start"], p["end"]) for p in d["phrases"]]], threshold=THRESHOLD, nms_iou=0.6)
    sample, _ = pseudo_sample(d["key"], d["caption"], decoded.width, decoded.height, d["phrases"], dets,
                              FilterConfig(THRESHOLD, 0.6, 10, 2.0), d["source"])
    return sample.to_dict()["boxes"]


def _same_boxes(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["phrase"] == y["phrase"] and x["bbox"] == pytest.approx(y["bbox"], abs=1e-3)
                                    and x["score"] == pytest.approx(y["score"], abs=1e-5) for x, y in zip(a, b))


def test_a_tuned_prompt_is_grounded_in_every_image(prompt_inputs, prompt_labeled, teacher_dir, teacher_prompts):
    from labeling.prompts import TunedPrompt
    from labeling.teacher import GLIPTeacher, teacher_identity
    from prompt_helpers import prompted_model

    out, result = prompt_labeled
    assert result.exit_code == 0, result.output
    tuned = TunedPrompt.read(str(teacher_prompts[0]))
    assert tuned.caption == "square. an orange tile."
    options = json.loads((out / "_manifest.json").read_text())["options"]
    assert options["prompt_sha256"] == tuned.sha256 and options["prompt"] == str(teacher_prompts[0])
    assert options["prompt_template"] == {"tile": {"prefix": "an orange ", "name": "tile", "suffix": ""}}
    samples = _samples_by_key(out)
    assert sorted(samples) == [f"00000/00000{i:04d}" for i in range(3)]   # the one without parsed phrases too
    identity = teacher_identity(teacher_dir)
    prompted = GLIPTeacher(prompted_model(teacher_dir, teacher_prompts[0]), identity)
    plain = GLIPTeacher.load(teacher_dir)
    differs = 0
    for key, (d, image) in samples.items():
        assert d["caption"] == tuned.caption
        assert d["phrases"] == [{"text": "square", "start": 0, "end": 6, "root": "square"},
                                {"text": "tile", "start": 18, "end": 22, "root": "tile"}]   # the names only
        assert d["extra"]["alt_text"] == prompt_inputs["captions"][d["extra"]["source_key"]]
        assert d["extra"]["prompt_sha256"] == tuned.sha256
        assert _same_boxes(d["boxes"], _grounded_by_hand(prompted, d, image))
        differs += not _same_boxes(d["boxes"], _grounded_by_hand(plain, d, image))
    assert sum(len(d["boxes"]) for d, _ in samples.values()) > 0
    assert differs > 0                                   # the actor did attach the prompt


def test_a_resumed_run_with_another_prompt_is_refused(prompt_inputs, prompt_labeled, teacher_dir, teacher_prompts,
                                                      cli):
    out, _ = prompt_labeled
    for extra in (("--prompt", teacher_prompts[1]), ()):
        r = cli(*_args(prompt_inputs, teacher_dir, out, *extra))
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and "prompt_sha256" in said and "--overwrite" in said, r.output
    r = cli(*_args(prompt_inputs, teacher_dir, out, "--prompt", teacher_prompts[0]))
    assert r.exit_code == 0 and "1 already done" in r.output, r.output


def test_a_template_alone_is_grounded_in_every_image(prompt_inputs, teacher_dir, tiny_teacher, tmp_path, cli,
                                                     ray_session):
    out = tmp_path / "out"
    r = cli(*_args(prompt_inputs, teacher_dir, out, "--prompt-template", '{"square": {}, "tile": {"prefix": "a "}}'))
    assert r.exit_code == 0, r.output
    options = json.loads((out / "_manifest.json").read_text())["options"]
    assert options["prompt_sha256"] is None and options["prompt_template"]["tile"]["prefix"] == "a "
    samples = _samples_by_key(out)
    assert len(samples) == 3
    for d, image in samples.values():
        assert d["caption"] == "square. a tile." and [p["text"] for p in d["phrases"]] == ["square", "tile"]
        assert d["extra"]["alt_text"] == prompt_inputs["captions"][d["extra"]["source_key"]]
        assert "prompt_sha256" not in d["extra"]
        assert _same_boxes(d["boxes"], _grounded_by_hand(tiny_teacher, d, image))
    r = cli(*_args(prompt_inputs, teacher_dir, out, "--prompt-template", '{"square": {}, "tile": {"prefix": "an "}}'))
    assert r.exit_code == 2 and "prompt_template" in r.output and "--overwrite" in r.output


def test_prompts_a_teacher_cannot_take_are_refused(prompt_inputs, teacher_dir, teacher_prompts, hf_teacher_dirs,
                                                   tmp_path, cli, ray_session):
    from prompt_helpers import other_model

    for teacher, message in ((hf_teacher_dirs["grounding-dino"], "only a GLIP teacher takes a tuned prompt"),
                             (other_model(teacher_dir, tmp_path / "other"), "was tuned for base model sha256")):
        r = cli(*_args(prompt_inputs, teacher, tmp_path / "out", "--prompt", teacher_prompts[0]))
        assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
        assert not (tmp_path / "out" / "_manifest.json").exists()
    r = cli(*_args(prompt_inputs, teacher_dir, tmp_path / "out", "--prompt", teacher_prompts[0],
                   "--prompt-template", '{"tile": {"prefix": "a "}}'))
    assert r.exit_code == 2 and "a tuned prompt brings its own" in " ".join(r.output.split())
    r = cli(*_args(prompt_inputs, teacher_dir, tmp_path / "out", "--prompt", teacher_dir))
    assert r.exit_code == 2 and "not a tuned prompt" in r.output
