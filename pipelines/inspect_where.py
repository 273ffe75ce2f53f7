"""``glipctl inspect --where``: a small, safe filter language over the box view.

Grammar (no ``eval``; every name must be a known column)::

    expr    := and_expr ("or" and_expr)*
    and_expr:= not_expr ("and" not_expr)*
    not_expr:= "not" not_expr | "(" expr ")" | test
    test    := COLUMN OP LITERAL | COLUMN "contains" STRING | COLUMN "in" "(" LITERAL ("," LITERAL)* ")"
    OP      := "==" | "=" | "!=" | "<" | "<=" | ">" | ">="
    LITERAL := number | 'string' | "string" | true | false

Columns are those of the box view (``key``, ``phrase``, ``source``, ``file``,
``score``, ``box_index``) plus ``x``, ``y``, ``w``, ``h`` (the bbox, pixels) and
``area`` (w * h). Example: ``score >= 0.6 and (phrase contains "dog" or w > 100)``.

``compile_where(text)`` returns a function ``RecordBatch -> BooleanArray`` built from
``pyarrow.compute`` calls; mistakes are ``InputError`` (exit 2) with the position.
Parentheses and ``not`` nest at most ``MAX_DEPTH`` levels (together): the parser and the
compiled predicate recurse once per level, so a hostile filter (hundreds of ``(``) is an
``InputError`` naming the limit, not a ``RecursionError``.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import InputError

Predicate = Callable[[pa.RecordBatch], pa.Array]

MAX_DEPTH = 100     # nested "(" and "not" levels; each costs ~3 parser frames and 1 predicate frame

STRING_COLUMNS = ("key", "phrase", "source", "file")
NUMBER_COLUMNS = ("score", "box_index", "x", "y", "w", "h", "area")
_BBOX_INDEX = {"x": 0, "y": 1, "w": 2, "h": 3}
_COMPARE = {"==": pc.equal, "=": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal,
            ">": pc.greater, ">=": pc.greater_equal}
_TOKEN = re.compile(r"""\s*(?:
      (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<op>==|!=|<=|>=|=|<|>)
    | (?P<punct>[(),])
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""", re.VERBOSE)


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise InputError(f"--where: cannot read {text[pos:].strip()[:20]!r} at position {pos}")
        kind = m.lastgroup
        raw = m.group(kind)
        at = m.start(kind)
        if kind == "number":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "string":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1])
        elif kind == "name" and raw.lower() in ("and", "or", "not", "contains", "in", "true", "false"):
            kind, value = "keyword", raw.lower()
        else:
            value = raw
        tokens.append((kind, value, at))
        pos = m.end()
    return tokens


def column(batch: pa.RecordBatch, name: str) -> pa.Array:
    """The values of a --where column in ``batch`` (derived bbox columns computed here)."""
    if name in _BBOX_INDEX:
        return pc.list_element(batch.column("bbox"), _BBOX_INDEX[name])
    if name == "area":
        return pc.multiply(column(batch, "w"), column(batch, "h"))
    return batch.column(name)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def error(self, message: str) -> InputError:
        at = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return InputError(f"--where: {message} at position {at} in {self.text!r}")

    def peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            want = value if value is not None else kind
            got = "the end" if tok is None else repr(tok[1])
            raise self.error(f"expected {want}, found {got}")
        self.i += 1
        return tok[1]

    def at(self, kind: str, value: Any) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == kind and tok[1] == value

    def parse(self) -> Predicate:
        if not self.tokens:
            raise InputError("--where: empty expression")
        pred = self.expr()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()[1]!r}")
        return pred

    def expr(self) -> Predicate:
        parts = [self.and_expr()]
        while self.at("keyword", "or"):
            self.i += 1
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else _fold(pc.or_kleene, parts)

    def and_expr(self) -> Predicate:
        parts = [self.not_expr()]
        while self.at("keyword", "and"):
            self.i += 1
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else _fold(pc.and_kleene, parts)

    def _deeper(self) -> None:
        """Enter one more "(" or "not" level; refuse past ``MAX_DEPTH`` (before Python's own limit)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            at = self.tokens[self.i][2]
            raise InputError(f"--where: parentheses and 'not' nest deeper than {MAX_DEPTH} levels "
                             f"(at position {at} of {len(self.text)} characters)")

    def not_expr(self) -> Predicate:
        if self.at("keyword", "not"):
            self._deeper()
            self.i += 1
            inner = self.not_expr()
            self.depth -= 1
            return lambda b: pc.invert(inner(b))
        if self.at("punct", "("):
            self._deeper()
            self.i += 1
            inner = self.expr()
            self.take("punct", ")")
            self.depth -= 1
            return inner
        return self.test()

    def literal(self) -> Any:
        tok = self.peek()
        if tok is None:
            raise self.error("expected a value, found the end")
        if tok[0] in ("number", "string"):
            self.i += 1
            return tok[1]
        if tok[0] == "keyword" and tok[1] in ("true", "false"):
            self.i += 1
            return tok[1] == "true"
        raise self.error(f"expected a number or a quoted string, found {tok[1]!r}")

    def test(self) -> Predicate:
        name = self.take("name")
        if name not in STRING_COLUMNS + NUMBER_COLUMNS:
            self.i -= 1
            raise self.error(f"unknown column {name!r} (columns: {', '.join(STRING_COLUMNS + NUMBER_COLUMNS)})")
        is_text = name in STRING_COLUMNS
        if self.at("keyword", "contains"):
            self.i += 1
            needle = self.literal()
            if not is_text or not isinstance(needle, str):
                raise self.error(f"'contains' needs a text column and a quoted string (column {name!r})")
            return lambda b: pc.match_substring(column(b, name), needle)
        if self.at("keyword", "in"):
            self.i += 1
            self.take("punct", "(")
            values = [self._checked(name, is_text, self.literal())]
            while self.at("punct", ","):
                self.i += 1
                values.append(self._checked(name, is_text, self.literal()))
            self.take("punct", ")")
            value_set = pa.array(values, pa.string() if is_text else pa.float64())
            return lambda b: pc.is_in(column(b, name), value_set=value_set)
        op = self.take("op") if self.peek() and self.peek()[0] == "op" else None
        if op is None:
            raise self.error(f"expected a comparison after {name!r} (==, !=, <, <=, >, >=, contains, in)")
        value = self._checked(name, is_text, self.literal())
        compare = _COMPARE[op]
        return lambda b: compare(column(b, name), value)

    def _checked(self, name: str, is_text: bool, value: Any) -> Any:
        if is_text != isinstance(value, str) or isinstance(value, bool):
            self.i -= 1
            kind = "a quoted string" if is_text else "a number"
            raise self.error(f"column {name!r} compares with {kind}, not {value!r}")
        return value


def _fold(fn, parts: list[Predicate]) -> Predicate:
    def run(batch: pa.RecordBatch) -> pa.Array:
        out = parts[0](batch)
        for p in parts[1:]:
            out = fn(out, p(batch))
        return out
    return run


def compile_where(text: str) -> Predicate:
    """Parse ``text`` into ``batch -> BooleanArray`` (nulls count as False when filtering)."""
    pred = _Parser(text).parse()
    return lambda batch: pc.fill_null(pred(batch), False)
