"""The loopback servers of tests/servers.py are real and usable: S3 through pyarrow.fs, and a
two-node Ray cluster joined from a subprocess (the way `glipctl ... --address` joins one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import psutil
import pytest
from pyarrow import fs as pafs


def _files(fs, base: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


def test_s3_round_trip(s3_server, s3_prefix):
    fs = s3_server.filesystem()
    base = s3_prefix.removeprefix("s3://")
    assert base.startswith(s3_server.bucket + "/test_s3_round_trip-")
    payloads = {f"{base}/a.bin": os.urandom(1000), f"{base}/sub/b.txt": b"hello"}
    for path, data in payloads.items():
        with fs.open_output_stream(path) as f:
            f.write(data)
    assert _files(fs, base) == {path: len(data) for path, data in payloads.items()}
    for path, data in payloads.items():
        with fs.open_input_stream(path) as f:
            assert f.read() == data
    for path in payloads:
        fs.delete_file(path)
    assert _files(fs, base) == {}


def test_s3_multipart_upload(s3_server, s3_prefix):
    """> 10 MiB through open_output_stream: pyarrow uploads it in parts (10 MiB by default)."""
    fs = s3_server.filesystem()
    path = s3_prefix.removeprefix("s3://") + "/big.bin"
    data = os.urandom(12 * 1024 * 1024 + 3)
    with fs.open_output_stream(path) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
    with fs.open_input_file(path) as f:
        assert f.size() == len(data) and f.read() == data
    fs.delete_file(path)


def test_exception_in_open_output_stream_leaves_the_partial_object(s3_server, s3_prefix):
    """pyarrow's behaviour that a commit protocol on object stores must live with (see servers.py):
    nothing is visible while writing, but close() on the way out of a failing `with` block
    completes the upload, so the partial object appears under its final name."""
    fs = s3_server.filesystem()
    path = s3_prefix.removeprefix("s3://") + "/partial.bin"
    with pytest.raises(RuntimeError):
        with fs.open_output_stream(path) as f:
            f.write(b"x" * 100)
            assert fs.get_file_info(path).type == pafs.FileType.NotFound
            raise RuntimeError("boom")
    assert fs.get_file_info(path).size == 100
    fs.delete_file(path)


def test_s3_env_is_enough_for_a_client(s3_env, s3_prefix):
    """A client configured from the environment alone (keys from the AWS default chain, endpoint
    from AWS_ENDPOINT_URL) reaches the server."""
    url = urlparse(os.environ["AWS_ENDPOINT_URL"])
    assert url.geturl() == s3_env.endpoint
    fs = pafs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme,
                           region=os.environ["AWS_REGION"])
    path = s3_prefix.removeprefix("s3://") + "/env.txt"
    with fs.open_output_stream(path) as f:
        f.write(b"via env")
    with s3_env.filesystem().open_input_stream(path) as f:
        assert f.read() == b"via env"
    fs.delete_file(path)


# one driver per call, as `glipctl --address` would be; prints one JSON line
_DRIVER = r"""
import json, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(log_to_driver=False)
want_alive = int(sys.argv[1])
deadline = time.monotonic() + 30
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) == want_alive or time.monotonic() > deadline:
        break
    time.sleep(0.2)

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
    n["NodeID"], soft=False)).remote() for n in nodes])
print(json.dumps({"cpus": sorted(n["Resources"].get("CPU", 0) for n in nodes),
                  "nodes": sorted(n["NodeID"] for n in nodes), "ran_on": sorted(ran_on)}))
"""


def _drive(cluster, want_alive: int) -> dict:
    env = {**os.environ, **cluster.env()}
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(want_alive)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ray_cluster_has_two_nodes_of_one_cpu(ray_cluster):
    seen = _drive(ray_cluster, want_alive=2)
    assert seen["cpus"] == [1.0, 1.0]
    assert seen["ran_on"] == seen["nodes"]  # a task ran on each node


def test_kill_worker_node_leaves_one_alive_node(ray_cluster):
    procs = ray_cluster.node_processes(ray_cluster.worker)
    assert ray_cluster.kill_worker_node() > 0
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    seen = _drive(ray_cluster, want_alive=1)
    assert seen["cpus"] == [1.0] and seen["ran_on"] == seen["nodes"]
