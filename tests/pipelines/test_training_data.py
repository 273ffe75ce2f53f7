"""Training data: options parsing, source loading, seeded sampling, the per-worker feed."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.training.augment import TrainAugment
from pipelines.training.feed import MixedFeed, detection_prompt
from pipelines.training.options import AnnotatedImages, TrainOptions, parse_mix
from pipelines.training.sampling import MixSampler, ShardStream, read_shard, shuffled
from pipelines.training.sources import DetectionImage, TrainingSources, find_pseudo_shards
from storage.errors import InputError
from storage.skips import StageCounts
from training_helpers import make_world, write_detection_shards, write_gold_shards, write_pseudo_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def pseudo_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("pseudo")
    write_pseudo_shards(world, out, shards=3, per_shard=4)
    return out


@pytest.fixture(scope="module")
def gold_files(world, tmp_path_factory):
    return write_gold_shards(world, tmp_path_factory.mktemp("gold"), per_shard=6)


@pytest.fixture(scope="module")
def detection(world, tmp_path_factory):
    return write_detection_shards(world, tmp_path_factory.mktemp("detection"), per_shard=3)


def small_augment() -> TrainAugment:
    return TrainAugment(48, 80)


# ----------------------------------------------------------------------------- options

def test_parse_mix_defaults_and_errors():
    assert parse_mix("gold=2,pseudo=0.5") == {"gold": 2.0, "pseudo": 0.5, "detection": 1.0}
    for bad in ("gold", "coco=1", "gold=x", "gold=-1", "gold=nan"):
        with pytest.raises(InputError):
            parse_mix(bad)


def test_annotated_images_names_the_missing_part(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    with pytest.raises(InputError, match="ANN.json=IMAGE_DIR"):
        AnnotatedImages.parse(str(ann), "--gold")
    with pytest.raises(InputError, match="image folder"):
        AnnotatedImages.parse(f"{ann}={tmp_path / 'nope'}", "--gold")
    with pytest.raises(InputError, match="annotation file"):
        AnnotatedImages.parse(f"{tmp_path / 'nope.json'}={tmp_path}", "--gold")
    assert AnnotatedImages.parse(f"{ann}={tmp_path}", "--gold").image_root == str(tmp_path)


def test_annotated_images_split_after_json_and_normalize(tmp_path, monkeypatch):
    # "=" inside a path (Hive-style partitions, common in buckets) does not split it
    part = tmp_path / "date=2024"
    (part / "img=1").mkdir(parents=True)
    (part / "ann.json").write_text("{}")
    spec = AnnotatedImages.parse(f"{part / 'ann.json'}={part / 'img=1'}", "--gold")
    assert (spec.annotations, spec.image_root) == (str(part / "ann.json"), str(part / "img=1"))
    monkeypatch.chdir(tmp_path)                       # relative paths come back absolute
    spec = AnnotatedImages.parse("date=2024/ann.json=date=2024/img=1", "--eval")
    assert (spec.annotations, spec.image_root) == (str(part / "ann.json"), str(part / "img=1"))
    assert AnnotatedImages.parse(f"file://{part / 'ann.json'}={part}", "--gold").annotations == str(part / "ann.json")


def test_options_refuse_runs_that_cannot_train(tmp_path):
    with pytest.raises(InputError, match="nothing to train on"):
        TrainOptions(out=str(tmp_path)).validate()
    with pytest.raises(InputError, match="weight 0"):
        TrainOptions(out=str(tmp_path), pseudo=[str(tmp_path)], mix=parse_mix("pseudo=0")).validate()


# ----------------------------------------------------------------------------- sampling

def test_mix_sampler_honours_weights_over_many_draws():
    sampler = MixSampler({"gold": 1.0, "pseudo": 3.0, "detection": 0.0}, seed=7)
    draws = Counter(sampler.next() for _ in range(20000))
    assert "detection" not in draws
    assert abs(draws["pseudo"] / 20000 - 0.75) < 0.015


def test_mix_sampler_state_round_trip_replays_draws():
    a = MixSampler({"gold": 1.0, "pseudo": 1.0}, seed=3)
    for _ in range(17):
        a.next()
    b = MixSampler({"gold": 1.0, "pseudo": 1.0}, seed=3)
    b.load_state_dict(a.state_dict())
    assert [a.next() for _ in range(50)] == [b.next() for _ in range(50)]


def test_shuffled_keeps_every_item():
    out = list(shuffled(iter(range(100)), 16, np.random.default_rng(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


def keys_of(stream: ShardStream, n: int) -> list[str]:
    return [stream.next()[1].key for _ in range(n)]


def test_shard_stream_splits_shards_between_readers_and_wraps(pseudo_dir):
    files = sorted(str(p) for p in pseudo_dir.glob("*.tar"))
    assert len(files) == 3
    streams = [ShardStream(files, seed=0, rank=r, world=2, buffer_size=4) for r in range(2)]
    # one epoch: reader 0 reads 2 shards, reader 1 one shard (shard-level split)
    first = [keys_of(s, n) for s, n in zip(streams, (8, 4))]
    assert not set(first[0]) & set(first[1])
    assert len(set(first[0]) | set(first[1])) == 12
    streams[1].next()
    assert streams[1].epoch == 1   # endless: wrapped to the next epoch (new shard order)


def test_shard_stream_with_fewer_shards_than_readers_splits_samples(pseudo_dir):
    one = [str(sorted(pseudo_dir.glob("*.tar"))[0])]
    keys = [keys_of(ShardStream(one, seed=0, rank=r, world=3), 1)[0] for r in range(3)]
    assert len(set(keys)) == 3


class CountingReader:
    """``read_shard`` that counts the samples it hands out (how much a resume re-reads)."""

    def __init__(self):
        self.samples = 0

    def __call__(self, path, counts):
        for item in read_shard(path, counts):
            self.samples += 1
            yield item


def test_shard_stream_resumes_exactly_rereading_only_its_current_group(gold_files):
    assert len(gold_files) == 4                       # 24 gold samples, 6 per shard
    a = ShardStream(gold_files, seed=0, group_shards=2, buffer_size=4)
    keys_of(a, 30)                                    # epoch 1, second group, 6 samples in
    assert (a.epoch, a.taken) == (1, 6)
    reader = CountingReader()
    b = ShardStream(gold_files, seed=0, group_shards=2, buffer_size=4, reader=reader)
    b.load_state_dict(a.state_dict())
    read_before = a.counts.read
    assert keys_of(a, 30) == keys_of(b, 30)
    # the replay read the 6 samples taken plus what the buffer held ahead, never the 24 before them
    assert reader.samples - 30 <= 6 + 4 + 2
    # the replayed reads are not counted again (the counts travel in the feed's state, not here):
    # b, starting from zero, counts exactly what a counted over the same 30 samples
    assert b.counts.read == a.counts.read - read_before > 0


def test_shard_stream_resplit_reads_every_shard_left_in_the_epoch(gold_files):
    old = [ShardStream(gold_files, seed=3, rank=r, world=2, group_shards=1, buffer_size=2) for r in range(2)]
    taken = set(keys_of(old[0], 7) + keys_of(old[1], 2))      # reader 0: one shard done, one begun
    epoch_keys = {s.key for f in gold_files for s, _ in read_shard(f, StageCounts())}
    new = [ShardStream(gold_files, seed=3, rank=r, world=3, group_shards=1, buffer_size=2) for r in range(3)]
    for stream in new:
        stream.resplit([o.state_dict() for o in old])
    assert sum(len(s.pending) for s in new) == 3              # the finished shard is not read again
    rest = [keys_of(s, 6 * len(s.pending)) for s in new]
    assert all(s.epoch == 0 for s in new)
    left = set().union(*map(set, rest))
    assert left | taken == epoch_keys                         # nothing of the epoch is lost
    assert len(left & taken) <= 7                             # only the shards begun are read again


def test_truncated_shard_is_a_counted_skip(pseudo_dir, tmp_path):
    good = sorted(pseudo_dir.glob("*.tar"))[0]
    bad = tmp_path / "bad-00000.tar"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    stream = ShardStream([str(bad), str(good)], seed=0, buffer_size=2)
    assert len(keys_of(stream, 6)) == 6
    assert stream.counts.skipped["truncated_tar"] >= 1


def test_empty_pseudo_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no .tar"):
        find_pseudo_shards([str(tmp_path)])


def test_detection_prompt_names_positives_and_negatives():
    image = DetectionImage("k", "p", 100, 100, [([0, 0, 10, 10], "dog"), ([5, 5, 10, 10], "cat"),
                                                ([1, 1, 5, 5], "dog")],
                           ("dog", "cat", "car", "bus", "tree", "zebra"), "det/x")
    rng = np.random.default_rng(0)
    negatives_seen = set()
    for _ in range(50):
        caption, boxes, spans = detection_prompt(image, rng, negatives=3)
        names = caption.rstrip(".").split(". ")
        assert {"dog", "cat"} <= set(names) and len(names) <= 5
        negatives_seen |= set(names) - {"dog", "cat"}
        assert len(boxes) == 3
        for (s, e), (_, name) in zip([sp[0] for sp in spans], image.boxes):
            assert caption[s:e] == name
    assert negatives_seen == {"car", "bus", "tree", "zebra"}
    caption, _, _ = detection_prompt(image, rng, negatives=None)
    assert set(caption.rstrip(".").split(". ")) == set(image.categories)     # evaluation: every name
    # a token budget too small for every name: boxes of names left out are dropped
    caption, boxes, spans = detection_prompt(image, rng, negatives=0, max_tokens=5)
    assert len(caption.rstrip(".").split(". ")) == 1 and len(boxes) in (1, 2)


# ----------------------------------------------------------------------------- feed

def test_feed_mix_ratio_and_bad_records(gold_files, pseudo_dir, detection):
    sources = TrainingSources(gold_files=gold_files, pseudo_files=find_pseudo_shards([str(pseudo_dir)]),
                              detection_files=detection[0], vocabularies=detection[1])
    feed = MixedFeed(sources, {"gold": 1.0, "pseudo": 3.0, "detection": 1.0}, small_augment(), seed=0,
                     pseudo_min_score=0.5, shuffle_buffer=4)
    examples = feed.next_batch(200)
    share = sum(e.source == "pseudo" for e in examples) / len(examples)
    assert abs(share - 0.6) < 0.1
    for e in examples:
        assert e.image.dtype == torch.float32 and e.image.shape[0] == 3 and min(e.image.shape[1:]) <= 48
        assert e.boxes.shape[0] == len(e.tokens_positive) >= 1
        assert (e.boxes[:, 2:] > e.boxes[:, :2]).all()
        assert (e.boxes[:, 2] <= e.image.shape[2]).all() and (e.boxes[:, 3] <= e.image.shape[1]).all()
    counts = feed.all_counts()
    # pseudo boxes scored 0.3 are filtered: single-object samples whose only box is 0.9 survive
    assert counts["pseudo"]["written"] == sum(e.source == "pseudo" for e in examples)
    assert counts["pseudo"]["read"] >= counts["pseudo"]["written"]
    assert counts["_reader_gold"]["read"] >= counts["gold"]["read"]
    # detection prompts name the image's categories and draw negatives from the whole vocabulary
    vocabulary = set(next(iter(detection[1].values())))
    named = [set(e.caption.rstrip(".").split(". ")) for e in examples if e.source == "detection"]
    assert named and all(n <= vocabulary for n in named) and len(set().union(*named)) == len(vocabulary)


def test_feed_skips_unusable_records_and_resumes_exactly(gold_files, pseudo_dir, tmp_path):
    sources = TrainingSources(gold_files=gold_files, pseudo_files=find_pseudo_shards([str(pseudo_dir)]))
    # a pseudo threshold no box reaches: every pseudo record is a counted skip, gold carries on
    only_gold = MixedFeed(sources, {"gold": 1.0, "pseudo": 0.0}, small_augment(), seed=0)
    assert {e.source for e in only_gold.next_batch(4)} == {"gold"}
    starved = MixedFeed(sources, {"pseudo": 1.0, "gold": 0.0}, small_augment(), seed=0, pseudo_min_score=2.0)
    with pytest.raises(InputError, match="no usable record"):
        starved.next_example()
    assert starved.counts["pseudo"].skipped["no_box_above_min_score"] >= 1000
    # a detection sample whose vocabulary is unknown: skipped and counted, the run does not crash
    from storage.packed import detection_sample
    from storage.shards import ShardWriter
    with ShardWriter(tmp_path, "lost") as writer:
        writer.write(detection_sample("d0", 32, 24, [([0, 0, 8, 8], "dog")], "det/x", "nowhere"), _jpeg(32, 24))
    lost = MixedFeed(TrainingSources(detection_files=[str(tmp_path / writer.outputs[0])]), {"detection": 1.0},
                     small_augment(), seed=0)
    with pytest.raises(InputError, match="no usable record"):
        lost.next_example()
    assert lost.counts["detection"].skipped["unknown_vocabulary"] >= 1000
    # resume: same state -> same examples, whatever the global torch RNG does meanwhile
    a = MixedFeed(sources, {"gold": 1.0, "pseudo": 1.0}, small_augment(), seed=1, shuffle_buffer=4)
    a.next_batch(5)
    state = a.state_dict()
    b = MixedFeed(sources, {"gold": 1.0, "pseudo": 1.0}, small_augment(), seed=1, shuffle_buffer=4)
    b.load_state_dict(state)
    after_a = a.next_batch(6)
    torch.manual_seed(12345)
    after_b = b.next_batch(6)
    assert [e.key for e in after_a] == [e.key for e in after_b]
    assert all(torch.equal(x.image, y.image) for x, y in zip(after_a, after_b))
    assert b.all_counts() == a.all_counts()


def _jpeg(width: int, height: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_feed_leaves_phrases_without_a_kept_box_out_of_the_loss(world, gold_files, pseudo_dir):
    """Box j of a test pseudo sample scores 0.9 or 0.3 by parity; at --pseudo-min-score 0.5 the phrases of
    the dropped boxes are unknown ("ignore"), or negatives as in gold captions ("negative")."""
    from storage.shards import iter_shard_samples

    records = {s.key: s for s, _ in iter_shard_samples([str(pseudo_dir)], StageCounts())}
    sources = TrainingSources(gold_files=gold_files, pseudo_files=find_pseudo_shards([str(pseudo_dir)]))
    for mode in ("ignore", "negative"):
        feed = MixedFeed(sources, {"gold": 1.0, "pseudo": 1.0}, small_augment(), seed=0, pseudo_min_score=0.5,
                         pseudo_unboxed=mode, shuffle_buffer=4)
        examples = feed.next_batch(40)
        assert all(e.tokens_ignore == [] for e in examples if e.source == "gold")
        pseudo = [e for e in examples if e.source == "pseudo"]
        dropped = 0
        for e in pseudo:
            record = records[e.key]
            expected = [[record.phrases[b.phrase].start, record.phrases[b.phrase].end]
                        for b in record.boxes if b.score < 0.5]
            assert e.tokens_ignore == (expected if mode == "ignore" else [])
            assert not any(s < pe and ps < t for s, t in e.tokens_ignore for span in e.tokens_positive
                           for ps, pe in span)
            dropped += len(expected)
        assert dropped > 0    # the case is exercised
    with pytest.raises(InputError, match="pseudo-unboxed"):
        TrainOptions(out="x", gold=[AnnotatedImages(str(world.gold_json), str(world.gold_images))],
                     pseudo_unboxed="maybe").validate()


def test_options_shipped_to_ray_hold_absolute_paths_and_uris(tmp_path, monkeypatch):
    from pipelines.training.runner import normalized_options

    monkeypatch.chdir(tmp_path)
    o = normalized_options(TrainOptions(
        out="runs/student", gold=[AnnotatedImages("gold.json", "images")], pseudo=["pseudo", "s3://b/pseudo/"],
        detection=[AnnotatedImages("s3://b/coco.json", "s3://b/coco/")], eval=[AnnotatedImages("e.json", "e")],
        init="file:///models/teacher", text_encoder=None))
    assert o.out == str(tmp_path / "runs" / "student")
    assert o.gold == [AnnotatedImages(str(tmp_path / "gold.json"), str(tmp_path / "images"))]
    assert o.pseudo == [str(tmp_path / "pseudo"), "s3://b/pseudo"]
    assert o.detection == [AnnotatedImages("s3://b/coco.json", "s3://b/coco")]
    assert o.eval == [AnnotatedImages(str(tmp_path / "e.json"), str(tmp_path / "e"))]
    assert (o.init, o.text_encoder) == ("/models/teacher", None)
