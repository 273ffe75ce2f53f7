"""labeling.teacher: identity (sha256), the CPU-side resize, and the real tiny GLIP teacher."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from labeling.teacher import (TeacherIdentity, TeacherResize, checkpoint_sha256, teacher_identity,
                              teacher_resize)
from storage.errors import InputError


def test_sha256_of_a_file_is_the_plain_file_hash(tmp_path):
    f = tmp_path / "glip_tiny_model_o365_goldg.pth"
    f.write_bytes(b"weights" * 1000)
    assert checkpoint_sha256(f) == hashlib.sha256(b"weights" * 1000).hexdigest()
    ident = teacher_identity(f)
    assert ident.kind == "official" and ident.source == f"pseudo/{ident.sha256[:12]}"


def test_sha256_of_a_directory_covers_model_files_only(tmp_path):
    d = tmp_path / "ckpt"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text('{"min_size": 320, "max_size": 512}')
    (d / "model.safetensors").write_bytes(b"abc")
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    first = checkpoint_sha256(d)
    (d / "train_state.pt").write_bytes(b"optimizer state")      # resume state: not identity
    (d / ".hidden.tmp").write_bytes(b"x")
    assert checkpoint_sha256(d) == first
    (d / "tokenizer" / "vocab.txt").write_text("a\nc\n")        # a tokenizer change is
    assert checkpoint_sha256(d) != first
    assert teacher_identity(d).kind == "glipctl"


def test_identity_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        teacher_identity(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        teacher_identity(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a teacher"):
        teacher_identity(tmp_path / "notes.txt")


def test_teacher_resize_reads_config_and_scales_the_cap(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"min_size": 800, "max_size": 1333}))
    assert teacher_resize(d) == TeacherResize(800, 1333)
    assert teacher_resize(d, image_size=400) == TeacherResize(400, 666)
    assert teacher_resize(tmp_path / "official.pth") == TeacherResize(800, 1333)
    (d / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="config.json"):
        teacher_resize(d)


@pytest.mark.parametrize("size", [(96, 80), (640, 480), (40, 300), (64, 64)])
def test_teacher_resize_equals_glip_prepare_image(size):
    from glip.config import GLIPConfig
    from glip.preprocess import prepare_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    resize = TeacherResize(64, 128)
    ours = resize(img)
    theirs = prepare_image(img, GLIPConfig.preset("tiny", min_size=64, max_size=128))
    assert ours.dtype == np.uint8 and ours.shape == (theirs.shape[1], theirs.shape[2], 3)
    np.testing.assert_array_equal(ours, (theirs.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_identity_round_trips_to_dict():
    ident = TeacherIdentity("/x", "a" * 64, "glipctl")
    assert ident.to_dict() == {"path": "/x", "sha256": "a" * 64, "kind": "glipctl", "source": "pseudo/aaaaaaaaaaaa"}


def test_glip_teacher_on_resized_arrays_equals_model_ground_on_pil_images():
    """The split path (CPU resize to uint8, then the teacher) gives the model's own answer."""
    import torch

    from glip import GLIP
    from labeling.teacher import GLIPTeacher

    torch.manual_seed(0)
    model = GLIP.from_preset("tiny", score_threshold=0.0, min_size=64, max_size=96)
    teacher = GLIPTeacher(model, TeacherIdentity("mem", "0" * 64, "glipctl"))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((80, 60), (50, 90))]
    captions = ["a red square on a blue background", "two cats"]
    spans = [[(0, 12), (16, 33)], [(0, 8)]]
    resize = TeacherResize(64, 96)
    ours = teacher.ground([resize(im) for im in images], [im.size for im in images], captions, spans,
                          threshold=0.05, nms_iou=0.6)
    theirs = model.ground(images, captions, spans, threshold=0.05, nms_threshold=0.6)
    assert [[len(p) for p in img] for img in ours] == [[len(p) for p in img] for img in theirs]
    assert sum(len(p) for img in ours for p in img) > 0
    for a_img, b_img in zip(ours, theirs):
        for a_phrase, b_phrase in zip(a_img, b_img):
            for a, b in zip(a_phrase, b_phrase):
                assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"])
    w, h = images[0].size
    for det in ours[0][0]:                          # original pixels, not the 64 px the model saw
        x, y, bw, bh = det["bbox"]
        assert -1e-3 <= x and x + bw <= w + 1 + 1e-3 and y + bh <= h + 1 + 1e-3
