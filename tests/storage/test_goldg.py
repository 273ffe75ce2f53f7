"""MDETR GoldG: multi-span tokens_positive, sources, round trip, and every bad input."""
from __future__ import annotations

import json

import pytest

from storage.errors import InputError
from storage.goldg import load_mdetr, write_mdetr
from storage.skips import StageCounts

CAPTION = "A man in a red shirt holds his hat next to a dog"
# "A man" = [0, 5], "his hat" = [27, 34], "a dog" = [43, 48]


def mdetr_file(tmp_path, make_jpeg, extra_images=(), extra_anns=()):
    images_dir = tmp_path / "flickr30k"
    images_dir.mkdir(exist_ok=True)
    (images_dir / "1000.jpg").write_bytes(make_jpeg(100, 80))
    (images_dir / "2000.jpg").write_bytes(make_jpeg(50, 40))
    data = {
        "images": [
            {"id": 0, "file_name": "1000.jpg", "width": 100, "height": 80, "caption": CAPTION,
             "dataset_name": "flickr", "original_img_id": 1000, "sentence_id": 3,
             "tokens_negative": [[0, 5], [11, 20]]},
            {"id": 1, "file_name": "2000.jpg", "width": 50, "height": 40, "caption": "a red ball",
             "dataset_name": "refcocog", "original_img_id": 2000},
            *extra_images,
        ],
        "annotations": [
            # "A man ... his hat": one box grounding two separate spans
            {"id": 1, "image_id": 0, "bbox": [10, 5, 30, 60], "area": 1800, "iscrowd": 0, "category_id": 1,
             "tokens_positive": [[0, 5], [27, 34]]},
            {"id": 2, "image_id": 0, "bbox": [60, 40, 20, 20], "area": 400, "iscrowd": 0, "category_id": 1,
             "tokens_positive": [[43, 48]]},
            {"id": 3, "image_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0, "category_id": 1,
             "tokens_positive": [[0, 10]]},
            *extra_anns,
        ],
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
    path = tmp_path / "final_flickr_separateGT_train.json"
    path.write_text(json.dumps(data))
    return path, images_dir


def test_multi_span_tokens_positive(tmp_path, make_jpeg):
    path, images = mdetr_file(tmp_path, make_jpeg)
    counts = StageCounts()
    s0, s1 = load_mdetr(path, images, counts)
    assert s0.key == "goldg/flickr/1000/3" and s0.source == "goldg/flickr"
    assert s1.key == "goldg/mixed/2000/1" and s1.source == "goldg/mixed"
    assert [p.text for p in s0.phrases] == ["A man", "his hat", "a dog"]
    man = s0.boxes[0]
    assert man.tokens_positive == [[0, 5], [27, 34]] and man.phrase == 0 and man.score == 1.0
    assert man.bbox == [10.0, 5.0, 30.0, 60.0]
    assert s0.boxes[1].phrase == 2
    assert s0.extra["image_path"] == str(images / "1000.jpg")
    assert s0.extra["tokens_negative"] == [[0, 5], [11, 20]]
    assert counts.read == 2 and not counts.skipped


def test_write_mdetr_round_trip(tmp_path, make_jpeg):
    path, images = mdetr_file(tmp_path, make_jpeg)
    first = list(load_mdetr(path, images, StageCounts()))
    out = tmp_path / "out.json"
    write_mdetr(first, out, image_root=images)
    again = list(load_mdetr(out, images, StageCounts()))
    assert [s.to_dict() for s in again] == [s.to_dict() for s in first]


def test_bad_spans_boxes_and_images_are_counted(tmp_path, make_jpeg):
    path, images = mdetr_file(
        tmp_path, make_jpeg,
        extra_images=[{"id": 2, "file_name": "gone.jpg", "width": 10, "height": 10, "caption": "x",
                       "dataset_name": "flickr"}],
        extra_anns=[dict(a, category_id=1) if a["id"] != 14 else a for a in [
            {"id": 10, "image_id": 0, "bbox": [0, 0, 10, 10], "tokens_positive": [[40, 400]]},  # span outside
            {"id": 11, "image_id": 0, "bbox": [500, 500, 10, 10], "tokens_positive": [[0, 5]]},  # outside image
            {"id": 12, "image_id": 0, "bbox": [5, 5, 0, 10], "tokens_positive": [[0, 5]]},       # zero width
            {"id": 13, "image_id": 99, "bbox": [5, 5, 5, 5], "tokens_positive": [[0, 1]]},      # no such image
            {"id": 14, "bbox": [5, 5, 5, 5], "tokens_positive": [[0, 1]]},                      # no image_id
        ]])
    counts = StageCounts()
    samples = list(load_mdetr(path, images, counts))
    assert [len(s.boxes) for s in samples] == [2, 1]
    assert counts.skipped == {"box_span_outside_caption": 1, "box_outside_image": 1,
                              "box_non_positive_size": 1, "annotation_missing_image": 1, "malformed_annotation": 1,
                              "missing_image": 1, "phrase_span_outside_caption": 1}


def test_unparsable_or_missing_file_is_input_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        list(load_mdetr(bad, None, StageCounts()))
    with pytest.raises(InputError, match="not found"):
        list(load_mdetr(tmp_path / "nope.json", None, StageCounts()))
    ok = tmp_path / "ok.json"
    ok.write_text('{"images": [], "annotations": []}')
    with pytest.raises(InputError, match="image folder not found"):
        list(load_mdetr(ok, tmp_path / "no_images", StageCounts()))


def test_annotations_and_images_on_s3_read_the_same(s3_env, s3_prefix, tmp_path, make_jpeg):
    from storage import fs

    path, images = mdetr_file(tmp_path, make_jpeg,
                              extra_images=[{"id": 2, "file_name": "sub/3000.jpg", "width": 30, "height": 20,
                                             "caption": "a cup", "dataset_name": "flickr"},
                                            {"id": 3, "file_name": "sub/gone.jpg", "width": 30, "height": 20,
                                             "caption": "a cup", "dataset_name": "flickr"}],
                              extra_anns=[{"id": 9, "image_id": 2, "bbox": [1, 1, 5, 5], "category_id": 1,
                                           "tokens_positive": [[0, 5]]}])
    (images / "sub").mkdir()
    (images / "sub" / "3000.jpg").write_bytes(make_jpeg(30, 20))
    remote_ann, remote_images = fs.join(s3_prefix, "ann.json"), fs.join(s3_prefix, "flickr30k")
    fs.upload_tree(path, remote_ann)
    fs.upload_tree(images, remote_images)
    local_counts, remote_counts = StageCounts(), StageCounts()
    local = list(load_mdetr(path, images, local_counts))
    remote = list(load_mdetr(remote_ann, remote_images, remote_counts))
    assert [s.extra["image_path"] for s in remote] == [fs.join(remote_images, n)
                                                       for n in ("1000.jpg", "2000.jpg", "sub/3000.jpg")]
    for s in remote + local:
        s.extra.pop("image_path")
    assert [s.to_dict() for s in remote] == [s.to_dict() for s in local]
    assert remote_counts.to_dict() == local_counts.to_dict() and remote_counts.skipped == {"missing_image": 1}
    # written to S3 and read back: the same samples, file names relative to the image root
    again = list(load_mdetr(remote_ann, remote_images, StageCounts()))
    write_mdetr(again, fs.join(s3_prefix, "out.json"), image_root=remote_images)
    assert [i["file_name"] for i in fs.read_json(fs.join(s3_prefix, "out.json"))["images"]] == \
        ["1000.jpg", "2000.jpg", "sub/3000.jpg"]
    with pytest.raises(InputError, match="image folder not found"):
        list(load_mdetr(remote_ann, fs.join(s3_prefix, "nothing-here"), StageCounts()))
    with pytest.raises(InputError, match="not found"):
        list(load_mdetr(fs.join(s3_prefix, "nope.json"), None, StageCounts()))
