"""COCO AP through our path (pycocotools COCOeval), Recall@k on hand-made cases, prompt splitting."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from labeling.evaluation import (category_prompts, coco_metrics, detect_coco, iou_xywh,
                                 recall_at_k)

CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 5, "name": "traffic_light"}]


@pytest.fixture
def coco_set(tmp_path):
    """Three images, five boxes over three categories (of several sizes)."""
    images, anns = [], []
    boxes = {1: [(1, [10, 10, 40, 30]), (2, [60, 50, 20, 20])],
             2: [(5, [5, 5, 100, 90])],
             3: [(1, [30, 40, 12, 12]), (2, [70, 10, 50, 60])]}
    for image_id, objs in boxes.items():
        name = f"im{image_id}.jpg"
        Image.new("RGB", (128, 128), (200, 200, 200)).save(tmp_path / name)
        images.append({"id": image_id, "file_name": name, "width": 128, "height": 128})
        for cat, bbox in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, anns


def _as_detections(anns, dx=0.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": [a["bbox"][0] + dx, a["bbox"][1], a["bbox"][2], a["bbox"][3]], "score": 0.9} for a in anns]


def test_perfect_detections_score_one_and_shifted_lower(coco_set):
    path, anns = coco_set
    perfect = coco_metrics(path, _as_detections(anns))
    assert perfect["AP"] == pytest.approx(1.0)
    assert perfect["AP50"] == pytest.approx(1.0)
    assert set(perfect["per_category"]) == {"circle", "square", "traffic_light"}
    assert all(v == pytest.approx(1.0) for v in perfect["per_category"].values())
    shifted = coco_metrics(path, _as_detections(anns, dx=6.0))
    assert shifted["AP"] < 0.9
    assert shifted["AP75"] < perfect["AP75"]
    assert coco_metrics(path, [])["AP"] == 0.0


class OracleGrounder:
    """Answers ``ground`` with the ground-truth boxes of the category each span names.

    It stands in for a perfect model so the test checks our plumbing (prompts, spans ->
    category ids, COCO results), which a trained model could never isolate.
    """

    def __init__(self, anns, sizes):
        self.anns, self.sizes, self.prompts = anns, sizes, []

    def ground(self, images, captions, phrase_spans, threshold=None, **_):
        out = []
        for img, caption, spans in zip(images, captions, phrase_spans):
            self.prompts.append(caption)
            image_id = self.sizes[img.size]
            per_phrase = []
            for s, e in spans:
                cat = {c["name"].replace("_", " "): c["id"] for c in CATS}[caption[s:e]]
                per_phrase.append([{"bbox": a["bbox"], "score": 0.8} for a in self.anns
                                   if a["image_id"] == image_id and a["category_id"] == cat])
            out.append(per_phrase)
        return out


def test_detect_coco_maps_spans_to_categories_across_split_prompts(coco_set, tmp_path):
    path, anns = coco_set
    # give each image a distinct size so the oracle knows which one it sees
    for k, size in zip((1, 2, 3), (100, 110, 120)):
        Image.new("RGB", (size, 90)).save(tmp_path / f"im{k}.jpg")
    oracle = OracleGrounder(anns, {(100, 90): 1, (110, 90): 2, (120, 90): 3})
    # a 3-token limit is below any name's count: one prompt per category
    detections, evaluated, gt = detect_coco(oracle, path, tmp_path, batch_size=2, max_tokens=3)
    assert sorted(evaluated) == [1, 2, 3]
    assert len(set(oracle.prompts)) == 3
    assert coco_metrics(gt, detections, evaluated)["AP"] == pytest.approx(1.0)


def test_prompt_splitting_over_the_limit():
    cats = [{"id": i, "name": f"thing{i} name"} for i in range(1, 11)]
    count = lambda text: len(text.split())   # noqa: E731  (one token per word)
    prompts = category_prompts(cats, 6, count)
    assert len(prompts) == 4                 # 2 words per name: 3 names fit in 6 tokens
    seen = []
    for caption, spans in prompts:
        assert count(caption) <= 6
        for s, e, cat_id in spans:
            assert caption[s:e] == f"thing{cat_id} name"
            seen.append(cat_id)
    assert seen == list(range(1, 11))
    one = category_prompts(CATS, 256)
    assert one == [("circle. square. traffic light.", [(0, 6, 1), (8, 14, 2), (16, 29, 5)])]


def test_recall_at_k_hand_made():
    gt_a = [[0, 0, 10, 10]]
    gt_b = [[50, 50, 20, 20], [0, 0, 5, 5]]
    miss = [100, 100, 5, 5]
    preds = [
        [[0, 0, 10, 10]],                                  # hit at rank 1
        [miss, miss, [50, 50, 20, 21]] + [miss] * 5,       # hit at rank 3 (second gt box irrelevant)
        [miss] * 12 + [[0, 0, 10, 10]],                    # hit only at rank 13: a miss at 10
        [],                                                # no prediction: a miss
    ]
    r = recall_at_k(preds, [gt_a, gt_b, gt_a, gt_a])
    assert r == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.5, "phrases": 4}
    # merged protocol: the union of gt_b is [0, 0, 70, 70]; the small box no longer hits
    merged = recall_at_k([[[0, 0, 70, 70]], [[50, 50, 20, 20]]], [gt_b, gt_b], merge_boxes=True)
    assert merged["R@1"] == 0.5
    assert iou_xywh([[0, 0, 10, 10]], [[5, 0, 10, 10]])[0, 0] == pytest.approx(1 / 3)
