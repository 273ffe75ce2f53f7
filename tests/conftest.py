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
