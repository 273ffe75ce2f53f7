"""`glipctl pack` from and to s3:// on a real S3 server (SeaweedFS), in-process on the session's Ray.

Annotation files, image folders and --out all on S3: the shards are byte-identical to those of
the same run on local paths (checksums in the commit records), the bad records are counted the
same (an absent object is ``missing_image``), the training side lists them, and a lost commit
on S3 redoes exactly that shard.
"""
from __future__ import annotations

import json

from storage import fs
from storage.packed import packed_shards, read_vocabulary
from storage.shards import iter_shard_samples
from storage.skips import StageCounts
from tests.pipelines.test_pack import EXPECTED, SHARDS, build_inputs, pack_args


def _without_timing(shards: dict) -> dict:
    return {name: {k: v for k, v in entry.items() if k != "seconds"} for name, entry in shards.items()}


def test_s3_pack_equals_local_pack_and_resumes_one_shard(ray_session, cli, s3_env, s3_prefix, tmp_path):
    root = tmp_path / "inputs"
    build_inputs(root)
    fs.upload_tree(root, f"{s3_prefix}/in")
    out = f"{s3_prefix}/packed"

    local = cli(*pack_args(root, tmp_path / "packed", "--workers", "2"))
    assert local.exit_code == 0, local.output
    remote = cli(*pack_args(f"{s3_prefix}/in", out, "--workers", "2"))
    assert remote.exit_code == 0, remote.output
    assert "shards: 7 packed, 0 already done, 0 failed" in " ".join(remote.output.split())

    local_manifest = json.loads((tmp_path / "packed" / "_manifest.json").read_text())
    manifest = fs.read_json(f"{out}/_manifest.json")
    assert manifest["options"]["datasets"][0]["annotations"] == f"{s3_prefix}/in/flickr_gold.json"
    assert manifest["totals"] == local_manifest["totals"]
    assert _without_timing(manifest["shards"]) == _without_timing(local_manifest["shards"])   # same bytes
    for name in (n for names in SHARDS.values() for n in names):
        assert fs.read_json(f"{out}/_shards/{name}.json")["status"] == "done"
    assert read_vocabulary(out, "shapes_det") == ("red ball", "box", "tree")

    grounding = packed_shards([out], "grounding", "--gold")
    assert [fs.name_of(t) for t in grounding] == [fs.name_of(t) for t in
                                                  packed_shards([str(tmp_path / "packed")], "grounding", "--gold")]
    counts = StageCounts()
    remote_samples = [(s.to_dict(), image) for s, image in iter_shard_samples(grounding, counts)]
    local_samples = [(s.to_dict(), image) for s, image in iter_shard_samples(
        packed_shards([str(tmp_path / "packed")], "grounding", "--gold"), StageCounts())]
    assert remote_samples == local_samples and counts.skipped == {}
    assert len(remote_samples) == EXPECTED["flickr_gold"]["written"] + 3     # + the ODVG grounding lines

    # -- a worker's commit lost (as if it died before committing): exactly that shard is redone
    fs.delete(f"{out}/_shards/mixed-d00000.json")
    def objects() -> dict[str, int | None]:   # the summary's size follows its timings: only its name counts
        return {e.name: (None if e.name == "_manifest.json" else e.size) for e in fs.list_dir(out)}

    before = objects()
    again = cli(*pack_args(f"{s3_prefix}/in", out, "--workers", "2"))
    assert again.exit_code == 0, again.output
    assert "shards: 1 packed, 6 already done, 0 failed" in " ".join(again.output.split())
    assert fs.exists(f"{out}/_shards/mixed-d00000.json")
    assert objects() == before                                               # no extra objects, same shards
    resumed = fs.read_json(f"{out}/_manifest.json")
    assert _without_timing(resumed["shards"]) == _without_timing(manifest["shards"])
