"""Caption hygiene and noun-phrase extraction with the real spaCy pipeline (loaded once)."""
from __future__ import annotations

from collections import Counter

import pytest

from labeling.phrases import (DEFAULT_MAX_CAPTION_CHARS, NEEDED_COMPONENTS, PhraseExtractor,
                              clean_caption, load_spacy, load_stoplist)


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


def check_spans(caption: str, phrases: list[dict]) -> None:
    for p in phrases:
        assert 0 <= p["start"] < p["end"] <= len(caption)
        assert caption[p["start"]:p["end"]] == p["text"], (caption, p)


# ------------------------------------------------------------------ clean_caption

@pytest.mark.parametrize("raw, clean, fixes", [
    ("a dog on a beach", "a dog on a beach", []),
    ("Tom &amp; Jerry &quot;run&quot;", 'Tom & Jerry "run"', ["html_entities"]),
    ("a cat &amp;amp; a hat", "a cat & a hat", ["html_entities"]),            # double-escaped
    ("<p>a <b>red</b> car</p><br/>", "a red car", ["html_tags", "whitespace"]),
    ("a dog<!-- tracking -->barks", "a dog barks", ["html_tags"]),
    ("a\x00 dog\x07 \u200bbarks", "a dog barks", ["control_chars"]),
    ("two\tkids\n\non  a   bench ", "two kids on a bench", ["whitespace"]),
    ("3 < 4 and 5 > 2 apples", "3 < 4 and 5 > 2 apples", []),                 # not tags
])
def test_clean_caption_fixes(raw, clean, fixes):
    counter: Counter = Counter()
    assert clean_caption(raw, fixes=counter) == (clean, None)
    assert sorted(counter) == sorted(fixes)


@pytest.mark.parametrize("raw, reason", [
    (None, "not_string"), (42, "not_string"), (b"a dog", "not_string"), (["a"], "not_string"),
    ("", "empty_caption"), ("   \n\t ", "empty_caption"), ("<br><br/>", "empty_caption"),
    ("12345 !!! ...", "no_letters"), ("&#128512; 2020", "no_letters"),
])
def test_clean_caption_skips(raw, reason):
    counter: Counter = Counter()
    assert clean_caption(raw, fixes=counter) == (None, reason)
    assert not counter                       # a skipped caption counts no fixes


def test_clean_caption_truncates_on_a_word_boundary():
    words = "a dog runs on the green grass near a lake".split()
    long = " ".join(words * 40)
    counter: Counter = Counter()
    clean, reason = clean_caption(long, fixes=counter)
    assert reason is None and counter == {"truncated": 1}
    assert len(clean) <= DEFAULT_MAX_CAPTION_CHARS and long.startswith(clean)
    assert long[len(clean)] == " "            # cut between words, never inside one
    url = "http://example.com/" + "x" * 900    # no boundary at all: hard cut
    assert len(clean_caption(url, max_chars=100)[0]) == 100


# ------------------------------------------------------------------ spaCy

def test_load_spacy_keeps_only_what_noun_chunks_need(nlp):
    assert "parser" in nlp.pipe_names and "lemmatizer" in nlp.pipe_names
    assert set(nlp.pipe_names) <= set(NEEDED_COMPONENTS)
    assert "ner" not in nlp.pipe_names
    with pytest.raises(ValueError, match="not installed"):
        load_spacy("no_such_spacy_pipeline_xyz")


def test_noun_phrases_spans_filters_and_roots(nlp):
    ex = PhraseExtractor(nlp)
    captions = [
        "A woman in a red dress is walking past two dogs near the old building.",
        "It is a picture of a dog and a cat on the left side of the photo.",
        "What is that? Someone holds a dog while a dog barks at them.",
        "  A  man's hat   on the table, which is brown.",
        "Two men in the background of a sunny day playing a game of frisbee.",
        "café Zürich — a naïve señor with a ☕ cup",
    ]
    out = ex.extract_batch(captions)
    assert len(out) == len(captions)
    for caption, phrases in zip(captions, out):
        check_spans(caption, phrases)
        assert [p["start"] for p in phrases] == sorted(p["start"] for p in phrases)
    texts = [[p["text"] for p in ps] for ps in out]
    assert texts[0] == ["A woman", "a red dress", "two dogs", "the old building"]
    assert [p["root"] for p in out[0]] == ["woman", "dress", "dog", "building"]   # lemmas
    # "a picture", "the left side", "the photo" have abstract heads; "It" is a pronoun
    assert texts[1] == ["a dog", "a cat"]
    # wh-words and pronouns dropped; the second "a dog" is a duplicate
    assert texts[2] == ["a dog"]
    assert "the table" in texts[3] and all(t.lower() != "which" for t in texts[3])
    assert texts[4] == ["Two men", "frisbee"]     # background / day / game are stoplisted
    assert texts[5] == ["café Zürich", "a naïve señor", "a ☕ cup"]   # non-ASCII offsets exact


def test_referring_expressions_are_exact_and_not_nested(nlp):
    ex = PhraseExtractor(nlp, expressions=True)
    captions = ["A woman in a red dress is walking past two dogs.",
                "A boy jumps off a rock into the water in front of a crowd of people.",
                "A black dog and a spotted dog are fighting"]
    out = ex.extract_batch(captions)
    for caption, phrases in zip(captions, out):
        check_spans(caption, phrases)
        spans = [(p["start"], p["end"]) for p in phrases]
        for a in spans:   # GRIT: a phrase inside another kept expression is dropped
            assert not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in spans)
    assert out[0][0] == {"text": "A woman in a red dress", "start": 0, "end": 22, "root": "woman"}
    assert "a crowd of people" in [p["text"] for p in out[1]]
    # expressions never cross a conjunction of nouns: two separate dogs
    assert [p["text"] for p in out[2]] == ["A black dog", "a spotted dog"]
    # ... but conjoined verbs describe the same referent
    assert [p["text"] for p in ex.extract("A man sitting and reading on a bench")] == \
        ["A man sitting and reading on a bench"]


def test_expressions_never_cut_a_noun_phrase_on_real_captions(nlp, flickr_captions):
    ex = PhraseExtractor(nlp, expressions=True)
    captions = flickr_captions[5000:5300]
    for caption, doc, phrases in zip(captions, nlp.pipe(captions), ex.extract_batch(captions)):
        check_spans(caption, phrases)
        chunks = [(c.start_char, c.end_char) for c in doc.noun_chunks]
        for p in phrases:
            assert not any(s < p["start"] < e or s < p["end"] < e for s, e in chunks), (caption, p)


def test_stoplist_file_is_documented_and_overridable(nlp, tmp_path):
    words = load_stoplist()
    assert {"background", "picture", "front", "day"} <= words
    assert not {"dog", "group", "water", "sky"} & words        # concrete things stay
    custom = tmp_path / "stop.txt"
    custom.write_text("# only dogs are abstract here\ndog\n\n")
    ex = PhraseExtractor(nlp, stoplist=load_stoplist(custom))
    assert [p["text"] for p in ex.extract("a dog near the background")] == ["the background"]
