"""Small data for the training tests: the generated shapes world plus pseudo-label shards."""
from __future__ import annotations

from pathlib import Path

from pipelines.world import WorldPaths, WorldSpec, generate_world
from storage.goldg import load_mdetr
from storage.records import Box, GroundedSample
from storage.shards import ShardWriter
from storage.skips import StageCounts


def make_world(root: Path, gold_images: int = 24) -> WorldPaths:
    """A small generated world (gold MDETR + COCO eval, 128-192 px JPEGs)."""
    spec = WorldSpec.small().scaled(gold_images=gold_images, crawled_images=4, eval_images=8)
    return generate_world(root, spec)


def gold_samples(world: WorldPaths) -> list[GroundedSample]:
    return list(load_mdetr(world.gold_json, world.gold_images, StageCounts()))


def write_pseudo_shards(world: WorldPaths, out_dir: Path, shards: int = 3, per_shard: int = 4,
                        scores: tuple[float, ...] = (0.9, 0.3)) -> list[str]:
    """Gold images re-labelled as pseudo-labels (box i gets ``scores[i % len(scores)]``),
    ``shards`` tars of ``per_shard`` samples each; returns the keys written."""
    samples = gold_samples(world)
    keys, i = [], 0
    for shard in range(shards):
        with ShardWriter(out_dir, f"{shard:05d}") as writer:
            for _ in range(per_shard):
                s = samples[i % len(samples)]
                i += 1
                boxes = [Box(b.bbox, b.tokens_positive, b.phrase, scores[j % len(scores)])
                         for j, b in enumerate(s.boxes)]
                pseudo = GroundedSample(f"pseudo-{i:04d}", s.caption, s.width, s.height, s.phrases, boxes,
                                        "pseudo/test", {})
                writer.write(pseudo, Path(s.extra["image_path"]).read_bytes())
                keys.append(pseudo.key)
    return keys


def write_gold_shards(world: WorldPaths, out_dir: Path, per_shard: int = 8) -> list[str]:
    """The world's gold samples as grounding shards of ``per_shard`` (what `glipctl pack` writes,
    without its manifest); returns the tar paths."""
    samples = gold_samples(world)
    files = []
    for start in range(0, len(samples), per_shard):
        with ShardWriter(out_dir, f"gold-{start // per_shard:05d}") as writer:
            for s in samples[start:start + per_shard]:
                image = Path(s.extra.pop("image_path")).read_bytes()
                writer.write(s, image)
        files += [str(out_dir / name) for name in writer.outputs]
    return files


def write_detection_shards(world: WorldPaths, out_dir: Path, per_shard: int = 4) -> tuple[list[str], dict]:
    """The world's COCO eval images as packed detection shards plus their vocabulary file;
    returns (tar paths, ``TrainingSources.vocabularies``)."""
    from storage.packed import detection_sample, vocabulary_path, write_vocabulary

    from pipelines.training.sources import load_detection
    from pipelines.training.options import AnnotatedImages

    images = load_detection([AnnotatedImages(str(world.eval_coco_json), str(world.eval_images))], StageCounts())
    vocabulary = images[0].categories
    write_vocabulary(str(out_dir), "eval", list(vocabulary))
    files = []
    for start in range(0, len(images), per_shard):
        with ShardWriter(out_dir, f"eval-{start // per_shard:05d}") as writer:
            for d in images[start:start + per_shard]:
                sample = detection_sample(d.key, d.width, d.height, d.boxes, d.source, "eval")
                writer.write(sample, Path(d.image_path).read_bytes())
        files += [str(out_dir / name) for name in writer.outputs]
    return files, {vocabulary_path(str(out_dir), "eval"): tuple(vocabulary)}
