"""`glipctl inspect`: summary, --where, --to, --render, --json, and user errors (exit 2)."""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from pipelines.inspect_where import compile_where
from storage.errors import InputError
from storage.goldg import write_mdetr
from storage.manifest import Manifest
from storage.records import Box, GroundedSample, Phrase
from storage.shards import ShardWriter


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def jpeg(w=64, h=48):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 90, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def sample(key, scores, caption="a red dog on a green lawn"):
    phrases = [Phrase("a red dog", 0, 9), Phrase("a green lawn", 13, 25)]
    boxes = [Box([2.0 + 3 * i, 4.0, 20.0, 16.0], [[phrases[i % 2].start, phrases[i % 2].end]], i % 2, s)
             for i, s in enumerate(scores)]
    return GroundedSample(key, caption, 64, 48, phrases, boxes, "pseudo/teacher-a")


@pytest.fixture
def shards(tmp_path):
    out = tmp_path / "pseudo"
    with ShardWriter(out, "00000", max_samples=3) as w:
        for i, scores in enumerate([[0.9, 0.3], [0.5], [], [0.7, 0.65, 0.2]]):
            w.write(sample(f"k{i}", scores), jpeg())
    m = Manifest(stage="pseudo-label")
    m.mark("00000", "done", counts={"read": 6, "written": 4, "skipped": {"no_phrases": 2}},
           outputs=w.outputs, labels=w.labels, checksums=w.checksums)
    m.save(out)
    return out


def test_summary_json(cli, shards):
    r = cli("inspect", shards, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert (s["samples"], s["boxes"], s["samples_with_boxes"]) == (4, 6, 3)
    assert s["boxes_per_sample"]["histogram"]["0"] == 1 and s["boxes_per_sample"]["histogram"]["3"] == 1
    assert s["score"]["histogram"]["0.9-1.0"] == 1 and s["score"]["histogram"]["0.2-0.3"] == 1
    assert s["top_phrases"] == [["a red dog", 4], ["a green lawn", 2]]
    assert s["sources"] == {"pseudo/teacher-a": {"samples": 4, "boxes": 6}}
    assert s["manifest"]["skipped"] == {"no_phrases": 2} and s["skipped"] == {}


def test_tables_name_every_section(cli, shards):
    r = cli("inspect", shards)
    assert r.exit_code == 0, r.output
    for title in ("boxes per sample", "score histogram", "most frequent phrases", "sources",
                  "skipped records", "_manifest.json", "a red dog"):
        assert title in r.output


def test_where_to_parquet_boxes_and_samples(cli, shards, tmp_path):
    out = tmp_path / "high.parquet"
    r = cli("inspect", shards, "--where", "score >= 0.6 and phrase contains 'dog'", "--to", out, "--json")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.column_names == ["key", "box_index", "phrase", "bbox", "score", "source", "file"]
    assert sorted(zip(t.column("key").to_pylist(), t.column("box_index").to_pylist())) == [("k0", 0), ("k3", 0)]
    assert json.loads(r.output)["boxes"] == 2

    out2 = tmp_path / "samples.parquet"
    r = cli("inspect", shards, "--where", "score > 0.6", "--to", out2, "--view", "samples")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out2).to_pylist()
    assert [(x["key"], [round(b["score"], 2) for b in x["boxes"]]) for x in rows] == [("k0", [0.9]),
                                                                                    ("k3", [0.7, 0.65])]


def test_render_draws_matching_boxes(cli, shards, tmp_path):
    from PIL import Image

    out = tmp_path / "png"
    r = cli("inspect", shards, "--render", out, "--limit", "2", "--where", "score >= 0.5")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000_k0.png", "0001_k1.png"]
    im = Image.open(out / files[0]).convert("RGB")
    assert im.size == (64, 48)
    # k0: the 0.9 box spans x 2..22, the 0.3 box x 5..25, both y 4..20 (labels sit at the top)
    assert im.getpixel((12, 20)) != (90, 90, 90)          # the 0.9 box's bottom edge is drawn
    assert im.getpixel((24, 20)) == (90, 90, 90)          # the 0.3 box is filtered out


def test_summary_where_and_to_come_from_the_label_tables_not_the_tars(cli, shards, tmp_path):
    """A folder whose tars have label tables is summarised, filtered and exported without
    opening a tar: delete the tars (a stage's folder: the manifest names them) or fill them with
    garbage (a plain folder), and everything but --render gives the same answer."""
    import shutil

    def views(folder, tag):
        summary = cli("inspect", folder, "--json")
        assert summary.exit_code == 0, summary.output
        out = tmp_path / f"{tag}.parquet"
        r = cli("inspect", folder, "--where", "score >= 0.5", "--to", out, "--view", "samples", "--json")
        assert r.exit_code == 0, r.output
        s = json.loads(summary.output)
        return s, pq.read_table(out).drop_columns(["file"]).to_pylist()

    expected, expected_rows = views(shards, "intact")
    assert expected["samples"] == 4 and len(expected_rows) == 3
    plain = tmp_path / "plain"                       # the same files, no manifest
    plain.mkdir()
    for f in shards.glob("*-*.*"):
        shutil.copy(f, plain / f.name)
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 2 and all(f.with_name(f.name[:-4] + ".labels.parquet").exists() for f in tars)
    for tar in tars:
        tar.unlink()
    for tar in plain.glob("*.tar"):
        tar.write_bytes(b"\0" * 512)
    for folder, tag in ((shards, "deleted"), (plain, "garbage")):
        got, rows = views(folder, tag)
        if folder == plain:
            expected.pop("manifest", None)
        assert got == expected and rows == expected_rows, tag
    # --render needs the images: without the tars, what it could not draw is a counted skip
    r = cli("inspect", shards, "--render", tmp_path / "png", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["skipped"] == {"render_sample_not_found": 2}


def test_render_gold_json_needs_image_root(cli, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg())
    s = sample("goldg/flickr/1/0", [1.0])
    s.source, s.extra = "goldg/flickr", {"file_name": "a.jpg"}
    write_mdetr([s], tmp_path / "gold.json")
    r = cli("inspect", f"{tmp_path / 'gold.json'}={images}", "--render", tmp_path / "png", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["rendered"]) == 1


@pytest.mark.parametrize("args,message", [
    (["--where", "scor > 1"], "unknown column 'scor'"),
    (["--where", "score > 'high'"], "compares with a number"),
    (["--where", "__import__('os')"], "unknown column"),
    (["--view", "pixels", "--to", "x.parquet"], "--view must be"),
])
def test_bad_options_exit_2(cli, shards, args, message):
    r = cli("inspect", shards, *args)
    assert r.exit_code == 2 and message in flat(r)
    assert "Traceback" not in r.output


def test_bad_paths_exit_2(cli, tmp_path):
    r = cli("inspect", tmp_path / "missing")
    assert r.exit_code == 2 and "no such file" in flat(r)
    (tmp_path / "empty").mkdir()
    r = cli("inspect", tmp_path / "empty")
    assert r.exit_code == 2 and "no .tar shards" in flat(r)
    (tmp_path / "bad.json").write_text("{not json")
    r = cli("inspect", tmp_path / "bad.json")
    assert r.exit_code == 2 and "bad.json: not valid JSON" in flat(r)


def test_truncated_only_shard_is_exit_2_naming_the_reason(cli, tmp_path):
    with ShardWriter(tmp_path, "t", max_samples=10, labels=False) as w:   # the tar is all there is
        w.write(sample("k", [0.9]), jpeg())
    tar = tmp_path / "t-00000.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    r = cli("inspect", tmp_path)
    assert r.exit_code == 2 and "truncated_tar 1" in flat(r)


def test_where_language_truth_table():
    import pyarrow as pa

    b = pa.RecordBatch.from_pydict({
        "key": ["a", "b", "c"], "phrase": ["a dog", "cat", "dog"], "source": ["s"] * 3, "file": ["f"] * 3,
        "score": pa.array([0.5, 0.7, 0.9], pa.float64()), "box_index": pa.array([0, 1, 0], pa.int32()),
        "bbox": pa.array([[0, 0, 10, 10], [0, 0, 200, 5], [1, 1, 1, 1]], pa.list_(pa.float32(), 4))})
    cases = {"score >= 0.6": [False, True, True],
             "phrase contains 'dog' and not score < 0.6": [False, False, True],
             "w > 100 or area <= 1": [False, True, True],
             "key in ('a', \"c\")": [True, False, True],
             "(score>=.6) and phrase = 'cat'": [False, True, False]}
    for text, expected in cases.items():
        assert compile_where(text)(b).to_pylist() == expected, text
    for text in ["score >", "(score > 1", "score > 1 x", "score ~ 1", "", "phrase > 3"]:
        with pytest.raises(InputError):
            compile_where(text)


HOSTILE_WHERE = {"400 nested parentheses": "(" * 400 + "score > 0.5" + ")" * 400,
                 "1000 nots": "not " * 1000 + "score > 0.5"}


@pytest.mark.parametrize("name", list(HOSTILE_WHERE))
def test_where_nesting_is_bounded_with_a_clear_error(name):
    with pytest.raises(InputError, match=r"nest deeper than \d+ levels") as info:   # not a RecursionError
        compile_where(HOSTILE_WHERE[name])
    from pipelines.inspect_where import MAX_DEPTH

    assert f"deeper than {MAX_DEPTH} levels" in str(info.value)                  # the message names the limit
    assert "\n" not in str(info.value) and len(str(info.value)) < 200      # one line, the filter not echoed
    # up to the limit it still works, with parentheses and 'not' mixed
    import pyarrow as pa

    b = pa.RecordBatch.from_pydict({"score": pa.array([0.4, 0.9], pa.float64())})
    half = MAX_DEPTH // 2
    deep = "(not " * half + "score > 0.5" + ")" * half          # MAX_DEPTH levels; an even number of nots
    assert compile_where(deep)(b).to_pylist() == [False, True]
    with pytest.raises(InputError, match="nest deeper"):
        compile_where("not " + deep)


@pytest.mark.parametrize("name", list(HOSTILE_WHERE))
def test_where_nesting_on_the_cli_is_exit_2_in_one_line(cli, shards, name):
    r = cli("inspect", shards, "--where", HOSTILE_WHERE[name])
    assert r.exit_code == 2, (type(r.exception).__name__, r.output[-300:])
    assert "nest deeper than" in flat(r) and "Traceback" not in r.output
    assert r.output.count("error:") == 1 and len(r.output.strip().splitlines()) <= 2   # rich may wrap it once
