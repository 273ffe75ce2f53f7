"""The official-checkpoint converter (glip.convert) on state dicts with the official key names and shapes.

The key tables in ../shared/data/official_glip are read from the official repo's own model; tensors here are on
the meta device (names, shapes and dtypes only) unless a value check needs real ones.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glip import convert
from storage.errors import InputError

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "official_glip"


def official_table(name: str) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) rows of an official state-dict table, in state-dict order."""
    rows = []
    for line in (OFFICIAL / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, [int(s) for s in shape.split(",")] if shape else [], dtype))
    return rows


def official_state_dict(name: str, device: str = "meta") -> dict[str, torch.Tensor]:
    """An official-layout state dict (no ``module.`` prefix) with empty tensors of the table's shapes."""
    return {key: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            for key, shape, dtype in official_table(name)}


def test_tables_hold_the_documented_counts():
    t, l = official_table("glip_t_state_dict.tsv"), official_table("glip_l_state_dict.tsv")
    assert (len(t), len(l)) == (746, 1022)
    params_t = sum(torch.Size(s).numel() for k, s, d in t if d == "float32" and "cell_anchors" not in k)
    assert params_t == 231_780_222  # README: GLIP-T parameters (float32 entries minus the anchor buffers)


@pytest.mark.parametrize("table,preset", [("glip_t_state_dict.tsv", "glip-t"), ("glip_l_state_dict.tsv", "glip-l")])
def test_every_official_swin_key_lands_on_our_swin(table, preset):
    """Swin keys map one-to-one onto our Swin body (torchvision blocks in the official tree), shapes fitting."""
    from glip.backbone import SwinBody
    from glip.config import GLIPConfig

    with torch.device("meta"):
        body = SwinBody(GLIPConfig.preset(preset))
    ours = body.state_dict()
    mapped = {}
    for key, tensor in official_state_dict(table).items():
        if not key.startswith("backbone.body."):
            continue
        our_key = convert.official_to_ours(key)
        assert our_key is not None and our_key.startswith("backbone.body."), key
        our_key = our_key[len("backbone.body."):]
        assert our_key in ours, (key, our_key)
        fitted, problem = convert._fit(key, tensor, ours[our_key])
        assert problem is None, (key, problem)
        mapped[our_key] = key
    assert set(mapped) == set(ours)


def test_relative_position_index_is_flattened_and_checked():
    from torchvision.models.swin_transformer import SwinTransformerBlock

    ours = SwinTransformerBlock(96, 3, [7, 7], [0, 0]).state_dict()["attn.relative_position_index"]
    official_index = ours.reshape(49, 49).clone()
    fitted, problem = convert._fit("backbone.body.layers.0.blocks.0.attn.relative_position_index",
                                   official_index, ours)
    assert problem is None and torch.equal(fitted, ours)


def test_module_prefix_stripped_only_when_every_key_has_it():
    a = {"module.x": torch.zeros(1), "module.y": torch.zeros(1)}
    assert set(convert.strip_module_prefix(a)) == {"x", "y"}
    b = {"module.x": torch.zeros(1), "y": torch.zeros(1)}
    assert set(convert.strip_module_prefix(b)) == {"module.x", "y"}
    wrapped = {"model": a, "iteration": 5, "optimizer": {}}
    assert set(convert.extract_state_dict(wrapped)) == {"x", "y"}
    assert set(convert.extract_state_dict(a)) == {"x", "y"}   # a bare state dict
    with pytest.raises(InputError):
        convert.extract_state_dict({"iteration": 3})


def test_detect_preset_from_swin_width():
    assert convert.detect_preset(official_state_dict("glip_t_state_dict.tsv")) == "glip-t"
    assert convert.detect_preset(official_state_dict("glip_l_state_dict.tsv")) == "glip-l"
    with pytest.raises(InputError, match="not an official GLIP"):
        convert.detect_preset({"backbone.body.conv1.weight": torch.zeros(1)})


def test_ignored_buffers_are_value_checked():
    assert convert._check_ignored("language_backbone.body.model.embeddings.position_ids",
                                  torch.arange(512).reshape(1, 512)) is None
    assert convert._check_ignored("language_backbone.body.model.embeddings.position_ids",
                                  torch.arange(512).flip(0).reshape(1, 512)) is not None
    for level in range(5):
        good = convert._expected_cell_anchor(level)
        assert convert._check_ignored(f"rpn.anchor_generator.cell_anchors.{level}", good) is None
        assert convert._check_ignored(f"rpn.anchor_generator.cell_anchors.{level}", good * 2) is not None
    # level 0 of the official ATSS generator: stride 8, size 64, centred at 3.5
    assert convert._expected_cell_anchor(0).tolist() == [[-28.0, -28.0, 35.0, 35.0]]
