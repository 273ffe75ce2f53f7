"""`glipctl export` from and to s3:// on a real S3 server (SeaweedFS): the same files as on local paths."""
from __future__ import annotations

import json

from storage import fs
from tests.pipelines.test_export import odvg_lines, write_pseudo


def test_export_from_s3_to_s3_equals_local(cli, s3_env, s3_prefix, tmp_path):
    local, remote = tmp_path / "pseudo", f"{s3_prefix}/pseudo"
    write_pseudo(str(local))
    write_pseudo(remote)

    r = cli("export", remote, "--format", "odvg", "--out", f"{s3_prefix}/out/labels.jsonl",
            "--images", f"{s3_prefix}/out/images", "--where", "score >= 0.5")
    assert r.exit_code == 0, r.output
    r = cli("export", local, "--format", "odvg", "--out", tmp_path / "labels.jsonl",
            "--images", tmp_path / "images", "--where", "score >= 0.5")
    assert r.exit_code == 0, r.output
    lines = odvg_lines(f"{s3_prefix}/out/labels.jsonl")
    assert lines == odvg_lines(tmp_path / "labels.jsonl") and len(lines) == 6
    names = sorted(e.name for e in fs.list_dir(f"{s3_prefix}/out/images"))
    assert names == sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(x["filename"] for x in lines)
    for name in names:
        assert fs.read_bytes(f"{s3_prefix}/out/images/{name}") == (tmp_path / "images" / name).read_bytes()

    # COCO from S3 to a local file and to an object: the same detections
    r = cli("export", remote, "--format", "coco", "--out", f"{s3_prefix}/out/coco.json")
    assert r.exit_code == 0, r.output
    r = cli("export", local, "--format", "coco", "--out", tmp_path / "coco.json")
    assert r.exit_code == 0, r.output
    got, want = fs.read_json(f"{s3_prefix}/out/coco.json"), json.loads((tmp_path / "coco.json").read_text())
    for part in ("images", "annotations", "categories"):
        assert got[part] == want[part], part
    assert len(got["annotations"]) == 11

    # what is not there: exit 2, nothing written
    r = cli("export", f"{s3_prefix}/nothing-here", "--format", "odvg", "--out", f"{s3_prefix}/out/none.jsonl")
    assert r.exit_code == 2 and "no such file or folder" in " ".join(r.output.split())
    assert not fs.exists(f"{s3_prefix}/out/none.jsonl")
