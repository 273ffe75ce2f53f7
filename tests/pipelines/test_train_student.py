"""`glipctl train-student` end to end on real Ray Train (gloo, CPU), tiny preset, tiny images.

Four TorchTrainer fits in all (each costs ~10-20 s of Ray Train start-up): a 1-worker
gold + pseudo + detection run, its resume, a 2-worker gold-only run with evaluation, and a
1-worker run whose worker process dies once (Ray Train restarts it from the newest checkpoint).
Bad input is refused on the driver before Ray Train starts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.training.checkpointing import list_checkpoints, load_train_state
from pipelines.training.loop import read_metrics
from pipelines.training.schedule import lr_factor
from storage.records import Box, GroundedSample
from storage.shards import ShardWriter
from training_helpers import gold_samples, make_world, write_pseudo_shards

pytestmark = pytest.mark.slow

SIZE = ["--min-size", "48", "--max-size", "64"]
LOSS_TERMS = {"loss", "loss_cls", "loss_box", "loss_centerness"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), gold_images=16)


@pytest.fixture(scope="module")
def pseudo_dir(world, tmp_path_factory):
    """Two good shards, a truncated one, and a sample whose only box lies outside its image."""
    out = tmp_path_factory.mktemp("pseudo")
    write_pseudo_shards(world, out, shards=2, per_shard=4)
    data = (out / "00000-00000.tar").read_bytes()
    (out / "truncated-00000.tar").write_bytes(data[: len(data) // 2 + 100])
    s = gold_samples(world)[0]
    outside = GroundedSample("outside", s.caption, s.width, s.height, s.phrases,
                             [Box([s.width + 5.0, 0.0, 10.0, 10.0], s.boxes[0].tokens_positive, 0, 0.9)],
                             "pseudo/test", {})
    with ShardWriter(out, "zz-bad") as writer:
        writer.write(outside, Path(s.extra["image_path"]).read_bytes())
    return out


def _said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_one_worker_gold_pseudo_detection_then_resume(cli, ray_session, world, pseudo_dir, tmp_path):
    # detection data packed once by `glipctl pack`; gold given as ANN=IMAGES, packed by the run itself
    packed = tmp_path / "packed"
    _ok(cli("pack", "--detection", world.eval_coco_arg, "--out", str(packed), "--samples-per-shard", "3"))
    out = tmp_path / "student"
    args = ["train-student", "--gold", world.gold_arg, "--pseudo", str(pseudo_dir),
            "--detection", str(packed), "--mix", "gold=1,pseudo=2,detection=3",
            "--pseudo-min-score", "0.5", "--out", str(out), "--batch-size", "2", "--warmup", "1",
            "--checkpoint-every", "2", "--keep", "2", "--log-every", "1", *SIZE]
    _ok(cli(*args, "--steps", "3"))

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(LOSS_TERMS <= set(r) and r["samples_per_s"] > 0 for r in rows)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["stage"] == "train-student"
    shards = manifest["shards"]
    assert {"gold", "pseudo", "detection"} <= set(shards) and all(e["status"] == "done" for e in shards.values())
    assert sum(e["counts"]["written"] for e in shards.values()) == 3 * 2
    pseudo_skips = shards["pseudo"]["counts"]["skipped"]
    assert any("trunc" in reason for reason in pseudo_skips), pseudo_skips          # the cut tar: counted
    assert pseudo_skips.get("box_outside_image", 0) >= 1                           # the bad box: counted
    assert shards["detection"]["counts"]["written"] >= 1 and shards["detection"]["counts"]["read"] >= 1
    assert len(list((out / "_packed").iterdir())) == 1                             # the run's own pack of --gold

    # the top of --out is a checkpoint that loads and predicts
    from PIL import Image

    from glip import GLIP
    model = GLIP.from_pretrained(out)
    sample = gold_samples(world)[0]
    spans = [(p.start, p.end) for p in sample.phrases]
    grounded = model.ground([Image.open(sample.extra["image_path"]).convert("RGB")], [sample.caption], [spans])
    assert len(grounded) == 1 and len(grounded[0]) == len(spans)
    assert all(len(box["bbox"]) == 4 for phrase in grounded[0] for box in phrase)

    # the same --out without --resume is refused (exit 2) before anything runs
    refused = cli(*args, "--steps", "4")
    assert refused.exit_code == 2 and "--resume" in _said(refused)

    _ok(cli(*args, "--steps", "4", "--resume"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]                                 # the curve continues
    # the schedule continued from step 3 (a fresh one would still be warming up)
    assert rows[3]["lr"] == pytest.approx(1e-4 * lr_factor(3, 4, 1, "cosine"))
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]
    assert load_train_state(out)["step"] == 4
    assert json.loads((out / "_manifest.json").read_text())["options"]["reached_step"] == 4


def test_two_workers_with_evaluation_heal_and_resume_exactly(ray_session, world, tmp_path, monkeypatch, caplog):
    from glip import GLIP
    from pipelines.training import AnnotatedImages, TrainOptions, train
    from pipelines.training.loop import FAULT_ENV, run_worker
    from pipelines.training.sources import prepare_sources

    def options(out: str, **extra) -> TrainOptions:
        return TrainOptions(
            out=str(tmp_path / out), gold=[AnnotatedImages(str(world.gold_json), str(world.gold_images))],
            model_overrides={"min_size": 48, "max_size": 64}, steps=3, batch_size=1, warmup=0, workers=2,
            checkpoint_every=1, keep=3, log_every=1, seed=5, **extra)

    result = train(options("teacher", eval=[AnnotatedImages(str(world.eval_coco_json), str(world.eval_images))],
                           eval_every=3, eval_samples=4), progress=False)
    assert result.step == 3 and result.start_step == 0
    assert result.counts["gold"]["written"] == 3 * 1 * 2          # steps x batch x workers
    assert result.counts["gold"]["read"] >= 6                     # the samples both workers read from the shards
    last = result.metrics[-1]
    assert last["step"] == 3 and "eval_loss" in last and 0.0 <= last["eval_AP"] <= 1.0
    assert [s for s, _ in list_checkpoints(result.out)] == [1, 2, 3]
    assert GLIP.from_pretrained(result.out).config.min_size == 48

    # the same run whose worker process dies after step 2: the restarted group resumes from a checkpoint
    # with both workers' data positions and RNG, so every logged step equals the undisturbed run's
    monkeypatch.setenv(FAULT_ENV, f"2:{tmp_path / 'killed'}")
    healed = train(options("healed", max_failures=1), progress=False)
    monkeypatch.delenv(FAULT_ENV)
    assert (tmp_path / "killed").exists() and healed.step == 3
    rows = read_metrics(tmp_path / "healed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for mine, plain in zip(rows, result.metrics, strict=True):
        for term in (*LOSS_TERMS, "lr"):
            assert mine[term] == pytest.approx(plain[term], rel=1e-4, abs=1e-6), (mine["step"], term)

    # resumed with another worker count (one, in-process): the shards left are split anew, and the run
    # continues at the next step
    one = options("healed", resume=True)
    one.workers, one.steps = 1, 4
    state_before = load_train_state(tmp_path / "healed")
    resumed = run_worker({"options": one, "sources": prepare_sources(one.gold, [], [], one.out), "out": one.out,
                          "resume_from": str(list_checkpoints(tmp_path / "healed")[-1][1]), "heldout": []})
    assert "split anew" in caplog.text
    assert resumed["start_step"] == 3 and [r["step"] for r in resumed["rows"]] == [4]
    assert state_before["world_size"] == 2 and load_train_state(tmp_path / "healed")["world_size"] == 1


def test_a_lost_worker_is_restarted_from_the_newest_checkpoint_and_ends_at_the_requested_step(
        ray_session, world, tmp_path, monkeypatch):
    from pipelines.training import AnnotatedImages, TrainOptions, train
    from pipelines.training.loop import FAULT_ENV, run_worker
    from pipelines.training.sources import prepare_sources

    def options(out: str) -> TrainOptions:
        return TrainOptions(out=str(tmp_path / out), gold=[AnnotatedImages(str(world.gold_json), str(world.gold_images))],
                            model_overrides={"min_size": 48, "max_size": 64}, steps=4, batch_size=1, warmup=1,
                            checkpoint_every=1, keep=4, log_every=1, max_failures=1)

    # the worker process exits (os._exit) after step 3's metrics row, before its checkpoint, once
    killed = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"3:{killed}")
    result = train(options("healed"), progress=False)
    assert killed.exists()                                       # the fault happened
    out = tmp_path / "healed"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]            # step 3 trained again from checkpoint 2, logged once
    assert result.step == 4 and [r["step"] for r in result.metrics] == [1, 2, 3, 4]
    assert load_train_state(out)["step"] == 4
    # resumed from checkpoint 2, not from scratch: checkpoints 1 and 2 predate the fault, 3 and 4 follow it
    written = {s: (path / "train_state.pt").stat().st_mtime_ns for s, path in list_checkpoints(out)}
    assert sorted(written) == [1, 2, 3, 4]
    assert written[1] < written[2] < killed.stat().st_mtime_ns < written[3] < written[4]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["options"]["reached_step"] == 4 and manifest["options"]["max_failures"] == 1
    assert manifest["shards"]["gold"]["counts"]["written"] == 4     # the data position came back with the counts

    # the same run undisturbed (in-process, world size 1 as above): the restart restored weights, optimizer,
    # schedule, data position and RNG, so steps 3 and 4 are the same steps
    monkeypatch.delenv(FAULT_ENV)
    straight = options("straight")
    (tmp_path / "straight").mkdir()
    undisturbed = run_worker({"options": straight, "sources": prepare_sources(straight.gold, [], [], straight.out),
                              "out": straight.out, "resume_from": None, "heldout": []})
    for healed, plain in zip(rows, undisturbed["rows"], strict=True):
        for term in (*LOSS_TERMS, "lr"):
            assert healed[term] == pytest.approx(plain[term], rel=1e-4, abs=1e-6), (healed["step"], term)


def test_bad_input_is_exit_2_before_training(cli, world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = cli("train-student", "--gold", f"{world.gold_json}={empty}", "--out", str(tmp_path / "a"))
    assert no_images.exit_code == 2 and "no usable record" in _said(no_images)
    no_shards = cli("train-student", "--gold", world.gold_arg, "--pseudo", str(empty), "--out", str(tmp_path / "b"))
    assert no_shards.exit_code == 2 and "no .tar" in _said(no_shards)
    malformed = cli("train-student", "--gold", str(world.gold_json), "--out", str(tmp_path / "c"))
    assert malformed.exit_code == 2 and "ANN.json=IMAGE_DIR" in _said(malformed)
    nothing = cli("train-student", "--out", str(tmp_path / "d"))
    assert nothing.exit_code == 2 and "nothing to train on" in _said(nothing)


def test_more_workers_than_the_local_cluster_holds_is_exit_2(cli, ray_session, world, tmp_path):
    too_many = cli("train-student", "--gold", world.gold_arg, "--out", str(tmp_path / "x"), "--workers", "3")
    assert too_many.exit_code == 2 and "needs 3 CPU" in _said(too_many)
    no_gpu = cli("train-student", "--gold", world.gold_arg, "--out", str(tmp_path / "y"), "--gpus-per-worker", "1")
    assert no_gpu.exit_code == 2 and "needs 1 GPU" in _said(no_gpu)


def test_overwrite_never_costs_the_previous_run_on_bad_input(cli, world, tmp_path):
    from pipelines.training.checkpointing import save_checkpoint

    out = tmp_path / "run"
    save_checkpoint(out, 7, lambda folder: (folder / "config.json").write_text("{}"), {"step": 7}, keep=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = cli("train-student", "--gold", f"{world.gold_json}={empty}", "--out", str(out), "--overwrite")
    assert bad.exit_code == 2 and [s for s, _ in list_checkpoints(out)] == [7]
    both = cli("train-student", "--gold", world.gold_arg, "--out", str(out), "--overwrite", "--resume")
    assert both.exit_code == 2 and "contradict" in _said(both)
