"""ODVG JSONL: grounding and detection variants, round trips, bad lines."""
from __future__ import annotations

import json

from storage.coco import load_coco_detection
from storage.odvg import load_odvg, write_odvg
from storage.skips import StageCounts


def test_grounding_round_trip_keeps_multi_span_and_scores(tmp_path, make_sample):
    samples = [make_sample("a", n_boxes=3), make_sample("b", n_boxes=1)]
    samples[0].boxes[2].tokens_positive = [[0, 9], [13, 25]]
    out = tmp_path / "g.odvg.jsonl"
    write_odvg(samples, out)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["grounding"]["regions"][0]["bbox"] == [1.0, 2.0, 11.0, 14.0]      # xyxy on disk
    back = list(load_odvg(out, None, StageCounts()))
    assert [s.key for s in back] == ["a", "b"] and back[0].source == "pseudo/test"
    assert [b.bbox for b in back[0].boxes] == [b.bbox for b in samples[0].boxes]
    assert back[0].boxes[2].tokens_positive == [[0, 9], [13, 25]]
    assert [round(b.score, 4) for b in back[0].boxes] == [0.9, 0.8, 0.7]
    assert [p.text for p in back[0].phrases] == ["a red dog", "a green lawn"]


def test_written_phrases_come_back_grounded_or_not_with_roots(tmp_path, make_sample):
    import pytest

    from storage.odvg import OdvgWriter

    s = make_sample("a", n_boxes=1)              # "a green lawn" has no box
    out = tmp_path / "p.jsonl"
    write_odvg([s], out)
    line = json.loads(out.read_text())
    assert line["phrases"] == [p.to_dict() for p in s.phrases] and len(line["grounding"]["regions"]) == 1
    (back,) = load_odvg(out, None, StageCounts())
    assert [p.to_dict() for p in back.phrases] == [p.to_dict() for p in s.phrases]
    assert [b.to_dict() for b in back.boxes] == [b.to_dict() for b in s.boxes]
    with pytest.raises(RuntimeError):
        with OdvgWriter(tmp_path / "never.jsonl") as w:
            w.write(s, file_name="x.jpg")
            raise RuntimeError("crash")
    assert not (tmp_path / "never.jsonl").exists()


def test_third_party_grounding_line_without_spans(tmp_path, make_jpeg):
    (tmp_path / "im.jpg").write_bytes(make_jpeg(40, 30))
    lines = [{"filename": "im.jpg", "height": 30, "width": 40,
              "grounding": {"caption": "a cat near a bowl.",
                            "regions": [{"bbox": [1, 1, 20, 20], "phrase": "a cat"},
                                        {"bbox": [[22, 5, 30, 15], [31, 5, 39, 15]], "phrase": "a bowl"},
                                        {"bbox": [1, 1, 5, 5], "phrase": "a unicorn"}]}},
             {"filename": "gone.jpg", "height": 30, "width": 40, "grounding": {"caption": "x", "regions": []}}]
    path = tmp_path / "third.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    counts = StageCounts()
    (s,) = load_odvg(path, tmp_path, counts)
    assert s.source == "goldg/third" and s.extra["image_path"] == str(tmp_path / "im.jpg")
    assert [(s.phrases[b.phrase].text, b.bbox) for b in s.boxes] == [
        ("a cat", [1.0, 1.0, 19.0, 19.0]), ("a bowl", [22.0, 5.0, 8.0, 10.0]), ("a bowl", [31.0, 5.0, 8.0, 10.0])]
    assert counts.skipped == {"phrase_not_in_caption": 1, "missing_image": 1, "bad_json": 1}


def test_detection_variant_round_trip_with_label_map(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "1.jpg", "width": 50, "height": 50}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [5, 5, 20, 20], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "traffic_light"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (det,) = load_coco_detection(tmp_path / "c.json", None, StageCounts())
    out, lm = tmp_path / "d.jsonl", tmp_path / "labels.json"
    labels = write_odvg([det], out, variant="detection", label_map_path=lm)
    assert labels == {3: "car", 7: "traffic light"}
    inst = json.loads(out.read_text())["detection"]["instances"]
    assert [(i["label"], i["category"], i["bbox"]) for i in inst] == [
        (3, "car", [1.0, 1.0, 11.0, 11.0]), (7, "traffic light", [5.0, 5.0, 25.0, 25.0])]
    for label_map in (lm, None):      # from the file, or gathered from the instances
        (back,) = load_odvg(out, None, StageCounts(), label_map=label_map)
        assert back.caption == det.caption == "car. traffic light."
        assert [b.to_dict() for b in back.boxes] == [b.to_dict() for b in det.boxes]
        assert back.extra["category_ids"] == [3, 7] and back.key == det.key


def test_odvg_on_s3_streams_lines_like_local(s3_env, s3_prefix, tmp_path, make_jpeg, monkeypatch):
    import storage.odvg as odvg
    from storage import fs

    (tmp_path / "im.jpg").write_bytes(make_jpeg(40, 30))
    line = {"filename": "im.jpg", "height": 30, "width": 40,
            "grounding": {"caption": "a cat near a bowl.", "regions": [{"bbox": [1, 1, 20, 20], "phrase": "a cat"}]}}
    text = "\n".join([json.dumps(dict(line, key=f"k{i}")) for i in range(50)] + ["{broken", ""])
    (tmp_path / "g.jsonl").write_text(text)
    remote = fs.join(s3_prefix, "g.jsonl")
    fs.write_text(remote, text)
    fs.upload_tree(tmp_path / "im.jpg", fs.join(s3_prefix, "images", "im.jpg"))
    monkeypatch.setattr(odvg, "_CHUNK", 37)              # lines cut across chunk boundaries
    local_counts, remote_counts = StageCounts(), StageCounts()
    local = list(load_odvg(tmp_path / "g.jsonl", tmp_path, local_counts))
    got = list(load_odvg(remote, fs.join(s3_prefix, "images"), remote_counts))
    assert [s.key for s in got] == [f"k{i}" for i in range(50)]
    assert got[0].extra["image_path"] == fs.join(s3_prefix, "images", "im.jpg")
    assert remote_counts.to_dict() == local_counts.to_dict() and remote_counts.skipped == {"bad_json": 1}
    assert [s.boxes[0].bbox for s in got] == [s.boxes[0].bbox for s in local]
    labels = write_odvg(got[:2], fs.join(s3_prefix, "out.jsonl"), image_root=fs.join(s3_prefix, "images"))
    assert labels == {}
    assert [json.loads(x)["filename"] for x in fs.read_text(fs.join(s3_prefix, "out.jsonl")).splitlines()] == \
        ["im.jpg", "im.jpg"]
