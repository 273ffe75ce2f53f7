"""Training parts without a model: augmentation, LR schedule and param groups, checkpoint files."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.training.augment import TrainAugment, caption_allows_flip
from pipelines.training.checkpointing import (TRAIN_STATE, latest_checkpoint, list_checkpoints,
                                              load_train_state, publish, save_checkpoint)
from pipelines.training.schedule import build_optimizer, is_text_encoder_param, lr_factor, param_groups


# ----------------------------------------------------------------------------- augment

def _half_red_image(w: int = 160, h: int = 120) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h))
    return img


def test_resize_shortest_side_with_max_size_and_boxes_follow():
    aug = TrainAugment(60, 100, train=False)
    out = aug(_half_red_image(160, 120), torch.tensor([[0.0, 0.0, 80.0, 60.0]]), "a red half")
    assert out.image.shape == (3, 60, 80) and out.image.dtype == torch.float32
    assert 0.0 <= float(out.image.min()) and float(out.image.max()) <= 1.0
    assert torch.allclose(out.boxes, torch.tensor([[0.0, 0.0, 40.0, 30.0]]))
    wide = aug(Image.new("RGB", (400, 100)), torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "x")
    assert wide.image.shape[2] == 100 and wide.image.shape[1] == 25      # the long side capped


def test_flip_moves_boxes_and_is_refused_when_the_caption_names_a_side():
    assert not caption_allows_flip("the man on the LEFT") and not caption_allows_flip("right hand")
    assert caption_allows_flip("a bright light") and caption_allows_flip("leftover pizza")
    aug = TrainAugment(60, 100, flip_p=1.0, jitter=0.0)
    out = aug(_half_red_image(), torch.tensor([[0.0, 0.0, 80.0, 120.0]]), "a red half")
    assert out.flipped
    assert torch.allclose(out.boxes, torch.tensor([[40.0, 0.0, 80.0, 60.0]]))
    assert float(out.image[0, 30, 70]) > 0.9          # the red half moved to the right
    torch.manual_seed(0)
    for _ in range(20):
        kept = aug(_half_red_image(), torch.tensor([[0.0, 0.0, 80.0, 120.0]]), "the box on the left")
        assert not kept.flipped and float(kept.image[0, 30, 10]) > 0.9


def test_boxes_are_clipped_and_degenerate_ones_dropped():
    aug = TrainAugment(60, 100, train=False)
    boxes = torch.tensor([[-20.0, -20.0, 40.0, 40.0],     # partly outside: clipped
                          [170.0, 10.0, 200.0, 50.0],     # wholly outside: dropped
                          [10.0, 10.0, 10.5, 90.0],       # thinner than a pixel after resize: dropped
                          [100.0, 20.0, 150.0, 110.0]])
    out = aug(_half_red_image(), boxes, "x")
    assert out.keep.tolist() == [0, 3]
    assert torch.allclose(out.boxes[0], torch.tensor([0.0, 0.0, 20.0, 20.0]))


# ----------------------------------------------------------------------------- schedule

def test_warmup_then_cosine_or_step():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.001)
    assert lr_factor(5, 100, 10, "cosine") == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(50, 100, 0, "step") == 1.0
    assert lr_factor(67, 100, 0, "step") == pytest.approx(0.1)
    assert lr_factor(95, 100, 0, "step") == pytest.approx(0.01)
    factors = [lr_factor(s, 100, 10, "cosine") for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.language_backbone = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_text_encoder_gets_its_own_learning_rate():
    assert is_text_encoder_param("module.language_backbone.model.encoder.weight")
    assert not is_text_encoder_param("backbone.body.conv1.weight")
    groups = {g["name"]: g for g in param_groups(_Toy().named_parameters(), lr=1e-3, text_lr=1e-5, weight_decay=0.1)}
    assert groups["text"]["lr"] == 1e-5 and groups["main"]["lr"] == 1e-3
    assert groups["main_no_decay"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups.values()) == 4     # frozen params left out
    model = _Toy()
    opt, sched = build_optimizer(model, 1e-3, 1e-5, 0.1, total_steps=10, warmup=2, schedule="cosine")
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["main"] == pytest.approx(1e-6) and lrs["text"] == pytest.approx(1e-8)   # warm-up start
    for _ in range(2):
        opt.step()
        sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["main"] == pytest.approx(1e-3)
    restored_opt, restored = build_optimizer(_Toy(), 1e-3, 1e-5, 0.1, total_steps=10, warmup=2, schedule="cosine")
    restored_opt.load_state_dict(opt.state_dict())
    restored.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), restored_opt.step(), restored.step()
    assert restored.get_last_lr() == sched.get_last_lr()
    assert not math.isclose(sched.get_last_lr()[0], 1e-3)


# ----------------------------------------------------------------------------- checkpoints

def _fake_model_saver(tag: str):
    def save(folder):
        (folder / "config.json").write_text('{"tag": "%s"}' % tag)
        (folder / "model.safetensors").write_bytes(tag.encode())
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text(tag)
    return save


def test_checkpoints_are_atomic_pruned_and_published(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, _fake_model_saver(f"s{step}"), {"step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    # a crash mid-write leaves a .tmp folder: never taken for a checkpoint
    half = tmp_path / "checkpoints" / ".tmp-step-00000020"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step-00000015"
    assert load_train_state(latest_checkpoint(tmp_path)) == {"step": 15}
    # rewriting a step replaces it whole
    save_checkpoint(tmp_path, 15, _fake_model_saver("again"), {"step": 15, "again": True}, keep=2)
    assert load_train_state(latest_checkpoint(tmp_path))["again"] is True
    publish(latest_checkpoint(tmp_path), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"again"
    assert (tmp_path / "tokenizer" / "vocab.txt").read_text() == "again"
    assert (tmp_path / TRAIN_STATE).is_file()
    save_checkpoint(tmp_path, 20, _fake_model_saver("s20"), {"step": 20}, keep=2)
    publish(latest_checkpoint(tmp_path), tmp_path)
    assert (tmp_path / "tokenizer" / "vocab.txt").read_text() == "s20"
    assert not any(p.name.startswith((".tmp", ".old")) for p in tmp_path.iterdir())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]


def _objects(prefix: str) -> list[str]:
    """Every object under ``prefix`` (an emptied folder may still be listed by SeaweedFS: not an object)."""
    from storage import fs

    try:
        return [e.name for e in fs.list_dir(prefix, recursive=True)]
    except FileNotFoundError:
        return []


def test_checkpoints_on_s3_are_committed_by_the_pointer(s3_env, s3_prefix, tmp_path, monkeypatch):
    from pipelines.training.checkpointing import RunOutput, clear_run, publish_checkpoint
    from pipelines.training.runner import RUN_OUTPUTS
    from storage import fs
    from storage.checkpoints import POINTER, local_model, read_pointer

    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))
    out = fs.join(s3_prefix, "run")
    run = RunOutput(out)
    assert run.remote and run.work.is_relative_to(tmp_path / "cache")
    assert list_checkpoints(out) == [] and latest_checkpoint(out) is None
    for step in (5, 10, 15):
        where = run.save_checkpoint(step, _fake_model_saver(f"s{step}"), {"step": step}, keep=2)
        assert where == fs.join(out, f"checkpoints/step-{step:08d}")
    assert list_checkpoints(out) == [(10, fs.join(out, "checkpoints/step-00000010")),
                                     (15, fs.join(out, "checkpoints/step-00000015"))]
    assert _objects(fs.join(out, "checkpoints", "step-00000005")) == []              # its objects are gone
    assert [p.name for p in (run.work / "checkpoints").iterdir()] == ["step-00000015"]  # staging: newest only
    # an upload that never got its pointer (a crash mid-upload) is not a checkpoint, and the next save removes it
    fs.write_bytes(fs.join(out, "checkpoints", "step-00000020", "model.safetensors"), b"half")
    assert latest_checkpoint(out) == fs.join(out, "checkpoints/step-00000015")
    assert load_train_state(latest_checkpoint(out)) == {"step": 15}
    # rewriting a committed step: it is uncommitted while its objects change, then committed again
    run.save_checkpoint(15, _fake_model_saver("again"), {"step": 15, "again": True}, keep=2)
    assert read_pointer(out)["kept"] == [[10, "checkpoints/step-00000010"], [15, "checkpoints/step-00000015"]]
    assert not fs.exists(fs.join(out, "checkpoints", "step-00000020", "model.safetensors"))
    assert fs.read_bytes(fs.join(out, "checkpoints", "step-00000015", "model.safetensors")) == b"again"

    run.publish_final()
    assert fs.read_bytes(fs.join(out, "model.safetensors")) == b"again"
    assert fs.read_text(fs.join(out, "tokenizer", "vocab.txt")) == "again"
    assert not fs.exists(fs.join(out, TRAIN_STATE))              # the optimizer state stays in checkpoints/
    # a model path on S3 loads from a local copy of the newest checkpoint, without its optimizer state
    model = local_model(out)
    assert sorted(p.name for p in Path(model).iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert (Path(model) / "config.json").read_text() == '{"tag": "again"}'
    publish_checkpoint(fs.join(out, "checkpoints/step-00000010"), out)           # --resume at the target step
    assert fs.read_bytes(fs.join(out, "model.safetensors")) == b"s10"
    run.close()
    assert not run.work.exists()

    clear_run(out, RUN_OUTPUTS)                                   # --overwrite
    assert not fs.exists(fs.join(out, POINTER)) and list_checkpoints(out) == []
    assert _objects(out) == []
