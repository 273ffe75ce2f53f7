"""Pieces of our glip-t against the official GLIP-T's own numbers (../shared/data/official_glip/reference).

The whole forward (Swin, FPN, 6 fusion layers, head, detections) is checked by ``make reference``
(benchmarks/official_reference.py, ~2 min on CPU with a 928 MB weights file). These tests check, in a few seconds,
what can be checked without the whole network: preprocessing, tokens and positive map, the BERT text encoder and
the image side of the first fusion layer with the official-layout weights (the generator's random stream replayed
for just those keys, mapped by ``glip.convert``), and post-processing on the official raw head outputs.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import official_reference as oref
from glip import convert
from glip.config import GLIPConfig
from glip.language import load_tokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ref() -> dict:
    return oref.load_reference()


@pytest.fixture(scope="module")
def config() -> GLIPConfig:
    return GLIPConfig.preset("glip-t")


@pytest.fixture(scope="module")
def tokenizer(config):
    return load_tokenizer(config)


@pytest.fixture(scope="module")
def official_text_and_fusion0() -> dict[str, torch.Tensor]:
    """Official-layout weights of the BERT encoder and of the first fusion layer's bi-attention (seed 1)."""
    keys = [line.split("\t")[0] for line in oref.TABLE_T.read_text().splitlines()]
    wanted = [k for k in keys if k.startswith("language_backbone.") or k.startswith("rpn.head.dyhead_tower.0.")]
    return oref.official_weights_subset(wanted)


def _submodule_state(official: dict, our_prefix: str) -> dict[str, torch.Tensor]:
    """The official tensors whose converted key starts with ``our_prefix``, keyed relative to it."""
    out = {}
    for key, tensor in official.items():
        ours = convert.official_to_ours(key)
        if ours is not None and ours.startswith(our_prefix) and convert.ignore_reason(key) is None:
            out[ours[len(our_prefix):]] = tensor
    return out


def test_preprocessing_gives_the_official_network_input(ref, config):
    from PIL import Image

    from glip.preprocess import batch_images, prepare_image

    image = prepare_image(Image.open(oref.IMAGE_FILE).convert("RGB"), config)
    resized_u8_bgr = (image * 255).round().to(torch.uint8).permute(1, 2, 0)[:, :, [2, 1, 0]]
    assert torch.equal(resized_u8_bgr, ref["resized_image_u8_hwc_bgr"])      # PIL bilinear resize, 640x480->1066x800
    batch, sizes = batch_images([image], config)
    assert list(batch.shape) == ref["image_tensor_shape_padded"] and sizes == [(800, 1066)]
    assert torch.equal(batch, oref._official_input_from_u8(ref))               # BGR 0-255, mean/std, zero pad to /32
    assert float(batch.double().sum()) == ref["image_tensor_sum"]


def test_tokens_and_positive_map_match_official(ref, config, tokenizer):
    from glip.positive_map import spans_to_positive_map, tokenize

    tok = tokenize(tokenizer, [oref.CAPTION], config.max_query_len, pad_to_max=True)
    assert torch.equal(tok.input_ids, ref["input_ids"])
    assert torch.equal(tok.attention_mask, ref["attention_mask"])
    positive = spans_to_positive_map(tok.offsets[0], [[s] for s in oref.SPANS], 256).map
    assert torch.equal(positive, ref["positive_map"] > 0)


def test_text_encoder_with_official_weights_matches(ref, config, official_text_and_fusion0):
    from glip.language import LanguageBackbone, resolve_text_config

    with torch.device("meta"):  # no random init of 110M parameters: every one comes from the official weights
        encoder = LanguageBackbone(resolve_text_config(config)).eval()
    state = _submodule_state(official_text_and_fusion0, "language_backbone.")
    encoder.load_state_dict(state, strict=True, assign=True)
    embeddings = encoder.model.embeddings  # non-persistent buffers are not in a state dict: rebuild them
    for name, buf in list(embeddings.named_buffers(recurse=False)):
        fill = torch.arange(buf.shape[-1]).expand(buf.shape) if name == "position_ids" else torch.zeros(buf.shape)
        setattr(embeddings, name, fill.to(buf.dtype))
    n = int(ref["attention_mask"].sum())
    with torch.no_grad():
        hidden = encoder(ref["input_ids"][:, :n], ref["attention_mask"][:, :n])
    # the official records BERT's output as `lang_embedded_valid` (its `lang_hidden_valid` was overwritten in
    # place by the fusion tower)
    row = oref.compare("text encoder", hidden, ref["lang_embedded_valid"])
    assert row.ok, row


def test_first_fusion_layer_image_side_matches(ref, config, official_text_and_fusion0):
    """Each visual token's fused output depends only on itself and the text (it attends over the text tokens),
    so the recorded sampled tokens can be pushed through our bi-attention alone."""
    from glip.fusion import BiAttentionBlock

    block = BiAttentionBlock(config.fpn_channels, 768, config.fusion_embed_dim, config.fusion_heads,
                             config.fusion_dropout, config.layer_scale_init, clamp=config.clamp_fusion).eval()
    block.load_state_dict(_submodule_state(official_text_and_fusion0, "head.dyhead_tower.0.b_attn."), strict=True)
    visual = torch.cat(ref["fpn_sampled"])[None]                  # [1, 1820, 256]: sampled tokens of 5 levels
    text = ref["b_attn0_in_lang_valid"]
    mask = torch.ones(1, text.shape[1], dtype=torch.long)
    deltas = {}
    handle = block.attn.register_forward_hook(lambda m, a, out: deltas.update(v=out[0]))
    with torch.no_grad():
        out_v, _ = block(visual, text, mask)
    handle.remove()
    offsets = torch.tensor([0] + [s[2] * s[3] for s in ref["fpn_shapes"]]).cumsum(0)[:-1]
    flat = torch.cat([idx + off for idx, off in zip(ref["token_sample_index"], offsets)])
    assert torch.equal(flat, ref["b_attn0_mha_flat_sample_index"])
    for name, ours, official in (("delta visual", deltas["v"][0], ref["b_attn0_mha_delta_v_sampled"]),
                                 ("output visual", out_v[0], torch.cat(ref["b_attn0_out_visual_sampled"]))):
        row = oref.compare(name, ours, official)
        assert row.ok, row


@pytest.mark.parametrize("variant", ["default", "low_threshold"])
def test_postprocessing_on_official_raw_outputs_gives_official_detections(ref, config, tokenizer, variant):
    """Candidates over the threshold, per-level top 1000 (binding at the low threshold), decode with the "+1"
    convention, clip, per-phrase NMS with "+1" areas, top 100, rescale to the original image."""
    record = ref if variant == "default" else ref["low_threshold_variant"]
    threshold = config.score_threshold if variant == "default" else record["MODEL.ATSS.INFERENCE_TH"]
    per_phrase = oref.detections_from_raw(ref["dot_product_logits_valid_tokens"], ref["bbox_regression"],
                                          ref["centerness"], ref["anchors_xyxy"], config, tokenizer, threshold,
                                          (800, 1066), (640, 480))
    rows, note = oref.detection_rows(per_phrase, record["pred_before_threshold"], plus_one=True)
    assert all(r.ok for r in rows), (rows, note)
    assert sum(len(p) for p in per_phrase) == 100
