"""`glipctl inspect s3://...` on a real S3 server (SeaweedFS): the same answers as on local paths.

Summary, --where with --to (to a local file and to an object), and --render into a bucket; the
summary of a stage's folder comes from the label tables even when the tars are gone.
"""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

from storage import fs
from storage.manifest import Manifest, commit_shard
from storage.shards import ShardWriter
from tests.pipelines.test_inspect import jpeg, sample

SCORES = [[0.9, 0.3], [0.5], [], [0.7, 0.65, 0.2], [0.95]]


def write_pseudo(out: str) -> None:
    """A pseudo-label output folder (local path or URI): tars + label tables, commit records, summary."""
    with ShardWriter(out, "00000", max_samples=3) as w:
        for i, scores in enumerate(SCORES):
            w.write(sample(f"k{i}", scores), jpeg())
    entry = {"status": "done", "counts": {"read": 7, "written": 5, "skipped": {"no_phrases": 2}},
             "outputs": w.outputs, "labels": w.labels, "checksums": w.checksums}
    commit_shard(out, "00000", {**entry, "stage": "pseudo-label"})
    m = Manifest(stage="pseudo-label")
    m.mark("00000", **entry)
    m.save(out)


def test_inspect_on_s3_matches_local(cli, s3_env, s3_prefix, tmp_path):
    local, remote = tmp_path / "pseudo", f"{s3_prefix}/pseudo"
    write_pseudo(str(local))
    write_pseudo(remote)
    assert sorted(e.name for e in fs.list_dir(remote)) == sorted(p.name for p in local.iterdir())

    def summary(path) -> dict:
        r = cli("inspect", path, "--json")
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    expected = summary(local)
    assert (expected["samples"], expected["boxes"]) == (5, 7)
    assert summary(f"{remote}/") == expected

    # --where --to: to a local file from S3, to an object from local and from S3
    where = ["--where", "score >= 0.6", "--view", "samples", "--json"]
    r = cli("inspect", local, *where, "--to", tmp_path / "local.parquet")
    assert r.exit_code == 0, r.output
    r = cli("inspect", remote, *where, "--to", tmp_path / "from_s3.parquet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["to"] == {"path": str(tmp_path / "from_s3.parquet"), "rows": 3}
    r = cli("inspect", remote, *where, "--to", f"{s3_prefix}/views/high.parquet")
    assert r.exit_code == 0, r.output
    want = pq.read_table(tmp_path / "local.parquet")
    assert [(x["key"], len(x["boxes"])) for x in want.to_pylist()] == [("k0", 1), ("k3", 2), ("k4", 1)]
    for got in (pq.read_table(tmp_path / "from_s3.parquet"),
                pq.read_table(io.BytesIO(fs.read_bytes(f"{s3_prefix}/views/high.parquet")))):
        assert got.drop_columns(["file"]).equals(want.drop_columns(["file"]))
        assert all(f.startswith(f"{remote}/00000-") for f in got.column("file").to_pylist())

    # --render into the bucket: the same PNGs as a local render
    r = cli("inspect", local, "--render", tmp_path / "png", "--limit", "3", "--where", "score >= 0.5")
    assert r.exit_code == 0, r.output
    r = cli("inspect", remote, "--render", f"{s3_prefix}/png", "--limit", "3", "--where", "score >= 0.5",
            "--json")
    assert r.exit_code == 0, r.output
    rendered = json.loads(r.output)["rendered"]
    assert [fs.name_of(p) for p in rendered] == sorted(p.name for p in (tmp_path / "png").iterdir())
    for path in rendered:
        assert fs.read_bytes(path) == (tmp_path / "png" / fs.name_of(path)).read_bytes()

    # the tars gone from the bucket: the summary still comes from the label tables alone
    for e in fs.list_dir(remote):
        if e.name.endswith(".tar"):
            fs.delete(e.path)
    assert summary(remote) == expected
