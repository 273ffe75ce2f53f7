"""Phrase files: schema, atomic write, round trip."""
from __future__ import annotations

from storage.phrase_files import PHRASE_SCHEMA, iter_phrase_rows, read_phrase_file, write_phrase_file


def test_phrase_file_round_trip(tmp_path):
    rows = [
        {"key": "000000000", "caption": "a dog on a lawn",
         "phrases": [{"text": "a dog", "start": 0, "end": 5, "root": "dog"},
                     {"text": "a lawn", "start": 9, "end": 15}],
         "url": "http://x/0.jpg", "width": 64, "height": 48, "source_shard": "00000", "source_index": 0},
        {"key": "000000001", "caption": "nothing here", "phrases": [], "source_shard": "00000",
         "source_index": 2},
    ]
    path = tmp_path / "phrases" / "00000.parquet"
    write_phrase_file(path, rows)
    assert [p.name for p in path.parent.iterdir()] == ["00000.parquet"]   # no temp file left
    table = read_phrase_file(path)
    assert table.schema.equals(PHRASE_SCHEMA)
    back = list(iter_phrase_rows(path))
    assert back[0]["phrases"][1] == {"text": "a lawn", "start": 9, "end": 15, "root": None}
    assert back[0]["phrases"][0]["root"] == "dog"
    assert back[1]["url"] is None and back[1]["width"] is None and back[1]["source_index"] == 2
    assert [r["key"] for r in back] == ["000000000", "000000001"]


def test_empty_phrase_file_is_valid(tmp_path):
    path = tmp_path / "empty.parquet"
    write_phrase_file(path, [])
    assert read_phrase_file(path).num_rows == 0
    assert list(iter_phrase_rows(path)) == []
