"""labeling.hf_teacher: transformers zero-shot detectors (Grounding DINO, MM Grounding DINO, OWLv2) as
teachers and as evaluate/predict models. Real tiny random models (tests/hf_models.py), nothing downloaded."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from labeling.hf_teacher import (HFGrounder, HFTeacher, gdino_prompt, is_hub_id, prompt_chunks,
                                 select_per_phrase)
from labeling.teacher import (TeacherResize, check_teacher, checkpoint_sha256, detr_resized_size, load_teacher,
                              longer_side_size, teacher_identity, teacher_resize)
from storage.errors import InputError

GDINO_FAMILY = ("grounding-dino", "mm-grounding-dino")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread (a shared 2-core machine: a second thread is much slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grounders(hf_teacher_dirs) -> dict[str, HFGrounder]:
    return {kind: HFGrounder.from_pretrained(path) for kind, path in hf_teacher_dirs.items()}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Flat colour with two rectangles: something for random weights to respond to."""
    rng = np.random.default_rng(seed)
    arr = np.full((height, width, 3), rng.integers(0, 255, 3), np.uint8)
    arr[height // 4:height // 2, width // 5:width // 2] = rng.integers(0, 255, 3)
    arr[height // 2:, width // 2:] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def _spans(caption: str, words: list[str]) -> list[tuple[int, int]]:
    out, cursor = [], 0
    for w in words:
        s = caption.index(w, cursor)
        out.append((s, s + len(w)))
        cursor = s + len(w)
    return out


def _assert_same(a, b, atol=1e-5):
    """Two ``ground`` results (per image, per phrase, detections) equal up to float noise."""
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert [len(d) for d in pa] == [len(d) for d in pb]
        for da, db in zip(pa, pb):
            for x, y in zip(da, db):
                assert x["score"] == pytest.approx(y["score"], abs=atol)
                np.testing.assert_allclose(x["bbox"], y["bbox"], atol=1e-3)


# ----------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("size", [(96, 80), (640, 480), (1000, 100), (100, 1000), (64, 64), (333, 1333), (50, 30)])
def test_resize_rules_match_the_processors(size):
    from transformers.image_transforms import get_size_with_aspect_ratio

    w, h = size
    oh, ow = get_size_with_aspect_ratio((h, w), 800, 1333)
    assert detr_resized_size(w, h, 800, 1333) == (ow, oh)
    lw, lh = longer_side_size(w, h, 960)
    assert max(lw, lh) == 960 and abs(lw / lh - w / h) < 2.0 / min(lw, lh) + 1e-9
    assert TeacherResize(96, 96, "longer").target_size(w, h) == longer_side_size(w, h, 96)
    with pytest.raises(ValueError):
        TeacherResize(1, 2, "nearest")


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("IDEA-Research/grounding-dino-tiny") and is_hub_id("google/owlv2-base-patch16-ensemble@main")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    for not_hub in ("/abs/path", "./org/model", "s3://bucket/model", "runs/model.pth", "one-name", "a/b/c",
                    str(tmp_path / "org" / "model")):
        assert not is_hub_id(not_hub), not_hub


def test_select_per_phrase_thresholds_nms_and_caps():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 70]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6]])
    out = select_per_phrase(boxes, scores, 0.5, None, None)
    assert [[d["score"] for d in p] for p in out] == [pytest.approx([0.9, 0.8]), pytest.approx([0.7, 0.6])]
    assert out[0][0]["bbox"] == [0, 0, 10, 10]                                  # xyxy -> xywh
    nms = select_per_phrase(boxes, scores, 0.5, 0.5, None)                    # IoU(0, 1) = 0.68 > 0.5
    assert [len(p) for p in nms] == [1, 2]
    assert [len(p) for p in select_per_phrase(boxes, scores, 0.0, None, 1)] == [1, 1]
    top = select_per_phrase(boxes, scores, None, None, None)                  # official: best pairs, no floor
    assert sum(len(p) for p in top) == 6
    unscored = select_per_phrase(boxes, torch.full((3, 1), -1.0), None, None, None)
    assert unscored == [[]]


def test_prompt_chunks_keep_phrases_whole_and_rebased():
    caption = "a red square next to a blue circle under a green star and a grey cross"
    words = ["a red square", "a blue circle", "a green star", "a grey cross"]
    spans = _spans(caption, words)
    count = lambda text: len(text.split()) + 2            # noqa: E731 - a word counter with 2 specials
    assert prompt_chunks(caption, spans, count, 100) == [type(prompt_chunks(caption, spans, count, 100)[0])(
        gdino_prompt(caption), 0, (0, 1, 2, 3))]
    chunks = prompt_chunks(caption, spans, count, 9)
    assert len(chunks) > 1 and sorted(p for c in chunks for p in c.phrases) == [0, 1, 2, 3]
    for c in chunks:
        assert count(c.text) <= 9 and c.text.endswith(" .")
        for p in c.phrases:
            s, e = spans[p]
            assert c.text[s - c.offset:e - c.offset] == caption[s:e]
    assert gdino_prompt("a cat.") == "a cat." and gdino_prompt("a cat") == "a cat ."


# ----------------------------------------------------------------------------- identity and dispatch
def test_transformers_folders_are_teachers_with_their_identity(hf_teacher_dirs, tmp_path):
    for model_type, path in hf_teacher_dirs.items():
        assert check_teacher(path) == "transformers"
        ident = teacher_identity(path)
        assert (ident.kind, ident.model_type, ident.revision) == ("transformers", model_type, "")
        assert ident.sha256 == checkpoint_sha256(path) and ident.source == f"pseudo/{ident.sha256[:12]}"
        assert ident.to_dict()["model_type"] == model_type
    assert teacher_resize(hf_teacher_dirs["grounding-dino"]) == TeacherResize(64, 96, "detr")
    assert teacher_resize(hf_teacher_dirs["grounding-dino"], image_size=32) == TeacherResize(32, 48, "detr")
    assert teacher_resize(hf_teacher_dirs["owlv2"]) == TeacherResize(96, 96, "longer")
    assert teacher_resize(hf_teacher_dirs["owlv2"], image_size=64) == TeacherResize(64, 64, "longer")

    other = tmp_path / "detr"                          # a transformers model, but no grounding teacher
    shutil.copytree(hf_teacher_dirs["owlv2"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "detr"}))
    with pytest.raises(InputError, match="not a grounding teacher"):
        check_teacher(other)
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "processor_config.json").unlink()
    with pytest.raises(InputError, match="processor"):
        check_teacher(other)


def test_a_hub_id_resolves_through_the_cache_to_its_commit(hf_teacher_dirs, tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it (offline: HF_HUB_OFFLINE=1 from conftest)."""
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-owlv2"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(hf_teacher_dirs["owlv2"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    ident = teacher_identity("tiny-org/tiny-owlv2")
    assert (ident.path, ident.kind, ident.model_type, ident.revision) == \
        ("tiny-org/tiny-owlv2", "transformers", "owlv2", commit)
    assert ident.sha256 == checkpoint_sha256(hf_teacher_dirs["owlv2"])   # the same files, the same number
    assert teacher_resize("tiny-org/tiny-owlv2") == TeacherResize(96, 96, "longer")
    teacher = load_teacher("tiny-org/tiny-owlv2", ident)
    assert isinstance(teacher, HFTeacher) and teacher.identity.revision == commit
    with pytest.raises(InputError, match="hub"):
        teacher_identity("tiny-org/not-cached")


# ----------------------------------------------------------------------------- Grounding DINO family
@pytest.mark.parametrize("model_type", GDINO_FAMILY)
def test_span_scoring_equals_transformers_post_process_on_single_word_phrases(grounders, model_type):
    """Ours: per phrase, the max sigmoid over the phrase's own tokens (found from character spans). Theirs:
    ``post_process_grounded_object_detection`` (max over tokens) on the model's logits restricted to the
    token of that word (found from its vocabulary id): the same boxes and scores."""
    g = grounders[model_type]
    caption, words = "cat. dog. bird.", ["cat", "dog", "bird"]
    image = _image(96, 64)                             # already at the processor's size: same pixels
    threshold = 0.3
    ours = g.ground([image], [caption], [_spans(caption, words)], threshold=threshold)[0]

    inputs = g.processor(images=image, text=caption, return_tensors="pt")
    with torch.no_grad():
        outputs = g.model(**inputs)
    ids, logits = inputs["input_ids"][0], outputs.logits
    found = 0
    for word, dets in zip(words, ours):
        position = (ids == g.tokenizer.convert_tokens_to_ids(word)).nonzero().flatten()
        assert position.numel() == 1
        masked = logits.clone()
        keep = torch.zeros(masked.shape[-1], dtype=torch.bool)
        keep[position] = True
        masked[..., ~keep] = float("-inf")
        outputs.logits = masked
        theirs = g.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=threshold, text_threshold=0.0, target_sizes=[(64, 96)])[0]
        order = theirs["scores"].argsort(descending=True)
        assert [d["score"] for d in dets] == pytest.approx(theirs["scores"][order].tolist(), abs=1e-6)
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
        np.testing.assert_allclose(xyxy, theirs["boxes"][order].numpy().reshape(-1, 4), atol=1e-4)
        found += len(dets)
    assert found > 0                                   # the threshold left something to compare


@pytest.mark.parametrize("model_type", GDINO_FAMILY + ("owlv2",))
def test_labels_do_not_depend_on_batch_neighbours(grounders, model_type):
    g = grounders[model_type]
    images = [_image(96, 64, 1), _image(80, 120, 2), _image(96, 64, 3)]
    captions = ["a red square", "a blue circle under a green star.", "a star and a grey cross next to a cat"]
    spans = [_spans(captions[0], ["a red square"]), _spans(captions[1], ["a blue circle", "a green star"]),
             _spans(captions[2], ["a star", "a grey cross", "a cat"])]
    together = g.ground(images, captions, spans, threshold=0.0, max_per_phrase=5)
    alone = [g.ground([im], [c], [s], threshold=0.0, max_per_phrase=5)[0] for im, c, s in zip(images, captions, spans)]
    _assert_same(together, alone)
    assert all(dets for per in together for dets in per)


def test_a_long_caption_is_split_into_prompts_and_every_phrase_is_grounded(grounders):
    """Over max_text_len (32 tokens) the caption becomes several prompts; each phrase's detections are those of
    grounding its chunk as a caption of its own."""
    from labeling.evaluation import model_token_counter

    g = grounders["grounding-dino"]
    words = ["a red square", "a blue circle", "a green star", "a grey cross", "a yellow heart", "a white triangle",
             "a black dog", "a small cat", "a purple kite", "an orange ball"]
    caption = "photo of " + ", then ".join(words) + " on a table"
    spans = _spans(caption, words)
    count = model_token_counter(g)
    assert count(caption) > g.config.max_query_len
    chunks = prompt_chunks(caption, spans, count, g.config.max_query_len)
    assert len(chunks) >= 2 and all(count(c.text) <= g.config.max_query_len for c in chunks)
    image = _image(96, 64, 4)
    whole = g.ground([image], [caption], [spans], threshold=0.0, max_per_phrase=3)[0]
    assert all(whole), "every phrase is grounded"
    for c in chunks:
        local = [(spans[p][0] - c.offset, spans[p][1] - c.offset) for p in c.phrases]
        alone = g.ground([image], [c.text], [local], threshold=0.0, max_per_phrase=3)[0]
        _assert_same([[whole[p] for p in c.phrases]], [alone])


def test_owlv2_phrases_are_independent_queries(grounders):
    """OWLv2 scores each phrase as its own query: grounding a phrase inside a long caption equals grounding it
    alone, and its detections do not depend on the other phrases."""
    g = grounders["owlv2"]
    words = ["a red square", "a blue circle", "a green star", "a grey cross", "a yellow heart"]
    caption = " and ".join(words)
    spans = _spans(caption, words)
    image = _image(120, 80, 5)
    whole = g.ground([image], [caption], [spans], threshold=0.0, max_per_phrase=4)[0]
    for span, dets in zip(spans, whole):
        _assert_same([[dets]], [g.ground([image], [caption], [[span]], threshold=0.0, max_per_phrase=4)[0]])


# ----------------------------------------------------------------------------- OWLv2 geometry
def test_owlv2_boxes_on_non_square_images_are_original_pixels(grounders):
    """The processor pads to a square (bottom/right); boxes are normalized to its side. Hand computation from the
    raw pred_boxes: x = x_norm * S * W / w, y = y_norm * S * H / h (S = max(w, h) of the model's input, W x H the
    original, w x h after the CPU resize)."""
    g = grounders["owlv2"]
    text = "a red square"
    for width, height in ((96, 64), (200, 120), (60, 150)):
        image = _image(width, height, 6)
        resized = g.prepare_image(image)
        h, w = resized.shape[:2]
        assert max(w, h) == 96
        inputs = g.processor(text=[[text]], images=resized.copy(), return_tensors="pt")
        assert tuple(inputs["pixel_values"].shape[-2:]) == (96, 96)
        with torch.no_grad():
            raw = g.model(**inputs)
        cx, cy, bw, bh = raw.pred_boxes[0].unbind(-1)
        side = 96.0
        hand = torch.stack([(cx - bw / 2) * side * width / w, (cy - bh / 2) * side * height / h,
                            bw * side * width / w, bh * side * height / h], dim=-1)
        scores = raw.logits[0, :, 0].sigmoid()
        order = scores.argsort(descending=True)
        ours = g.ground([image], [text], [[(0, len(text))]], threshold=0.0, max_per_phrase=1000)[0][0]
        assert len(ours) == len(order)
        np.testing.assert_allclose([d["bbox"] for d in ours], hand[order].numpy(), atol=1e-3)
        np.testing.assert_allclose([d["score"] for d in ours], scores[order].numpy(), atol=1e-5)
        if (width, height) == (96, 64):      # no resize: transformers' own post-processing agrees
            theirs = g.image_processor.post_process_object_detection(raw, threshold=0.0, target_sizes=[(64, 96)])[0]
            xyxy = theirs["boxes"][order].numpy()
            np.testing.assert_allclose([[x, y, x + bw_, y + bh_] for x, y, bw_, bh_ in (d["bbox"] for d in ours)],
                                       xyxy, atol=1e-3)
            assert float(hand[:, 1].max()) > 0 and float((hand[:, 1] + hand[:, 3]).max()) > 64 * 0.5


def test_owlv2_ground_prompts_runs_the_image_encoder_once(grounders):
    g = grounders["owlv2"]
    images = [_image(96, 64, 7), _image(50, 90, 8)]
    prompts = [("circle. square.", [(0, 6), (8, 14)]), ("star. heart. cross.", [(0, 4), (6, 11), (13, 18)])]
    calls = []
    original = g.model.image_embedder

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    g.model.image_embedder = counted
    try:
        reused = g.ground_prompts(images, prompts, threshold=None, max_per_phrase=5)
        assert len(calls) == 1                       # both images share the 96 x 96 input: one pass
        separate = [g.ground(images, [c] * 2, [s] * 2, threshold=None, max_per_phrase=5) for c, s in prompts]
        assert len(calls) == 1 + len(prompts)
    finally:
        del g.model.image_embedder
    for a, b in zip(reused, separate):
        _assert_same(a, b)


# ----------------------------------------------------------------------------- the Teacher protocol
@pytest.mark.parametrize("model_type", GDINO_FAMILY + ("owlv2",))
def test_hf_teacher_grounds_resized_arrays_like_the_grounder(hf_teacher_dirs, grounders, model_type):
    path = hf_teacher_dirs[model_type]
    teacher = load_teacher(path)
    assert isinstance(teacher, HFTeacher) and teacher.identity.model_type == model_type
    resize = teacher_resize(path)
    images = [_image(130, 90, 9), _image(70, 140, 10)]
    arrays = [resize(im) for im in images]
    assert [a.shape[:2] for a in arrays] == [resize.target_size(*im.size)[::-1] for im in images]
    captions = ["a red square and a blue circle", "a green star"]
    spans = [_spans(captions[0], ["a red square", "a blue circle"]), _spans(captions[1], ["a green star"])]
    got = teacher.ground(arrays, [im.size for im in images], captions, spans, threshold=0.2, nms_iou=0.6)
    _assert_same(got, grounders[model_type].ground(images, captions, spans, threshold=0.2, nms_threshold=0.6))
    buckets = {teacher.bucket_of(a) for a in arrays}
    assert buckets == ({(96, 96)} if model_type == "owlv2" else {a.shape[:2] for a in arrays})
    bf16 = HFTeacher(teacher.grounder, teacher.identity, precision="bf16")
    out = bf16.ground(arrays, [im.size for im in images], captions, spans, threshold=0.0, nms_iou=0.6)
    assert [len(p) for p in out] == [2, 1] and all(isinstance(d["score"], float) for p in out for q in p for d in q)


# ----------------------------------------------------------------------------- evaluate and predict
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipelines.world import WorldSpec, generate_world

    return generate_world(tmp_path_factory.mktemp("world"),
                          WorldSpec.small(seed=0).scaled(eval_images=4, gold_images=2, crawled_images=2))


@pytest.mark.parametrize("model_type", ["grounding-dino", "owlv2"])
def test_evaluate_command_takes_a_transformers_model(cli, hf_teacher_dirs, world, tmp_path, model_type):
    out = tmp_path / "eval.json"
    r = cli("evaluate", "--model", hf_teacher_dirs[model_type], "--coco", world.eval_coco_arg,
            "--grounding", world.eval_grounding_arg, "--device", "cpu", "--out", out, "--batch-size", "3")
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["coco"]["images"] == 4 and rep["coco"]["detections"] > 0
    assert 0.0 <= rep["coco"]["AP"] <= 1.0 and len(rep["coco"]["per_category"]) == 6
    assert rep["grounding"]["phrases"] > 0
    r = cli("evaluate", "--model", hf_teacher_dirs[model_type], "--coco", world.eval_coco_arg, "--device", "nope")
    assert r.exit_code == 2


def test_owlv2_evaluation_reuses_image_features_with_the_same_detections(grounders, world):
    """A category list over the chunk limit: the image-feature reuse gives the detections of running each
    prompt chunk."""
    from labeling.evaluation import category_prompts, detect_coco, model_token_counter

    g = grounders["owlv2"]
    categories = json.loads(world.eval_coco_json.read_text())["categories"]
    assert len(category_prompts(categories, 8, model_token_counter(g))) > 2      # several prompt chunks

    class EachChunk:          # the same model without ground_prompts: evaluation runs each chunk
        config, tokenizer = g.config, g.tokenizer

        def ground(self, *args, **kwargs):
            return g.ground(*args, **kwargs)

    reused, ids, _ = detect_coco(g, world.eval_coco_json, world.eval_images, batch_size=4, max_tokens=8)
    chunked, ids2, _ = detect_coco(EachChunk(), world.eval_coco_json, world.eval_images, batch_size=4, max_tokens=8)
    assert ids == ids2 and len(reused) == len(chunked) > 0
    for a, b in zip(reused, chunked):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_predict_takes_a_transformers_model(cli, hf_teacher_dirs, tmp_path):
    image = tmp_path / "shapes.png"
    _image(120, 80, 11).save(image)
    out = tmp_path / "pred"
    r = cli("predict", image, "--model", hf_teacher_dirs["grounding-dino"], "--prompt", "star. heart. circle.",
            "--threshold", "0.0", "--out", out)
    assert r.exit_code == 0, r.output
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["phrases"] == ["star", "heart", "circle"] and pred["images"][0]["boxes"]
