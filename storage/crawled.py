"""Crawled image-caption pairs: img2dataset output, plain Parquet, JSONL.

The shard is the unit of work (img2dataset's own rule). ``discover_crawled_shards``
turns the user's paths into a list of ``CrawledShard``; each shard streams its
records as plain dicts::

    {"key": str, "caption": str, "url": str | None, "width": int | None,
     "height": int | None, "source_index": int, "image": bytes | None}

``source_index`` is the record's position in its shard, counting records that were
skipped, so it is stable across re-runs. ``width``/``height`` are the stored image's
pixels when the input says so (img2dataset does), else None.

Layouts understood:

- img2dataset ``webdataset`` mode: ``NNNNN.tar`` holding ``{key}.jpg``, ``{key}.txt``
  (the caption) and ``{key}.json`` (url, key, width, height, status, ...), with
  ``NNNNN.parquet`` and ``NNNNN_stats.json`` beside it. The tar is the shard; the
  Parquet beside it (the *sidecar*) is metadata of the same rows, failed downloads
  included, and is not a shard of its own. Reading captions only (``with_images=False``)
  reads the sidecar when there is one: a few percent of the tar's bytes. Its rows whose
  ``status`` is not ``success`` are the failed downloads the tar does not hold; they are
  passed over (neither read nor skipped), so both ways give the same records and indices.
- img2dataset ``parquet`` mode: ``NNNNN.parquet`` with columns url, key, caption,
  status, width, height and the image bytes in ``jpg``; rows whose ``status`` is
  not ``success`` are skipped (``download_failed``).
- plain Parquet or JSONL with a caption column (``caption_field``), optional key and
  url columns; an ``image_path`` field (relative to the file) or ``jpg``/``image``
  bytes column provides the image.

Bad records are counted skips (``StageCounts.skip(reason, file, key)``), never
exceptions. The reader counts ``read`` once per record it meets; the consumer
counts ``written``.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from storage import fs
from storage.errors import InputError
from storage.skips import StageCounts
from storage.tar_members import iter_tar_groups

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("jpg", "image", "png", "webp")
KINDS = ("img2dataset_tar", "parquet", "jsonl")


@dataclass(frozen=True)
class CrawledShard:
    """One input shard. Picklable: Ray tasks receive it and read the file themselves."""
    name: str              # stable and unique among the inputs of one run, e.g. "00000"
    path: str              # absolute local path or URI (storage.fs)
    kind: str              # one of KINDS
    caption_field: str = "caption"
    key_field: str = "key"
    url_field: str = "url"
    sidecar: str = ""      # img2dataset_tar: the Parquet beside the tar, when there is one

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "kind": self.kind, "caption_field": self.caption_field,
                "key_field": self.key_field, "url_field": self.url_field, "sidecar": self.sidecar}

    def iter_records(self, counts: StageCounts, with_images: bool = False) -> Iterator[dict[str, Any]]:
        """Stream the shard's usable records; see the module docstring for the dict shape."""
        if self.kind == "img2dataset_tar" and self.sidecar and not with_images:
            yield from self._iter_parquet(counts, False, path=self.sidecar, failed_rows_are_absent=True)
        elif self.kind == "img2dataset_tar":
            yield from self._iter_tar(counts, with_images)
        elif self.kind == "parquet":
            yield from self._iter_parquet(counts, with_images)
        elif self.kind == "jsonl":
            yield from self._iter_jsonl(counts, with_images)
        else:
            raise ValueError(f"unknown shard kind {self.kind!r}")

    # -- img2dataset webdataset mode -------------------------------------------------
    def _iter_tar(self, counts: StageCounts, with_images: bool) -> Iterator[dict[str, Any]]:
        wanted = frozenset(("txt", "json") + (IMAGE_EXTENSIONS if with_images else ()))
        for index, (member_key, group) in enumerate(iter_tar_groups(self.path, counts, wanted)):
            counts.read += 1
            where = f"{self.path} key {member_key}"
            meta: dict[str, Any] = {}
            if group.get("json") is not None:
                try:
                    meta = json.loads(group["json"].decode("utf-8"))
                    if not isinstance(meta, dict):
                        raise ValueError("not a JSON object")
                except (UnicodeDecodeError, ValueError) as exc:
                    counts.skip("bad_json", where, str(exc))
                    continue
            if group.get("txt") is not None:
                try:
                    caption = group["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    counts.skip("invalid_utf8", where)
                    continue
            else:
                caption = meta.get(self.caption_field)
            image = None
            if with_images:
                image = next((group[e] for e in IMAGE_EXTENSIONS if group.get(e)), None)
            record = self._record(meta.get(self.key_field) or member_key, caption,
                                  meta.get(self.url_field), meta.get("width"), meta.get("height"),
                                  index, image, with_images, counts, where)
            if record is not None:
                yield record

    # -- Parquet (img2dataset parquet mode, or any Parquet with a caption column) ----
    def _iter_parquet(self, counts: StageCounts, with_images: bool, path: str | None = None,
                      failed_rows_are_absent: bool = False) -> Iterator[dict[str, Any]]:
        """Rows of a Parquet file; ``failed_rows_are_absent``: an img2dataset sidecar, whose
        failed downloads are not records of the shard (they are not in its tar)."""
        import pyarrow.parquet as pq

        path = path or self.path
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
        except Exception as exc:   # pyarrow raises ArrowInvalid/OSError for a corrupt file
            counts.skip("unreadable_parquet", path, str(exc))
            return
        names = set(pf.schema_arrow.names)
        image_col = next((c for c in IMAGE_COLUMNS if c in names), None) if with_images else None
        wanted = [c for c in (self.caption_field, self.key_field, self.url_field, "width",
                              "height", "status", "image_path", image_col) if c and c in names]
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=wanted):
                cols = batch.to_pydict()
                for i in range(batch.num_rows):
                    row = {c: cols[c][i] for c in wanted}
                    if failed_rows_are_absent and row.get("status", "success") != "success":
                        continue
                    counts.read += 1
                    yield from self._row_record(row, index, image_col, with_images, counts, path)
                    index += 1
        except Exception as exc:   # a corrupt page mid-file: keep what was read
            counts.skip("unreadable_parquet", path, f"at row {index}: {exc}")

    # -- JSONL ------------------------------------------------------------------------
    def _iter_jsonl(self, counts: StageCounts, with_images: bool) -> Iterator[dict[str, Any]]:
        with fs.open_input_stream(self.path) as raw:
            for index, line in enumerate(_lines(raw)):
                if not line.strip():
                    continue
                counts.read += 1
                try:
                    row = json.loads(line.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                except UnicodeDecodeError:
                    counts.skip("invalid_utf8", f"{self.path} line {index + 1}")
                    continue
                except ValueError as exc:
                    counts.skip("bad_json", f"{self.path} line {index + 1}", str(exc))
                    continue
                yield from self._row_record(row, index, None, with_images, counts)

    # -- shared -------------------------------------------------------------------------
    def _row_record(self, row: dict[str, Any], index: int, image_col: str | None,
                    with_images: bool, counts: StageCounts, path: str | None = None) -> Iterator[dict[str, Any]]:
        key = row.get(self.key_field)
        key = str(key) if key not in (None, "") else f"{self.name}-{index:07d}"
        where = f"{path or self.path} key {key}"
        status = row.get("status")
        if status is not None and status != "success":
            counts.skip("download_failed", where, str(status))
            return
        image = None
        if with_images:
            if image_col is not None:
                image = row.get(image_col)
            elif row.get("image_path"):
                image = self._read_image_path(str(row["image_path"]), counts, where)
                if image is None:
                    return
        record = self._record(key, row.get(self.caption_field), row.get(self.url_field),
                              row.get("width"), row.get("height"), index, image, with_images,
                              counts, where)
        if record is not None:
            yield record

    def _read_image_path(self, rel: str, counts: StageCounts, where: str) -> bytes | None:
        path = rel if fs.is_remote(rel) or rel.startswith("/") else fs.join(fs.parent_of(self.path), rel)
        try:
            return fs.read_bytes(path)
        except OSError:     # FileNotFoundError included
            counts.skip("missing_image", where, path)
            return None

    def _record(self, key: Any, caption: Any, url: Any, width: Any, height: Any, index: int,
                image: bytes | None, with_images: bool, counts: StageCounts,
                where: str) -> dict[str, Any] | None:
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                counts.skip("invalid_utf8", where)
                return None
        if not isinstance(caption, str) or not caption.strip():
            counts.skip("missing_caption", where)
            return None
        if with_images and not image:
            counts.skip("missing_image", where)
            return None
        return {"key": str(key), "caption": caption, "url": None if url is None else str(url),
                "width": _positive_int(width), "height": _positive_int(height),
                "source_index": index, "image": bytes(image) if image else None}


def _positive_int(v: Any) -> int | None:
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _lines(fh) -> Iterator[bytes]:
    """Lines of a binary stream (pyarrow streams have no line iteration of their own)."""
    rest = b""
    while chunk := fh.read(1 << 20):
        rest += chunk
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


def _is_stats_or_hidden(name: str) -> bool:
    return name.startswith((".", "_")) or fs.stem_of(name).endswith("_stats")


_KIND_OF_SUFFIX = {".tar": "img2dataset_tar", ".parquet": "parquet", ".jsonl": "jsonl"}


def _files_of(path: str) -> list[tuple[str, str, str]]:
    """The shard files of one input path: ``(path, kind, sidecar)``."""
    if fs.is_file(path):
        kind = _KIND_OF_SUFFIX.get(fs.suffix_of(path))
        if kind is None:
            raise InputError(f"{path}: not a crawled shard (expected .tar, .parquet or .jsonl)")
        sidecar = ""
        if kind == "img2dataset_tar":
            beside = path[: -len(".tar")] + ".parquet"
            sidecar = beside if fs.is_file(beside) else ""
        return [(path, kind, sidecar)]
    files = [e for e in fs.list_dir(path) if not e.is_dir and not _is_stats_or_hidden(e.name)]
    by_name = {e.name: e for e in files}
    tar_stems = {e.name[:-4] for e in files if e.name.endswith(".tar")}
    out = []
    for e in files:
        suffix = fs.suffix_of(e.name)
        if suffix == ".tar":
            side = by_name.get(e.name[:-4] + ".parquet")
            out.append((e.path, "img2dataset_tar", side.path if side else ""))
        elif suffix == ".parquet" and e.name[: -len(".parquet")] not in tar_stems:   # beside a tar = its sidecar
            out.append((e.path, "parquet", ""))
        elif suffix == ".jsonl":
            out.append((e.path, "jsonl", ""))
    return out


def _check_columns(path: str, caption_field: str) -> None:
    """Fail early (exit 2) when a readable Parquet file lacks the caption column."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(fs.open_input_file(path)).names
    except Exception:
        return   # unreadable: the shard counts it as a skip when read
    if caption_field not in names:
        raise InputError(f"{path}: no caption column {caption_field!r} (columns: {', '.join(names)}); "
                         f"pass --caption-field")


def discover_crawled_shards(inputs: list[str], caption_field: str = "caption", key_field: str = "key",
                            url_field: str = "url") -> list[CrawledShard]:
    """Every shard under ``inputs`` (files or folders, local paths or URIs), in a stable order.

    Names are file stems ("00000"); when two inputs hold the same stem the parent
    folder's name is prefixed ("laion_00000") so names stay unique. Paths come back
    normalized (absolute, or the URI). Raises ``InputError`` for a missing path, a folder
    with no shard, or (first Parquet file of each input) no caption column.
    """
    if not inputs:
        raise InputError("no input paths given")
    found: list[tuple[str, str, str]] = []
    for raw in inputs:
        path = fs.normalize(raw)
        if fs.kind_of(path) is None:
            raise InputError(f"{raw}: no such file or folder")
        files = _files_of(path)
        if not files:
            raise InputError(f"{raw}: no crawled shards found (.tar, .parquet or .jsonl)")
        # one footer per input, not per shard: a wrong --caption-field shows on the first file,
        # and a later file without the column still only yields counted missing_caption skips
        first_parquet = next((p for p, kind, _ in files if kind == "parquet"), None)
        if first_parquet is not None:
            _check_columns(first_parquet, caption_field)
        found.extend(files)
    stems = [fs.stem_of(p) for p, _, _ in found]
    stem_count = Counter(stems)
    names = [s if stem_count[s] == 1 else f"{fs.name_of(fs.parent_of(p))}_{s}"
             for s, (p, _, _) in zip(stems, found)]
    name_count, seen = Counter(names), Counter()
    unique = []
    for n in names:   # same folder name twice: number them, in input order
        seen[n] += 1
        unique.append(n if name_count[n] == 1 else f"{n}_{seen[n]}")
    return [CrawledShard(name, p, kind, caption_field, key_field, url_field, sidecar)
            for name, (p, kind, sidecar) in zip(unique, found)]
