"""The Arrow view over shards, GoldG, COCO and ODVG files: one row per sample, one row per box."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from storage.arrow_view import (BOX_SCHEMA, SAMPLE_SCHEMA, boxes_table, iter_sample_batches,
                                resolve_sources, samples_table)
from storage.coco import write_coco_detection
from storage.errors import InputError
from storage.goldg import write_mdetr
from storage.odvg import write_odvg
from storage.shards import ShardWriter
from storage.skips import StageCounts


def test_every_source_in_one_view(tmp_path, make_sample, make_jpeg):
    shards = tmp_path / "pseudo"
    with ShardWriter(shards, "00000", max_samples=2) as w:
        for i in range(3):
            w.write(make_sample(f"p{i}", n_boxes=2), make_jpeg())
    gold = make_sample("goldg/flickr/1/0", n_boxes=1, source="goldg/flickr")
    gold.boxes[0].tokens_positive = [[0, 9], [13, 25]]
    write_mdetr([gold], tmp_path / "gold.json")
    det = make_sample("d", n_boxes=3, source="det/x")
    write_coco_detection([det], tmp_path / "coco.json")
    write_odvg([make_sample("o", n_boxes=1, source="goldg/odvg")], tmp_path / "o.jsonl")

    paths = [str(shards), str(tmp_path / "gold.json"), str(tmp_path / "coco.json"), str(tmp_path / "o.jsonl")]
    counts = StageCounts()
    t = samples_table(paths, counts)
    assert t.schema.equals(SAMPLE_SCHEMA)
    assert t.column("source").to_pylist() == ["pseudo/test"] * 3 + ["goldg/flickr", "det/coco", "goldg/odvg"]
    assert t.column("key").to_pylist()[:4] == ["p0", "p1", "p2", "goldg/flickr/1/0"]
    first = t.slice(0, 1).to_pylist()[0]
    assert first["boxes"][1] == {"bbox": [2.0, 2.0, 10.0, 12.0], "tokens_positive": [[13, 25]], "phrase": 1,
                                 "phrase_text": "a green lawn", "score": pytest.approx(0.8)}
    assert t.slice(3, 1).to_pylist()[0]["boxes"][0]["tokens_positive"] == [[0, 9], [13, 25]]
    assert counts.written == 6 and not counts.skipped

    b = boxes_table(paths)
    assert b.schema.equals(BOX_SCHEMA)
    assert b.num_rows == 3 * 2 + 1 + 3 + 1
    row = b.slice(1, 1).to_pylist()[0]
    assert (row["key"], row["box_index"], row["phrase"], row["source"]) == ("p0", 1, "a green lawn", "pseudo/test")
    assert row["bbox"] == [2.0, 2.0, 10.0, 12.0] and row["score"] == pytest.approx(0.8)
    # COCO boxes come back as category-name phrases
    assert b.filter(b.column("source").to_numpy(zero_copy_only=False) == "det/coco").column("phrase").to_pylist() \
        == ["a red dog", "a green lawn", "a red dog"]


def test_batches_stream_and_bad_records_are_counted(tmp_path, make_sample, make_jpeg):
    with ShardWriter(tmp_path, "s", max_samples=100) as w:
        for i in range(5):
            w.write(make_sample(f"k{i}"), make_jpeg())
    bad = make_sample("bad").to_dict()
    bad["boxes"][0]["bbox"] = [100.0, 100.0, 5.0, 5.0]          # outside the 64x48 image
    bad["boxes"][1]["bbox"] = [-5.0, -5.0, 20.0, 20.0]          # clipped, kept
    with tarfile.open(tmp_path / "t.tar", "w") as t:
        for name, data in [("bad.json", json.dumps(bad).encode()), ("x.json", b"{nope"),
                           ("y.json", b'{"key": "y", "caption": "", "width": 1, "height": 1}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    counts = StageCounts()
    batches = list(iter_sample_batches([str(tmp_path)], counts, batch_size=2))
    # the writer's label table gives [2, 2, 1], then the foreign tar (no label table) [1]
    assert [b.num_rows for b in batches] == [2, 2, 1, 1]
    last = batches[-1].to_pylist()[-1]
    assert last["key"] == "bad" and [b["bbox"] for b in last["boxes"]] == [[0.0, 0.0, 15.0, 15.0]]
    assert counts.read == 8 and counts.written == 6
    assert counts.skipped == {"box_outside_image": 1, "bad_json": 1, "invalid_sample": 1}


def test_sources_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        resolve_sources([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="no .tar shards"):
        resolve_sources([str(tmp_path)])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="not a shard"):
        resolve_sources([str(tmp_path / "x.csv")])
    (tmp_path / "a.json").write_text("{}")
    assert resolve_sources([f"{tmp_path / 'a.json'}={tmp_path}"])[0].image_root == str(tmp_path)
