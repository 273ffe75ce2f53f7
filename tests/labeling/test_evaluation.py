"""COCO AP through our path (pycocotools COCOeval), Recall@k on hand-made cases, prompt splitting."""
from __future__ import annotations

import json

import numpy as np
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


# ----------------------------------------------------------------------------- against COCOeval itself

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def cocoeval_stats(dataset: dict, detections: list[dict], cat_ids=None, img_ids=None) -> dict[str, float]:
    """pycocotools' own numbers, computed here without labeling.evaluation: stats[0:6] of COCOeval,
    restricted to ``cat_ids`` (``params.catIds``) and ``img_ids`` when given."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STATS, ev.stats[:6])}


MIXED_CATS = [{"id": 3, "name": "circle"}, {"id": 1, "name": "square"}, {"id": 7, "name": "star"},
              {"id": 12, "name": "heart"}, {"id": 9, "name": "cross"}]   # unsorted ids; no cross in the data


@pytest.fixture
def mixed_case(tmp_path):
    """Six 200x200 images, 4 categories with objects of all three COCO sizes, and detections of every kind:
    tight and loose hits at mixed scores, misses, duplicates, false positives of high score, wrong categories,
    a category without ground truth. Seeded, so the numbers are fixed; none is 0 or 1."""
    rng = np.random.default_rng(17)
    images, anns, dets = [], [], []
    sizes = [(10, 12), (20, 25), (30, 30), (40, 50), (60, 70), (110, 120), (150, 100)]  # small .. large
    for image_id in range(1, 7):
        images.append({"id": image_id, "file_name": f"im{image_id}.jpg", "width": 200, "height": 200})
        for _ in range(int(rng.integers(2, 6))):
            cat = int(rng.choice([3, 1, 7, 12], p=[0.35, 0.3, 0.2, 0.15]))
            w, h = sizes[int(rng.integers(len(sizes)))]
            x, y = float(rng.integers(0, 200 - w)), float(rng.integers(0, 200 - h))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": float(w * h), "iscrowd": 0})
            kind = rng.random()
            if kind < 0.2:
                continue                                                        # a miss
            jitter = 0.02 if kind < 0.55 else 0.15                              # tight or loose
            box = [x + rng.normal(0, jitter * w), y + rng.normal(0, jitter * h),
                   w * (1 + rng.normal(0, jitter)), h * (1 + rng.normal(0, jitter))]
            dets.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random())})
            if kind > 0.85:                                                     # a duplicate, lower score
                dets.append({**dets[-1], "score": dets[-1]["score"] * 0.5})
        for _ in range(int(rng.integers(1, 4))):                                # false positives
            w, h = sizes[int(rng.integers(len(sizes)))]
            dets.append({"image_id": image_id, "category_id": int(rng.choice([3, 1, 7, 12, 9])),
                         "bbox": [float(rng.integers(0, 200 - w)), float(rng.integers(0, 200 - h)), w, h],
                         "score": float(rng.random())})
    dataset = {"images": images, "annotations": anns, "categories": MIXED_CATS}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(dataset))
    return path, dataset, dets


def test_ap_and_per_category_ap_equal_cocoeval_on_a_mixed_case(mixed_case):
    path, dataset, dets = mixed_case
    ours = coco_metrics(path, dets)
    theirs = cocoeval_stats(dataset, dets)
    for name in STATS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-12), name
    assert all(0.05 < theirs[n] < 0.95 for n in STATS), theirs          # non-trivial, every size present
    expected = {c["name"]: cocoeval_stats(dataset, dets, cat_ids=[c["id"]])["AP"] for c in MIXED_CATS}
    assert ours["per_category"] == pytest.approx(expected, abs=1e-12)
    assert expected["cross"] == -1.0                                    # no ground truth: COCOeval's -1
    named = [v for k, v in expected.items() if k != "cross"]
    assert len({round(v, 6) for v in named}) == 4 and all(0 < v < 1 for v in named), expected
    # on a subset of the images (as evaluate passes the images it could read)
    subset = [2, 3, 5]
    ours = coco_metrics(path, dets, image_ids=subset)
    assert ours["AP"] == pytest.approx(cocoeval_stats(dataset, dets, img_ids=subset)["AP"], abs=1e-12)
    for c in MIXED_CATS:
        want = cocoeval_stats(dataset, dets, cat_ids=[c["id"]], img_ids=subset)["AP"]
        assert ours["per_category"][c["name"]] == pytest.approx(want, abs=1e-12), c["name"]


def test_no_detections_give_cocoevals_numbers(coco_set, mixed_case):
    """COCOeval on an empty result set: 0 where there are objects, -1 where there are none (the coco_set has
    no large object). COCOeval's own numbers come from a decoy image outside the evaluated ones, since
    pycocotools' loadRes refuses an empty list."""
    for path, dataset in ((coco_set[0], json.loads(coco_set[0].read_text())), mixed_case[:2]):
        ids = [im["id"] for im in dataset["images"]]
        decoy = {**dataset, "images": dataset["images"] + [{"id": 999, "file_name": "decoy.jpg", "width": 9,
                                                            "height": 9}]}
        one = [{"image_id": 999, "category_id": dataset["categories"][0]["id"], "bbox": [0, 0, 5, 5], "score": 1}]
        ours = coco_metrics(path, [])
        theirs = cocoeval_stats(decoy, one, img_ids=ids)
        assert {n: ours[n] for n in STATS} == theirs
        for c in dataset["categories"]:
            assert ours["per_category"][c["name"]] == cocoeval_stats(decoy, one, cat_ids=[c["id"]], img_ids=ids)["AP"]
        assert ours["detections"] == 0 and ours["images"] == len(ids)
    small_and_medium_only = coco_metrics(coco_set[0], [])
    assert (small_and_medium_only["AP"], small_and_medium_only["APs"], small_and_medium_only["APl"]) == (0.0, 0.0, -1.0)


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
