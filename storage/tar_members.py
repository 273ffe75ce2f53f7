"""Stream a WebDataset-style tar as groups of members that share a key.

WebDataset's rule: a member ``dir/abc.jpg`` belongs to sample ``dir/abc``; the
extension is everything after the first dot of the basename. Members of one
sample are consecutive. Reading is streaming, so memory holds one sample at a
time whatever the tar's size.

Tars in the POSIX/GNU ``ustar`` family (what Python's ``tarfile``, webdataset,
img2dataset and GNU tar write) are read by a small header parser: ``tarfile`` spends
most of a metadata-only scan decoding header fields we never use, and members we
do not want (images, when only the JSON is needed) are seeked over, not read.
Anything else (old v7 tars, compressed tars) goes through ``tarfile``.

A tar that ends early (no end-of-archive block, a short member) or has a corrupt
header yields what came before, then reports ``truncated_tar`` through the caller's
``StageCounts``; it never raises.
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from storage import fs
from storage.skips import StageCounts

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
Groups = Iterator[tuple[str, dict[str, "bytes | None"]]]


class CorruptTar(Exception):
    """The tar cannot be read past this point (truncated, or a header that does not parse).

    ``member``: the name of the member whose data was cut short, when its header was read
    (the sample before it is then known to be complete).
    """

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


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


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:          # GNU base-256 for sizes >= 8 GiB
        return tarfile.nti(field)
    field = field.strip(b"\0 ")
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise CorruptTar(f"bad number field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise CorruptTar(f"unexpected end of file ({len(data)} of {n} bytes)")
    return data


def _ustar_members(fh: BinaryIO, wanted_name) -> Iterator[tuple[str, bytes | None]]:
    """``(member name, data or None)`` for the regular files of a ustar tar opened at offset 0.

    ``wanted_name(name) -> bool`` says whose data to read; the others are seeked over.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = fh.read(BLOCK)
        if len(header) < BLOCK:
            raise CorruptTar("no end-of-archive block")
        if header.count(0) == BLOCK:                # end of archive
            return
        if header[257:262] != b"ustar":
            raise CorruptTar("header without ustar magic")
        chksum = _number(header[148:156])
        unsigned = sum(header[:148]) + 256 + sum(header[156:])
        if chksum != unsigned and chksum != unsigned - 256 * sum(b >= 128 for b in header):
            raise CorruptTar("header checksum mismatch")   # (old Sun tars sum signed bytes)
        size = _number(header[124:136])
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"x", b"L"):                     # metadata for the next header
            data = _read_exact(fh, padded)[:size]
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            else:
                pax = _pax_records(data)
            continue
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\0":           # POSIX: a prefix may hold the leading path
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        name = pax.get("path") or long_name or name
        if "size" in pax:
            size = int(pax["size"])
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        long_name, pax = None, {}
        if kind in _REGULAR and wanted_name(name):
            try:
                data = _read_exact(fh, padded)
            except CorruptTar as exc:
                raise CorruptTar(str(exc), member=name) from None
            yield name, data[:size]
        else:
            if padded:
                _skip(fh, padded)    # past the end of a cut file: the next header read fails
            if kind in _REGULAR:
                yield name, None


def _skip(fh: BinaryIO, n: int) -> None:
    """Move ``n`` bytes ahead: a seek on local files, reading past on object-store streams."""
    if fh.seekable():
        fh.seek(n, 1)
        return
    while n > 0:
        chunk = fh.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def _tarfile_members(path: str, wanted_name) -> Iterator[tuple[str, bytes | None]]:
    """The same as ``_ustar_members`` through ``tarfile`` (other tar flavours, compression)."""
    current: str | None = None   # the member being read when the file breaks
    try:
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                current = None
                if not member.isfile():
                    continue
                if not wanted_name(member.name):
                    yield member.name, None
                    continue
                current = member.name
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise CorruptTar(f"member {member.name} is short", member=member.name)
                current = None
                yield member.name, data
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise CorruptTar(str(exc), member=current) from None


def _members(path: str, wanted_name) -> Iterator[tuple[str, bytes | None]]:
    with fs.open_input_stream(path) as fh:
        first = fh.read(BLOCK)
        if len(first) == BLOCK and first[257:262] == b"ustar":
            yield from _ustar_members(_Rewound(first, fh), wanted_name)
            return
    yield from _tarfile_members(path, wanted_name)


class _Rewound:
    """A stream whose first bytes were already read (to sniff the format), put back in front.

    Object-store streams cannot seek back to 0; local files could, but one code path is simpler.
    """

    def __init__(self, head: bytes, fh: BinaryIO):
        self._head = head
        self._fh = fh

    def read(self, n: int) -> bytes:
        if not self._head:
            return self._fh.read(n)
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += self._fh.read(n - len(data))
        return data

    def seekable(self) -> bool:
        return not self._head and self._fh.seekable()

    def seek(self, n: int, whence: int = 0) -> None:
        self._fh.seek(n, whence)


def iter_tar_groups(path: str | Path, counts: StageCounts,
                    wanted: frozenset[str] | None = None) -> Groups:
    """Yield ``(key, {extension: bytes or None})`` for each sample in the tar at ``path``.

    ``wanted``: extensions whose bytes are read (others are skipped without reading,
    which saves copying images when only metadata is needed; unread members map to
    None); ``wanted=None`` reads all. Truncation or a corrupt header is counted once as
    ``truncated_tar`` and ends the file; the sample being read at the break is dropped.
    """
    path = str(path)

    def wanted_name(name: str) -> bool:
        if wanted is None:
            return True
        return split_member_name(name)[1] in wanted

    key: str | None = None
    group: dict[str, bytes | None] = {}
    try:
        for name, data in _members(path, wanted_name):
            k, ext = split_member_name(name)
            if not k:
                continue
            if k != key:
                if key is not None:
                    yield key, group
                key, group = k, {}
            group[ext] = data
    except (OSError, FileNotFoundError) as exc:   # pyarrow raises OSError for a missing object too
        counts.skip("unreadable_tar", path, str(exc))
        return
    except CorruptTar as exc:
        cut = exc.member
        if key is not None and cut is not None and split_member_name(cut)[0] != key:
            yield key, group          # the break is inside the next sample: this one is whole
            key = cut
        counts.skip("truncated_tar", path, f"at key {key!r}: {exc}")
        return
    if key is not None:
        yield key, group
