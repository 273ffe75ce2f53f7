"""Builders for real on-disk inputs (img2dataset folders, tiny JPEGs, grounded samples)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.records import Box, GroundedSample, Phrase


def jpeg_bytes(width: int = 8, height: int = 6, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def sample(key: str = "k0", caption: str = "a red dog on a green lawn", n_boxes: int = 2,
           width: int = 64, height: int = 48, source: str = "pseudo/test") -> GroundedSample:
    phrases = [Phrase("a red dog", 0, 9, "dog"), Phrase("a green lawn", 13, 25, "lawn")]
    boxes = [Box([1.0 + i, 2.0, 10.0, 12.0], [[phrases[i % 2].start, phrases[i % 2].end]], i % 2,
                 0.9 - 0.1 * i) for i in range(n_boxes)]
    return GroundedSample(key, caption, width, height, phrases, boxes, source, {"teacher": "t"})


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_folder(root: Path, captions: list[list[str]], mode: str = "webdataset",
                             failed_per_shard: int = 1) -> Path:
    """An img2dataset output folder as img2dataset writes it.

    ``captions[s]`` are the successful samples of shard ``s``; each shard also has
    ``failed_per_shard`` failed downloads (present in the Parquet, absent from the tar).
    Keys are img2dataset's: 5-digit shard id + 4-digit index.
    """
    root.mkdir(parents=True, exist_ok=True)
    for s, caps in enumerate(captions):
        shard = f"{s:05d}"
        rows = []
        tar = tarfile.open(root / f"{shard}.tar", "w") if mode == "webdataset" else None
        for i, cap in enumerate(caps + [None] * failed_per_shard):
            key = f"{shard}{i:04d}"
            ok = cap is not None
            img = jpeg_bytes(8 + i, 6) if ok else None
            meta = {"url": f"http://example.com/{key}.jpg", "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP 404",
                    "width": 8 + i if ok else None, "height": 6 if ok else None,
                    "original_width": 80 + i if ok else None, "original_height": 60 if ok else None,
                    "exif": None, "sha256": hashlib.sha256(img).hexdigest() if ok else None,
                    "caption": cap}
            rows.append(dict(meta, jpg=img) if mode == "parquet" else meta)
            if tar is not None and ok:
                _add(tar, f"{key}.jpg", img)
                _add(tar, f"{key}.txt", cap.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        if tar is not None:
            tar.close()
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard}.parquet")
        n_ok = len(caps)
        (root / f"{shard}_stats.json").write_text(json.dumps({
            "count": n_ok + failed_per_shard, "successes": n_ok, "failed_to_download": failed_per_shard,
            "failed_to_resize": 0, "duration": 1.0, "start_time": 0.0, "end_time": 1.0,
            "status_dict": {"success": n_ok, "HTTP 404": failed_per_shard}}))
    return root


@pytest.fixture
def make_jpeg():
    return jpeg_bytes


@pytest.fixture
def make_sample():
    return sample


@pytest.fixture
def img2dataset_folder():
    return write_img2dataset_folder
