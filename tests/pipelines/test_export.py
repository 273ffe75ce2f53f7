"""`glipctl export` end to end: pseudo-label-like shards -> ODVG / COCO, read back by their readers.

The shards are written by the real ``ShardWriter`` (a stage folder with a manifest and a bare
folder of tars); the outputs are read back with ``storage.odvg.load_odvg``, pycocotools and
``glipctl pack --odvg`` (the round trip), and ``--where`` is checked against ``inspect --where``.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from storage import fs
from storage.manifest import Manifest, commit_shard
from storage.records import Box, GroundedSample, Phrase
from storage.shards import ShardWriter, iter_shard_entries, iter_shard_samples, member_stem
from storage.skips import StageCounts
from tests.storage.conftest import jpeg_bytes


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def grounded(key: str, caption: str, phrases: list[tuple[str, str | None]],
             boxes: list[tuple[int, list[float], float]], width: int = 64, height: int = 48) -> GroundedSample:
    """``phrases``: (text, root) found in ``caption`` in order; ``boxes``: (phrase index, xywh, score)."""
    found, cursor = [], 0
    for text, root in phrases:
        start = caption.index(text, cursor)
        found.append(Phrase(text, start, start + len(text), root))
        cursor = start + len(text)
    return GroundedSample(key, caption, width, height, found,
                          [Box(bbox, [[found[p].start, found[p].end]], p, score) for p, bbox, score in boxes],
                          "pseudo/glip-tiny", {"teacher": "glip-tiny"})


def pseudo_samples() -> list[tuple[GroundedSample, bytes, str]]:
    """Seven samples (sample, image bytes, extension); 00002 has no box, 00003 is a PNG."""
    S = grounded
    return [
        (S("000000000", "a red dog chases two cats on a green lawn",
           [("a red dog", "dog"), ("two cats", "cat"), ("a green lawn", "lawn")],
           [(0, [2.0, 3.0, 20.5, 15.0], 0.91), (1, [30.0, 10.0, 12.0, 9.0], 0.72),
            (1, [44.0, 20.0, 10.0, 10.0], 0.41)]),
         jpeg_bytes(64, 48), "jpg"),
        (S("000000001", "a dog sits near a traffic light", [("a dog", "dog"), ("a traffic light", "light")],
           [(0, [1.0, 1.0, 30.0, 30.0], 0.83), (1, [40.0, 2.0, 8.0, 20.0], 0.56)], 50, 40),
         jpeg_bytes(50, 40, (20, 20, 200)), "jpg"),
        (S("000000002", "a cat on a sofa", [("a cat", "cat"), ("a sofa", "sofa")], []), jpeg_bytes(64, 48), "jpg"),
        (S("000000003", "the big Trees behind a house", [("the big Trees", None), ("a house", None)],
           [(0, [0.0, 0.0, 60.0, 30.0], 0.66), (1, [10.0, 20.0, 20.0, 20.0], 0.35)]),
         png_bytes(64, 48), "png"),
        (S("000000004", "two dogs play", [("two dogs", "dog")], [(0, [5.0, 5.0, 25.0, 25.0], 0.95)]),
         jpeg_bytes(64, 48), "jpg"),
        (S("crawl/5.jpg", "a cat and a dog", [("a cat", "cat"), ("a dog", "dog")],
           [(0, [3.0, 3.0, 10.0, 10.0], 0.6), (1, [20.0, 3.0, 10.0, 10.0], 0.48)]),
         jpeg_bytes(64, 48), "jpg"),
        (S("000000006", "a lawn", [("a lawn", "lawn")], [(0, [0.0, 30.0, 64.0, 18.0], 0.77)]),
         jpeg_bytes(64, 48), "jpg"),
    ]


def write_pseudo(out: str, samples=None, max_samples: int = 3) -> list[tuple[GroundedSample, bytes, str]]:
    """A pseudo-label output folder (local path or URI): tars + label tables, commit record, manifest."""
    samples = samples or pseudo_samples()
    with ShardWriter(out, "00000", max_samples=max_samples) as w:
        for s, image, ext in samples:
            w.write(s, image, ext)
    entry = {"status": "done", "counts": {"read": len(samples), "written": len(samples), "skipped": {}},
             "outputs": w.outputs, "labels": w.labels, "checksums": w.checksums}
    commit_shard(out, "00000", {**entry, "stage": "pseudo-label"})
    m = Manifest(stage="pseudo-label")
    m.mark("00000", **entry)
    m.save(out)
    return samples


@pytest.fixture
def pseudo(tmp_path) -> Path:
    out = tmp_path / "pseudo"
    write_pseudo(str(out))
    return out


def shard_entries(path) -> list:
    return list(iter_shard_entries([str(path)], StageCounts()))


def odvg_lines(path) -> list[dict]:
    return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


def assert_same_samples(got: list[GroundedSample], want: list[GroundedSample], tol: float = 1e-4) -> None:
    """Keys, captions, sizes, sources, phrases (spans, roots) and boxes (spans, phrase, score; bbox within tol)."""
    assert [s.key for s in got] == [s.key for s in want]
    for g, w in zip(got, want):
        assert (g.caption, g.width, g.height, g.source) == (w.caption, w.width, w.height, w.source)
        assert [p.to_dict() for p in g.phrases] == [p.to_dict() for p in w.phrases]
        assert len(g.boxes) == len(w.boxes), g.key
        for gb, wb in zip(g.boxes, w.boxes):
            assert gb.bbox == pytest.approx(wb.bbox, abs=tol)
            assert (gb.tokens_positive, gb.phrase) == (wb.tokens_positive, wb.phrase)
            assert gb.score == pytest.approx(wb.score, abs=1e-9)


# ----------------------------------------------------------------------------- ODVG

def test_odvg_export_reads_back_as_the_shards_with_their_images(cli, pseudo, tmp_path):
    from storage.odvg import load_odvg

    out, images = tmp_path / "out" / "labels.jsonl", tmp_path / "images"
    r = cli("export", pseudo, "--format", "odvg", "--out", out, "--images", images)
    assert r.exit_code == 0, r.output
    entries = shard_entries(pseudo)
    with_boxes = [e for e in entries if e.sample.boxes]
    lines = odvg_lines(out)
    assert [line["key"] for line in lines] == [e.sample.key for e in with_boxes]     # shard order
    first = lines[0]
    assert first["filename"] == "000000000.jpg" and (first["width"], first["height"]) == (64, 48)
    assert first["grounding"]["caption"] == "a red dog chases two cats on a green lawn"
    assert first["grounding"]["regions"][0] == {"bbox": [2.0, 3.0, 22.5, 18.0], "phrase": "a red dog",
                                                "tokens_positive": [[0, 9]], "score": 0.91}
    # the images: the tars' bytes, under the names the lines give (member name + real extension)
    for line, e in zip(lines, with_boxes):
        assert line["filename"] == f"{member_stem(e.sample.key)}.{e.ext}"
        assert (images / line["filename"]).read_bytes() == next(
            img for s, img in iter_shard_samples([str(pseudo)], StageCounts()) if s.key == e.sample.key)
    assert lines[2]["filename"] == "000000003.png" and lines[4]["filename"] == "crawl_5_jpg.jpg"
    assert sorted(p.name for p in images.iterdir()) == sorted(line["filename"] for line in lines)

    counts = StageCounts()
    back = list(load_odvg(out, images, counts))
    assert counts.skipped == {} and counts.read == 6
    assert_same_samples(back, [e.sample for e in with_boxes])
    assert all(s.extra["image_path"] == str(images / line["filename"]) for s, line in zip(back, lines))
    text = " ".join(r.output.split())
    assert "no_boxes" in text and f"wrote 6 images to {images}" in text


def test_odvg_without_images_names_tar_members_and_keep_empty(cli, pseudo, tmp_path):
    out = tmp_path / "labels.jsonl"
    r = cli("export", pseudo, "--format", "odvg", "--out", out, "--keep-empty", "--json")
    assert r.exit_code == 0, r.output
    lines = odvg_lines(out)
    assert len(lines) == 7 and lines[2]["grounding"]["regions"] == []                # the box-less sample kept
    assert [p["text"] for p in lines[2]["phrases"]] == ["a cat", "a sofa"]
    assert "images were not written" in " ".join(r.output.split())
    # `tar -xf` of the shards into one folder gives exactly the files the lines name
    extracted = tmp_path / "extracted"
    for tar in sorted(pseudo.glob("*.tar")):
        with tarfile.open(tar) as t:
            t.extractall(extracted, filter="data")
    for line in lines:
        assert (extracted / line["filename"]).is_file()
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["samples"] == {"read": 7, "written": 7, "skipped": {}}
    assert summary["boxes"] == {"read": 11, "written": 11, "dropped": {}}


def test_round_trip_through_pack_gives_back_the_same_samples(ray_session, cli, pseudo, tmp_path):
    """ODVG export, `glipctl pack --odvg FILE=IMAGES`, then the packed shards exported again: the
    samples (keys, captions, phrases, spans, boxes, scores) and the ODVG lines are the same."""
    out, images = tmp_path / "a.jsonl", tmp_path / "images"
    assert cli("export", pseudo, "--format", "odvg", "--out", out, "--images", images).exit_code == 0
    packed = tmp_path / "packed"
    r = cli("pack", "--odvg", f"{out}={images}", "--out", packed, "--workers", "1")
    assert r.exit_code == 0, r.output
    counts = StageCounts()
    repacked = [s for s, _ in iter_shard_samples([str(packed)], counts)]
    assert counts.skipped == {}
    assert_same_samples(repacked, [e.sample for e in shard_entries(pseudo) if e.sample.boxes])
    # the packed images are the exported bytes, and a second export of the packed folder is the same file
    again = tmp_path / "b.jsonl"
    r = cli("export", packed, "--format", "odvg", "--out", again)
    assert r.exit_code == 0, r.output
    assert odvg_lines(again) == odvg_lines(out)
    # and inspect reads the ODVG file as the shards
    r = cli("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["samples"] == 6 and summary["boxes"] == 11 and summary["skipped"] == {}


# ----------------------------------------------------------------------------- COCO

def load_coco(path):
    import contextlib

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_coco_export_one_category_per_root_noun(cli, pseudo, tmp_path):
    out, images = tmp_path / "coco.json", tmp_path / "images"
    r = cli("export", pseudo, "--format", "coco", "--out", out, "--images", images)
    assert r.exit_code == 0, r.output
    coco = load_coco(out)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    # parsed roots (cats -> cat, a traffic light -> light), else the last word ("the big Trees" -> trees)
    assert list(names.values()) == ["cat", "dog", "house", "lawn", "light", "trees"]
    assert list(names) == [1, 2, 3, 4, 5, 6]
    entries = [e for e in shard_entries(pseudo) if e.sample.boxes]
    imgs = coco.loadImgs(coco.getImgIds())
    assert [i["file_name"] for i in imgs] == [f"{member_stem(e.sample.key)}.{e.ext}" for e in entries]
    assert [i["key"] for i in imgs] == [e.sample.key for e in entries]
    roots = {"a red dog": "dog", "two cats": "cat", "a dog": "dog", "a traffic light": "light",
             "the big Trees": "trees", "a house": "house", "two dogs": "dog", "a cat": "cat", "a lawn": "lawn"}
    for img, e in zip(imgs, entries):
        assert (img["width"], img["height"]) == (e.sample.width, e.sample.height)
        assert (images / img["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert [a["bbox"] for a in anns] == [pytest.approx(b.bbox) for b in e.sample.boxes]
        assert [names[a["category_id"]] for a in anns] == [roots[e.sample.phrases[b.phrase].text]
                                                           for b in e.sample.boxes]
        assert [a["score"] for a in anns] == [b.score for b in e.sample.boxes]
        assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) and a["iscrowd"] == 0 for a in anns)
    assert len(coco.getAnnIds()) == 11


def test_coco_categories_list_maps_tails_and_drops_the_rest(cli, pseudo, tmp_path):
    out = tmp_path / "coco.json"
    r = cli("export", pseudo, "--format", "coco", "--out", out, "--categories", "dog, Traffic Light", "--json")
    assert r.exit_code == 0, r.output
    coco = load_coco(out)
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "dog"), (2, "traffic light")]
    by_key = {img["key"]: coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])) for img in coco.loadImgs(coco.getImgIds())}
    assert set(by_key) == {"000000000", "000000001", "000000004", "crawl/5.jpg"}
    assert [a["category_id"] for a in by_key["000000001"]] == [1, 2]      # "a traffic light": its tail
    assert [a["bbox"] for a in by_key["000000000"]] == [[2.0, 3.0, 20.5, 15.0]]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["boxes"] == {"read": 11, "written": 5, "dropped": {"no_category": 6}}
    assert summary["samples"]["skipped"] == {"no_boxes": 1, "no_category_box": 2}
    assert summary["categories"] == ["dog", "traffic light"]


# ----------------------------------------------------------------------------- --where

def test_where_keeps_exactly_the_boxes_inspect_matches(cli, pseudo, tmp_path):
    import pyarrow.parquet as pq

    where = "score >= 0.5 and (phrase contains 'dog' or w > 25)"
    r = cli("inspect", pseudo, "--where", where, "--to", tmp_path / "boxes.parquet")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "boxes.parquet").to_pylist()
    matched = [(row["key"], row["box_index"]) for row in rows]
    assert matched == [("000000000", 0), ("000000001", 0), ("000000003", 0), ("000000004", 0), ("000000006", 0)]

    out = tmp_path / "where.jsonl"
    r = cli("export", pseudo, "--format", "odvg", "--out", out, "--where", where, "--json")
    assert r.exit_code == 0, r.output
    samples = {e.sample.key: e.sample for e in shard_entries(pseudo)}
    lines = odvg_lines(out)
    exported = [(line["key"], region["bbox"]) for line in lines for region in line["grounding"]["regions"]]
    want = [(k, [b.bbox[0], b.bbox[1], b.bbox[0] + b.bbox[2], b.bbox[1] + b.bbox[3]])
            for k, i in matched for b in [samples[k].boxes[i]]]
    assert exported == want
    assert [p["text"] for p in lines[0]["phrases"]] == ["a red dog", "two cats", "a green lawn"]   # all kept
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["boxes"]["dropped"] == {"not_matching_where": 11 - 5}
    assert summary["samples"]["skipped"] == {"no_boxes": 1, "no_matching_box": 1}

    coco_out = tmp_path / "where.json"
    r = cli("export", pseudo, "--format", "coco", "--out", coco_out, "--where", where)
    assert r.exit_code == 0, r.output
    assert len(load_coco(coco_out).getAnnIds()) == 5


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_exit_2_or_a_counted_skip(cli, pseudo, tmp_path):
    out = tmp_path / "x.jsonl"
    for args, message in [
        ((tmp_path / "missing",), "no such file or folder"),
        ((pseudo / "00000-00000.labels.parquet",), "not a shard"),
        ((pseudo, "--format", "coco", "--out", tmp_path / "x.jsonl"), "ends in .json"),
        ((pseudo, "--out", tmp_path / "x.json"), "ends in .jsonl"),
        ((pseudo, "--format", "yaml"), "--format must be one of"),
        ((pseudo, "--categories", "dog"), "--categories applies to --format coco"),
        ((pseudo, "--where", "score >>= 1"), "--where"),
        ((pseudo, "--where", "score > 2"), "no sample to export"),
        ((pseudo, "--images", pseudo / "00000-00000.tar"), "not a folder"),
    ]:
        argv = ["export", *args]
        argv += [] if "--format" in args else ["--format", "odvg"]
        argv += [] if "--out" in args else ["--out", out]
        r = cli(*argv)
        assert r.exit_code == 2, (args, r.output)
        assert message in " ".join(r.output.split()), (args, r.output)
        assert not out.exists()                              # nothing written, not even empty

    # a truncated tar: the samples before the cut are exported, the break is counted
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (pseudo / "00000-00001.tar").read_bytes()
    (cut / "00000-00001.tar").write_bytes(data[: len(data) * 2 // 3])
    r = cli("export", cut / "00000-00001.tar", pseudo / "00000-00002.tar", "--format", "odvg", "--out", out,
            "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["samples"]["skipped"]["truncated_tar"] == 1
    assert [line["key"] for line in odvg_lines(out)] == ["000000003", "000000004", "000000006"]   # crawl/5.jpg cut


def test_names_two_tars_share_are_made_unique(cli, tmp_path):
    """The same crawl labelled twice (two folders, same keys): every line names its own file."""
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    write_pseudo(str(a))
    other = [(grounded(s.key, s.caption, [(p.text, p.root) for p in s.phrases],
                       [(x.phrase, x.bbox, x.score / 2) for x in s.boxes], s.width, s.height), img, ext)
             for s, img, ext in pseudo_samples()]
    write_pseudo(str(b), other)
    out, images = tmp_path / "both.jsonl", tmp_path / "images"
    r = cli("export", a, b, "--format", "odvg", "--out", out, "--images", images)
    assert r.exit_code == 0, r.output
    names = [line["filename"] for line in odvg_lines(out)]
    assert len(names) == len(set(names)) == 12
    assert names[6:8] == ["000000000_1.jpg", "000000001_1.jpg"]
    assert len(list(images.iterdir())) == 12
    assert "6 image names shared by two tars" in " ".join(r.output.split())
