"""The per-worker loop run in-process (world size 1, no Ray): a resumed run continues the
loss curve exactly; divergence stops the run, keeps the last good checkpoint and is recorded
so that a restarted worker group does not diverge again."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.training.checkpointing import checkpoint_dir, list_checkpoints, load_train_state
from pipelines.training.loop import (TrainingDiverged, error_from_stop_record, read_metrics, run_restartable_worker,
                                     run_worker)
from pipelines.training.options import AnnotatedImages, TrainOptions
from pipelines.training.sources import TrainingSources, find_pseudo_shards
from training_helpers import make_world, write_gold_shards, write_pseudo_shards


def _run(options: TrainOptions, sources, resume_from=None):
    return run_worker({"options": options, "sources": sources, "out": options.out,
                       "resume_from": str(resume_from) if resume_from else None, "heldout": []})


def test_resume_continues_the_loss_curve_and_nan_keeps_the_last_good_checkpoint(tmp_path):
    world = make_world(tmp_path / "world", gold_images=6)
    write_pseudo_shards(world, tmp_path / "pseudo", shards=2, per_shard=3)

    def options(out: str, steps: int) -> TrainOptions:
        (tmp_path / out).mkdir(exist_ok=True)
        return TrainOptions(out=str(tmp_path / out), gold=[AnnotatedImages(str(world.gold_json), str(world.gold_images))],
                            pseudo=[str(tmp_path / "pseudo")], model_overrides={"min_size": 48, "max_size": 64},
                            steps=steps, batch_size=2, warmup=1, checkpoint_every=1, log_every=1, seed=3)

    sources = TrainingSources(gold_files=write_gold_shards(world, tmp_path / "gold", per_shard=2),
                              pseudo_files=find_pseudo_shards([str(tmp_path / "pseudo")]))
    straight = _run(options("straight", 2), sources)
    _run(options("resumed", 1), sources)
    state = load_train_state(checkpoint_dir(tmp_path / "resumed", 1))
    assert state["step"] == 1 and state["world_size"] == 1 and state["scheduler"]["last_epoch"] == 1
    assert state["ranks"][0]["feed"]["feeds"][0]["streams"]["pseudo"]["pending"]   # the data position
    resumed = _run(options("resumed", 2), sources, checkpoint_dir(tmp_path / "resumed", 1))
    assert resumed["start_step"] == 1 and [r["step"] for r in resumed["rows"]] == [2]
    # same weights, optimizer, schedule, data position and RNG: step 2 is the same step
    for term in ("loss", "loss_cls", "loss_box", "loss_centerness", "lr"):
        assert resumed["rows"][0][term] == pytest.approx(straight["rows"][1][term], rel=1e-4, abs=1e-6), term
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2]

    # --init from a finished run (the teacher -> student hand-over): its weights, our resolution
    from pipelines.training.loop import build_model
    student = build_model(TrainOptions(out="unused", init=str(tmp_path / "straight"),
                                       model_overrides={"min_size": 40, "max_size": 60}))
    teacher_weights = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert torch.equal(student.state_dict()["head.bbox_pred.weight"], teacher_weights["head.bbox_pred.weight"])
    assert (student.config.min_size, student.config.max_size) == (40, 60)

    # the saved weights turn bad: the next step's centerness loss is NaN
    good = checkpoint_dir(tmp_path / "resumed", 2)
    weights = load_file(str(good / "model.safetensors"))
    weights["head.centerness.bias"] = torch.full_like(weights["head.centerness.bias"], float("nan"))
    save_file(weights, str(good / "model.safetensors"))
    # as a Ray Train worker group runs it: the error no restart cures is recorded, and a restarted group hands
    # it back at once instead of training into it again
    stop_file = tmp_path / "resumed" / "_ray" / "run.stopped.json"
    config = {"options": options("resumed", 4), "sources": sources, "out": str(tmp_path / "resumed"),
              "resume_from": str(good), "heldout": [], "stop_file": str(stop_file)}
    with pytest.raises(TrainingDiverged) as info:
        run_restartable_worker(config)
    message = str(info.value)
    assert "loss" in message and "step 3" in message and str(good) in message
    again = run_restartable_worker(config)
    assert again == {"stopped": json.loads(stop_file.read_text())}
    recorded = error_from_stop_record(again["stopped"])
    assert isinstance(recorded, TrainingDiverged) and str(recorded) == message
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [1, 2]       # nothing after the NaN
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2]


def test_held_out_evaluation_of_a_grounding_file(tmp_path):
    from glip import GLIP
    from pipelines.training.heldout import HeldOutEvaluator, HeldOutSet
    from storage.skips import StageCounts

    world = make_world(tmp_path / "world", gold_images=2)
    held = HeldOutSet.load(AnnotatedImages(str(world.eval_grounding_json), str(world.eval_images)), StageCounts())
    assert not held.detection and len(held.records) == 8
    model = GLIP.from_preset("tiny", min_size=48, max_size=64).train()
    # the optimizer's text side is the model's own: the language backbone and the fusion's BERT layers
    from pipelines.training.schedule import text_parameter_ids
    text = {n for n, p in model.named_parameters() if id(p) in text_parameter_ids(model)}
    assert any(n.startswith("language_backbone.") for n in text) and any(".text_layer." in n for n in text)
    assert not any(n.startswith("backbone.") for n in text)
    row = HeldOutEvaluator([held], 48, 64, model.config.max_query_len, samples=4, batch_size=4)(model)
    assert {"eval_loss", "eval_loss_cls", "eval_R@1", "eval_R@5"} <= set(row)
    assert row["eval_loss"] > 0 and 0.0 <= row["eval_R@1"] <= row["eval_R@5"] <= 1.0
    assert model.training                    # evaluation leaves the model as it found it
