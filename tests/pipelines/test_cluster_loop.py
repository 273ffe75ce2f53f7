"""The whole loop on object storage and a two-node Ray cluster, as a user runs it.

A generated img2dataset-layout crawl is uploaded to a real S3 server (SeaweedFS on loopback);
`glipctl parse-captions`, `pseudo-label`, `inspect` and `train-student` run as subprocesses that
join a two-node loopback Ray cluster (tests/servers.py), with every input and output an s3:// URI.
Their outputs must equal those of the same commands on local paths with a one-node Ray: the
phrase tables row for row and the pseudo-label tars byte for byte (labels depend on the image,
caption, teacher and options alone; samples are written in input order).

Failures: a node lost mid-run (the worker node SIGKILLed after the first shard committed) and a
driver killed mid-run then resumed must both end with every shard labeled once, the same bytes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import fs

pytestmark = pytest.mark.slow

GLIPCTL = str(Path(sys.executable).parent / "glipctl")
IMAGE_SIZE = 64
THRESHOLD = "0.05"
LABEL = ["--threshold", THRESHOLD, "--image-size", str(IMAGE_SIZE), "--batch-size", "4",
         "--max-samples-per-tar", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipelines.world import WorldSpec, generate_world

    spec = WorldSpec.small(seed=3).scaled(crawled_images=48, crawled_shard_size=8, gold_images=8, eval_images=4)
    return generate_world(tmp_path_factory.mktemp("world"), spec)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A real tiny GLIP with random weights; score_threshold 0 lets its random boxes through."""
    from glip import GLIP

    path = tmp_path_factory.mktemp("teacher") / "tiny"
    GLIP.from_preset("tiny", score_threshold=0.0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local_run(world, teacher, tmp_path_factory, ray_session):
    """The reference: the same commands on local paths, in-process, one-node Ray."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    out = tmp_path_factory.mktemp("local")
    runner = CliRunner()
    for args in (["parse-captions", str(world.crawled_dir), "--out", str(out / "phrases")],
                 ["pseudo-label", str(world.crawled_dir), "--phrases", str(out / "phrases"), "--teacher",
                  str(teacher), "--out", str(out / "pseudo"), *LABEL]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return out


def _env(s3_server, ray_cluster, tmp_path) -> dict[str, str]:
    return {**os.environ, **s3_server.env(), **ray_cluster.env(), "GLIPCTL_CACHE_DIR": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _glipctl(args: list[str], env: dict, cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([GLIPCTL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"glipctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def _commits(folder: str) -> dict[str, dict]:
    from storage.manifest import read_commits

    return read_commits(folder)


def _phrase_rows(folder: str) -> dict[str, list]:
    from storage.manifest import Manifest
    from storage.phrase_files import read_phrase_file

    manifest = Manifest.load(folder)
    return {name: read_phrase_file(fs.join(folder, name)).to_pylist() for name in manifest.outputs()}


def _tar_bytes(folder: str) -> dict[str, bytes]:
    """Every committed tar of a pseudo-label folder, read back: name -> bytes."""
    from storage.shards import list_shard_files

    return {fs.name_of(t): fs.read_bytes(t) for t in list_shard_files([folder])}


def _upload_inputs(world, teacher, prefix: str) -> tuple[str, str]:
    crawl, teacher_uri = fs.join(prefix, "crawl"), fs.join(prefix, "teacher")
    fs.upload_tree(world.crawled_dir, crawl)
    fs.upload_tree(teacher, teacher_uri)
    return crawl, teacher_uri


def _wait_for_commit(folder: str, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Poll until the first shard of ``folder`` is committed (or the run ended); returns how many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(_commits(folder))
        if n or proc.poll() is not None:
            return n
        time.sleep(0.2)
    raise TimeoutError(f"no shard of {folder} committed in {timeout} s")


def test_the_loop_on_s3_and_two_nodes_equals_the_local_run_and_survives_a_lost_node(
        world, teacher, local_run, s3_server, ray_cluster, s3_prefix, tmp_path, monkeypatch):
    env = _env(s3_server, ray_cluster, tmp_path)
    for key, value in s3_server.env().items():          # this process writes and reads S3 too
        monkeypatch.setenv(key, value)
    crawl, teacher_uri = _upload_inputs(world, teacher, s3_prefix)
    phrases, pseudo = fs.join(s3_prefix, "phrases"), fs.join(s3_prefix, "pseudo")

    _glipctl(["parse-captions", crawl, "--out", phrases], env)
    assert _phrase_rows(phrases) == _phrase_rows(str(local_run / "phrases"))

    # pseudo-label, and the worker node dies after the first shard is committed
    proc = subprocess.Popen([GLIPCTL, "pseudo-label", crawl, "--phrases", phrases, "--teacher", teacher_uri,
                             "--out", pseudo, *LABEL], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    committed_before_kill = _wait_for_commit(pseudo, proc)
    killed = ray_cluster.kill_worker_node()
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-5000:]
    n_shards = len(list(world.crawled_dir.glob("*.tar")))
    assert killed > 0 and committed_before_kill < n_shards       # the node was lost mid-run
    commits = _commits(pseudo)
    assert sorted(commits) == sorted(_commits(str(local_run / "pseudo")))   # every shard, once
    assert _tar_bytes(pseudo) == _tar_bytes(str(local_run / "pseudo"))      # the same labels, byte for byte
    assert {n: c["checksums"] for n, c in commits.items()} == \
        {n: c["checksums"] for n, c in _commits(str(local_run / "pseudo")).items()}

    # inspect on S3 reads the label tables, and says what inspect says locally
    summaries = []
    for folder in (pseudo, str(local_run / "pseudo")):
        text = _glipctl(["inspect", folder, "--json"], env)
        summaries.append(json.loads(text[text.index("{"):text.rindex("}") + 1]))
    assert summaries[0]["samples"] == summaries[1]["samples"] > 0
    assert summaries[0]["boxes"] == summaries[1]["boxes"]

    # train-student streams the S3 pseudo-labels on the cluster and checkpoints to S3
    student = fs.join(s3_prefix, "student")
    _glipctl(["train-student", "--gold", world.gold_arg, "--pseudo", pseudo, "--out", student, "--steps", "2",
              "--batch-size", "2", "--warmup", "1", "--log-every", "1", "--min-size", "48", "--max-size", "64"], env)
    assert fs.is_file(fs.join(student, "config.json")) and fs.is_file(fs.join(student, "model.safetensors"))
    metrics = [json.loads(line) for line in fs.read_text(fs.join(student, "metrics.jsonl")).splitlines() if line]
    assert metrics and metrics[-1]["step"] == 2


def test_a_killed_run_resumes_on_s3_without_duplicates_or_losses(
        world, teacher, local_run, s3_server, ray_cluster, s3_prefix, tmp_path, monkeypatch):
    env = _env(s3_server, ray_cluster, tmp_path)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    crawl, teacher_uri = _upload_inputs(world, teacher, s3_prefix)
    phrases, pseudo = fs.join(s3_prefix, "phrases"), fs.join(s3_prefix, "pseudo")
    fs.upload_tree(local_run / "phrases", phrases)        # parse-captions' output, as the local run made it
    args = ["pseudo-label", crawl, "--phrases", phrases, "--teacher", teacher_uri, "--out", pseudo, *LABEL]

    proc = subprocess.Popen([GLIPCTL, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_for_commit(pseudo, proc)
    os.killpg(proc.pid, signal.SIGKILL)                   # the driver dies: no summary update, no cleanup
    proc.wait(timeout=30)
    partial = len(_commits(pseudo))
    n_shards = len(list(world.crawled_dir.glob("*.tar")))
    assert 0 < partial < n_shards
    output = _glipctl(args, env)
    assert "already done" in output
    assert sorted(_commits(pseudo)) == sorted(_commits(str(local_run / "pseudo")))
    assert _tar_bytes(pseudo) == _tar_bytes(str(local_run / "pseudo"))
    manifest = fs.read_json(fs.join(pseudo, "_manifest.json"))
    assert manifest["totals"]["written"] == fs.read_json(str(local_run / "pseudo" / "_manifest.json"))["totals"]["written"]


def test_relative_local_paths_work_on_a_two_node_cluster(world, teacher, local_run, ray_cluster, tmp_path):
    """Ray workers do not run in the driver's working directory: paths must be made absolute first."""
    import shutil

    work = tmp_path / "work"
    (work / "crawl").mkdir(parents=True)
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00001.parquet"):   # two shards are enough
        shutil.copy(world.crawled_dir / name, work / "crawl" / name)
    shutil.copytree(teacher, work / "teacher")
    env = {**os.environ, **ray_cluster.env(), "HF_HUB_OFFLINE": "1"}
    _glipctl(["parse-captions", "crawl", "--out", "phrases"], env, cwd=work)
    _glipctl(["pseudo-label", "crawl", "--phrases", "phrases", "--teacher", "teacher", "--out", "pseudo", *LABEL],
             env, cwd=work)
    local_phrases, local_tars = _phrase_rows(str(local_run / "phrases")), _tar_bytes(str(local_run / "pseudo"))
    phrases, tars = _phrase_rows(str(work / "phrases")), _tar_bytes(str(work / "pseudo"))
    assert sorted(phrases) == ["00000.parquet", "00001.parquet"] and tars
    assert phrases == {n: local_phrases[n] for n in phrases}
    assert tars == {n: local_tars[n] for n in tars}
