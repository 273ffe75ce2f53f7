"""Character spans -> token indices through the fast tokenizer's offsets (word pieces, multi-span, truncation)."""
from __future__ import annotations

import pytest

from glip.config import GLIPConfig
from glip.language import load_tokenizer
from glip.positive_map import phrase_token_lists, spans_to_positive_map, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(GLIPConfig.preset("tiny"))


def tokens_of(tokenizer, caption, spans_per_item, max_len=64):
    tok = tokenize(tokenizer, [caption], max_len)
    pm = spans_to_positive_map(tok.offsets[0], spans_per_item, tok.input_ids.shape[1], tok.truncated_at[0])
    pieces = tokenizer.convert_ids_to_tokens(tok.input_ids[0])
    return [[pieces[i] for i in row] for row in phrase_token_lists(pm)], pm


def test_word_pieces_are_all_marked(tokenizer):
    caption = "A skateboarder jumps over a wall."
    start = caption.index("skateboarder")
    rows, pm = tokens_of(tokenizer, caption, [[(start, start + len("skateboarder"))]])
    assert rows == [["skate", "##board", "##er"]]
    assert (pm.dropped_spans, pm.truncated_spans, pm.empty_spans) == (0, 0, 0)


def test_multi_span_phrase_is_the_union(tokenizer):
    caption = "a man and a woman hold a red umbrella"
    man, umbrella = caption.index("man"), caption.index("red umbrella")
    rows, _ = tokens_of(tokenizer, caption, [[(man, man + 3), (umbrella, umbrella + 12)], [(0, 1)]])
    assert rows == [["man", "red", "umbrella"], ["a"]]


def test_punctuation_inside_a_span_and_not_outside(tokenizer):
    caption = "the red-brick wall, by the sea."
    span = (caption.index("red-brick wall"), caption.index("red-brick wall") + len("red-brick wall"))
    rows, _ = tokens_of(tokenizer, caption, [[span]])
    assert rows == [["red", "-", "brick", "wall"]]  # the comma after "wall" is not part of the phrase


def test_spans_with_surrounding_whitespace_find_the_same_tokens(tokenizer):
    caption = "two dogs  run"
    rows, _ = tokens_of(tokenizer, caption, [[(3, 10)]])  # " dogs  " with spaces on both sides
    assert rows == [["dogs"]]


def test_truncation_drops_and_counts_spans_past_the_limit(tokenizer):
    caption = "a cat sits on a mat near a dog and a bird"
    cat = caption.index("cat")
    bird = caption.index("bird")
    near = caption.index("near a dog")
    # 8 tokens: [CLS] a cat sits on a mat [SEP]
    rows, pm = tokens_of(tokenizer, caption,
                         [[(cat, cat + 3)], [(bird, bird + 4)], [(0, 1), (bird, bird + 4)], [(4, near + 4)]],
                         max_len=8)
    assert rows[0] == ["cat"]
    assert rows[1] == []                     # wholly past the limit: dropped, not mis-assigned
    assert rows[2] == ["a"]                  # its second span is dropped, the first kept
    assert rows[3] == ["cat", "sits", "on", "a", "mat"]  # cut in the middle: surviving tokens kept
    assert pm.dropped_spans == 2 and pm.truncated_spans == 1
    assert pm.map.shape == (4, 8)
    assert not pm.map[:, 0].any() and not pm.map[:, -1].any()  # never [CLS] / [SEP]


def test_a_span_of_only_spaces_is_empty_not_dropped(tokenizer):
    caption = "a   cat"
    rows, pm = tokens_of(tokenizer, caption, [[(2, 4)]])
    assert rows == [[]] and pm.empty_spans == 1 and pm.dropped_spans == 0
