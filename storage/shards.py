"""Pseudo-label shards: WebDataset tars of ``{key}.jpg`` + ``{key}.json``.

Each sample is two consecutive tar members: the original image bytes (never
re-encoded) and the grounded sample as JSON (``GroundedSample.to_dict()``, boxes
``[x, y, w, h]`` in pixels of that image). Both ``webdataset`` and
``ray.data.read_webdataset`` read them: member names are the key made safe for
WebDataset's "key = name up to the first dot" rule; the true key is in the JSON.

Files are ``{name}-{i:05d}.tar``, written under a temporary name and renamed when
complete, so a crash never leaves a tar that looks finished.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from storage.atomic import atomic_path
from storage.errors import InputError
from storage.records import GroundedSample, InvalidRecord, validate_sample
from storage.skips import StageCounts
from storage.tar_members import iter_tar_groups

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def member_stem(key: str) -> str:
    """The tar member stem for ``key``: dots and slashes would split or nest it in WebDataset."""
    return _UNSAFE.sub("_", key) or "_"


class ShardWriter:
    """Write grounded samples with their images into size-capped WebDataset tars.

    Usage::

        with ShardWriter(out_dir, "00000", max_samples=10000) as w:
            w.write(sample, jpeg_bytes)
        w.outputs   # ["00000-00000.tar", ...] file names in out_dir, in order

    A tar becomes visible under its final name only once it is complete; leaving the
    ``with`` block by an exception removes the unfinished one.
    """

    def __init__(self, out_dir: str | Path, name: str, max_samples: int = 10000):
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.out_dir = Path(out_dir)
        self.name = name
        self.max_samples = max_samples
        self.outputs: list[str] = []
        self.samples_written = 0
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_current = 0
        self._stems: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort(exc_type, exc, tb)

    def _open_next(self) -> None:
        final = self.out_dir / f"{self.name}-{len(self.outputs):05d}.tar"
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(final))
        self._tar = self._stack.enter_context(tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT))
        self._final = final
        self._in_current = 0
        self._stems = set()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0          # identical input -> identical bytes (resume, hashing)
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, sample: GroundedSample, image: bytes, ext: str = "jpg") -> None:
        """Append one sample; ``image`` is the original encoded file, ``ext`` its extension."""
        if self._tar is None:
            self._open_next()
        stem = member_stem(sample.key)
        if stem in self._stems:   # two keys that differ only in unsafe characters
            n = 1
            while f"{stem}_{n}" in self._stems:
                n += 1
            stem = f"{stem}_{n}"
        self._stems.add(stem)
        payload = json.dumps(sample.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._add(f"{stem}.{ext.lstrip('.').lower()}", bytes(image))
        self._add(f"{stem}.json", payload)
        self._in_current += 1
        self.samples_written += 1
        if self._in_current >= self.max_samples:
            self._finish_current()

    def _finish_current(self) -> None:
        if self._stack is not None:
            self._stack.close()          # closes the tar, then renames it into place
            self.outputs.append(self._final.name)
        self._stack, self._tar = None, None

    def close(self) -> None:
        self._finish_current()

    def _abort(self, exc_type=None, exc=None, tb=None) -> None:
        if self._stack is not None:
            self._stack.__exit__(exc_type, exc, tb)   # atomic_path removes the temp file
        self._stack, self._tar = None, None


def list_shard_files(paths: list[str] | list[Path]) -> list[Path]:
    """The ``.tar`` files named by ``paths`` (files, or folders searched non-recursively).

    Raises ``InputError`` for a missing path or a folder without any tar.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if p.is_dir():
            tars = sorted(f for f in p.iterdir() if f.suffix == ".tar" and not f.name.startswith("."))
            if not tars:
                raise InputError(f"{p}: no .tar shards in this folder")
            out.extend(tars)
        else:
            out.append(p)
    return out


def parse_sample_json(data: bytes, counts: StageCounts, where: str) -> GroundedSample | None:
    """Decode and validate one ``{key}.json`` member; bad ones become counted skips.

    Spans outside the caption and boxes outside the image are dropped per box and
    counted by reason (``box_span_outside_caption``, ``box_outside_image``, ...).
    """
    try:
        sample = GroundedSample.from_dict(json.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, ValueError) as exc:   # JSONDecodeError, InvalidRecord
        counts.skip("bad_json" if not isinstance(exc, InvalidRecord) else "malformed_record",
                    where, str(exc))
        return None
    return validated(sample, counts, where)


def validated(sample: GroundedSample, counts: StageCounts, where: str) -> GroundedSample | None:
    """``validate_sample`` with its drops and failures recorded in ``counts``."""
    try:
        clean, dropped = validate_sample(sample)
    except InvalidRecord as exc:
        counts.skip("invalid_sample", where, str(exc))
        return None
    for reason, n in dropped.items():
        if reason == "box_clipped":   # the box was kept (clipped to the image): not a skip
            continue
        for _ in range(n):
            counts.skip(reason, where)
    return clean


def iter_shard_samples(paths: list[str] | list[Path], counts: StageCounts,
                       with_images: bool = True) -> Iterator[tuple[GroundedSample, bytes]]:
    """Stream ``(sample, image_bytes)`` from pseudo-label shards (tars, or folders of tars).

    ``with_images=False`` skips reading image bytes (yields ``b""``), for metadata-only
    consumers such as the Arrow view. Truncated tars and bad members are counted skips.
    """
    wanted = frozenset(("json",) + (IMAGE_EXTENSIONS if with_images else ()))
    for path in list_shard_files(paths):
        for stem, group in iter_tar_groups(path, counts, wanted):
            counts.read += 1
            where = f"{path} key {stem}"
            if group.get("json") is None:
                counts.skip("missing_json", where)
                continue
            image = b""
            if with_images:
                image = next((group[e] for e in IMAGE_EXTENSIONS if group.get(e)), None)
                if image is None:
                    counts.skip("missing_image", where)
                    continue
            sample = parse_sample_json(group["json"], counts, where)
            if sample is not None:
                yield sample, image
