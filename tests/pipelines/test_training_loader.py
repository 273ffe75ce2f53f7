"""The per-worker batch loader: off-thread feeds that draw what the in-thread feed draws, resumed exactly."""
from __future__ import annotations

import pytest
import torch

from pipelines.training.loader import FeedSpec, WorkerBatches
from pipelines.training.options import TrainOptions
from pipelines.training.sources import TrainingSources, find_pseudo_shards
from training_helpers import make_world, write_gold_shards, write_pseudo_shards


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> FeedSpec:
    world = make_world(tmp_path_factory.mktemp("world"))
    gold = write_gold_shards(world, tmp_path_factory.mktemp("gold"), per_shard=4)
    pseudo_dir = tmp_path_factory.mktemp("pseudo")
    write_pseudo_shards(world, pseudo_dir, shards=4, per_shard=4)
    sources = TrainingSources(gold_files=gold, pseudo_files=find_pseudo_shards([str(pseudo_dir)]))
    options = TrainOptions(out="unused", shuffle_buffer=4, group_shards=2)
    return FeedSpec(sources, options, 48, 80, 256)


def take(batches: WorkerBatches, n: int) -> list:
    return [e for _ in range(n) for e in batches.next_batch()]


def same(a: list, b: list) -> bool:
    return [e.key for e in a] == [e.key for e in b] and all(
        torch.equal(x.image, y.image) and torch.equal(x.boxes, y.boxes) for x, y in zip(a, b))


def test_a_loader_process_draws_what_the_training_thread_draws(spec):
    in_thread = WorkerBatches(spec, rank=0, world=1, batch_size=3, loader_workers=0)
    off_thread = WorkerBatches(spec, rank=0, world=1, batch_size=3, loader_workers=1)
    try:
        assert same(take(in_thread, 5), take(off_thread, 5))
        assert in_thread.state_dict()["feeds"][0]["counts"] == off_thread.state_dict()["feeds"][0]["counts"]
    finally:
        off_thread.close()


def test_two_loader_processes_resume_exactly_mid_round(spec):
    straight = WorkerBatches(spec, rank=0, world=1, batch_size=2, loader_workers=2)
    first = WorkerBatches(spec, rank=0, world=1, batch_size=2, loader_workers=2)
    resumed = WorkerBatches(spec, rank=0, world=1, batch_size=2, loader_workers=2)
    try:
        expected = take(straight, 9)
        head = take(first, 5)                 # odd: the next batch is feed 1's
        state = first.state_dict()
        assert state["next"] == 1
        resumed.load([state])
        assert same(head + take(resumed, 4), expected)
    finally:
        for b in (straight, first, resumed):
            b.close()


def test_another_worker_count_resplits_the_shards_left(spec, caplog):
    old = WorkerBatches(spec, rank=0, world=1, batch_size=4, loader_workers=0)
    take(old, 3)
    state = old.state_dict()
    left = set(state["feeds"][0]["streams"]["gold"]["pending"])
    new = [WorkerBatches(spec, rank=r, world=2, batch_size=4, loader_workers=0) for r in range(2)]
    for b in new:
        b.load([state])
    assert "split anew" in caplog.text
    parts = [set(b.states[0]["streams"]["gold"]["pending"]) for b in new]
    assert parts[0] | parts[1] == left and not parts[0] & parts[1]
    # the counts so far are carried once (by rank 0), not doubled
    assert new[0].counts()["gold"] == state["feeds"][0]["counts"]["gold"]
    assert new[1].counts().get("gold", {}).get("read", 0) == 0
    take(new[1], 2)                            # and the re-split feeds run
