"""The generated world: same seed -> same bytes; formats readable; rare shapes rare in gold only.

The transfer task: same seed -> same bytes; every category, the novel one included, in both
splits with boxes on their shapes; the world never shows or names the novel shape.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.world import (NOVEL_SHAPES, RARE_SHAPES, SHAPES, TransferSpec, WorldSpec, _shape_mask,
                             generate_transfer_task, generate_world)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = WorldSpec.small(seed=3)
    a = generate_world(tmp_path / "a", spec)
    b = generate_world(tmp_path / "b", spec)
    c = generate_world(tmp_path / "c", WorldSpec.small(seed=4))
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)


def test_world_formats_and_rarity(tmp_path):
    spec = WorldSpec(seed=1, gold_images=120, crawled_images=120, eval_images=12, crawled_shard_size=50)
    w = generate_world(tmp_path, spec)
    gold = json.loads(w.gold_json.read_text())
    assert len(gold["images"]) == 120
    for img in gold["images"][:20]:
        assert (w.gold_images / img["file_name"]).exists()
    for ann in gold["annotations"]:
        img = gold["images"][ann["image_id"] - 1]
        (s, e), = ann["tokens_positive"]
        assert img["caption"][s:e].split()[-1] in SHAPES
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and x + bw <= img["width"] and 0 <= y and y + bh <= img["height"] and bw > 5
    # img2dataset webdataset layout: three shards of tar + parquet + stats
    tars = sorted(w.crawled_dir.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    table = pq.read_table(w.crawled_dir / "00000.parquet")
    assert {"key", "caption", "url", "width", "height", "status"} <= set(table.column_names)
    assert json.loads((w.crawled_dir / "00002_stats.json").read_text())["successes"] == 20
    coco = json.loads(w.eval_coco_json.read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPES)
    # the point of the world: rare shapes are scarce in gold, common in crawled
    shapes = w.summary["shapes"]
    rare_gold = sum(shapes["gold"].get(s, 0) for s in RARE_SHAPES) / sum(shapes["gold"].values())
    rare_crawled = sum(shapes["crawled"].get(s, 0) for s in RARE_SHAPES) / sum(shapes["crawled"].values())
    assert rare_gold < 0.08 and rare_crawled > 0.3


# ----------------------------------------------------------------------------- novel shape, transfer task

def test_moon_is_a_disc_minus_an_offset_disc():
    rng = np.random.default_rng(0)
    moon = np.asarray(_shape_mask("moon", (80, 80), 40, 40, 40, rng)) > 0
    disc = np.asarray(_shape_mask("circle", (80, 80), 40, 40, 40, rng)) > 0
    assert NOVEL_SHAPES == ("moon",) and "moon" not in SHAPES
    assert not (moon & ~disc).any()                      # inside the disc ...
    assert 0.2 < moon.sum() / disc.sum() < 0.6           # ... with a bite out of it
    assert not moon[40, 40] and moon[40, 22]             # the centre is cut, the far rim stays


def test_transfer_task_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = TransferSpec.small(seed=3)
    a = generate_transfer_task(tmp_path / "a", spec)
    b = generate_transfer_task(tmp_path / "b", spec)
    c = generate_transfer_task(tmp_path / "c", TransferSpec.small(seed=4))
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert a.test_json.read_bytes() == b.test_json.read_bytes()
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)
    assert a.train_json.read_bytes() != c.train_json.read_bytes()
    # each split has its own generator: resizing the test split leaves train as it was
    d = generate_transfer_task(tmp_path / "d", replace(spec, test_images=5))
    assert _digest(d.train_images) == _digest(a.train_images)
    assert d.train_json.read_bytes() == a.train_json.read_bytes()
    # regenerating smaller over a larger task leaves no stale image behind
    e = generate_transfer_task(tmp_path / "a", replace(spec, train_images=7))
    assert len(list(e.train_images.glob("*.jpg"))) == 7


def test_transfer_task_layout_categories_and_boxes(tmp_path):
    from pycocotools.coco import COCO

    spec = TransferSpec.small()
    t = generate_transfer_task(tmp_path / "transfer", spec)
    assert t.train_arg == f"{tmp_path / 'transfer' / 'train.json'}={tmp_path / 'transfer' / 'train'}"
    assert t.test_arg == f"{tmp_path / 'transfer' / 'test.json'}={tmp_path / 'transfer' / 'test'}"
    assert spec.categories == SHAPES + NOVEL_SHAPES
    for ann_json, image_dir, n_images in ((t.train_json, t.train_images, 24), (t.test_json, t.test_images, 12)):
        coco = COCO(str(ann_json))
        assert [coco.cats[k]["name"] for k in sorted(coco.cats)] == list(SHAPES + NOVEL_SHAPES)
        assert sorted(coco.cats) == list(range(1, len(spec.categories) + 1))
        assert len(coco.imgs) == n_images
        per_category = {k: len(coco.getAnnIds(catIds=[k])) for k in coco.cats}
        assert min(per_category.values()) >= 2, per_category           # moon too, in both splits
        for image in coco.imgs.values():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            assert 1 <= len(anns) <= spec.max_objects
            arr = np.asarray(Image.open(image_dir / image["file_name"]).convert("RGB")).astype(int)
            assert arr.shape == (image["height"], image["width"], 3)
            inside = np.zeros(arr.shape[:2], bool)
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"]
                assert 5 < w <= 80 and 5 < h <= 80 and ann["area"] == w * h and ann["iscrowd"] == 0
                inside[int(y):int(y + h), int(x):int(x + w)] = True
            # the shape's pixels stand out from the background inside its box, and hardly outside
            background = np.median(arr[~inside], axis=0)
            far = np.abs(arr - background).sum(-1) > 90
            for ann in anns:
                x, y, w, h = (int(v) for v in ann["bbox"])
                assert far[y:y + h, x:x + w].mean() > 0.1, ann
            assert far[~inside].mean() < 0.1


def test_world_never_shows_or_names_the_novel_shape(tmp_path):
    w = generate_world(tmp_path, WorldSpec.small(seed=5))
    texts = [p.read_text().lower() for p in w.root.rglob("*.json")]
    for tar_path in w.crawled_dir.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            texts += [tar.extractfile(m).read().decode().lower() for m in tar.getmembers()
                      if not m.name.endswith(".jpg")]
    for parquet in w.crawled_dir.glob("*.parquet"):
        texts += [c.lower() for c in pq.read_table(parquet).column("caption").to_pylist()]
    assert len(texts) > 2 * 48
    for novel in NOVEL_SHAPES:
        assert not any(novel in text for text in texts)
    coco = json.loads(w.eval_coco_json.read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPES)
    truth = json.loads(w.crawled_truth.read_text())
    assert {o["shape"] for objects in truth.values() for o in objects} <= set(SHAPES)
    assert all(set(counts) <= set(SHAPES) for counts in w.summary["shapes"].values())


def test_transfer_spec_rejects_unknown_or_repeated_categories():
    with pytest.raises(ValueError):
        TransferSpec(categories=("circle", "hexagon"))
    with pytest.raises(ValueError):
        TransferSpec(categories=("moon", "moon"))
