"""`glipctl pack` end to end: real Ray (the session's local one), inputs built on disk.

One gold (MDETR) file, one COCO detection file and one mixed ODVG file, each with its bad
records, are packed once (module fixture, through the CLI); the tests read the shards back
through the training side of the contract (``storage.packed``), then resume, redo, refuse.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipelines.pack import (AnnotationCache, OdvgLabels, PackOptions, PackSpec, ShardPacker, pack_shard,
                            plan_odvg, resolve_datasets, run_pack)
from storage import fs
from storage.errors import InputError
from storage.goldg import load_mdetr
from storage.packed import detection_boxes, packed_shards, read_vocabulary
from storage.shards import iter_shard_samples
from storage.skips import StageCounts
from tests.storage.conftest import jpeg_bytes

CAPTION = "a red ball and a blue box"      # "a red ball" [0, 10), "a blue box" [15, 25)
PER_SHARD = 4


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _gold(root: Path) -> dict:
    """MDETR JSON of 10 image entries (sizes 40+i x 30) and its images; the bad ones:
    3 image file absent, 5 truncated JPEG, 6 one box outside the image, 7 one box with a
    span outside the caption, 8 annotated 99x99, 9 every box outside; one orphan annotation."""
    images, anns = [], []
    for i in range(1, 11):
        w, h = 40 + i, 30
        name = f"g{i:02d}.jpg"
        data = jpeg_bytes(w, h, (20 * i, 30, 30))
        if i == 5:
            data = data[: len(data) // 2]
        if i != 3:
            (root / "gold_images" / name).write_bytes(data)
        images.append({"id": i, "file_name": name, "width": 99 if i == 8 else w, "height": 99 if i == 8 else h,
                       "caption": CAPTION, "dataset_name": "flickr", "original_img_id": 1000 + i,
                       "sentence_id": i % 3, "tokens_negative": [[0, 1]]})
        boxes = [([1.0, 2.0, 10.0, 8.0], [[0, 10]]), ([20.0, 5.0, 15.0, 12.0], [[15, 25]])]
        if i == 6:
            boxes[1] = ([500.0, 5.0, 15.0, 12.0], [[15, 25]])
        if i == 7:
            boxes[1] = ([20.0, 5.0, 15.0, 12.0], [[40, 50]])
        if i == 9:
            boxes = [([500.0, 5.0, 15.0, 12.0], [[0, 10]]), ([20.0, 500.0, 15.0, 12.0], [[15, 25]])]
        for bbox, spans in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": bbox, "area": bbox[2] * bbox[3],
                         "iscrowd": 0, "category_id": 1, "tokens_positive": spans})
    anns.append({"id": 999, "image_id": 99, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0, "category_id": 1,
                 "tokens_positive": [[0, 10]]})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def _detection(root: Path) -> dict:
    """COCO JSON of 7 images; 1 two boxes, 2 a box and a crowd box, 3 image file absent,
    4 only a box outside the image, 5 bytes that are no image, 6 a PNG named .jpg, 7 no box."""
    images, anns = [], []
    for i in range(1, 8):
        w, h = 50, 30 + i
        name = f"d{i}.jpg"
        data = png_bytes(w, h) if i == 6 else jpeg_bytes(w, h, (30, 30, 25 * i))
        if i == 5:
            data = b"this is not an image at all"
        if i != 3:
            (root / "det_images" / name).write_bytes(data)
        images.append({"id": i, "file_name": name, "width": w, "height": h})

    def box(image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> None:
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": crowd})

    box(1, 1, [1, 1, 10, 10]), box(1, 2, [20, 5, 10, 10])
    box(2, 3, [3, 3, 8, 8]), box(2, 1, [0, 0, 40, 20], crowd=1)
    box(3, 1, [1, 1, 5, 5])
    box(4, 2, [300, 300, 5, 5])
    box(5, 1, [1, 1, 5, 5])
    box(6, 2, [2, 2, 20, 20]), box(6, 2, [30, 10, 10, 10])
    cats = [{"id": 2, "name": "box"}, {"id": 1, "name": "red_ball"}, {"id": 3, "name": "tree"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _odvg(root: Path) -> str:
    """Mixed ODVG: grounding lines 1, 4 (image absent), 7 (a region not in the caption), 10;
    detection lines 2, 5 (an unknown label), 9; line 3 bad JSON, 6 neither kind, 8 blank."""
    def grounding(name: str, regions: list[dict]) -> str:
        (root / "odvg_images" / name).write_bytes(jpeg_bytes(60, 40))
        return json.dumps({"filename": name, "width": 60, "height": 40,
                           "grounding": {"caption": "a dog near a cat", "regions": regions}})

    def detection(name: str, instances: list[dict]) -> str:
        (root / "odvg_images" / name).write_bytes(jpeg_bytes(60, 40, (0, 0, 200)))
        return json.dumps({"filename": name, "width": 60, "height": 40, "detection": {"instances": instances}})

    dog = {"bbox": [1, 1, 20, 20], "phrase": "a dog", "tokens_positive": [[0, 5]]}
    cat = {"bbox": [30, 10, 50, 30], "phrase": "a cat"}
    lines = [
        grounding("o1.jpg", [dog, cat]),
        detection("o2.jpg", [{"bbox": [1, 1, 11, 11], "label": 0, "category": "dog"},
                             {"bbox": [20, 2, 40, 30], "label": 1, "category": "cat"}]),
        "{not json",
        json.dumps({"filename": "absent.jpg", "width": 60, "height": 40,
                    "grounding": {"caption": "a dog", "regions": [dog]}}),
        detection("o5.jpg", [{"bbox": [1, 1, 11, 11], "label": 7}, {"bbox": [5, 5, 25, 25], "label": 1}]),
        json.dumps({"filename": "o1.jpg", "width": 60, "height": 40}),
        grounding("o7.jpg", [dog, {"bbox": [2, 2, 9, 9], "phrase": "a horse"}]),
        "",
        detection("o9.jpg", [{"bbox": [2, 3, 12, 13], "label": 0, "category": "dog"}]),
        grounding("o10.jpg", [cat]),
    ]
    return "\n".join(lines) + "\n"


def build_inputs(root: Path) -> dict[str, Path]:
    for folder in ("gold_images", "det_images", "odvg_images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    paths = {"gold": root / "flickr_gold.json", "detection": root / "shapes_det.json",
             "odvg": root / "mixed.jsonl"}
    paths["gold"].write_text(json.dumps(_gold(root)))
    paths["detection"].write_text(json.dumps(_detection(root)))
    paths["odvg"].write_text(_odvg(root))
    return paths


def specs(root: Path) -> list[PackSpec]:
    """The three datasets of ``build_inputs`` as the Python API takes them."""
    return [PackSpec("gold", str(root / "flickr_gold.json"), str(root / "gold_images")),
            PackSpec("detection", str(root / "shapes_det.json"), str(root / "det_images")),
            PackSpec("odvg", str(root / "mixed.jsonl"), str(root / "odvg_images"))]


def pack_args(root: Path | str, out, *extra: str) -> list[str]:
    j = (lambda *p: fs.join(str(root), *p))
    return ["pack", "--gold", f"{j('flickr_gold.json')}={j('gold_images')}",
            "--detection", f"{j('shapes_det.json')}={j('det_images')}",
            "--odvg", f"{j('mixed.jsonl')}={j('odvg_images')}", "--out", str(out),
            "--samples-per-shard", str(PER_SHARD), *extra]


# What every dataset read, wrote and skipped (the ODVG file in its two kinds' shards).
EXPECTED = {
    "flickr_gold": {"read": 10, "written": 6, "skipped": {
        "missing_image": 1, "corrupt_image": 1, "image_size_mismatch": 1, "box_outside_image": 3,
        "box_span_outside_caption": 1, "phrase_span_outside_caption": 1, "no_valid_boxes": 1,
        "annotation_missing_image": 1}},
    "shapes_det": {"read": 7, "written": 3, "skipped": {
        "box_iscrowd": 1, "missing_image": 1, "box_outside_image": 1, "no_boxes": 2, "corrupt_image": 1}},
    "mixed": {"read": 9, "written": 6, "skipped": {
        "bad_json": 1, "malformed_record": 1, "missing_image": 1, "phrase_not_in_caption": 1,
        "box_unknown_category": 1}},
}
SHARDS = {"flickr_gold": ["flickr_gold-00000", "flickr_gold-00001", "flickr_gold-00002"],
          "shapes_det": ["shapes_det-00000", "shapes_det-00001"],
          "mixed": ["mixed-g00000", "mixed-d00000"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pack_inputs")
    build_inputs(root)
    return root


@pytest.fixture(scope="module")
def packed(ray_session, inputs, tmp_path_factory):
    """One CLI run over all three datasets: (out folder, CLI output)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = tmp_path_factory.mktemp("packed") / "packed"
    res = CliRunner().invoke(app, pack_args(inputs, out, "--workers", "2"))
    assert res.exit_code == 0, res.output
    return out, res.output


def _dataset_totals(manifest: dict) -> dict[str, dict]:
    totals: dict[str, dict] = {}
    for entry in manifest["shards"].values():
        t = totals.setdefault(entry["dataset"], {"read": 0, "written": 0, "skipped": {}})
        t["read"] += entry["counts"]["read"]
        t["written"] += entry["counts"]["written"]
        for reason, n in entry["counts"]["skipped"].items():
            t["skipped"][reason] = t["skipped"].get(reason, 0) + n
    return totals


def test_counts_shards_and_manifest_entries(packed):
    out, output = packed
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["stage"] == "pack"
    assert sorted(manifest["shards"]) == sorted(n for names in SHARDS.values() for n in names)
    assert _dataset_totals(manifest) == EXPECTED
    assert manifest["options"]["samples_per_shard"] == PER_SHARD
    assert [d["name"] for d in manifest["options"]["datasets"]] == ["flickr_gold", "shapes_det", "mixed"]
    for name, entry in manifest["shards"].items():
        assert entry["status"] == "done"
        detection = name.startswith(("shapes_det-", "mixed-d"))
        assert entry["kind"] == ("detection" if detection else "grounding")
        assert entry["dataset"] == name.rsplit("-", 1)[0]
        if entry["counts"]["written"]:
            assert entry["outputs"] == [f"{name}-00000.tar"]
            assert entry["labels"] == [f"{name}-00000.labels.parquet"]
        for file, digest in entry["checksums"].items():
            assert hashlib.sha256((out / file).read_bytes()).hexdigest() == digest
        record = json.loads((out / "_shards" / f"{name}.json").read_text())
        assert {k: v for k, v in record.items() if k not in ("shard", "stage")} == entry
    # shard 1 of the gold file holds image entries 5-8 (corrupt, two kept, size mismatch)
    assert manifest["shards"]["flickr_gold-00001"]["records"] == [4, 8]
    assert manifest["shards"]["flickr_gold-00001"]["counts"]["written"] == 2
    # the ODVG lines of neither kind are counted once, by the grounding shard that holds them
    assert manifest["shards"]["mixed-g00000"]["counts"]["skipped"] == {
        "bad_json": 1, "malformed_record": 1, "missing_image": 1, "phrase_not_in_caption": 1}
    flat = " ".join(output.split())
    assert "shards: 7 packed, 0 already done, 0 failed" in flat
    assert "flickr_gold (--gold) │ 3 (0 already done) │ 10 │ 6 │ 10" in flat
    assert "│ image_size_mismatch │ │ │ │ 1 │" in flat


def test_gold_samples_equal_the_reader_and_keep_the_original_bytes(packed, inputs):
    out, _ = packed
    tars = packed_shards([str(out)], "grounding", "--gold")
    assert [fs.name_of(t) for t in tars] == [
        "flickr_gold-00000-00000.tar", "flickr_gold-00001-00000.tar", "flickr_gold-00002-00000.tar",
        "mixed-g00000-00000.tar"]
    counts = StageCounts()
    got = list(iter_shard_samples(tars[:3], counts))
    assert counts.skipped == {} and counts.read == 6
    reference = {s.key: s for s in load_mdetr(inputs / "flickr_gold.json", inputs / "gold_images", StageCounts())}
    assert [s.extra["image_id"] for s, _ in got] == [1001, 1002, 1004, 1006, 1007, 1010]
    for sample, image in got:
        ref = reference[sample.key]
        assert image == Path(ref.extra.pop("image_path")).read_bytes()
        assert sample.to_dict() == ref.to_dict()       # the reader's sample, image path left out
        assert "image_path" not in sample.extra and sample.extra["file_name"].startswith("g")
    assert [len(s.boxes) for s, _ in got] == [2, 2, 2, 1, 1, 2]


def test_detection_samples_and_vocabulary(packed, inputs):
    out, _ = packed
    assert read_vocabulary(str(out), "shapes_det") == ("red ball", "box", "tree")
    assert read_vocabulary(str(out), "mixed") == ("dog", "cat")
    tars = packed_shards([str(out)], "detection", "--detection")
    assert [fs.name_of(t) for t in tars] == ["mixed-d00000-00000.tar", "shapes_det-00000-00000.tar",
                                             "shapes_det-00001-00000.tar"]
    counts = StageCounts()
    got = {s.key: (s, image) for s, image in iter_shard_samples(tars, counts)}
    assert counts.skipped == {}
    assert sorted(got) == ["det/mixed/o2.jpg/2", "det/mixed/o5.jpg/5", "det/mixed/o9.jpg/9",
                           "det/shapes_det/1", "det/shapes_det/2", "det/shapes_det/6"]
    s1, image = got["det/shapes_det/1"]
    assert detection_boxes(s1) == [([1.0, 1.0, 10.0, 10.0], "red ball"), ([20.0, 5.0, 10.0, 10.0], "box")]
    assert s1.caption == "box. red ball." and s1.source == "det/shapes_det"
    assert s1.extra == {"image_id": 1, "file_name": "d1.jpg", "vocabulary": "shapes_det"}
    assert image == (inputs / "det_images" / "d1.jpg").read_bytes()
    assert detection_boxes(got["det/shapes_det/2"][0]) == [([3.0, 3.0, 8.0, 8.0], "tree")]
    png_sample, png = got["det/shapes_det/6"]
    assert png == (inputs / "det_images" / "d6.jpg").read_bytes()      # never re-encoded
    assert detection_boxes(png_sample) == [([2.0, 2.0, 20.0, 20.0], "box"), ([30.0, 10.0, 10.0, 10.0], "box")]
    with tarfile.open(out / "shapes_det-00001-00000.tar") as tar:       # named by its real format
        assert tar.getnames() == ["det_shapes_det_6.png", "det_shapes_det_6.json"]
    assert detection_boxes(got["det/mixed/o5.jpg/5"][0]) == [([5.0, 5.0, 20.0, 20.0], "cat")]
    assert got["det/mixed/o9.jpg/9"][0].extra == {"file_name": "o9.jpg", "line": 9, "vocabulary": "mixed"}


def test_odvg_grounding_samples(packed):
    out, _ = packed
    counts = StageCounts()
    got = list(iter_shard_samples([str(out / "mixed-g00000-00000.tar")], counts))
    assert counts.skipped == {}
    assert [s.key for s, _ in got] == ["goldg/mixed/o1.jpg/1", "goldg/mixed/o7.jpg/7", "goldg/mixed/o10.jpg/10"]
    first = got[0][0]
    assert first.caption == "a dog near a cat"
    assert [(b.bbox, b.tokens_positive) for b in first.boxes] == [([1.0, 1.0, 19.0, 19.0], [[0, 5]]),
                                                                  ([30.0, 10.0, 20.0, 20.0], [[11, 16]])]
    assert first.extra == {"file_name": "o1.jpg"}
    assert len(got[1][0].boxes) == 1           # "a horse" is not in the caption: that region dropped


def test_resume_writes_nothing_and_redoes_a_lost_commit(packed, inputs, ray_session):
    out, _ = packed
    options = PackOptions(samples_per_shard=PER_SHARD, workers=1)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()
              and p.name != "_manifest.json"}
    again = run_pack(specs(inputs), str(out), options)
    assert again.done == [] and again.failed == [] and len(again.resumed) == 7
    assert {n: c.to_dict() for n, c in again.counts.items()} == EXPECTED
    assert [c.to_dict() for c in again.dataset_counts()] == list(EXPECTED.values())
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()
            and p.name != "_manifest.json"} == before

    (out / "_shards" / "flickr_gold-00001.json").unlink()     # as if its worker died before committing
    redo = run_pack(specs(inputs), str(out), options)
    assert redo.done == ["flickr_gold-00001"] and len(redo.resumed) == 6
    assert {n: c.to_dict() for n, c in redo.counts.items()} == EXPECTED
    assert (out / "_shards" / "flickr_gold-00001.json").exists()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "_manifest.json"}
    assert after == {n: data for n, (_, data) in before.items()}    # byte-identical, nothing extra


def test_changed_options_are_refused_unless_overwrite(packed, inputs, cli, tmp_path):
    out, _ = packed
    res = cli(*pack_args(inputs, out)[:-1], "3")
    assert res.exit_code == 2
    assert "samples_per_shard: 4 -> 3" in " ".join(res.output.split()) and "--overwrite" in res.output
    res = cli("pack", "--gold", f"{inputs / 'flickr_gold.json'}={inputs / 'gold_images'}", "--out", out,
              "--samples-per-shard", str(PER_SHARD))
    assert res.exit_code == 2 and "datasets" in res.output

    # --overwrite into a copy: the old shards and vocabularies go, the new ones are complete
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    res = cli("pack", "--gold", f"{inputs / 'flickr_gold.json'}={inputs / 'gold_images'}", "--out", copy,
              "--samples-per-shard", "10", "--overwrite")
    assert res.exit_code == 0, res.output
    manifest = json.loads((copy / "_manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["flickr_gold-00000"]
    assert sorted(p.name for p in copy.iterdir()) == [
        "_manifest.json", "_shards", "flickr_gold-00000-00000.labels.parquet", "flickr_gold-00000-00000.tar"]
    assert sorted(p.name for p in (copy / "_shards").iterdir()) == ["flickr_gold-00000.json"]
    assert packed_shards([str(copy)], "grounding", "--gold") == [str(copy / "flickr_gold-00000-00000.tar")]
    with pytest.raises(InputError, match="no detection shards in this packed folder"):
        packed_shards([str(copy)], "detection", "--detection")


def test_bad_paths_exit_2_with_a_clear_message(cli, inputs, tmp_path, ray_session):
    def run(*args) -> str:
        res = cli("pack", *args, "--out", tmp_path / "o")
        assert res.exit_code == 2, res.output
        return " ".join(res.output.split())

    assert f"--gold {inputs / 'nope.json'}: annotation file not found" in \
        run("--gold", f"{inputs / 'nope.json'}={inputs / 'gold_images'}")
    assert "image folder not found" in run("--detection", f"{inputs / 'shapes_det.json'}={inputs / 'no_images'}")
    assert "expected ANN.json=IMAGE_DIR" in run("--odvg", str(inputs / "mixed.jsonl"))
    assert "nothing to pack" in run()
    assert "--label-map applies to --odvg files" in run("--gold", f"{inputs / 'flickr_gold.json'}={inputs}",
                                                        "--label-map", inputs / "flickr_gold.json")
    assert "not MDETR/GoldG grounding data" in run("--gold", f"{inputs / 'shapes_det.json'}={inputs / 'det_images'}")
    assert not (tmp_path / "o" / "_shards").exists()


def test_a_dataset_without_usable_record_is_an_input_error(ray_session, inputs, tmp_path):
    empty = tmp_path / "empty_images"
    empty.mkdir()
    spec = PackSpec("gold", str(inputs / "flickr_gold.json"), str(empty))
    with pytest.raises(InputError, match=r"--gold .*flickr_gold.json: no usable record .*'missing_image': 9"):
        run_pack([spec], str(tmp_path / "out"), PackOptions(samples_per_shard=100, workers=1))


def test_dataset_names_are_safe_and_unique(tmp_path):
    for folder in ("a", "b", "images"):
        (tmp_path / folder).mkdir()
    for path in ("a/train.json", "b/train.json", "a/o365 v2.jsonl"):
        (tmp_path / path).write_text("{}")
    specs = [PackSpec("gold", str(tmp_path / "a/train.json"), str(tmp_path / "images")),
             PackSpec("detection", str(tmp_path / "b/train.json"), str(tmp_path / "images")),
             PackSpec("odvg", str(tmp_path / "a/o365 v2.jsonl"), str(tmp_path / "images"))]
    assert [d.name for d in resolve_datasets(specs)] == ["train", "train_2", "o365_v2"]
    assert PackSpec.parse("gold", "s3://b/date=2024/ann.json=s3://b/img=1") == \
        PackSpec("gold", "s3://b/date=2024/ann.json", "s3://b/img=1")
    with pytest.raises(InputError, match="only ODVG"):
        resolve_datasets([PackSpec("gold", str(tmp_path / "a/train.json"), str(tmp_path / "images"),
                                   str(tmp_path / "a/train.json"))])


@pytest.mark.parametrize("per_shard", [1, 2, 3])
def test_odvg_shards_tile_the_file_whatever_their_size(inputs, tmp_path, per_shard):
    """In-process (no Ray): any shard size gives the same samples, each line counted once."""
    out = str(tmp_path / "out")
    dataset = resolve_datasets([specs(inputs)[2]])[0]
    plan = plan_odvg(dataset, out, per_shard)
    n_g, n_d = -(-4 // per_shard), -(-3 // per_shard)
    assert plan.shards == [f"mixed-g{i:05d}" for i in range(n_g)] + [f"mixed-d{i:05d}" for i in range(n_d)]
    totals, keys = StageCounts(), []
    for task in plan.tasks:
        entry = pack_shard(task, out, AnnotationCache(), OdvgLabels({"mixed": plan.label_map}))
        assert entry["records"][1] - entry["records"][0] <= per_shard
        totals.merge(entry["counts"])
        keys += [s.key for s, _ in iter_shard_samples([fs.join(out, o) for o in entry["outputs"]], StageCounts())]
    assert totals.to_dict() == EXPECTED["mixed"]
    assert keys == ["goldg/mixed/o1.jpg/1", "goldg/mixed/o7.jpg/7", "goldg/mixed/o10.jpg/10",
                    "det/mixed/o2.jpg/2", "det/mixed/o5.jpg/5", "det/mixed/o9.jpg/9"]


def test_a_failing_shard_is_recorded_and_redone_by_the_next_run(ray_session, inputs, tmp_path):
    class FailsOnce(ShardPacker):
        def pack(self, task):
            if task.name == "shapes_det-00001":
                raise OSError("the store refused the upload")
            return super().pack(task)

    spec = specs(inputs)[1]
    out = tmp_path / "out"
    options = PackOptions(samples_per_shard=PER_SHARD, workers=1)
    first = run_pack([spec], str(out), options, packer_cls=FailsOnce)
    assert first.done == ["shapes_det-00000"] and first.failed == ["shapes_det-00001"]
    entry = json.loads((out / "_manifest.json").read_text())["shards"]["shapes_det-00001"]
    assert entry["status"] == "failed" and "the store refused the upload" in entry["error"]
    assert not (out / "_shards" / "shapes_det-00001.json").exists()
    second = run_pack([spec], str(out), options)
    assert second.done == ["shapes_det-00001"] and second.resumed == ["shapes_det-00000"]
    assert second.counts["shapes_det"].to_dict() == EXPECTED["shapes_det"]


def test_check_image_reads_headers_and_proves_the_bytes_decode():
    from PIL import Image

    from pipelines.pack import check_image

    jpeg = jpeg_bytes(64, 48)
    assert check_image(jpeg, 64, 48) == ("jpg", "", "")
    assert check_image(png_bytes(20, 10), 20, 10) == ("png", "", "")
    assert check_image(jpeg, 48, 64)[:2] == (None, "image_size_mismatch")
    assert check_image(jpeg[: len(jpeg) - 40], 64, 48)[:2] == (None, "corrupt_image")     # truncated
    assert check_image(png_bytes(20, 10)[:-30], 20, 10)[:2] == (None, "corrupt_image")
    assert check_image(b"", 1, 1)[:2] == (None, "corrupt_image")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert check_image(gif.getvalue(), 8, 8) == (None, "unsupported_image_format", "GIF")
