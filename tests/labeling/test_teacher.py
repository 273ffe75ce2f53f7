"""labeling.teacher: identity (sha256), the CPU-side resize, and the real tiny GLIP teacher."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
    assert ident.to_dict() == {"path": "/x", "sha256": "a" * 64, "kind": "glipctl", "model_type": "glip",
                               "source": "pseudo/aaaaaaaaaaaa"}
    assert TeacherIdentity.from_dict(ident.to_dict()) == ident
    hub = TeacherIdentity("org/model", "b" * 64, "transformers", "owlv2", "c" * 40)
    assert hub.to_dict()["revision"] == "c" * 40 and TeacherIdentity.from_dict(hub.to_dict()) == hub
    assert hub.sample_extra() == {"teacher_sha256": "b" * 64, "teacher_kind": "transformers",
                                  "teacher_model_type": "owlv2", "teacher_revision": "c" * 40}


@pytest.fixture(scope="module")
def tiny_glip():
    """Random tiny weights, token logits spread out (log_scale -3) so scores range ~0.05-0.5; one intra-op
    thread while the module's tests use it (on a shared 2-core machine a second thread is 20x slower under load,
    measured: 0.9 s -> 21 s)."""
    import torch

    from glip import GLIP

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GLIP.from_preset("tiny", min_size=64, max_size=128).eval()
    with torch.no_grad():
        model.head.log_scale.fill_(-3.0)
        model.head.bias0.fill_(-2.5)
    yield model
    torch.set_num_threads(before)


IDENT = TeacherIdentity("mem", "0" * 64, "glipctl")


def test_glip_teacher_on_resized_arrays_equals_model_ground_on_pil_images(tiny_glip):
    """The split path (CPU resize to uint8, then the teacher) gives the model's own answer for each image."""
    from labeling.teacher import GLIPTeacher

    model = tiny_glip
    teacher = GLIPTeacher(model, IDENT)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((80, 60), (50, 90))]
    captions = ["a red square on a blue background", "two cats"]
    spans = [[(0, 12), (16, 33)], [(0, 8)]]
    resize = TeacherResize(64, 128)
    ours = teacher.ground([resize(im) for im in images], [im.size for im in images], captions, spans,
                          threshold=0.05, nms_iou=0.6)
    theirs = [model.ground([im], [c], [s], threshold=0.05, nms_threshold=0.6)[0]
              for im, c, s in zip(images, captions, spans)]
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
    assert teacher.precision == "fp32"


# resized arrays (h, w): buckets at size_divisibility 32 are (64, 96) x3, (64, 64) x2, (96, 64), (64, 128), (128, 64)
SHAPES = [(64, 96), (64, 90), (70, 64), (64, 64), (64, 120), (100, 64), (64, 92), (64, 61)]
CAPTIONS = ["a red ball and a blue box", "two dogs", "a cat on a very long mat near the door", "the sun",
            "a man riding a horse", "trees", "a car and a bus and a truck", "one bird"]
SPANS = [[(0, 10), (15, 25)], [(0, 8)], [(0, 5), (9, 38)], [(0, 7)], [(0, 5), (13, 20)], [(0, 5)],
         [(0, 5), (10, 15), (20, 27)], [(0, 8)]]


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]


def _assert_close(ours, theirs, atol):
    assert [[len(p) for p in img] for img in ours] == [[len(p) for p in img] for img in theirs]
    for a_img, b_img in zip(ours, theirs):
        for a_phrase, b_phrase in zip(a_img, b_img):
            for a, b in zip(a_phrase, b_phrase):
                assert a["bbox"] == pytest.approx(b["bbox"], abs=atol)
                assert a["score"] == pytest.approx(b["score"], abs=atol)


def test_labels_do_not_depend_on_batch_neighbours(tiny_glip):
    """Each image alone, all 8 together (neighbours of other sizes, captions of other lengths), and the 8 in
    another order: the same boxes and scores (1e-5), each in the caller's order."""
    import torch

    from labeling.teacher import GLIPTeacher

    teacher = GLIPTeacher(tiny_glip, IDENT)
    arrays = _arrays()
    sizes = [(w, h) for h, w in SHAPES]             # the resized frame: 1e-5 is in the model's own pixels
    assert len({teacher.bucket_of(a) for a in arrays}) == 5
    alone = [teacher.ground([a], [s], [c], [p], threshold=0.2, nms_iou=0.6)[0]
             for a, s, c, p in zip(arrays, sizes, CAPTIONS, SPANS)]
    assert sum(len(p) for img in alone for p in img) > 20
    together = teacher.ground(arrays, sizes, CAPTIONS, SPANS, threshold=0.2, nms_iou=0.6)
    _assert_close(together, alone, 1e-5)
    order = [5, 0, 7, 2, 6, 1, 4, 3]
    shuffled = teacher.ground([arrays[i] for i in order], [sizes[i] for i in order], [CAPTIONS[i] for i in order],
                              [SPANS[i] for i in order], threshold=0.2, nms_iou=0.6)
    _assert_close(shuffled, [alone[i] for i in order], 1e-5)
    # what the teacher avoids: one batch padded to its largest image changes the labels of the smaller ones
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255.0) for a in arrays]
    padded = tiny_glip.ground(tensors, CAPTIONS, SPANS, threshold=0.2, image_sizes=sizes)
    best = [[p[0]["score"] if p else 0.0 for p in img] for img in padded]
    best_alone = [[p[0]["score"] if p else 0.0 for p in img] for img in alone]
    assert max(abs(a - b) for x, y in zip(best, best_alone) for a, b in zip(x, y)) > 1e-3


def test_bucket_is_the_padded_shape_of_a_batch_of_one(tiny_glip):
    import torch

    from glip.preprocess import batch_images, padded_shape
    from labeling.teacher import GLIPTeacher

    assert padded_shape(64, 90, 32) == (64, 96) and padded_shape(65, 64, 32) == (96, 64)
    assert padded_shape(7, 9, 0) == (7, 9) and padded_shape(7, 9, 1) == (7, 9)
    teacher = GLIPTeacher(tiny_glip, IDENT)
    assert teacher.size_divisibility == tiny_glip.config.size_divisibility == 32
    for array in _arrays():
        batch, _ = batch_images([torch.zeros(3, *array.shape[:2])], tiny_glip.config)
        assert teacher.bucket_of(array) == tuple(batch.shape[-2:])


def test_bf16_precision_runs_and_stays_close_to_fp32(tiny_glip):
    from labeling.teacher import GLIPTeacher

    fp32 = GLIPTeacher(tiny_glip, IDENT)
    bf16 = GLIPTeacher(tiny_glip, IDENT, precision="bf16")
    assert bf16.precision == "bf16"
    arrays, sizes = _arrays(), [(2 * w, 2 * h) for h, w in SHAPES]
    exact = fp32.ground(arrays, sizes, CAPTIONS, SPANS, threshold=0.3, nms_iou=0.6)
    mixed = bf16.ground(arrays, sizes, CAPTIONS, SPANS, threshold=0.3, nms_iou=0.6)
    matched = 0
    for a_img, b_img in zip(exact, mixed):
        for a_phrase, b_phrase in zip(a_img, b_img):
            assert all(type(v) is float for d in b_phrase for v in [*d["bbox"], d["score"]])
            # bf16 keeps ~3 significant digits: near-tied boxes may swap, so match each clear box to a close one
            for b in b_phrase:
                if b["score"] < 0.32:
                    continue
                assert any(abs(a["score"] - b["score"]) < 0.02
                           and a["bbox"] == pytest.approx(b["bbox"], abs=1.0) for a in a_phrase)
                matched += 1
    assert matched >= 10
    with pytest.raises(ValueError, match="precision"):
        GLIPTeacher(tiny_glip, IDENT, precision="fp16")


def test_load_on_cuda_without_cuda_raises_teacher_device_error(tmp_path):
    """An actor given a GPU that finds no CUDA fails loudly (here: CUDA hidden from torch), before loading."""
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from labeling.teacher import GLIPTeacher, TeacherDeviceError\n"
            "assert not torch.cuda.is_available()\n"
            "try:\n"
            f"    GLIPTeacher.load({str(tmp_path / 'never-read')!r}, device='cuda')\n"
            "except TeacherDeviceError as exc:\n"
            "    assert isinstance(exc, RuntimeError) and 'CUDA is not available' in str(exc), exc\n"
            "    print('raised')\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "raised", done.stderr


def test_device_errors_are_told_apart_from_record_errors():
    import torch

    from labeling.teacher import is_device_error

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_device_error(oom, "cuda") and is_device_error(oom, "cuda:1")
    assert is_device_error(RuntimeError("CUDA error: device-side assert triggered"), "cuda")
    assert is_device_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "cuda")
    assert is_device_error(torch.AcceleratorError("an illegal memory access was encountered"), "cuda")
    assert not is_device_error(oom, "cpu")              # only an accelerator's failure restarts the actor
    assert not is_device_error(RuntimeError("shape '[2, 3]' is invalid for input of size 5"), "cuda")
    assert not is_device_error(ValueError("CUDA"), "cuda")
