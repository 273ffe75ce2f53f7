"""pseudo-label with transformers teachers: the real Ray pipeline (`glipctl pseudo-label`) with tiny random Grounding
DINO, MM Grounding DINO and OWLv2 models (tests/hf_models.py) on a generated crawl whose phrases come from the
real `glipctl parse-captions`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from storage.skips import StageCounts

THRESHOLD = 0.3          # random weights: scores spread over (0, 1), so boxes exist
MODEL_TYPES = ("grounding-dino", "mm-grounding-dino", "owlv2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for the teachers run in this process (as each CPU actor runs; on a shared 2-core
    machine a second thread is 100x slower under load, measured: 12 ms -> 12 s a forward pass)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory, ray_session):
    """A generated crawl of 2 img2dataset shards (6 images) and its parse-captions phrase folder."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.world import WorldSpec, generate_world

    root = tmp_path_factory.mktemp("hf_crawl")
    world = generate_world(root / "world", WorldSpec.small(seed=3).scaled(
        gold_images=2, eval_images=2, crawled_images=6, crawled_shard_size=3))
    phrases = root / "phrases"
    r = CliRunner().invoke(app, ["parse-captions", str(world.crawled_dir), "--out", str(phrases), "--workers", "1"])
    assert r.exit_code == 0, r.output
    return world.crawled_dir, phrases


@pytest.fixture(scope="module")
def labeled(crawl, hf_teacher_dirs, tmp_path_factory):
    """One CLI run per teacher family: {model_type: (out folder, CliRunner result)}."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    crawled, phrases = crawl
    runs = {}
    for model_type in MODEL_TYPES:
        out = tmp_path_factory.mktemp(f"pseudo_{model_type}")
        runs[model_type] = out, CliRunner().invoke(app, [
            "pseudo-label", str(crawled), "--phrases", str(phrases), "--teacher", str(hf_teacher_dirs[model_type]),
            "--out", str(out), "--threshold", str(THRESHOLD), "--batch-size", "2", "--workers", "1"])
    return runs


def _samples(out):
    from storage.shards import iter_shard_samples

    counts = StageCounts()
    found = {sample.key: (sample, image) for sample, image in iter_shard_samples([out], counts)}
    assert counts.skipped == {} and counts.read == len(found)
    return found


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_transformers_teachers_label_a_crawl(labeled, hf_teacher_dirs, model_type):
    """Valid shards; the identity (kind, model type, sha256) and thresholds in the manifest and every sample; every
    box on its phrase's span."""
    from labeling.teacher import checkpoint_sha256

    out, result = labeled[model_type]
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "_manifest.json").read_text())
    model = manifest["model"]
    sha = checkpoint_sha256(hf_teacher_dirs[model_type])
    assert (model["kind"], model["model_type"], model["sha256"]) == ("transformers", model_type, sha)
    assert {s["status"] for s in manifest["shards"].values()} == {"done"} and len(manifest["shards"]) == 2
    assert "teacher_error" not in manifest["totals"]["skipped"], manifest["totals"]["skipped"]
    samples = _samples(out)
    assert len(samples) == manifest["totals"]["written"] > 0
    n_boxes = 0
    for sample, _ in samples.values():
        d = sample.to_dict()
        assert d["source"] == f"pseudo/{sha[:12]}"
        assert d["extra"]["teacher_model_type"] == model_type and d["extra"]["teacher_kind"] == "transformers"
        assert d["extra"]["teacher_sha256"] == sha and d["extra"]["threshold"] == THRESHOLD
        assert d["phrases"]
        for b in d["boxes"]:
            p = d["phrases"][b["phrase"]]
            assert b["tokens_positive"] == [[p["start"], p["end"]]] and b["score"] >= THRESHOLD
            x, y, w, h = b["bbox"]
            assert 0 <= x and 0 <= y and x + w <= d["width"] + 1e-3 and y + h <= d["height"] + 1e-3
            n_boxes += 1
    assert n_boxes > 0 and n_boxes == sum(e["counts"]["boxes"] for e in manifest["shards"].values())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_box_is_the_teachers_box_for_its_phrase(labeled, hf_teacher_dirs, model_type):
    """The shards hold exactly what the teacher, run here on the same stored bytes, gives each phrase (its own
    tokens' score for Grounding DINO, its own query's for OWLv2; labeling.filters applied): the same boxes,
    scores and phrase indices, whatever the batch the pipeline ran them in."""
    from labeling.filters import FilterConfig, pseudo_sample
    from labeling.images import decode_image
    from labeling.teacher import load_teacher, teacher_resize

    out, result = labeled[model_type]
    assert result.exit_code == 0, result.output
    path = hf_teacher_dirs[model_type]
    teacher, resize = load_teacher(path), teacher_resize(path)
    manifest = json.loads((out / "_manifest.json").read_text())
    config = FilterConfig(**{k: manifest["options"][k] for k in ("threshold", "nms_iou", "max_boxes_per_phrase",
                                                                 "min_box_size")})
    for key, (sample, image) in sorted(_samples(out).items()):
        decoded = decode_image(image)
        phrases = [{"text": p.text, "start": p.start, "end": p.end, "root": p.root} for p in sample.phrases]
        found = teacher.ground([resize(decoded.image)], [(decoded.width, decoded.height)], [sample.caption],
                               [[(p["start"], p["end"]) for p in phrases]],
                               threshold=config.threshold, nms_iou=config.nms_iou)[0]
        expected, _ = pseudo_sample(key, sample.caption, decoded.width, decoded.height, phrases, found, config,
                                    sample.source, {})
        assert [b.phrase for b in sample.boxes] == [b.phrase for b in expected.boxes], key
        np.testing.assert_allclose([b.bbox for b in sample.boxes], [b.bbox for b in expected.boxes], atol=1e-3)
        np.testing.assert_allclose([b.score for b in sample.boxes], [b.score for b in expected.boxes], atol=1e-5)
