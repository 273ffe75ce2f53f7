"""`glipctl predict` and `glipctl evaluate` on a real (untrained) tiny GLIP checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from glip import GLIP

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    # score_threshold 0: an untrained model scores about the prior (0.01), below the official 0.05
    GLIP.from_preset("tiny", min_size=128, max_size=160, score_threshold=0.0).save_pretrained(path)
    return path


@pytest.fixture
def shapes_image(tmp_path):
    img = Image.new("RGB", (96, 80), (230, 230, 230))
    img.paste((200, 30, 30), (10, 10, 40, 40))
    img.paste((30, 30, 200), (55, 35, 85, 70))
    path = tmp_path / "shapes.jpg"
    img.save(path)
    return path


def test_predict_draws_boxes_and_labels(cli, tiny_checkpoint, shapes_image, tmp_path):
    out = tmp_path / "pred"
    r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", "a red square next to a blue square",
            "--phrases", "a red square;a blue square", "--threshold", "0", "--max-per-phrase", "2", "--out", out)
    assert r.exit_code == 0, r.output
    preds = json.loads((out / "predictions.json").read_text())
    assert preds["phrases"] == ["a red square", "a blue square"]
    boxes = preds["images"][0]["boxes"]
    assert boxes and {b["phrase"] for b in boxes} <= {"a red square", "a blue square"}
    for b in boxes:
        x, y, w, h = b["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 80.01
    drawn = np.asarray(Image.open(out / "shapes.png").convert("RGB")).astype(int)
    scale = drawn.shape[1] // 96
    assert drawn.shape[:2] == (80 * scale, 96 * scale)
    plain = np.asarray(Image.open(shapes_image).convert("RGB").resize((96 * scale, 80 * scale), Image.NEAREST)).astype(int)
    changed = (np.abs(drawn - plain).sum(axis=2) > 60).mean()
    assert changed > 0.005            # rectangles and label strips were drawn
    assert "a red square" in r.output


def test_predict_auto_phrases_and_bad_phrase(cli, tiny_checkpoint, shapes_image, tmp_path):
    out = tmp_path / "auto"
    r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", "A red square and a blue square.",
            "--threshold", "0", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "predictions.json").read_text())["phrases"] == ["A red square", "a blue square"]
    r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", "a red square",
            "--phrases", "a green star", "--out", out)
    assert r.exit_code == 2 and "a green star" in r.output
    r = cli("predict", tmp_path / "missing.jpg", "--model", tiny_checkpoint, "--prompt", "x", "--out", out)
    assert r.exit_code == 2


def test_evaluate_command_writes_same_numbers(cli, tiny_checkpoint, tmp_path):
    from pipelines.world import WorldSpec, generate_world

    w = generate_world(tmp_path / "world", WorldSpec.small(seed=0).scaled(eval_images=6, gold_images=4,
                                                                          crawled_images=4))
    out = tmp_path / "eval.json"
    r = cli("evaluate", "--model", tiny_checkpoint, "--coco", w.eval_coco_arg, "--grounding", w.eval_grounding_arg,
            "--out", out, "--batch-size", "3")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["coco"]["images"] == 6
    assert set(rep["coco"]["per_category"]) == {"circle", "square", "triangle", "star", "heart", "cross"}
    # the reported numbers are COCOeval's own on this model's detections (computed here with pycocotools
    # directly); an untrained model finds nothing, so AP is 0 and APl is COCOeval's -1 (no large object)
    expected = cocoeval_ap(tiny_checkpoint, w.eval_coco_json, w.eval_images, batch_size=3)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert rep["coco"][name] == pytest.approx(expected[name], abs=1e-12), name
    assert rep["coco"]["per_category"] == pytest.approx(expected["per_category"], abs=1e-12)
    assert rep["grounding"]["protocol"] == "any-box" and rep["grounding"]["phrases"] > 0
    assert 0.0 <= rep["grounding"]["R@1"] <= rep["grounding"]["R@5"] <= rep["grounding"]["R@10"] <= 1.0
    assert f"{100 * rep['coco']['AP']:.1f}" in r.output
    r = cli("evaluate", "--model", tiny_checkpoint, "--out", out)
    assert r.exit_code == 2


def cocoeval_ap(model_dir, coco_json, images, batch_size: int) -> dict:
    """AP, AP50, AP75, APs/m/l and per-category AP of a checkpoint's zero-shot COCO detections, from COCOeval
    directly (``params.catIds = [c]`` per category), not through labeling.evaluation's metrics."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from labeling.evaluation import detect_coco, load_model

    detections, evaluated, _ = detect_coco(load_model(model_dir), coco_json, images, batch_size=batch_size)
    out = {"per_category": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_json))
        dt = gt.loadRes(detections)
        for cat in [None] + gt.loadCats(gt.getCatIds()):
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = sorted(evaluated)
            if cat is not None:
                ev.params.catIds = [cat["id"]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            if cat is None:
                out.update(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), map(float, ev.stats[:6])))
            else:
                out["per_category"][cat["name"]] = float(ev.stats[0])
    return out


def test_predict_evaluate_and_convert_take_uris(cli, tiny_checkpoint, shapes_image, s3_env, s3_prefix, tmp_path,
                                                monkeypatch):
    """The same commands with the model, the images, the annotations and the outputs on S3."""
    from glip import GLIP
    from pipelines.commands.convert_official import save_model
    from pipelines.world import WorldSpec, generate_world
    from storage import fs

    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))
    model = fs.join(s3_prefix, "model")
    save_model(GLIP.from_pretrained(tiny_checkpoint), model)        # what convert-official --out s3://... does
    assert {e.name for e in fs.list_dir(model)} == {"config.json", "model.safetensors", "tokenizer"}
    image = fs.join(s3_prefix, "images", "shapes.jpg")
    fs.upload_tree(shapes_image, image)

    pred = fs.join(s3_prefix, "pred")
    r = cli("predict", image, "--model", model, "--prompt", "a red square next to a blue square",
            "--phrases", "a red square;a blue square", "--threshold", "0", "--out", pred)
    assert r.exit_code == 0, r.output
    preds = fs.read_json(fs.join(pred, "predictions.json"))
    assert preds["images"][0]["image"] == image and preds["images"][0]["png"] == fs.join(pred, "shapes.png")
    assert preds["images"][0]["boxes"]
    drawn = Image.open(fs.open_input_file(fs.join(pred, "shapes.png")))
    assert drawn.size[0] % 96 == 0 and drawn.size[0] // 96 == drawn.size[1] // 80

    w = generate_world(tmp_path / "world", WorldSpec.small(seed=0).scaled(eval_images=4, gold_images=4,
                                                                          crawled_images=4))
    data = fs.join(s3_prefix, "eval")
    fs.upload_tree(w.eval_images, fs.join(data, "images"))
    fs.upload_tree(w.eval_coco_json, fs.join(data, "coco.json"))
    fs.upload_tree(w.eval_grounding_json, fs.join(data, "grounding.json"))
    remote_out, local_out = fs.join(s3_prefix, "eval.json"), tmp_path / "eval.json"
    r = cli("evaluate", "--model", model, "--coco", f"{data}/coco.json={data}/images",
            "--grounding", f"{data}/grounding.json={data}/images", "--out", remote_out, "--batch-size", "2")
    assert r.exit_code == 0, r.output
    r = cli("evaluate", "--model", tiny_checkpoint, "--coco", w.eval_coco_arg, "--grounding", w.eval_grounding_arg,
            "--out", local_out, "--batch-size", "2")
    assert r.exit_code == 0, r.output
    remote, local = fs.read_json(remote_out), json.loads(local_out.read_text())
    assert remote["coco"]["images"] == local["coco"]["images"] == 4
    for name in ("AP", "AP50"):
        assert remote["coco"][name] == pytest.approx(local["coco"][name], abs=1e-9)
    assert remote["grounding"]["R@1"] == pytest.approx(local["grounding"]["R@1"], abs=1e-9)

    r = cli("convert-official", fs.join(s3_prefix, "missing.pth"), "--out", fs.join(s3_prefix, "converted"))
    assert r.exit_code == 2 and "no such checkpoint" in " ".join(r.output.split())
    fs.write_bytes(fs.join(s3_prefix, "junk.pth"), b"not a checkpoint")
    r = cli("convert-official", fs.join(s3_prefix, "junk.pth"), "--out", fs.join(s3_prefix, "converted"))
    assert r.exit_code == 2 and "cannot read checkpoint" in " ".join(r.output.split())
    assert not fs.exists(fs.join(s3_prefix, "converted", "config.json"))


# ---- category-list prompts (the official demos' "a. b. c." form) and --device

SHAPES_PROMPT = "star. heart. circle. square. cross. triangle."
SHAPES = ["star", "heart", "circle", "square", "cross", "triangle"]


def test_category_list_prompt_gives_one_span_per_name_without_spacy(monkeypatch):
    import labeling.phrases
    from pipelines.commands.predict import phrase_spans

    def no_spacy(*args, **kwargs):
        raise AssertionError("a category list must not be parsed")

    monkeypatch.setattr(labeling.phrases, "load_spacy", no_spacy)
    spans = phrase_spans(SHAPES_PROMPT, "auto")
    assert [SHAPES_PROMPT[s:e] for s, e in spans] == SHAPES
    assert spans == [(0, 4), (6, 11), (13, 19), (21, 27), (29, 34), (36, 44)]
    for prompt, names in [("cat . dog .", ["cat", "dog"]),                       # Grounding DINO's spacing
                          ("person. bicycle. traffic light", ["person", "bicycle", "traffic light"]),
                          ("aerosol_can. t-shirt. baby's breath.", ["aerosol_can", "t-shirt", "baby's breath"])]:
        assert [prompt[s:e] for s, e in phrase_spans(prompt, "auto")] == names


@pytest.mark.parametrize("prompt", [
    "A red square and a blue square.",          # one sentence
    "star.",                                    # one name: spaCy finds the same noun
    "a 3.5 inch square. a star",                # a dot inside a name
    "a square, a star. a heart",                # a comma: prose
    "a man riding a brown horse on the beach. the sun sets.",   # names are at most four words
])
def test_prose_prompts_still_go_through_spacy(prompt):
    from labeling.phrases import category_list_spans

    assert category_list_spans(prompt) is None


def test_prose_prompt_uses_spacy_noun_phrases(monkeypatch):
    import labeling.phrases
    from pipelines.commands.predict import phrase_spans

    calls = []
    real = labeling.phrases.load_spacy
    monkeypatch.setattr(labeling.phrases, "load_spacy", lambda name: calls.append(name) or real(name))
    prompt = "A red square and a blue square."
    assert [prompt[s:e] for s, e in phrase_spans(prompt, "auto")] == ["A red square", "a blue square"]
    assert calls == [labeling.phrases.DEFAULT_SPACY_MODEL]
    # what the issue saw: spaCy reads the list as text and merges two names into one phrase
    found = labeling.phrases.PhraseExtractor(real()).extract(SHAPES_PROMPT)
    assert [p["text"] for p in found] != SHAPES


def test_predict_cli_grounds_each_listed_name(cli, tiny_checkpoint, shapes_image, tmp_path):
    out = tmp_path / "list"
    r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", SHAPES_PROMPT,
            "--threshold", "0", "--max-per-phrase", "1", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    preds = json.loads((out / "predictions.json").read_text())
    assert preds["phrases"] == SHAPES
    boxes = preds["images"][0]["boxes"]
    assert [b["phrase"] for b in boxes] == SHAPES                 # one box per name, in prompt order
    assert [b["span"] for b in boxes] == [[s, e] for s, e in [(0, 4), (6, 11), (13, 19), (21, 27), (29, 34),
                                                                 (36, 44)]]
    table = [line for line in r.output.splitlines() if "shapes.jpg" in line]
    assert [next(n for n in SHAPES if f" {n} " in line) for line in table] == SHAPES


def test_predict_device_option(cli, tiny_checkpoint, shapes_image, tmp_path):
    import torch

    from pipelines.commands.predict import to_device

    r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", "star. heart.",
            "--device", "no-such-device", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--device" in r.output
    if not torch.cuda.is_available():
        r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", "star. heart.",
                "--device", "cuda", "--out", tmp_path / "x")
        assert r.exit_code == 2 and "CUDA is not available" in " ".join(r.output.split())
    else:   # a lent GPU: the model really moves
        from labeling.evaluation import load_model

        net = to_device(load_model(tiny_checkpoint), "cuda")
        assert next(net.parameters()).device.type == "cuda"


# ---- prompts for a frozen model: a manual --prompt-template and a tuned prompt (prompt-tune --mode prompt)

EVAL_NAMES = ["circle", "square", "triangle", "star", "heart", "cross"]     # the world's categories, by id
PROMPT_TEMPLATE = {"star": {"suffix": " with five points"}}
TUNED_CAPTION = "circle. square. triangle. star with five points. heart. cross."


@pytest.fixture(scope="module")
def prompt_world(tmp_path_factory):
    from pipelines.world import WorldSpec, generate_world

    return generate_world(tmp_path_factory.mktemp("prompt_world"),
                          WorldSpec.small(seed=0).scaled(eval_images=3, gold_images=1, crawled_images=1))


@pytest.fixture(scope="module")
def tuned_prompt(tiny_checkpoint, tmp_path_factory):
    """A prompt for tiny_checkpoint on the world's categories with PROMPT_TEMPLATE, random offsets."""
    from prompt_helpers import save_tuned_prompt

    return save_tuned_prompt(tmp_path_factory.mktemp("tuned") / "prompt", tiny_checkpoint, EVAL_NAMES,
                             PROMPT_TEMPLATE)


def _same_detections(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        and x["bbox"] == pytest.approx(y["bbox"], abs=1e-4) and x["score"] == pytest.approx(y["score"], abs=1e-6)
        for x, y in zip(a, b))


def test_evaluate_with_a_tuned_prompt_detects_what_the_model_with_it_attached_does(
        cli, tiny_checkpoint, tuned_prompt, prompt_world, tmp_path):
    from labeling.evaluation import detect_coco, load_model
    from labeling.teacher import checkpoint_sha256
    from prompt_helpers import prompted_model
    from storage.prompt_template import PromptTemplate

    w, template = prompt_world, PromptTemplate.from_json(PROMPT_TEMPLATE)
    out, dets = tmp_path / "eval.json", tmp_path / "dets.json"
    r = cli("evaluate", "--model", tiny_checkpoint, "--coco", w.eval_coco_arg, "--prompt", tuned_prompt,
            "--out", out, "--detections", dets, "--batch-size", "2")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["prompt"] == {"path": str(tuned_prompt), "sha256": checkpoint_sha256(tuned_prompt),
                                "caption": TUNED_CAPTION}
    assert report["prompt_template"] == template.to_json()         # the prompt's own template
    tuned = json.loads(dets.read_text())
    by_hand, _, _ = detect_coco(prompted_model(tiny_checkpoint, tuned_prompt), w.eval_coco_json, w.eval_images,
                                batch_size=2, template=template)
    assert tuned and _same_detections(tuned, by_hand)
    assert report["coco"]["detections"] == len(tuned)

    # the same text without the offsets: other detections (--prompt-template alone gives that text)
    r = cli("evaluate", "--model", tiny_checkpoint, "--coco", w.eval_coco_arg, "--prompt-template",
            json.dumps(PROMPT_TEMPLATE), "--detections", tmp_path / "plain.json", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    without, _, _ = detect_coco(load_model(tiny_checkpoint), w.eval_coco_json, w.eval_images, batch_size=2,
                                template=template)
    assert _same_detections(plain, without) and not _same_detections(plain, tuned)


def test_evaluate_refuses_a_tuned_prompt_it_cannot_honour(cli, tiny_checkpoint, tuned_prompt, prompt_world,
                                                          tmp_path):
    from prompt_helpers import other_model

    w = prompt_world
    base = ["evaluate", "--coco", w.eval_coco_arg, "--prompt", tuned_prompt, "--out", tmp_path / "x.json"]

    def refused(*args) -> str:
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert not (tmp_path / "x.json").exists()
        return " ".join(r.output.split())

    said = refused(*base, "--model", other_model(tiny_checkpoint, tmp_path / "other"))
    assert "was tuned for base model sha256" in said and "use the model it was tuned on" in said
    said = refused(*base, "--model", tiny_checkpoint, "--grounding", w.eval_grounding_arg)
    assert "a tuned prompt is for COCO detection (--coco) only" in said
    said = refused(*base, "--model", tiny_checkpoint, "--prompt-template", '{"star": {"suffix": " with six points"}}')
    assert "differs from what --prompt" in said and "a tuned prompt brings its own" in said
    # the same images with one category fewer: not the list the prompt was tuned on
    coco = json.loads(w.eval_coco_json.read_text())
    coco["categories"] = [c for c in coco["categories"] if c["name"] != "cross"]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in {c["id"] for c in coco["categories"]}]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(coco))
    said = refused("evaluate", "--coco", f"{fewer}={w.eval_images}", "--prompt", tuned_prompt, "--model",
                   tiny_checkpoint, "--out", tmp_path / "x.json")
    assert f"was tuned on the categories {', '.join(EVAL_NAMES)}; {fewer} has " \
           f"{', '.join(EVAL_NAMES[:-1])}" in said


def _ground_by_hand(model, image_path, caption: str, spans) -> list[dict]:
    (per_phrase,) = model.ground([Image.open(image_path).convert("RGB")], [caption], [spans], threshold=0.0,
                                 max_per_phrase=1)
    return [{"span": [s, e], **d} for (s, e), dets in zip(spans, per_phrase) for d in dets]


def _same_boxes(predicted: list[dict], by_hand: list[dict]) -> bool:
    return len(predicted) == len(by_hand) and all(
        p["span"] == h["span"] and p["bbox"] == pytest.approx(h["bbox"], abs=0.006)
        and p["score"] == pytest.approx(h["score"], abs=6e-5) for p, h in zip(predicted, by_hand))


def test_predict_with_a_tuned_prompt_grounds_its_categories(cli, tiny_checkpoint, tuned_prompt, shapes_image,
                                                            tmp_path):
    from labeling.evaluation import load_model
    from labeling.teacher import checkpoint_sha256
    from prompt_helpers import other_model, prompted_model

    args = ["predict", shapes_image, "--model", tiny_checkpoint, "--tuned-prompt", tuned_prompt, "--threshold", "0",
            "--max-per-phrase", "1"]
    r = cli(*args, "--out", tmp_path / "tuned")
    assert r.exit_code == 0, r.output
    preds = json.loads((tmp_path / "tuned" / "predictions.json").read_text())
    assert preds["prompt"] == TUNED_CAPTION and preds["phrases"] == EVAL_NAMES      # spans cover the names only
    assert preds["tuned_prompt"] == {"path": str(tuned_prompt), "sha256": checkpoint_sha256(tuned_prompt)}
    spans = [tuple(b["span"]) for b in preds["images"][0]["boxes"]]
    assert [TUNED_CAPTION[s:e] for s, e in spans] == EVAL_NAMES
    boxes = preds["images"][0]["boxes"]
    assert _same_boxes(boxes, _ground_by_hand(prompted_model(tiny_checkpoint, tuned_prompt), shapes_image,
                                              TUNED_CAPTION, spans))
    assert not _same_boxes(boxes, _ground_by_hand(load_model(tiny_checkpoint), shapes_image, TUNED_CAPTION, spans))
    # --prompt DIR, as evaluate and pseudo-label take it, is the same
    r = cli("predict", shapes_image, "--model", tiny_checkpoint, "--prompt", tuned_prompt, "--threshold", "0",
            "--max-per-phrase", "1", "--out", tmp_path / "as_prompt")
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "as_prompt" / "predictions.json").read_text())
    assert again["tuned_prompt"] == preds["tuned_prompt"] and again["images"][0]["boxes"] == boxes

    # the category list it was tuned on reads as the same text; another text is refused
    r = cli(*args, "--prompt", "circle. square. triangle. star. heart. cross", "--out", tmp_path / "listed")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "listed" / "predictions.json").read_text())["prompt"] == TUNED_CAPTION
    for caption in ("circle. square.", "a red circle"):
        r = cli(*args, "--prompt", caption, "--out", tmp_path / "other")
        assert r.exit_code == 2 and "is not the text --tuned-prompt" in " ".join(r.output.split())
    r = cli(*args[:3], other_model(tiny_checkpoint, tmp_path / "other_model"), *args[4:], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "was tuned for base model sha256" in " ".join(r.output.split())


def test_predict_applies_a_template_to_a_category_list(cli, tiny_checkpoint, shapes_image, tmp_path):
    from labeling.evaluation import load_model

    template = json.dumps(PROMPT_TEMPLATE)
    args = ["predict", shapes_image, "--model", tiny_checkpoint, "--threshold", "0", "--max-per-phrase", "1"]
    r = cli(*args, "--prompt", "square. star.", "--prompt-template", template, "--out", tmp_path / "listed")
    assert r.exit_code == 0, r.output
    preds = json.loads((tmp_path / "listed" / "predictions.json").read_text())
    assert preds["prompt"] == "square. star with five points." and preds["phrases"] == ["square", "star"]
    assert preds["prompt_template"] == {"star": {"prefix": "", "name": "star", "suffix": " with five points"}}
    assert _same_boxes(preds["images"][0]["boxes"], _ground_by_hand(load_model(tiny_checkpoint), shapes_image,
                                                                    preds["prompt"], [(0, 6), (8, 12)]))
    # a template alone grounds the categories it names
    r = cli(*args, "--prompt-template", '{"star": {"suffix": " with five points"}, "heart": {}}',
            "--out", tmp_path / "alone")
    assert r.exit_code == 0, r.output
    preds = json.loads((tmp_path / "alone" / "predictions.json").read_text())
    assert preds["prompt"] == "star with five points. heart." and preds["phrases"] == ["star", "heart"]
    r = cli(*args, "--prompt", "a red star on a wall", "--prompt-template", template, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "applies to a category-list --prompt" in " ".join(r.output.split())
    r = cli(*args, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "give --prompt TEXT" in r.output
