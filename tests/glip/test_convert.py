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


# ----------------------------------------------------------------------------------------------- whole model

EXPECTED_IGNORED = {"rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias",
                    "language_backbone.body.model.embeddings.position_ids",
                    *(f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5))}


@pytest.fixture(scope="module")
def our_keys() -> dict[str, dict[str, torch.Tensor]]:
    """Our glip-t and glip-l state dicts on the meta device (names, shapes, dtypes)."""
    from glip import GLIP

    out = {}
    with torch.device("meta"):
        for preset in ("glip-t", "glip-l"):
            out[preset] = GLIP.from_preset(preset).state_dict()
    return out


@pytest.mark.parametrize("table,preset", [("glip_t_state_dict.tsv", "glip-t"), ("glip_l_state_dict.tsv", "glip-l")])
def test_every_official_key_is_consumed_or_named_and_every_param_filled(table, preset, our_keys):
    official = official_state_dict(table)
    ours = our_keys[preset]
    converted, report = convert.convert_state_dict(official, ours, preset=preset)
    assert report.ok, report.problems()
    assert set(report.consumed) | set(report.ignored) == set(official)
    assert set(report.ignored) == EXPECTED_IGNORED
    assert all(report.ignored.values())                      # each with its reason
    assert report.not_filled == [] and set(converted) == set(ours)
    assert len(set(report.consumed.values())) == len(report.consumed)   # one official tensor per key of ours
    for key, our_key in report.consumed.items():
        assert converted[our_key].shape == ours[our_key].shape, key
    # the fusion tower: official flat (b_attn, BERT layer, DyConv) triples -> our FusionLayer parts
    assert report.consumed["rpn.head.dyhead_tower.4.attention.self.query.weight"] == \
        "head.dyhead_tower.1.text_layer.attention.self.query.weight"
    assert report.consumed["rpn.head.dyhead_tower.5.offset.weight"] == "head.dyhead_tower.1.image_layer.offset.weight"
    assert report.consumed["rpn.head.dyhead_tower.3.b_attn.gamma_v"] == "head.dyhead_tower.1.b_attn.gamma_v"
    assert report.consumed["backbone.body.layers.2.blocks.5.mlp.fc2.weight"] == \
        "backbone.body.layers.2.blocks.5.mlp.3.weight"
    assert report.consumed["language_backbone.body.model.encoder.layer.11.output.dense.bias"] == \
        "language_backbone.model.encoder.layer.11.output.dense.bias"


def test_pooler_reported_and_position_ids_optional(our_keys):
    official = official_state_dict("glip_t_state_dict.tsv")
    official["language_backbone.body.model.pooler.dense.weight"] = torch.empty(768, 768, device="meta")
    official["language_backbone.body.model.pooler.dense.bias"] = torch.empty(768, device="meta")
    del official["language_backbone.body.model.embeddings.position_ids"]      # files from transformers >= 4.31
    _, report = convert.convert_state_dict(official, our_keys["glip-t"], preset="glip-t")
    assert report.ok
    assert "pooler" in report.ignored["language_backbone.body.model.pooler.dense.weight"]


def test_refuses_wrong_shape_unless_partial(our_keys):
    official = official_state_dict("glip_t_state_dict.tsv")
    bad = "rpn.head.dyhead_tower.6.b_attn.attn.v_proj.weight"
    official[bad] = torch.empty(1024, 256, device="meta")
    with pytest.raises(InputError, match=r"dyhead_tower\.6\.b_attn\.attn\.v_proj\.weight.*\[1024, 256\]"):
        convert.convert_state_dict(official, our_keys["glip-t"], source="x.pth", preset="glip-t")
    converted, report = convert.convert_state_dict(official, our_keys["glip-t"], preset="glip-t", allow_partial=True)
    assert not report.ok and list(report.mismatched) == [bad]
    assert report.not_filled == ["head.dyhead_tower.2.b_attn.attn.v_proj.weight"]
    assert "head.dyhead_tower.2.b_attn.attn.v_proj.weight" not in converted


def test_refuses_missing_and_unknown_keys_unless_partial(our_keys):
    official = official_state_dict("glip_t_state_dict.tsv")
    del official["backbone.fpn.fpn_layer3.bias"]
    official["rpn.head.token_logits.weight"] = torch.empty(256, 256, 1, 1, device="meta")   # an unknown extra
    with pytest.raises(InputError, match="not filled"):
        convert.convert_state_dict(official, our_keys["glip-t"], preset="glip-t")
    _, report = convert.convert_state_dict(official, our_keys["glip-t"], preset="glip-t", allow_partial=True)
    assert report.not_filled == ["backbone.fpn.fpn_layer3.bias"]
    assert list(report.unmapped) == ["rpn.head.token_logits.weight"]
    assert "token_logits" in report.unmapped["rpn.head.token_logits.weight"]
    text = report.to_json()
    assert "backbone.fpn.fpn_layer3.bias" in text and '"ok": false' in text


def test_glip_t_file_refused_as_glip_l(our_keys):
    _, report = convert.convert_state_dict(official_state_dict("glip_t_state_dict.tsv"), our_keys["glip-l"],
                                           preset="glip-l", allow_partial=True)
    assert report.mismatched and report.not_filled


# ----------------------------------------------------------------------------------------------- CLI

def _tiny_official_file(path: Path, table: str, edit=None) -> Path:
    """An official-layout checkpoint of the table's shapes that takes a few KB: every tensor is one stored
    value expanded (stride 0), prefixed ``module.`` under ``model`` as the official trainer saves it."""
    sd = {}
    for key, shape, dtype in official_table(table):
        dt = getattr(torch, dtype)
        sd[key] = torch.zeros(1, dtype=dt).reshape([1] * len(shape)).expand(shape) if shape else torch.zeros((), dtype=dt)
    if edit:
        edit(sd)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "iteration": 7}, path)
    return path


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_cli_refuses_bad_inputs_with_exit_2(cli, tmp_path):
    result = cli("convert-official", tmp_path / "missing.pth", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no such checkpoint" in said(result)
    torch.save({"model": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    result = cli("convert-official", tmp_path / "resnet.pth", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "not an official GLIP" in said(result)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    result = cli("convert-official", tmp_path / "junk.pth", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "cannot read checkpoint" in said(result)
    result = cli("convert-official", tmp_path / "junk.pth", "--out", tmp_path / "out", "--preset", "glip-x")
    assert result.exit_code == 2 and "--preset" in said(result)


def test_cli_names_the_mismatched_key_and_writes_nothing(cli, tmp_path):
    bad = "backbone.body.layers.1.blocks.0.attn.qkv.weight"
    path = _tiny_official_file(tmp_path / "glip_t.pth", "glip_t_state_dict.tsv",
                               edit=lambda sd: sd.__setitem__(bad, torch.zeros(1, 1).expand(576, 96)))
    assert path.stat().st_size < 2_000_000
    result = cli("convert-official", path, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert bad in said(result) and "[576, 96]" in said(result) and "--allow-partial" in said(result)
    assert not (tmp_path / "out").exists()
    result = cli("convert-official", path, "--out", tmp_path / "out", "--preset", "glip-l")
    assert result.exit_code == 2 and "looks like glip-t" in said(result)
