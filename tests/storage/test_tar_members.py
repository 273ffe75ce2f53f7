"""The streaming tar reader: every tar flavour tarfile writes, and every way a tar breaks."""
from __future__ import annotations

import io
import tarfile

import pytest

from storage.skips import StageCounts
from storage.tar_members import iter_tar_groups, split_member_name

LONG = "d" * 120 + "/" + "k" * 110


def make_tar(path, members, fmt=tarfile.PAX_FORMAT, mode="w"):
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        dir_info = tarfile.TarInfo("somedir")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
    return path


MEMBERS = [("a.jpg", b"J" * 700), ("a.json", b'{"k": 1}'), (f"{LONG}.json", b"{}"),
           ("sub/b.seg.txt", "café".encode()), ("sub/b.txt", b"t"), (".hidden", b"x")]


def test_split_member_name():
    assert split_member_name("dir/abc.seg.json") == ("dir/abc", "seg.json")
    assert split_member_name("dir/.x") == ("", "")
    assert split_member_name("noext") == ("", "")


@pytest.mark.parametrize("fmt,mode", [(tarfile.PAX_FORMAT, "w"), (tarfile.GNU_FORMAT, "w"),
                                      (tarfile.PAX_FORMAT, "w:gz")])
def test_groups_in_every_flavour(tmp_path, fmt, mode):
    path = make_tar(tmp_path / "t.tar", MEMBERS, fmt, mode)
    counts = StageCounts()
    groups = list(iter_tar_groups(path, counts, wanted=frozenset({"json", "seg.txt", "txt"})))
    assert groups == [("a", {"jpg": None, "json": b'{"k": 1}'}), (LONG, {"json": b"{}"}),
                      ("sub/b", {"seg.txt": "café".encode(), "txt": b"t"})]
    assert not counts.skipped
    everything = dict(iter_tar_groups(path, counts))
    assert everything["a"]["jpg"] == b"J" * 700


@pytest.mark.parametrize("cut", ["mid_data", "header_boundary", "mid_header", "empty"])
def test_truncation_is_counted_once(tmp_path, cut):
    path = make_tar(tmp_path / "t.tar", [(f"k{i}.json", b"x" * 600) for i in range(4)])
    data = path.read_bytes()
    # members are 512 header + 1024 data; sample k1 spans bytes 1536..3072
    end = {"mid_data": 1536 + 700, "header_boundary": 3072, "mid_header": 3072 + 100, "empty": 0}[cut]
    path.write_bytes(data[:end])
    counts = StageCounts()
    keys = [k for k, _ in iter_tar_groups(path, counts)]
    # k1 is dropped even when whole: more of its members might have followed the break
    assert keys == {"mid_data": ["k0"], "header_boundary": ["k0"], "mid_header": ["k0"],
                    "empty": []}[cut]
    assert counts.skipped == {"truncated_tar": 1}


def test_corrupt_header_checksum(tmp_path):
    path = make_tar(tmp_path / "t.tar", [("a.json", b"1"), ("b.json", b"2")])
    data = bytearray(path.read_bytes())
    data[1024 + 10] ^= 0xFF          # inside b.json's header name field
    path.write_bytes(bytes(data))
    counts = StageCounts()
    # the broken header could have been another member of "a": nothing is trusted past it
    assert [k for k, _ in iter_tar_groups(path, counts)] == []
    assert counts.skipped == {"truncated_tar": 1}
