"""`glipctl train-student` with every input and the output on S3 (SeaweedFS on loopback).

Two TorchTrainer fits in all: the run on s3:// and the same run on relative local paths; they
must see the same samples. Resume from the S3 pointer runs in-process (``run_worker``, no Ray
Train), so it costs a few tiny steps, not another fit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from storage import fs
from storage.checkpoints import POINTER, read_pointer
from storage.manifest import Manifest, commit_shard
from storage.records import GroundedSample
from storage.shards import ShardWriter, labels_name
from training_helpers import gold_samples, make_world, write_pseudo_shards

pytestmark = pytest.mark.slow

SIZE = ["--min-size", "48", "--max-size", "64"]
SHARDS, PER_SHARD = 2, 3


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _committed_pseudo(world, out: str) -> None:
    """Pseudo-label shards in ``out`` (local or URI) committed the way the pseudo-label stage commits."""
    write_pseudo_shards(world, out, shards=SHARDS, per_shard=PER_SHARD)
    Manifest(stage="pseudo-label", options={"test": True}).save(out)
    for i in range(SHARDS):
        tar = f"{i:05d}-00000.tar"
        commit_shard(out, f"{i:05d}", {"status": "done", "outputs": [tar, labels_name(tar)],
                                       "counts": {"read": PER_SHARD, "written": PER_SHARD, "skipped": {}}})


def _uncommitted_tar(world, out: str) -> None:
    """A tar left by a worker that died before its commit record: readers must not see it."""
    s = gold_samples(world)[0]
    with ShardWriter(out, "99999") as writer:
        for k in range(4):
            writer.write(GroundedSample(f"ghost-{k}", s.caption, s.width, s.height, s.phrases, s.boxes,
                                        "pseudo/test", {}), Path(s.extra["image_path"]).read_bytes())


def _checkpoint_objects(out: str) -> set[str]:
    """The checkpoint folders that still hold objects (SeaweedFS may list an emptied folder)."""
    return {e.name.split("/", 1)[0] for e in fs.list_dir(fs.join(out, "checkpoints"), recursive=True)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), gold_images=8)


def test_train_student_on_s3_matches_local_and_resumes_from_the_pointer(
        cli, ray_session, world, s3_env, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))
    gold = fs.join(s3_prefix, "gold")
    fs.upload_tree(world.gold_images, fs.join(gold, "images"))
    fs.upload_tree(world.gold_json, fs.join(gold, "gold.json"))
    det = fs.join(s3_prefix, "det")
    fs.upload_tree(world.eval_images, fs.join(det, "images"))
    fs.upload_tree(world.eval_coco_json, fs.join(det, "instances.json"))
    pseudo = fs.join(s3_prefix, "pseudo")
    _committed_pseudo(world, pseudo)
    _uncommitted_tar(world, pseudo)
    out = fs.join(s3_prefix, "student")
    common = ["--steps", "2", "--batch-size", "2", "--warmup", "1", "--checkpoint-every", "0", "--keep", "1",
              "--log-every", "1", "--mix", "gold=1,pseudo=2,detection=1", *SIZE]

    s3_args = ["train-student", "--gold", f"{gold}/gold.json={gold}/images", "--pseudo", pseudo,
               "--detection", f"{det}/instances.json={det}/images", "--out", out, *common]
    _ok(cli(*s3_args))

    # committed by the pointer, pruned to --keep, and the model loads from a local copy
    pointer = read_pointer(out)
    assert pointer["step"] == 2 and pointer["kept"] == [[2, "checkpoints/step-00000002"]]
    assert _checkpoint_objects(out) == {"step-00000002"}
    from glip import GLIP
    from labeling.evaluation import load_model
    model = GLIP.from_pretrained(fs.local_copy(fs.join(out, pointer["checkpoint"])))
    assert model.config.min_size == 48
    assert fs.read_json(fs.join(out, "config.json"))["min_size"] == 48     # the top of OUT: the final model
    assert load_model(out).config.max_size == 64                           # --model s3://... (no optimizer state)
    rows = [json.loads(line) for line in fs.read_text(fs.join(out, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    s3_counts = {k: v["counts"] for k, v in fs.read_json(fs.join(out, "_manifest.json"))["shards"].items()}

    # the same run on relative local paths (made absolute before they reach Ray)
    local = tmp_path / "local"
    _committed_pseudo(world, str(local / "pseudo"))
    monkeypatch.chdir(tmp_path)

    def rel(path: Path) -> str:
        return os.path.relpath(path, tmp_path)

    local_args = ["train-student", "--gold", f"{rel(world.gold_json)}={rel(world.gold_images)}",
                  "--pseudo", "local/pseudo", "--detection", f"{rel(world.eval_coco_json)}={rel(world.eval_images)}",
                  "--out", "local/student", *common]
    _ok(cli(*local_args))
    local_counts = {k: v["counts"] for k, v in
                    json.loads((local / "student" / "_manifest.json").read_text())["shards"].items()}
    assert s3_counts == local_counts                     # same samples read, trained on and skipped
    assert s3_counts["pseudo"]["read"] == local_counts["pseudo"]["read"] > 0
    assert sum(c["written"] for c in s3_counts.values()) == 2 * 2

    # an existing S3 run is refused without --resume; --resume at the target step only publishes
    refused = cli(*s3_args)
    assert refused.exit_code == 2 and "--resume" in " ".join(refused.output.split())
    _ok(cli(*s3_args, "--resume"))

    # resume from the pointer, in-process: the next step lands on S3 and the pointer moves
    from pipelines.training import AnnotatedImages, TrainOptions
    from pipelines.training.checkpointing import latest_checkpoint, list_checkpoints
    from pipelines.training.loop import run_worker
    from pipelines.training.sources import prepare_sources

    options = TrainOptions(out=out, gold=[AnnotatedImages(f"{gold}/gold.json", f"{gold}/images")],
                           pseudo=[pseudo], model_overrides={"min_size": 48, "max_size": 64}, steps=3,
                           batch_size=2, warmup=1, checkpoint_every=1, keep=1, log_every=1,
                           mix={"gold": 1.0, "pseudo": 2.0, "detection": 1.0})
    sources = prepare_sources(options.gold, [], options.pseudo, out)     # the run's own pack, found again
    resumed = run_worker({"options": options, "sources": sources, "out": out,
                          "resume_from": latest_checkpoint(out), "heldout": []})
    assert resumed["start_step"] == 2 and [r["step"] for r in resumed["rows"]] == [3]
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert _checkpoint_objects(out) == {"step-00000003"}
    rows = [json.loads(line) for line in fs.read_text(fs.join(out, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert fs.is_file(fs.join(out, POINTER))
