"""Prompts for a frozen GLIP: manual templates (storage.prompt_template), the category prompt they make
(storage.coco.category_prompts), what the model then reads, and tuned prompt folders (labeling.prompts)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from prompt_helpers import other_model, save_tuned_prompt
from storage.coco import category_prompts, estimate_tokens
from storage.errors import InputError
from storage.prompt_template import PromptTemplate

CATS = [{"id": 2, "name": "dog"}, {"id": 1, "name": "hand"}, {"id": 3, "name": "traffic_light"}]
NAMES = ["square", "circle", "star"]
TEMPLATE = {"star": {"prefix": "a ", "suffix": " with five points"}}


# ----------------------------------------------------------------------------- templates (no model)
def test_object_form_gives_the_documented_prompt_with_spans_over_the_names():
    template = PromptTemplate.load('{"hand": {"suffix": " of a person"}, "dog": {"prefix": "a ", "name": "puppy"}}')
    ((caption, spans),) = category_prompts(CATS, 256, template=template)
    assert caption == "hand of a person. a puppy. traffic light."
    assert [(caption[s:e], cat_id) for s, e, cat_id in spans] == [("hand", 1), ("puppy", 2), ("traffic light", 3)]
    ((plain, plain_spans),) = category_prompts(CATS, 256)
    assert plain == "hand. dog. traffic light."
    assert [plain[s:e] for s, e, _ in plain_spans] == ["hand", "dog", "traffic light"]


def test_list_form_from_a_file_follows_the_category_order(tmp_path):
    path = tmp_path / "template.json"
    path.write_text(json.dumps([{"prefix": "", "name": "hand", "suffix": " of a person"}, {"name": "dog"},
                                {"prefix": "a red ", "name": "light"}]))
    template = PromptTemplate.load(str(path))
    ((caption, spans),) = category_prompts(CATS, 256, template=template)
    assert caption == "hand of a person. dog. a red light."
    assert [(caption[s:e], cat_id) for s, e, cat_id in spans] == [("hand", 1), ("dog", 2), ("light", 3)]
    assert template.to_json() == [{"prefix": "", "name": "hand", "suffix": " of a person"},
                                  {"prefix": "", "name": "dog", "suffix": ""},
                                  {"prefix": "a red ", "name": "light", "suffix": ""}]
    assert template.category_names() == ["hand", "dog", "light"]


def test_a_template_over_the_token_limit_splits_and_keeps_spans_over_the_names():
    cats = [{"id": i + 1, "name": f"thing{i}"} for i in range(12)]
    template = PromptTemplate.from_json({c["name"]: {"suffix": " seen from far above"} for c in cats})
    prompts = category_prompts(cats, 40, template=template)
    assert len(prompts) > 1
    assert [cat_id for _, spans in prompts for _, _, cat_id in spans] == list(range(1, 13))
    for caption, spans in prompts:
        assert estimate_tokens(caption) <= 40
        assert caption.endswith(" seen from far above.")
        assert all(caption[s:e] == f"thing{cat_id - 1}" for s, e, cat_id in spans)


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ('{"hand": {"sufix": " of a person"}}', "unknown field(s) sufix"),
    ('{"hand": {"suffix": 3}}', "must be strings"),
    ('{"hand": " of a person"}', "expected an object with prefix / name / suffix"),
    ("[]", "an empty list"),
    ('[{"prefix": "a "}]', "needs a non-empty name"),
    ('{"hand": {"name": "  "}}', "needs a non-empty name"),
])
def test_bad_templates_are_input_errors_that_say_why(value, message):
    with pytest.raises(InputError, match="--prompt-template") as err:
        PromptTemplate.load(value)
    assert message in str(err.value)


def test_a_template_must_fit_the_categories(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        PromptTemplate.load(str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match="expected a JSON object"):
        PromptTemplate.from_json("hand")
    with pytest.raises(InputError, match="2 entries for 3 categories"):
        category_prompts(CATS, template=PromptTemplate.from_json([{"name": "hand"}, {"name": "dog"}]))
    with pytest.raises(InputError, match="no category named 'cat'"):
        category_prompts(CATS, template=PromptTemplate.from_json({"cat": {"suffix": " on a mat"}}))


def test_a_template_alone_names_the_categories_to_find():
    from labeling.prompts import template_prompt

    caption, phrases = template_prompt(PromptTemplate.load('{"hand": {"suffix": " of a person"}, "dog": {}}'))
    assert caption == "hand of a person. dog."
    assert phrases == [{"text": "hand", "start": 0, "end": 4, "root": "hand"},
                       {"text": "dog", "start": 18, "end": 21, "root": "dog"}]
    caption, phrases = template_prompt(PromptTemplate.from_json([{"prefix": "a ", "name": "puppy"}]))
    assert (caption, [p["text"] for p in phrases]) == ("a puppy.", ["puppy"])
    with pytest.raises(InputError, match="names no category"):
        template_prompt(PromptTemplate.load("{}"))


# ----------------------------------------------------------------------------- with a tiny GLIP
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from glip import GLIP

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prompts") / "tiny"
    GLIP.from_preset("tiny", min_size=64, max_size=96, score_threshold=0.0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Two images and a COCO file whose categories are NAMES (ids in that order)."""
    root = tmp_path_factory.mktemp("coco")
    images, anns = [], []
    for i in (1, 2):
        img = Image.new("RGB", (80, 64), (220, 220, 220))
        img.paste((200, 40, 40), (10 * i, 10, 10 * i + 30, 40))
        img.save(root / f"im{i}.jpg")
        images.append({"id": i, "file_name": f"im{i}.jpg", "width": 80, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": i, "bbox": [10 * i, 10, 30, 30], "area": 900,
                     "iscrowd": 0})
    path = root / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}))
    return path, root


@pytest.fixture(scope="module")
def tuned(model_dir, tmp_path_factory):
    from labeling.prompts import TunedPrompt

    folder = save_tuned_prompt(tmp_path_factory.mktemp("tuned") / "prompt", model_dir, NAMES, TEMPLATE)
    return TunedPrompt.read(str(folder))


def _texts_read(model, run) -> list[str]:
    """The captions the text encoder of ``model`` read during ``run()``, decoded from its input ids."""
    seen: list[str] = []

    def hook(module, args):
        for ids in args[0]:
            seen.append(model.tokenizer.decode(ids, skip_special_tokens=True))
    handle = model.language_backbone.register_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_the_template_changes_the_text_the_model_reads(model_dir, coco):
    from glip import GLIP
    from labeling.evaluation import detect_coco

    model = GLIP.from_pretrained(model_dir)
    path, images = coco
    plain = _texts_read(model, lambda: detect_coco(model, path, images, batch_size=2))
    template = PromptTemplate.from_json(TEMPLATE)
    templated = _texts_read(model, lambda: detect_coco(model, path, images, batch_size=2, template=template))
    assert plain == ["square. circle. star."] * 2                     # the MiniLM vocabulary is lower case
    assert templated == ["square. circle. a star with five points."] * 2


def test_a_tuned_prompt_reads_back_what_was_saved(tuned, model_dir):
    from labeling.teacher import checkpoint_sha256

    assert tuned.caption == "square. circle. a star with five points."
    assert tuned.category_names == NAMES
    assert [tuned.caption[s:e] for s, e in tuned.spans] == NAMES          # the names, not the words around them
    assert tuned.phrases()[2] == {"text": "star", "start": 18, "end": 22, "root": "star"}
    assert tuned.template.to_json() == {"star": {"prefix": "a ", "name": "star", "suffix": " with five points"}}
    assert tuned.sha256 == checkpoint_sha256(tuned.path) and len(tuned.sha256) == 64
    tuned.check_base(str(model_dir))                                       # its own base model: accepted
    tuned.check_categories(NAMES, "the data")


def test_a_tuned_prompt_refuses_another_base_model_and_other_categories(tuned, model_dir, tmp_path):
    from labeling.teacher import checkpoint_sha256

    other = other_model(model_dir, tmp_path / "other")
    with pytest.raises(InputError, match="was tuned for base model sha256") as err:
        tuned.check_base(str(other))
    assert checkpoint_sha256(other)[:12] in str(err.value) and tuned.base_sha256[:12] in str(err.value)
    with pytest.raises(InputError, match="was tuned on the categories square, circle, star; the data has "
                                         "circle, square, star"):
        tuned.check_categories(["circle", "square", "star"], "the data")
    with pytest.raises(InputError, match="only GLIP models"):
        tuned.attach(object())


def test_folders_that_are_not_tuned_prompts_are_refused(tuned, model_dir, tmp_path):
    import shutil

    from labeling.prompts import TunedPrompt

    for folder in (model_dir, tmp_path / "missing"):
        with pytest.raises(InputError, match="not a tuned prompt"):
            TunedPrompt.read(str(folder), option="--tuned-prompt")
    meta = json.loads((Path(tuned.path) / "prompt.json").read_text())
    for change, message in (({"format": "something/2"}, "is not a glipctl-prompt/1 prompt"),
                            ({"base_model": {"path": "x"}}, "needs the sha256"),
                            ({"categories": [{"name": "square", "start": 0, "end": 99}]}, "with a span in"),
                            ({"template": {"star": {"colour": "red"}}}, "unknown field(s) colour")):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tuned.path, bad)
        (bad / "prompt.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(InputError, match=re.escape(message)):
            TunedPrompt.read(str(bad))
    (bad / "prompt.json").write_text("{")
    with pytest.raises(InputError, match="unreadable prompt.json"):
        TunedPrompt.read(str(bad))


def test_a_template_given_with_a_tuned_prompt_must_be_its_own(tuned):
    from labeling.prompts import effective_template

    assert effective_template(tuned, None).to_json() == tuned.template.to_json()
    same_as_a_list = PromptTemplate.from_json([{"name": "square"}, {"name": "circle"},
                                               {"prefix": "a ", "name": "star", "suffix": " with five points"}])
    assert effective_template(tuned, same_as_a_list).to_json() == tuned.template.to_json()
    for other in ({"star": {"suffix": " with six points"}}, {}, {"moon": {}}):
        with pytest.raises(InputError, match="differs from what --prompt .* was tuned with"):
            effective_template(tuned, PromptTemplate.from_json(other, "--prompt-template inline JSON"))
