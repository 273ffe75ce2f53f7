"""Pseudo-label shards: round trip, size cap, atomicity, bad input, and both WebDataset readers."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from storage.errors import InputError
from storage.shards import ShardWriter, iter_shard_samples, list_shard_files
from storage.skips import StageCounts


def write_shards(out, make_sample, make_jpeg, n=5, max_samples=2, name="00000"):
    samples = [make_sample(f"{name}{i:04d}") for i in range(n)]
    with ShardWriter(out, name, max_samples=max_samples) as w:
        for s in samples:
            w.write(s, make_jpeg())
    return samples, w


def test_round_trip_and_size_cap(tmp_path, make_sample, make_jpeg):
    samples, w = write_shards(tmp_path, make_sample, make_jpeg, n=5, max_samples=2)
    assert w.outputs == ["00000-00000.tar", "00000-00001.tar", "00000-00002.tar"]
    assert w.labels == [o[:-4] + ".labels.parquet" for o in w.outputs]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(w.outputs + w.labels)   # no temp files
    assert set(w.checksums) == set(w.outputs + w.labels)
    import hashlib
    assert w.checksums[w.outputs[0]] == hashlib.sha256((tmp_path / w.outputs[0]).read_bytes()).hexdigest()
    counts = StageCounts()
    back = list(iter_shard_samples([str(tmp_path)], counts))
    assert [s.to_dict() for s, _ in back] == [s.to_dict() for s in samples]
    assert all(img == make_jpeg() for _, img in back)
    assert counts.read == 5 and not counts.skipped


def test_keys_with_dots_and_slashes_survive(tmp_path, make_sample, make_jpeg):
    s = make_sample("goldg/flickr/123.jpg/4")
    with ShardWriter(tmp_path, "g", labels=False) as w:
        w.write(s, make_jpeg())
    names = tarfile.open(tmp_path / "g-00000.tar").getnames()
    assert names == ["goldg_flickr_123_jpg_4.jpg", "goldg_flickr_123_jpg_4.json"]
    (back, _), = iter_shard_samples([tmp_path / "g-00000.tar"], StageCounts())
    assert back.key == "goldg/flickr/123.jpg/4"


def test_exception_leaves_no_finished_looking_file(tmp_path, make_sample, make_jpeg):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "x", max_samples=10) as w:
            w.write(make_sample("a"), make_jpeg())
            raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def test_truncated_tar_and_bad_members_are_counted(tmp_path, make_sample, make_jpeg):
    write_shards(tmp_path, make_sample, make_jpeg, n=6, max_samples=6)
    tar = tmp_path / "00000-00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * 0.6)])
    bad = tmp_path / "bad.tar"
    outside = make_sample("o").to_dict()
    outside["boxes"][0]["bbox"] = [500.0, 500.0, 10.0, 10.0]            # outside a 64x48 image
    outside["boxes"][1]["tokens_positive"] = [[3, 999]]                 # span outside the caption
    with tarfile.open(bad, "w") as t:
        for name, payload in [("a.jpg", make_jpeg()), ("a.json", b"{not json"),
                              ("b.jpg", make_jpeg()),                    # no json
                              ("c.json", json.dumps(make_sample("c").to_dict()).encode()),  # no image
                              ("d.jpg", make_jpeg()), ("d.json", b'{"key": "d"}'),
                              ("o.jpg", make_jpeg()), ("o.json", json.dumps(outside).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    counts = StageCounts()
    back = list(iter_shard_samples([str(tmp_path)], counts))
    keys = [s.key for s, _ in back]
    assert 0 < len(keys) - 1 < 6 and keys[-1] == "o"
    assert back[-1][0].boxes == []           # both boxes dropped, the sample kept
    assert counts.skipped == {"truncated_tar": 1, "bad_json": 1, "missing_json": 1, "missing_image": 1,
                              "malformed_record": 1, "box_outside_image": 1,
                              "box_span_outside_caption": 1}


def test_list_shard_files_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list_shard_files([tmp_path / "missing"])
    with pytest.raises(InputError, match="no .tar shards"):
        list_shard_files([tmp_path])


def test_webdataset_library_reads_shards(tmp_path, make_sample, make_jpeg):
    import webdataset as wds

    samples, w = write_shards(tmp_path, make_sample, make_jpeg, n=3, max_samples=2)
    urls = [str(tmp_path / o) for o in w.outputs]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [g["json"]["key"] for g in got] == [s.key for s in samples]
    assert got[0]["jpg"].shape == (6, 8, 3)


def test_ray_read_webdataset_reads_shards(tmp_path, make_sample, make_jpeg, ray_session):
    import ray

    samples, w = write_shards(tmp_path, make_sample, make_jpeg, n=3, max_samples=2)
    ds = ray.data.read_webdataset([str(tmp_path / o) for o in w.outputs], decoder=None)
    rows = ds.take_all()
    keys = sorted(json.loads(r["json"])["key"] for r in rows)
    assert keys == sorted(s.key for s in samples)
    assert all(bytes(r["jpg"]) == make_jpeg() for r in rows)


def test_each_skip_is_logged_naming_the_file_and_the_key(tmp_path, make_sample, make_jpeg, caplog):
    """README: bad input is a counted, logged skip naming the file and key. One warning per bad member, each
    naming the reason, the tar and the member's key (a truncated tar: the key being read at the break)."""
    import logging

    bad = tmp_path / "bad.tar"
    outside = make_sample("o").to_dict()
    outside["boxes"][0]["bbox"] = [500.0, 500.0, 10.0, 10.0]            # outside a 64x48 image
    with tarfile.open(bad, "w") as t:
        for name, payload in [("a.jpg", make_jpeg()), ("a.json", b"{not json"),
                              ("b.jpg", make_jpeg()),                    # no json
                              ("c.json", json.dumps(make_sample("c").to_dict()).encode()),  # no image
                              ("d.jpg", make_jpeg()), ("d.json", b'{"key": "d"}'),
                              ("o.jpg", make_jpeg()), ("o.json", json.dumps(outside).encode()),
                              ("g.jpg", make_jpeg()), ("g.json", json.dumps(make_sample("g").to_dict()).encode()),
                              ("t.jpg", make_jpeg()), ("t.json", json.dumps(make_sample("t").to_dict()).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    data = bad.read_bytes()
    bad.write_bytes(data[:data.index(b"t.json") + 600])                  # cut inside t.json's payload
    caplog.set_level(logging.WARNING, logger="glipctl")
    counts = StageCounts()
    back = list(iter_shard_samples([str(bad)], counts))
    assert [s.key for s, _ in back] == ["o", "g"]
    logged = [r.getMessage() for r in caplog.records if r.name == "glipctl" and r.levelno == logging.WARNING]
    expected = [("bad_json", "a"), ("missing_json", "b"), ("missing_image", "c"), ("malformed_record", "d"),
                ("box_outside_image", "o")]
    assert len(logged) == len(expected) + 1, logged
    for message, (reason, key) in zip(logged, expected):
        assert message.startswith(f"skipped ({reason}) {bad} key {key}"), message
    assert logged[-1].startswith(f"skipped (truncated_tar) {bad}: at key 't'"), logged[-1]
    assert "Expecting" in logged[0]                                      # the JSON error itself is given
    assert sum(counts.skipped.values()) == len(logged)
