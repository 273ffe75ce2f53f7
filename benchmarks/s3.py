"""A real S3 server for benchmarks: SeaweedFS on loopback (tests/servers.py), its environment applied."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def seaweedfs(bucket: str = "bench") -> Iterator[object]:
    """Start ``weed mini``, point this process's AWS environment at it, undo both on exit.

    Raises what the server start raises (no ``weed`` binary, no free port): callers report it.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.servers import start_s3_server

    server = start_s3_server(bucket=bucket)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
