"""``glipctl prompt-tune``: what each mode trains (every other tensor bitwise unchanged), the prompt
artifact (reloads to the tuned model's detections exactly, names its base model), few-shot
sampling; the CLI run on Ray Train (template, shots, resume) is in test_prompt_tune_s3.py."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from storage.errors import InputError
from pipelines.training.loop import run_worker
from pipelines.training.sources import TrainingSources
from pipelines.training.tuning import LINEAR_PROBE, fixed_category_prompt
from training_helpers import make_world, write_detection_shards

SIZES = {"min_size": 48, "max_size": 64}


def _glip():
    from glip import GLIP   # lazily, as the other tests: under the bare `pytest` script tests/glip shadows it
    return GLIP


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small world, its eval set as packed detection shards, and a saved tiny base model."""
    root = tmp_path_factory.mktemp("prompt_tune")
    world = make_world(root / "world", gold_images=4)
    files, vocabularies = write_detection_shards(world, root / "packed")
    torch.manual_seed(0)
    base = root / "base"
    _glip().from_preset("tiny", **SIZES).save_pretrained(base)
    return world, TrainingSources(detection_files=files, vocabularies=vocabularies), base, root


def _tune(task, out, mode: str, steps: int = 3, template=None):
    """prompt-tune's options, run in-process on a model we keep; returns (model, summary, fixed prompt)."""
    from pipelines.prompt_tune import PromptTuneOptions, train_options

    world, sources, base, _ = task
    options = train_options(PromptTuneOptions(model=str(base), detection=world.eval_coco_arg, out=str(out), mode=mode,
                                              steps=steps, batch_size=2, warmup=1, log_every=1, loader_workers=0,
                                              prompt_template=json.dumps(template) if template else None))
    (vocabulary,) = set(sources.vocabularies.values())
    fixed = fixed_category_prompt(vocabulary, options.prompt_template)
    model = _glip().from_pretrained(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = run_worker({"options": options, "sources": sources, "out": str(out), "resume_from": None,
                          "heldout": [], "fixed_prompt": fixed, "model": model})
    return model, before, summary, fixed


def _ground(model, world, caption, spans):
    paths = sorted(world.eval_images.iterdir())[:3]
    images = [Image.open(p).convert("RGB") for p in paths]
    return model.eval().ground(images, [caption] * len(images), [spans] * len(images), threshold=0.0,
                               max_per_phrase=5)


def test_prompt_mode_trains_only_the_prompt_and_its_file_reproduces_the_tuned_model(task, tmp_path):
    from labeling.prompts import TunedPrompt
    from labeling.teacher import checkpoint_sha256

    world, _, base, root = task
    model, before, summary, fixed = _tune(task, tmp_path / "prompt", "prompt")
    after = model.state_dict()
    assert set(after) - set(before) == {"prompt.offset"}
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed during prompt tuning"
    offset = after["prompt.offset"]
    assert offset.abs().sum() > 0
    assert summary["step"] == 3 and [r["step"] for r in summary["rows"]] == [1, 2, 3]

    # the artifact: the rows of the prompt's tokens, what it was tuned on, and for which model
    prompt = TunedPrompt.read(str(tmp_path / "prompt"))
    meta = prompt.meta
    assert not (tmp_path / "prompt" / "model.safetensors").exists()
    assert prompt.caption == fixed["caption"] == "circle. square. triangle. star. heart. cross."
    assert prompt.category_names == ["circle", "square", "triangle", "star", "heart", "cross"]
    assert prompt.base_sha256 == checkpoint_sha256(str(base)) and meta["mode"] == "prompt"
    tokens = int(model.tokenizer([fixed["caption"]], return_tensors="pt")["attention_mask"].sum())
    assert meta["positions"] == tokens
    assert torch.count_nonzero(offset[tokens:]) == 0      # never read by this prompt: still zero

    # reloaded on a fresh copy of the base model, the prompt gives the tuned model's detections exactly
    fresh = _glip().from_pretrained(base)
    plain = _ground(fresh, world, prompt.caption, prompt.spans)
    prompt.check_base(str(base))
    prompt.attach(fresh)
    assert _ground(fresh, world, prompt.caption, prompt.spans) == _ground(model, world, prompt.caption, prompt.spans)
    assert _ground(fresh, world, prompt.caption, prompt.spans) != plain

    # another base model is refused, naming both
    torch.manual_seed(1)
    _glip().from_preset("tiny", **SIZES).save_pretrained(root / "other")
    with pytest.raises(InputError, match="tuned for base model sha256"):
        prompt.check_base(str(root / "other"))


@pytest.mark.parametrize("mode", ["linear", "full"])
def test_linear_probe_trains_the_last_projections_and_full_everything(task, tmp_path, mode):
    model, before, _, _ = _tune(task, tmp_path / mode, mode, steps=2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    probe = {k for k in before if k.startswith(LINEAR_PROBE)}
    if mode == "linear":
        assert changed and changed <= probe
        assert "head.dot_product_projection_text.weight" in changed and "head.bbox_pred.weight" in changed
    else:
        assert any(k.startswith("backbone.") for k in changed) and any(".b_attn." in k for k in changed)
    saved = _glip().from_pretrained(tmp_path / mode)    # linear / full write a whole model
    for k, v in saved.state_dict().items():
        assert torch.equal(v, after[k])


def test_template_changes_the_tuned_prompt_text(task, tmp_path):
    _, _, _, fixed = _tune(task, tmp_path / "t", "prompt", steps=1,
                           template={"star": {"prefix": "a ", "suffix": " with five points"}})
    caption = fixed["caption"]
    assert caption == "circle. square. triangle. a star with five points. heart. cross."
    star = next(c for c in fixed["categories"] if c["name"] == "star")
    assert caption[star["start"]:star["end"]] == "star"          # the span is the name only


def test_few_shot_subset_has_k_images_per_category_and_follows_the_seed(task, tmp_path):
    from storage.coco import few_shot_image_ids, write_few_shot_subset
    from storage.goldg import load_coco_api

    world = task[0]
    coco = load_coco_api(world.eval_coco_json)
    per_image = {i: {a["category_id"] for a in coco.imgToAnns[i]} for i in coco.getImgIds()}
    available = {c: sum(c in cats for cats in per_image.values()) for c in coco.getCatIds()}
    for k in (1, 2):
        ids = few_shot_image_ids(coco, k, seed=0)
        assert ids == few_shot_image_ids(coco, k, seed=0)
        for c in coco.getCatIds():
            assert sum(c in per_image[i] for i in ids) >= min(k, available[c])
    assert few_shot_image_ids(coco, 1, 0) != few_shot_image_ids(coco, 1, 1) or len(per_image) < 3
    assert len(few_shot_image_ids(coco, 1, 0)) < len(per_image)
    images, counts = write_few_shot_subset(world.eval_coco_json, 1, 0, tmp_path / "one.json")
    subset = load_coco_api(tmp_path / "one.json")
    assert sorted(subset.getImgIds()) == few_shot_image_ids(coco, 1, 0) and images == len(subset.getImgIds())
    assert all(n >= 1 for n in counts.values()) and subset.cats == coco.cats
    with pytest.raises(InputError, match="--shots"):
        few_shot_image_ids(coco, 0, 0)


def test_prompt_tune_cli_refuses_a_bad_mode(task, tmp_path, cli):
    """(The CLI's Ray Train runs, with --shots, a template and --resume: test_prompt_tune_s3.py.)"""
    world, _, base, _ = task
    result = cli("prompt-tune", "--model", str(base), "--detection", world.eval_coco_arg,
                 "--out", str(tmp_path / "bad"), "--mode", "sideways")
    assert result.exit_code == 2 and "--mode 'sideways'" in result.output


def test_only_a_glip_model_can_be_prompt_tuned(task, hf_teacher_dirs, tmp_path):
    from pipelines.prompt_tune import PromptTuneOptions, base_model_identity, train_options

    _, _, base, _ = task
    assert base_model_identity(str(base))["kind"] == "glipctl"
    with pytest.raises(InputError, match="prompt tuning needs a GLIP model"):
        base_model_identity(str(hf_teacher_dirs["owlv2"]))
    with pytest.raises(InputError, match="--shots samples from the annotations"):
        train_options(PromptTuneOptions(model=str(base), detection=str(task[1].detection_files[0]),
                                        out=str(tmp_path / "o"), shots=1))
