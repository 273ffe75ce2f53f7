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
    assert counts["skipped"] == {"no_phrase_row": 1, "no_phrases": 1, "phrase_row_without_image": 1}
    assert counts["read"] == len(samples) + 2
    by_key = {r["key"]: r for r in samples}
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
                             if k not in ("no_phrase_row", "no_phrases", "phrase_row_without_image")})
    for r in out:
        if r["kind"] == "sample":
            assert min(r["ph"], r["pw"]) == IMAGE_SIZE and len(r["pixels"]) == r["ph"] * r["pw"] * 3
            assert (r["width"], r["height"]) == Image.open(io.BytesIO(r["image"])).size
