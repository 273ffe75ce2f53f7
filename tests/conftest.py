"""Shared fixtures: one local Ray instance for the whole test session (ray.init costs ~4 s)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one; commands reuse it (ensure_ray)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=256 * 1024 * 1024)
    yield ray
    # left running until the interpreter exits: other session fixtures may still use it


@pytest.fixture(scope="session")
def flickr_captions() -> list[str]:
    """The 40k real Flickr8k captions (../shared/data)."""
    path = SHARED_DATA / "flickr8k_captions.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t", 1)[1] for line in lines if "\t" in line]


@pytest.fixture
def cli():
    """Invoke glipctl in-process (shares the session's Ray); returns (exit_code, output)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
        return result
    return invoke


# ---- real servers on loopback (tests/servers.py): S3 (SeaweedFS) and a two-node Ray cluster ----

def _servers():
    """tests/servers.py (the tests folder is on sys.path in pytest's default import mode)."""
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import servers

    return servers


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS `weed mini` S3 server on 127.0.0.1 (free ports), one bucket; stopped by pid.

    Attributes: endpoint, host, port, access_key, secret_key, bucket, region; env() (AWS_* for
    clients), uri(*parts) -> "s3://bucket/...", filesystem() -> pyarrow S3FileSystem.
    """
    server = _servers().start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """s3_server.env() applied to os.environ for one test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh "s3://bucket/<test-name>-<uuid>" prefix for one test."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:80]
    return s3_server.uri(f"{name}-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on this machine (1 CPU each, token auth), for subprocesses only:
    run them with env={**os.environ, **ray_cluster.env()} (RAY_ADDRESS, RAY_AUTH_MODE,
    RAY_AUTH_TOKEN) or pass `--address ray_cluster.address` plus that env.

    Attributes: address, token, env(), kill_worker_node(), start_worker_node(), startup_s.
    A test that kills the worker node leaves it dead; `_ray_cluster_two_nodes` starts a new one
    before the next test that uses this fixture. Stopped by pid at the end of the session.
    """
    cluster = _servers().start_ray_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def _ray_cluster_two_nodes(request):
    """Before each test that uses ray_cluster: restart the worker node if a previous test killed it."""
    if "ray_cluster" in request.fixturenames:
        request.getfixturevalue("ray_cluster").ensure_worker_node()


# ---- tiny random transformers zero-shot detectors (tests/hf_models.py), saved once per session ----

def _hf_models():
    _servers()                      # puts the tests folder on sys.path
    import hf_models

    return hf_models


@pytest.fixture(scope="session")
def hf_teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"grounding-dino": dir, "mm-grounding-dino": dir, "owlv2": dir}: tiny random models saved with
    ``save_pretrained`` together with their processors (MiniLM BERT vocabulary / a byte-level CLIP
    tokenizer), as a hub checkpoint folder looks. Built once (about a second)."""
    models = _hf_models()
    root = tmp_path_factory.mktemp("hf_teachers")
    return {"grounding-dino": models.build_gdino(root / "grounding-dino", "grounding-dino"),
            "mm-grounding-dino": models.build_gdino(root / "mm-grounding-dino", "mm-grounding-dino"),
            "owlv2": models.build_owlv2(root / "owlv2")}
