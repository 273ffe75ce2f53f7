"""glip-t built on the meta device (no memory, no time): official sizes, parameter count, forward shapes; and the
offline tokenizer is bert-base-uncased's vocabulary."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glip import GLIP, GLIPConfig
from glip.language import load_tokenizer, minilm_dir

OFFICIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "official_glip"
OFFICIAL_GLIP_T_PARAMETERS = 231_780_222
OFFICIAL_LEGACY_CLS_LOGITS = 80 * 256 + 80   # rpn.head.cls_logits: built by the official code, unused in grounding


@pytest.fixture(scope="module")
def glip_t():
    with torch.device("meta"):
        return GLIP.from_preset("glip-t", text_pretrained=False)


def test_parameter_count_matches_official(glip_t):
    ours = sum(p.numel() for p in glip_t.parameters())
    assert abs(ours - OFFICIAL_GLIP_T_PARAMETERS) / OFFICIAL_GLIP_T_PARAMETERS < 0.01
    assert ours == OFFICIAL_GLIP_T_PARAMETERS - OFFICIAL_LEGACY_CLS_LOGITS   # exactly: only cls_logits is left out


def test_parameter_count_per_official_prefix(glip_t):
    """The README's per-prefix counts of the official GLIP-T, module by module."""
    def count(prefix):
        return sum(p.numel() for n, p in glip_t.named_parameters() if n.startswith(prefix))
    assert count("backbone.body.") == 27_520_506
    assert count("backbone.fpn.") == 3_295_232
    assert count("language_backbone.") == 108_891_648
    assert count("head.dyhead_tower.") == 91_853_352


def test_official_sizes(glip_t):
    cfg = glip_t.config
    assert (cfg.max_query_len, cfg.min_size, cfg.max_size, cfg.num_levels) == (256, 800, 1333, 5)
    assert len(glip_t.head.dyhead_tower) == 6
    attn = glip_t.head.dyhead_tower[0].b_attn.attn
    assert (attn.embed_dim, attn.num_heads) == (2048, 8)
    assert cfg.text_config["hidden_size"] == 768 and cfg.text_config["num_hidden_layers"] == 12


def test_forward_shapes_on_meta(glip_t):
    images = [torch.empty(3, 800, 1066, device="meta"), torch.empty(3, 600, 900, device="meta")]
    out = glip_t(images, ["a red ball and a blue box.", "a cat"])
    t = out.tokenized.input_ids.shape[1]
    for level, stride in enumerate((8, 16, 32, 64, 128)):
        h, w = -(-800 // stride), -(-1088 // stride)
        assert out.head.box_regression[level].shape == (2, 4, h, w)
        assert out.head.centerness[level].shape == (2, 1, h, w)
        assert out.head.token_logits[level].shape == (2, h * w, t)


def test_glip_l_sizes_and_parameter_count():
    cfg = GLIPConfig.preset("glip-l")
    sizes = (cfg.swin_embed_dim, cfg.swin_depths, cfg.swin_window_size, cfg.num_fusion_layers)
    assert sizes == (192, (2, 2, 18, 2), 12, 8)
    with torch.device("meta"):
        glip_l = GLIP.from_preset("glip-l", text_pretrained=False)
    official_glip_l = 430_422_384   # official_glip/README.md
    assert sum(p.numel() for p in glip_l.parameters()) == official_glip_l - OFFICIAL_LEGACY_CLS_LOGITS


def test_offline_vocabulary_is_bert_base_uncased():
    vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 30522
    # ids every bert-base-uncased user knows
    known = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "the": 1996,
             "a": 1037, "and": 1998, "dog": 3899, "cat": 4937}
    assert {word: vocab.index(word) for word in known} == known
    tok = load_tokenizer(GLIPConfig.preset("glip-t"))
    assert tok("A Dog.")["input_ids"] == [101, 1037, 3899, 1012, 102]
