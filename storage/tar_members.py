"""Stream a WebDataset-style tar as groups of members that share a key.

WebDataset's rule: a member ``dir/abc.jpg`` belongs to sample ``dir/abc``; the
extension is everything after the first dot of the basename. Members of one
sample are consecutive. Reading is streaming (``tarfile`` mode ``r|``), so memory
holds one sample at a time whatever the tar's size.

A tar that ends early or has a broken header yields what came before, then
reports ``truncated_tar`` through the caller's ``StageCounts``; it never raises.
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from storage.skips import StageCounts


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.json"`` -> ``("dir/abc", "seg.json")``; ``("", "")`` for names to ignore."""
    slash = name.rfind("/")
    base = name[slash + 1:]
    if not base or base.startswith("."):
        return "", ""
    dot = base.find(".")
    if dot <= 0:
        return "", ""
    return name[: slash + 1 + dot], base[dot + 1:].lower()


def iter_tar_groups(path: str | Path, counts: StageCounts,
                    wanted: frozenset[str] | None = None) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Yield ``(key, {extension: bytes or None})`` for each sample in the tar at ``path``.

    ``wanted``: extensions whose bytes are read (others are skipped without reading,
    which saves copying images when only metadata is needed; unread members map to
    None); ``wanted=None`` reads all.
    Truncation or a corrupt header is counted once as ``truncated_tar`` and ends the file.
    """
    path = str(path)
    key: str | None = None
    group: dict[str, bytes | None] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_member_name(member.name)
                if not k:
                    continue
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                if wanted is None or ext in wanted:
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is short")
                    group[ext] = data
                else:
                    group.setdefault(ext, None)   # present, not read
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        counts.skip("truncated_tar", path, f"after key {key!r}: {exc}")
        # the partial sample at the break is dropped: its members may be incomplete
        return
    if key is not None:
        yield key, group
