"""A private redis-server for tests: started on a unix socket in a temporary folder, no TCP port."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """Yields a ``unix://`` URL; the server is killed on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it with apt-get)")
    sock = tmp / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("redis-server did not start")
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
