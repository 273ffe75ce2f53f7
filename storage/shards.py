"""Pseudo-label shards: WebDataset tars of ``{key}.jpg`` + ``{key}.json``, and their label tables.

Each sample is two consecutive tar members: the original image bytes (never
re-encoded) and the grounded sample as JSON (``GroundedSample.to_dict()``, boxes
``[x, y, w, h]`` in pixels of that image). Both ``webdataset`` and
``ray.data.read_webdataset`` read them: member names are the key made safe for
WebDataset's "key = name up to the first dot" rule; the true key is in the JSON.

Files are ``{name}-{i:05d}.tar`` and, beside each, ``{name}-{i:05d}.labels.parquet``: the same
samples without images (``storage.arrow_view.LABEL_SCHEMA``), so inspection and filtering read
megabytes, not the images. Both are written through ``storage.fs.open_output`` (local: temp
name then rename; object stores: visible once uploaded), to any filesystem; a folder written
by a stage lists its finished files in its manifest, which readers trust over a listing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from storage import fs
from storage.errors import InputError
from storage.records import GroundedSample, InvalidRecord, validate_sample
from storage.skips import StageCounts
from storage.tar_members import iter_tar_groups

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABELS_SUFFIX = ".labels.parquet"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def member_stem(key: str) -> str:
    """The tar member stem for ``key``: dots and slashes would split or nest it in WebDataset."""
    return _UNSAFE.sub("_", key) or "_"


def labels_name(tar_name: str) -> str:
    """``00000-00000.tar`` -> ``00000-00000.labels.parquet`` (works on full paths too)."""
    return (tar_name[:-4] if tar_name.endswith(".tar") else tar_name) + LABELS_SUFFIX


class _HashingWriter:
    """A write-only file object that passes bytes on and keeps their sha256 and count."""

    def __init__(self, fh):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.fh.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass


class ShardWriter:
    """Write grounded samples with their images into size-capped WebDataset tars + label tables.

    Usage::

        with ShardWriter(out_dir, "00000", max_samples=10000) as w:
            w.write(sample, jpeg_bytes)
        w.outputs    # ["00000-00000.tar", ...] tar names in out_dir, in order
        w.labels     # ["00000-00000.labels.parquet", ...] one per tar
        w.checksums  # {file name: sha256 hex} of everything written

    ``out_dir`` is a local path or a URI. A file becomes visible under its final name only
    once it is complete; leaving the ``with`` block by an exception removes the unfinished one.
    ``labels=False`` writes the tars alone.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, max_samples: int = 10000,
                 labels: bool = True):
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.out_dir = fs.normalize(out_dir)
        self.name = name
        self.max_samples = max_samples
        self.with_labels = labels
        self.outputs: list[str] = []
        self.labels: list[str] = []
        self.checksums: dict[str, str] = {}
        self.samples_written = 0
        self._output = None          # the open_output context of the current tar
        self._hashing: _HashingWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._rows: list[dict[str, Any]] = []
        self._in_current = 0
        self._stems: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort(exc_type, exc, tb)

    def _current_name(self) -> str:
        return f"{self.name}-{len(self.outputs):05d}.tar"

    def _open_next(self) -> None:
        fs.makedirs(self.out_dir)
        self._output = fs.open_output(fs.join(self.out_dir, self._current_name()))
        self._hashing = _HashingWriter(self._output.__enter__())
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self._in_current = 0
        self._stems = set()
        self._rows = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0          # identical input -> identical bytes (resume, hashing)
        self._tar.addfile(info, _BytesReader(data))

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
        record = sample.to_dict()
        payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._add(f"{stem}.{ext.lstrip('.').lower()}", bytes(image))
        self._add(f"{stem}.json", payload)
        if self.with_labels:
            self._rows.append(record)
        self._in_current += 1
        self.samples_written += 1
        if self._in_current >= self.max_samples:
            self._finish_current()

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        name = self._current_name()
        self._tar.close()                       # end-of-archive blocks
        self._output.__exit__(None, None, None)  # the tar is complete under its final name
        self.checksums[name] = self._hashing.sha256.hexdigest()
        self.outputs.append(name)
        self._tar, self._output, self._hashing = None, None, None
        if self.with_labels:
            from storage.arrow_view import write_labels

            label = labels_name(name)
            self.checksums[label] = write_labels(fs.join(self.out_dir, label), self._rows, file=name)
            self.labels.append(label)
        self._rows = []

    def close(self) -> None:
        self._finish_current()

    def _abort(self, exc_type=None, exc=None, tb=None) -> None:
        if self._output is not None:
            err = exc if exc is not None else RuntimeError("shard writer aborted")
            try:
                self._output.__exit__(type(err), err, tb)   # removes the unfinished file
            except BaseException:   # noqa: BLE001 - open_output re-raises the error it was given
                pass
        self._tar, self._output, self._hashing = None, None, None


class _BytesReader:
    """The smallest file object ``tarfile.addfile`` reads member data from (no BytesIO copy)."""

    def __init__(self, data: bytes):
        self.view = memoryview(data)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(len(self.view), self.pos + n)
        chunk = self.view[self.pos:end].tobytes()
        self.pos = end
        return chunk


def list_shard_files(paths: list[str] | list[os.PathLike]) -> list[str]:
    """The ``.tar`` files named by ``paths`` (files, or folders searched non-recursively).

    A folder written by a glipctl stage (it has a manifest) gives the tars its manifest
    commits, in shard order; any other folder, its ``.tar`` files by name. Local paths and
    URIs alike; paths come back normalized. Raises ``InputError`` for a missing path or a
    folder without any tar.
    """
    from storage.manifest import committed_outputs

    out: list[str] = []
    for raw in paths:
        p = fs.normalize(raw)
        kind = fs.kind_of(p)
        if kind is None:
            raise InputError(f"{raw}: no such file or folder")
        if kind == "dir":
            try:
                committed = committed_outputs(p)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            if committed is None:
                tars = [e.path for e in fs.list_dir(p)
                        if not e.is_dir and e.name.endswith(".tar") and not e.name.startswith(".")]
            else:
                tars = [t for t in committed if t.endswith(".tar")]
            if not tars:
                raise InputError(f"{raw}: no .tar shards in this folder")
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


@dataclass(frozen=True)
class ShardEntry:
    """One sample of a shard with where it came from: ``member`` is its tar member stem and
    ``ext`` its image's extension (``member.ext`` is the image's name inside ``tar``; ``""``
    when the sample has no image member and images were not read); ``image`` the original
    bytes, ``b""`` when they were not read."""
    sample: GroundedSample
    image: bytes
    tar: str
    member: str
    ext: str


def iter_shard_entries(paths: list[str] | list[os.PathLike], counts: StageCounts,
                       with_images: bool = True) -> Iterator[ShardEntry]:
    """``iter_shard_samples`` with each sample's tar, member stem and image extension."""
    wanted = frozenset(("json",) + (IMAGE_EXTENSIONS if with_images else ()))
    for path in list_shard_files(paths):
        for stem, group in iter_tar_groups(path, counts, wanted):
            counts.read += 1
            where = f"{path} key {stem}"
            if group.get("json") is None:
                counts.skip("missing_json", where)
                continue
            if with_images:
                ext = next((e for e in IMAGE_EXTENSIONS if group.get(e)), None)
                if ext is None:
                    counts.skip("missing_image", where)
                    continue
            else:   # unread members map to None: their extension is known without their bytes
                ext = next((e for e in IMAGE_EXTENSIONS if e in group), "")
            sample = parse_sample_json(group["json"], counts, where)
            if sample is not None:
                yield ShardEntry(sample, group[ext] if with_images else b"", path, stem, ext)


def iter_shard_samples(paths: list[str] | list[os.PathLike], counts: StageCounts,
                       with_images: bool = True) -> Iterator[tuple[GroundedSample, bytes]]:
    """Stream ``(sample, image_bytes)`` from pseudo-label shards (tars, or folders of tars).

    ``with_images=False`` skips reading image bytes (yields ``b""``), for metadata-only
    consumers such as the Arrow view. Truncated tars and bad members are counted skips.
    """
    for entry in iter_shard_entries(paths, counts, with_images):
        yield entry.sample, entry.image
