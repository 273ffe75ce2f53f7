"""A reduced `glipctl demo` (small world, a few steps) end to end through the real stages."""
from __future__ import annotations

import json

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_small_demo_end_to_end(ray_session, cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--small", "--out", out, "--seed", "1")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    from test_predict import cocoeval_ap      # tests/pipelines is on sys.path (pytest's rootdir import mode)

    for who in ("teacher", "student"):
        assert set(report[who]["per_category"]) == {"circle", "square", "triangle", "star", "heart", "cross"}
        # each model's AP is COCOeval's own on its detections (pycocotools directly, per category too)
        expected = cocoeval_ap(out / who, out / "world" / "eval" / "coco_eval.json", out / "world" / "eval" / "images",
                               batch_size=8)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert report[who][name] == pytest.approx(expected[name], abs=1e-12), (who, name)
        assert report[who]["per_category"] == pytest.approx(expected["per_category"], abs=1e-12), who
        assert report["rare"]["star"][who] == pytest.approx(expected["per_category"]["star"], abs=1e-12)
    assert set(report["rare"]) == {"star", "heart", "mean"}
    assert set(report["seconds"]) == {"world", "parse", "teacher", "pseudo", "student", "evaluate", "total"}
    # every stage really ran and left its output
    assert report["counts"]["parse"]["phrases"] > 0
    assert report["counts"]["pseudo"]["images"] == 48 and report["counts"]["pseudo"]["boxes"] > 0
    for stage in ("phrases", "pseudo", "teacher", "student"):
        assert (out / stage / "_manifest.json").exists(), stage
    assert (out / "teacher" / "config.json").exists() and (out / "student" / "config.json").exists()
    md = (out / "report.md").read_text()
    assert "| COCO AP" in md
    for png in ("pseudo_samples.png", "teacher_predictions.png", "student_predictions.png"):
        assert f"]({png})" in md
        assert Image.open(out / png).size[0] > 100
    assert "teacher" in r.output and "student" in r.output

    # a second demo into the same folder (another seed, fewer steps) replaces the first one's results;
    # a shard left over from an older, larger world is not read
    (out / "world" / "crawled" / "00099.tar").write_bytes(b"left over")
    r = cli("demo", "--small", "--out", out, "--seed", "2", "--steps", "3")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "report.json").read_text())
    assert again["options"]["seed"] == 2 and again["counts"]["student"]["steps"] == 3
    assert json.loads((out / "world" / "world.json").read_text())["spec"]["seed"] == 2
    assert not (out / "world" / "crawled" / "00099.tar").exists() and again["counts"]["pseudo"]["images"] == 48
