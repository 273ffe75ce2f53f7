"""Tiny random transformers zero-shot detectors, saved like hub checkpoints (model + processor), for tests.

Nothing is downloaded: Grounding DINO and MM Grounding DINO get a tokenizer built from the MiniLM package's
BERT vocabulary (the bert-base-uncased vocabulary, so the models' hard-coded [CLS]/[SEP]/"."/"?" ids hold);
OWLv2 a byte-level CLIP tokenizer whose vocabulary is the 256 byte symbols (plus end-of-word forms and the two
specials) and no merges, written into the folder. Widths, layers and queries are a few each, so a forward pass
on a 64-96 px image takes milliseconds. Some output layers are rescaled after the random init so that scores
spread over (0, 1) and boxes have a size, instead of the saturated scores and degenerate boxes of a raw init.
"""
from __future__ import annotations

from pathlib import Path

GDINO_SIZE = {"shortest_edge": 64, "longest_edge": 96}
GDINO_TEXT_LEN = 32          # max_text_len: captions over it are split into prompts
OWL_SIDE = 96                # the OWLv2 square input (6 x 6 patches of 16 px)
OWL_TEXT_LEN = 32            # tokens per OWLv2 query (the text model's positions)


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from glip.language import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def build_gdino(out: str | Path, model_type: str = "grounding-dino", seed: int = 0) -> Path:
    """A tiny (MM) Grounding DINO with a ResNet backbone and a 1-layer BERT, saved with its processor."""
    import torch
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, MMGroundingDinoConfig,
                              MMGroundingDinoForObjectDetection, ResNetConfig)

    out = Path(out)
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage2", "stage3", "stage4"])
    sizes = dict(backbone_config=backbone, text_config=text, num_queries=24, encoder_layers=1, decoder_layers=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=32, encoder_attention_heads=2,
                 decoder_attention_heads=2, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2,
                 max_text_len=GDINO_TEXT_LEN)
    config_cls, model_cls = {"grounding-dino": (GroundingDinoConfig, GroundingDinoForObjectDetection),
                             "mm-grounding-dino": (MMGroundingDinoConfig, MMGroundingDinoForObjectDetection)}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**sizes)).eval()
    with torch.no_grad():   # token logits are dot products of decoder and text features: spread them over ~[-3, 3]
        model.model.decoder.layer_norm.weight.mul_(0.2)
        for head in model.class_embed:
            if hasattr(head, "bias"):                 # MM Grounding DINO's prior bias (about -4.6)
                head.bias.zero_()
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=dict(GDINO_SIZE)),
                                       tokenizer=_minilm_tokenizer())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def clip_byte_tokenizer(model_max_length: int = OWL_TEXT_LEN):
    """A CLIP tokenizer over the 256 byte symbols, their end-of-word forms and the specials, no merges
    (every word is spelt out); ``"!"`` (id 0) pads, as in the OWLv2 checkpoints."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], pad_token="!",
                         model_max_length=model_max_length)


def build_owlv2(out: str | Path, seed: int = 0) -> Path:
    """A tiny OWLv2 (1-layer ViT on 96 px, 16 px patches; 1-layer text transformer), saved with its processor."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    out = Path(out)
    tokenizer = clip_byte_tokenizer()
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=OWL_TEXT_LEN,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=OWL_SIDE, patch_size=16),
        projection_dim=32)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        model.box_head.dense2.weight.mul_(0.002)     # boxes near their patch's prior (a patch-sized box)
        model.box_head.dense2.bias.zero_()
        model.class_head.logit_scale.weight.mul_(0.1)
        model.class_head.logit_shift.weight.mul_(0.1)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": OWL_SIDE, "width": OWL_SIDE}),
                               tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
