"""Phrase files: Parquet, one per input shard, the output of ``parse-captions``.

Columns (DESIGN.md): ``key, caption, phrases (list<struct<text,start,end,root>>), url,
width, height, source_shard, source_index``. Phrase spans are character offsets into
``caption``, end exclusive; ``root`` is the phrase's syntactic head word.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage import fs

PHRASE_STRUCT = pa.struct([
    ("text", pa.string()),
    ("start", pa.int32()),
    ("end", pa.int32()),
    ("root", pa.string()),
])

PHRASE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("phrases", pa.list_(PHRASE_STRUCT)),
    ("url", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source_shard", pa.string()),
    ("source_index", pa.int64()),
])


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """Fill absent optional columns with None and phrase ``root`` likewise."""
    out = {name: row.get(name) for name in PHRASE_SCHEMA.names}
    out["phrases"] = [{"text": p["text"], "start": int(p["start"]), "end": int(p["end"]),
                       "root": p.get("root")} for p in (row.get("phrases") or [])]
    return out


def write_phrase_file(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with PHRASE_SCHEMA's columns) to ``path`` atomically.

    An empty ``rows`` still writes a valid file with the schema, so a shard whose
    every caption was skipped is visibly done.
    """
    write_phrase_table(path, pa.Table.from_pylist([_normalise(r) for r in rows], schema=PHRASE_SCHEMA))


def read_phrase_file(path: str | os.PathLike) -> pa.Table:
    """The whole phrase file as a table with PHRASE_SCHEMA."""
    return pq.read_table(fs.open_input_file(path), schema=PHRASE_SCHEMA)


def iter_phrase_rows(path: str | os.PathLike, batch_size: int = 2048) -> Iterator[dict[str, Any]]:
    """Stream the rows of a phrase file as dicts (one record batch in memory at a time)."""
    pf = pq.ParquetFile(fs.open_input_file(path))
    for batch in pf.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def write_phrase_table(path: str | os.PathLike, table: pa.Table) -> None:
    """Write an Arrow table already in PHRASE_SCHEMA to ``path`` atomically.

    The columnar twin of ``write_phrase_file`` for producers that hold Arrow batches
    (parse-captions): no round trip through Python dicts.
    """
    table = table.select(PHRASE_SCHEMA.names).cast(PHRASE_SCHEMA)
    with fs.open_output(path) as fh:
        pq.write_table(table, fh, compression="zstd")
