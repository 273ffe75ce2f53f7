"""Character spans -> token indices: the one span-to-token mapper, used by training and inference.

A token belongs to a span [start, end) (end exclusive, characters of the caption) when its character range from
the fast tokenizer's offset mapping overlaps the span; special and padding tokens never do. This is right for word
pieces ("skateboarder" -> skate ##board ##er), punctuation inside a span, multi-span phrases (union of the spans)
and spans starting or ending on whitespace (the official ``char_to_token`` search with +-1/2 fallbacks finds the
same tokens). Truncation at ``max_query_len``: a span none of whose characters survive is dropped and counted in
``dropped_spans``; a span cut in the middle keeps its surviving tokens and is counted in ``truncated_spans``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokenized:
    """A tokenized caption batch: ``input_ids``/``attention_mask`` LongTensor[B, T]; ``offsets`` per caption a list
    of (start, end) character ranges per token, (0, 0) for special/padding tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]
    truncated_at: list[int | None]   # per caption: first character lost to truncation, None if nothing was cut


@dataclass
class PositiveMap:
    """``map`` BoolTensor[N, T]: row i marks the tokens of item i (a box or a phrase); counts of spans lost."""

    map: torch.Tensor
    dropped_spans: int = 0
    truncated_spans: int = 0
    empty_spans: int = 0


def tokenize(tokenizer, captions: list[str], max_len: int, pad_to_max: bool = False) -> Tokenized:
    """Tokenize with truncation at ``max_len`` tokens (special tokens included)."""
    enc = tokenizer(list(captions), max_length=max_len, truncation=True,
                    padding="max_length" if pad_to_max else "longest", return_offsets_mapping=True,
                    return_special_tokens_mask=True, return_tensors="pt")
    offsets, truncated_at = [], []
    for caption, offs, special in zip(captions, enc["offset_mapping"].tolist(), enc["special_tokens_mask"].tolist()):
        per_token = [(0, 0) if s else (int(a), int(b)) for (a, b), s in zip(offs, special)]
        offsets.append(per_token)
        kept_end = max((b for _, b in per_token), default=0)
        truncated_at.append(kept_end if caption[kept_end:].strip() else None)
    return Tokenized(enc["input_ids"], enc["attention_mask"], offsets, truncated_at)


def spans_to_positive_map(offsets: list[tuple[int, int]], spans_per_item: list[list[tuple[int, int]]],
                          num_tokens: int | None = None, truncated_at: int | None = None) -> PositiveMap:
    """Mark, for each item (a box or a phrase), the tokens overlapping any of its character spans.

    Args:
        offsets: (start, end) characters per token of ONE caption; (0, 0) for special tokens.
        spans_per_item: per item a list of (start, end) character spans, end exclusive.
        num_tokens: width T of the map (default: len(offsets)).
        truncated_at: first character lost to truncation (``Tokenized.truncated_at``), None when nothing was cut.
    """
    width = num_tokens if num_tokens is not None else len(offsets)
    real = [(i, a, b) for i, (a, b) in enumerate(offsets) if b > a]
    result = PositiveMap(torch.zeros(len(spans_per_item), width, dtype=torch.bool))
    for row, spans in enumerate(spans_per_item):
        for start, end in spans:
            start, end = int(start), int(end)
            hits = [i for i, a, b in real if a < end and b > start and i < width]
            cut = truncated_at is not None and end > truncated_at
            if hits:
                result.map[row, hits] = True
                result.truncated_spans += int(cut)
            elif cut:
                result.dropped_spans += 1
            else:
                result.empty_spans += 1
    return result


def phrase_token_lists(positive: PositiveMap) -> list[list[int]]:
    """Per row, the token indices (ascending) it covers."""
    return [row.nonzero().flatten().tolist() for row in positive.map]
