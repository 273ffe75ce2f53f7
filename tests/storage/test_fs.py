"""storage.fs, the one filesystem layer: path rules, and the same operations on a local disk and
on a real S3 server (SeaweedFS on loopback, tests/servers.py), never a mock."""
from __future__ import annotations

import os

import pytest

from storage import fs


# ----------------------------------------------------------------------------- names

def test_normalize_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fs.normalize("data/x.json") == str(tmp_path / "data" / "x.json")
    assert fs.normalize(tmp_path / "a" / ".." / "b") == str(tmp_path / "b")
    assert fs.normalize("file:///srv/data/x.tar") == "/srv/data/x.tar"
    assert fs.normalize("FILE:///srv/data/") == "/srv/data"
    assert fs.normalize("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert fs.normalize("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert fs.normalize("S3://bucket/Key") == "s3://bucket/Key"          # the scheme only is case-free
    assert fs.normalize("gs://b/x") == "gs://b/x"
    assert (fs.scheme_of("s3://b"), fs.scheme_of("file:///x"), fs.scheme_of("/x"), fs.scheme_of("gs://b")) == \
        ("s3", "", "", "gs")
    assert fs.is_remote("s3://b/x") and not fs.is_remote("file:///x") and not fs.is_remote("rel/x")


def test_join_name_parent_stem_suffix():
    assert fs.join("s3://b/run/", "checkpoints", "/step-1/") == "s3://b/run/checkpoints/step-1"
    assert fs.join("/data", "a", "b.json") == "/data/a/b.json"
    assert fs.name_of("s3://b/x/00000.tar") == "00000.tar" and fs.name_of("/d/x/") == "x"
    assert fs.parent_of("s3://b/x/00000.tar") == "s3://b/x"
    assert fs.parent_of("/d/x/y.json") == "/d/x"
    assert fs.stem_of("s3://b/00000-00001.labels.parquet") == "00000-00001"
    assert fs.suffix_of("x/a.b.Parquet") == ".parquet" and fs.suffix_of("s3://b/noext") == ""


def test_s3_options_from_the_standard_environment():
    assert fs.s3_options({}) == {}
    plain = fs.s3_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:8333"})
    assert plain == {"endpoint_override": "127.0.0.1:8333", "scheme": "http", "region": "us-east-1"}
    # the S3-specific variable wins over the general one (the AWS SDKs' rule)
    both = fs.s3_options({"AWS_ENDPOINT_URL": "http://general:1", "AWS_ENDPOINT_URL_S3": "https://s3only:2/"})
    assert (both["endpoint_override"], both["scheme"]) == ("s3only:2", "https")
    assert fs.s3_options({"AWS_ENDPOINT_URL": "minio.local:9000"})["scheme"] == "https"   # no scheme: https
    full = fs.s3_options({"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "t",
                          "AWS_DEFAULT_REGION": "eu-west-1"})
    assert full == {"access_key": "id", "secret_key": "secret", "session_token": "t", "region": "eu-west-1"}
    assert fs.s3_options({"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "eu-west-1"})["region"] == "ap-south-1"
    assert "access_key" not in fs.s3_options({"AWS_ACCESS_KEY_ID": "id"})    # half a key pair is none


# ----------------------------------------------------------------------------- the same operations, both stores

def _exercise(root: str) -> None:
    """Write, read, list, query and delete under ``root`` (a local folder or a URI)."""
    fs.makedirs(root)
    fs.write_bytes(fs.join(root, "a.bin"), b"\x00\x01\x02")
    fs.write_json(fs.join(root, "sub", "b.json"), {"x": [1, 2]})
    fs.write_text(fs.join(root, "sub", "deep", "c.txt"), "héllo")
    assert fs.read_bytes(fs.join(root, "a.bin")) == b"\x00\x01\x02"
    assert fs.read_json(fs.join(root, "sub", "b.json")) == {"x": [1, 2]}
    assert fs.read_text(fs.join(root, "sub", "deep", "c.txt")) == "héllo"
    with fs.open_input_file(fs.join(root, "a.bin")) as fh:                 # random access (PIL, Parquet)
        fh.seek(1)
        assert fh.read(1) == b"\x01"
    assert fs.size_of(fs.join(root, "a.bin")) == 3

    top = fs.list_dir(root)
    assert [(e.name, e.is_dir) for e in top] == [("a.bin", False), ("sub", True)]
    assert top[0].path == fs.join(root, "a.bin") and top[0].size == 3
    assert [e.name for e in fs.list_dir(root, recursive=True)] == ["a.bin", "sub/b.json", "sub/deep/c.txt"]
    assert fs.exists(fs.join(root, "sub")) and fs.is_dir(fs.join(root, "sub")) and not fs.is_file(fs.join(root, "sub"))
    assert fs.is_file(fs.join(root, "a.bin")) and not fs.is_dir(fs.join(root, "a.bin"))
    assert not fs.exists(fs.join(root, "nope")) and not fs.is_file(fs.join(root, "nope"))
    with pytest.raises(FileNotFoundError):
        fs.list_dir(fs.join(root, "nope"))
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(fs.join(root, "nope"))

    fs.write_bytes(fs.join(root, "a.bin"), b"new")                          # overwrite in place
    assert fs.read_bytes(fs.join(root, "a.bin")) == b"new"
    fs.delete(fs.join(root, "a.bin"))
    fs.delete(fs.join(root, "a.bin"))                                       # a missing file: no error
    assert not fs.exists(fs.join(root, "a.bin"))
    fs.delete_dir(fs.join(root, "sub"))
    fs.delete_dir(fs.join(root, "sub"))
    assert not fs.exists(fs.join(root, "sub", "b.json")) and not fs.is_dir(fs.join(root, "sub"))


def _failed_write_leaves_nothing(root: str) -> None:
    target = fs.join(root, "out", "x.tar")
    fs.write_bytes(fs.join(root, "out", "kept.txt"), b"k")
    with pytest.raises(RuntimeError, match="boom"):
        with fs.open_output(target) as fh:
            fh.write(b"half of a shard" * 1000)
            raise RuntimeError("boom")
    assert not fs.exists(target)
    assert [e.name for e in fs.list_dir(fs.join(root, "out"))] == ["kept.txt"]   # no temp file either
    # a failed rewrite of a finished file: locally the old one stays; on an object store it is gone,
    # never half-replaced (readers trust manifests there, written after the objects)
    fs.write_bytes(target, b"finished")
    with pytest.raises(RuntimeError):
        with fs.open_output(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    if fs.is_remote(root):
        assert not fs.exists(target)
    else:
        assert fs.read_bytes(target) == b"finished"


def test_local_operations(tmp_path):
    _exercise(str(tmp_path / "root"))


def test_local_open_output_leaves_nothing_on_failure(tmp_path):
    _failed_write_leaves_nothing(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "out")) == ["kept.txt", "x.tar"]


def test_local_copy_and_upload_tree_locally(tmp_path):
    src = tmp_path / "model"
    (src / "tokenizer").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "tokenizer" / "vocab.txt").write_text("a\nb")
    assert fs.local_copy(src) == str(src)                                   # a local path is its own copy
    fs.upload_tree(src, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "tokenizer" / "vocab.txt").read_text() == "a\nb"
    fs.upload_tree(src / "config.json", str(tmp_path / "one.json"))          # a single file
    assert (tmp_path / "one.json").read_text() == "{}"


# ----------------------------------------------------------------------------- S3 (SeaweedFS)

def test_s3_operations(s3_env, s3_prefix):
    _exercise(fs.join(s3_prefix, "root"))


def test_s3_open_output_leaves_nothing_on_failure(s3_env, s3_prefix):
    _failed_write_leaves_nothing(s3_prefix)


def test_s3_paths_resolve_with_the_endpoint_from_the_environment(s3_env, s3_prefix, s3_server):
    fs.write_bytes(fs.join(s3_prefix, "x.txt"), b"seen by a plain client")
    bucket_key = s3_prefix.split("://", 1)[1] + "/x.txt"
    with s3_server.filesystem().open_input_stream(bucket_key) as fh:        # the object is really there
        assert fh.read() == b"seen by a plain client"
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(fs.worker_environment())


def test_s3_local_copy_of_a_folder_is_cached_reused_and_refreshed(s3_env, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))
    model = fs.join(s3_prefix, "model")
    fs.write_bytes(fs.join(model, "config.json"), b'{"a": 1}')
    fs.write_bytes(fs.join(model, "tokenizer", "vocab.txt"), b"x\ny")
    first = fs.local_copy(model)
    assert first.startswith(str(tmp_path / "cache")) and os.path.basename(first) == "model"
    assert open(os.path.join(first, "tokenizer", "vocab.txt"), "rb").read() == b"x\ny"
    # a marker in the cached copy shows whether a later call downloads again
    open(os.path.join(first, ".marker"), "w").close()
    assert fs.local_copy(model) == first and os.path.exists(os.path.join(first, ".marker"))
    fs.write_bytes(fs.join(model, "config.json"), b'{"a": 1, "b": 2}')        # a file changes size
    refreshed = fs.local_copy(model)
    assert refreshed != first and open(os.path.join(refreshed, "config.json"), "rb").read() == b'{"a": 1, "b": 2}'
    single = fs.local_copy(fs.join(model, "config.json"))                    # a file, under its own name
    assert os.path.basename(single) == "config.json"


def test_s3_upload_tree_round_trip(s3_env, s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("GLIPCTL_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.bin").write_bytes(os.urandom(3000))
    (src / "a" / "b" / "deep.txt").write_text("deep")
    dest = fs.join(s3_prefix, "uploaded")
    fs.upload_tree(src, dest)
    assert [(e.name, e.size) for e in fs.list_dir(dest, recursive=True)] == [("a/b/deep.txt", 4), ("top.bin", 3000)]
    assert fs.read_bytes(fs.join(dest, "top.bin")) == (src / "top.bin").read_bytes()
    back = fs.local_copy(dest)
    assert open(os.path.join(back, "a", "b", "deep.txt")).read() == "deep"
