"""Crawled pairs: img2dataset folders (webdataset and parquet mode), plain Parquet, JSONL, bad input."""
from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.crawled import CrawledShard, discover_crawled_shards
from storage.errors import InputError
from storage.skips import StageCounts

CAPS = [["a dog runs", "two kids on a bench", "a red car"], ["a cat sleeps", "the sea at dusk"]]


def read_all(shards, with_images=False):
    counts = StageCounts()
    recs = [r for s in shards for r in s.iter_records(counts, with_images=with_images)]
    return recs, counts


def test_img2dataset_webdataset_mode(tmp_path, img2dataset_folder):
    root = img2dataset_folder(tmp_path / "crawl", CAPS)
    shards = discover_crawled_shards([str(root)])
    # the Parquet and _stats.json beside each tar are metadata, not shards
    assert [(s.name, s.kind) for s in shards] == [("00000", "img2dataset_tar"), ("00001", "img2dataset_tar")]
    assert pickle.loads(pickle.dumps(shards[0])) == shards[0]
    recs, counts = read_all(shards, with_images=True)
    assert [r["caption"] for r in recs] == CAPS[0] + CAPS[1]
    assert recs[1]["key"] == "000000001" and recs[1]["url"] == "http://example.com/000000001.jpg"
    assert (recs[1]["width"], recs[1]["height"]) == (9, 6)
    assert recs[1]["source_index"] == 1
    assert recs[0]["image"][:2] == b"\xff\xd8"          # the JPEG bytes, untouched
    assert counts.read == 5 and not counts.skipped


def test_img2dataset_parquet_mode_skips_failed_downloads(tmp_path, img2dataset_folder):
    root = img2dataset_folder(tmp_path / "crawl", CAPS, mode="parquet")
    shards = discover_crawled_shards([str(root)])
    assert [(s.name, s.kind) for s in shards] == [("00000", "parquet"), ("00001", "parquet")]
    recs, counts = read_all(shards, with_images=True)
    assert [r["caption"] for r in recs] == CAPS[0] + CAPS[1]
    assert all(r["image"][:2] == b"\xff\xd8" for r in recs)
    assert counts.read == 7 and counts.skipped == {"download_failed": 2}


def test_plain_parquet_and_jsonl_with_custom_columns(tmp_path):
    pq.write_table(pa.table({"text": ["a boat", "", "a tree"], "id": ["b1", "b2", "b3"]}),
                   tmp_path / "web.parquet")
    lines = [json.dumps({"text": "a horse", "link": "http://x/h.jpg"}), "{not json", "",
             json.dumps({"text": None})]
    (tmp_path / "more.jsonl").write_text("\n".join(lines) + "\n")
    shards = discover_crawled_shards([str(tmp_path / "web.parquet"), str(tmp_path / "more.jsonl")],
                                     caption_field="text", key_field="id", url_field="link")
    recs, counts = read_all(shards)
    assert [(r["key"], r["caption"]) for r in recs] == [("b1", "a boat"), ("b3", "a tree"),
                                                        ("more-0000000", "a horse")]
    assert recs[2]["url"] == "http://x/h.jpg" and recs[2]["width"] is None
    assert counts.skipped == {"missing_caption": 2, "bad_json": 1}


def test_jsonl_image_path_resolved_next_to_file(tmp_path, make_jpeg):
    (tmp_path / "img.jpg").write_bytes(make_jpeg())
    (tmp_path / "a.jsonl").write_text(json.dumps({"caption": "x", "image_path": "img.jpg"}) + "\n"
                                      + json.dumps({"caption": "y", "image_path": "gone.jpg"}) + "\n")
    recs, counts = read_all(discover_crawled_shards([str(tmp_path / "a.jsonl")]), with_images=True)
    assert len(recs) == 1 and recs[0]["image"][:2] == b"\xff\xd8"
    assert counts.skipped == {"missing_image": 1}


def test_truncated_tar_keeps_what_came_before(tmp_path, img2dataset_folder):
    root = img2dataset_folder(tmp_path / "crawl", [CAPS[0]])
    tar = root / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    (root / "00000.parquet").unlink()      # no sidecar: captions come from the tar itself
    recs, counts = read_all(discover_crawled_shards([str(root)]))
    assert 0 < len(recs) < 3
    assert counts.skipped["truncated_tar"] == 1


def test_corrupt_members_are_counted_skips(tmp_path):
    import io
    import tarfile

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.txt", b"good caption"), ("a.json", b'{"url": "u"}'),
                           ("b.txt", b"\xff\xfe bad utf8"), ("c.txt", b"fine"), ("c.json", b"{oops"),
                           ("d.json", b'{"key": "d"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    recs, counts = read_all([CrawledShard("00000", str(path), "img2dataset_tar")])
    assert [r["key"] for r in recs] == ["a"]
    assert counts.skipped == {"invalid_utf8": 1, "bad_json": 1, "missing_caption": 1}


def test_missing_path_empty_folder_and_wrong_column_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        discover_crawled_shards([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        discover_crawled_shards([str(tmp_path / "empty")])
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="no caption column 'caption'"):
        discover_crawled_shards([str(tmp_path / "t.parquet")])


def test_captions_come_from_the_parquet_sidecar_with_the_same_records(tmp_path, img2dataset_folder):
    root = img2dataset_folder(tmp_path / "crawl", CAPS, failed_per_shard=2)
    shards = discover_crawled_shards([str(root)])
    assert [s.sidecar for s in shards] == [str(root / "00000.parquet"), str(root / "00001.parquet")]
    from_sidecar, sidecar_counts = read_all(shards)
    no_sidecar = [CrawledShard(**{**s.to_dict(), "sidecar": ""}) for s in shards]
    from_tar, tar_counts = read_all(no_sidecar)
    assert from_sidecar == from_tar                 # keys, captions, urls, sizes, source_index
    assert sidecar_counts.to_dict() == tar_counts.to_dict()   # failed downloads are not records
    # proof the sidecar was read: break the tars, the captions are still all there
    for s in shards:
        with open(s.path, "r+b") as fh:
            fh.truncate(100)
    again, counts = read_all(shards)
    assert again == from_sidecar and not counts.skipped


def test_same_stem_in_two_folders_gets_unique_names(tmp_path, img2dataset_folder):
    a = img2dataset_folder(tmp_path / "laion", [["x"]])
    b = img2dataset_folder(tmp_path / "cc3m", [["y"]])
    names = [s.name for s in discover_crawled_shards([str(a), str(b)])]
    assert names == ["laion_00000", "cc3m_00000"]
