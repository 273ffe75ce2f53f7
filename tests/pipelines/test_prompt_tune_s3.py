"""`glipctl prompt-tune` on Ray Train with the base model, the data, the shots subset and the prompt on S3
(SeaweedFS on loopback), a resume from the S3 pointer, then `glipctl evaluate --prompt s3://...`:
the prompt-tune CLI's two TorchTrainer fits of the suite."""
from __future__ import annotations

import json

import pytest

from storage import fs
from training_helpers import make_world

pytestmark = pytest.mark.slow


def test_prompt_tune_on_s3_and_evaluate_with_the_prompt_from_s3(cli, ray_session, s3_env, s3_prefix, tmp_path,
                                                                  monkeypatch):
    import torch

    from glip import GLIP
    from labeling.prompts import TunedPrompt
    from labeling.teacher import checkpoint_sha256

    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))
    world = make_world(tmp_path / "world", gold_images=4)
    torch.manual_seed(0)
    GLIP.from_preset("tiny", min_size=48, max_size=64, score_threshold=0.0).save_pretrained(tmp_path / "base")
    base = fs.join(s3_prefix, "base")
    fs.upload_tree(tmp_path / "base", base)
    task = fs.join(s3_prefix, "task")
    fs.upload_tree(world.eval_images, fs.join(task, "images"))
    fs.upload_tree(world.eval_coco_json, fs.join(task, "instances.json"))
    detection = f"{task}/instances.json={task}/images"
    out = fs.join(s3_prefix, "prompt")

    args = ["prompt-tune", "--model", base, "--detection", detection, "--out", out, "--shots", "1",
            "--batch-size", "2", "--warmup", "1", "--log-every", "1", "--checkpoint-every", "1",
            "--prompt-template", '{"star": {"prefix": "a "}}']
    result = cli(*args, "--steps", "2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    first = fs.read_bytes(fs.join(out, "prompt.safetensors"))
    prompt = TunedPrompt.read(out)
    assert prompt.caption == "circle. square. triangle. a star. heart. cross."
    assert prompt.base_sha256 == checkpoint_sha256(str(tmp_path / "base")) == checkpoint_sha256(base)
    (shots,) = [e for e in fs.list_dir(fs.join(out, "_shots"))]
    assert 0 < len(fs.read_json(shots.path)["images"]) < 8      # the subset was written to S3 and trained on
    assert prompt.meta["shots"] == 1 and prompt.meta["template"]["star"]["prefix"] == "a "

    # --resume continues from the committed prompt checkpoint (base model + prompt) to step 3
    result = cli(*args, "--steps", "3", "--resume")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert [json.loads(line)["step"] for line in fs.read_text(fs.join(out, "metrics.jsonl")).splitlines()] == [1, 2, 3]
    assert fs.read_bytes(fs.join(out, "prompt.safetensors")) != first
    prompt = TunedPrompt.read(out)

    # evaluate reads model and prompt from S3 and scores what the prompted model detects
    result = cli("evaluate", "--model", base, "--prompt", out, "--coco", detection,
                 "--out", str(tmp_path / "metrics.json"), "--detections", str(tmp_path / "dets.json"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    from labeling.evaluation import detect_coco

    model = GLIP.from_pretrained(tmp_path / "base")
    prompt.attach(model)
    expected, _, _ = detect_coco(model.eval(), world.eval_coco_json, world.eval_images,
                                 template=prompt.template, tuned_prompt=prompt)
    written = json.loads((tmp_path / "dets.json").read_text())
    assert written == json.loads(json.dumps(expected))
