"""The per-worker loop run in-process (world size 1, no Ray): divergence keeps the last good
checkpoint; a resumed loop restores the step, the schedule and the data position."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.training.checkpointing import list_checkpoints, load_train_state
from pipelines.training.loop import TrainingDiverged, read_metrics, run_worker
from pipelines.training.options import AnnotatedImages, TrainOptions
from pipelines.training.sources import load_sources
from training_helpers import make_world

SMALL = {"min_size": 48, "max_size": 64}


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    world = make_world(tmp_path / "world", gold_images=6)
    out = tmp_path / "out"
    out.mkdir()
    options = TrainOptions(out=str(out), gold=[AnnotatedImages(str(world.gold_json), str(world.gold_images))],
                           model_overrides=SMALL, steps=1, batch_size=1, warmup=0, checkpoint_every=1, log_every=1)
    sources = load_sources(options.gold, [], [])
    config = {"options": options, "sources": sources, "out": str(out), "resume_from": None, "heldout": []}
    summary = run_worker(config)
    assert summary["step"] == 1 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    ((_, good),) = list_checkpoints(out)
    state = load_train_state(good)
    assert state["step"] == 1 and state["world_size"] == 1 and state["ranks"][0]["feed"]["cursors"]["gold"]
    assert state["scheduler"]["last_epoch"] == 1

    # the weights of the saved model turn bad: the next step's centerness loss is NaN
    weights = load_file(str(good / "model.safetensors"))
    weights["head.centerness.bias"] = torch.full_like(weights["head.centerness.bias"], float("nan"))
    save_file(weights, str(good / "model.safetensors"))
    options.steps = 3
    with pytest.raises(TrainingDiverged) as info:
        run_worker({**config, "resume_from": str(good)})
    message = str(info.value)
    assert "loss" in message and "step 2" in message and str(good) in message
    assert [s for s, _ in list_checkpoints(out)] == [1]            # nothing written after the NaN
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
