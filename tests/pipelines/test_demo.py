"""A reduced `glipctl demo` (small world, a few steps) end to end, then its report's commands by hand."""
from __future__ import annotations

import json
import shlex

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.demo import MODELS, commands_from_report

pytestmark = pytest.mark.slow


def test_small_demo_end_to_end_and_its_commands_reproduce_it(ray_session, cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--small", "--out", out, "--seed", "1")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    from test_predict import cocoeval_ap      # tests/pipelines is on sys.path (pytest's rootdir import mode)

    for who in MODELS:
        assert set(report["models"][who]["per_category"]) == {"circle", "square", "triangle", "star", "heart", "cross"}
        # each model's AP is COCOeval's own on its detections (pycocotools directly, per category too)
        expected = cocoeval_ap(out / who, out / "world" / "eval" / "coco_eval.json", out / "world" / "eval" / "images",
                               batch_size=8)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert report["models"][who][name] == pytest.approx(expected[name], abs=1e-12), (who, name)
        assert report["models"][who]["per_category"] == pytest.approx(expected["per_category"], abs=1e-12), who
        assert report["rare"]["star"][who] == pytest.approx(expected["per_category"]["star"], abs=1e-12)
    assert set(report["rare"]) == {"star", "heart", "mean"}
    assert set(report["seconds"]) == {"world", "parse", "pack", "teacher", "pseudo", "student", "control",
                                      "evaluate", "total"}
    # the paper's shape: a bigger student than its teacher; the control is the student's size, on gold only
    configs = {who: json.loads((out / who / "config.json").read_text()) for who in MODELS}
    assert configs["teacher"]["name"] == "demo-t" and configs["student"]["name"] == "demo-l"
    assert configs["student"] == configs["control"]
    assert configs["student"]["resnet_widths"][0] > configs["teacher"]["resnet_widths"][0]
    assert all(c["num_fusion_layers"] >= 1 for c in configs.values())                  # deep fusion in all
    assert report["counts"]["student"]["steps"] == report["counts"]["control"]["steps"] == 6
    trained_on = {who: json.loads((out / who / "_manifest.json").read_text()) for who in MODELS}
    assert trained_on["student"]["options"]["pseudo"] == [str(out / "pseudo")]
    assert trained_on["control"]["options"]["pseudo"] == []
    # every stage really ran and left its output
    assert report["counts"]["parse"]["phrases"] > 0
    assert report["counts"]["pseudo"]["written"] == 48 and report["counts"]["pseudo"]["boxes"] > 0
    for stage in ("phrases", "gold_packed", "pseudo", *MODELS):
        assert (out / stage / "_manifest.json").exists(), stage
    md = (out / "report.md").read_text()
    assert "| COCO AP" in md and "student - control" in md
    for png in ("pseudo_samples.png", "teacher_predictions.png", "student_predictions.png", "control_predictions.png"):
        assert f"]({png})" in md
        assert Image.open(out / png).size[0] > 100
    assert "teacher" in r.output and "control" in r.output

    # report.md lists the commands the demo ran; a user runs them by hand, in the same folder (a shard
    # left over from an older, larger world is not read) and gets the demo's models and numbers again
    lines = commands_from_report(out / "report.md")
    assert [shlex.split(line)[1] for line in lines] == [
        "demo-world", "parse-captions", "pack", "train-student", "pseudo-label", "train-student", "train-student",
        "evaluate", "evaluate", "evaluate"]
    assert [c["command"] for c in report["commands"]] == lines
    before = {who: json.loads((out / "eval" / f"{who}.json").read_text())["coco"] for who in MODELS}
    weights = {who: load_file(out / who / "model.safetensors") for who in MODELS}
    for who in MODELS:
        (out / who / "model.safetensors").unlink()
    (out / "world" / "crawled" / "00099.tar").write_bytes(b"left over")
    for line in lines:
        r = cli(*shlex.split(line)[1:])
        assert r.exit_code == 0, (line, r.output)
    assert not (out / "world" / "crawled" / "00099.tar").exists()
    assert json.loads((out / "pseudo" / "_manifest.json").read_text())
    for who in MODELS:
        again = load_file(out / who / "model.safetensors")
        assert again.keys() == weights[who].keys()
        for key, tensor in weights[who].items():
            torch.testing.assert_close(again[key], tensor, rtol=0, atol=1e-6, msg=f"{who} {key}")
        after = json.loads((out / "eval" / f"{who}.json").read_text())["coco"]
        assert after["AP"] == pytest.approx(before[who]["AP"], abs=1e-6), who
        assert after["per_category"] == pytest.approx(before[who]["per_category"], abs=1e-6), who
