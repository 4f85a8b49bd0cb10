"""A real S3-compatible server for tests: moto's server in a subprocess on 127.0.0.1 and a free port.

Loaded by ``conftest.py`` as a pytest plugin. Use the session-scoped ``s3_server`` fixture::

    def test_x(s3_server):
        uri = s3_server.make_bucket("my-test") + "/ws"       # s3://my-test/ws
        ws = Workspace(uri, s3_server.storage_options)

moto keeps everything in memory; each test should use its own bucket. Needs ``moto[server]`` and
``boto3`` (the ``dev`` extra); the tests that use the fixture are skipped without them.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import pytest

HOST = "127.0.0.1"  # loopback only: the server must never be reachable from outside
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass
class S3Server:
    """A running moto S3 server.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        storage_options: options for ``lancedb.connect`` / :class:`Workspace`: credentials, endpoint,
            region, ``allow_http`` (plain HTTP) and path-style requests (the bucket in the path, not the
            host name: virtual-hosted style cannot work against an IP address).
        log_path: the server's log (one line per request, with its HTTP status).
    """

    endpoint: str
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    storage_options: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.storage_options = {
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "aws_endpoint": self.endpoint,
            "aws_region": REGION,
            "allow_http": "true",
            "aws_virtual_hosted_style_request": "false",
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(proxies={}, s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 lowercase letters, digits, '-', '.'; existing is fine).

        Returns:
            ``s3://<name>``.
        """
        if not _BUCKET_NAME.match(name):
            raise ValueError(f"invalid S3 bucket name {name!r}: 3-63 chars of a-z, 0-9, '-', '.'")
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def count_status(self, status: int, path_contains: str = "") -> int:
        """How many requests the server answered with HTTP ``status`` (e.g. 412: a conditional PUT that
        lost a race), optionally only those whose request line contains ``path_contains``."""
        pattern = re.compile(rf'"[A-Z]+ (\S*) HTTP/[\d.]+" {status} ')
        n = 0
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = pattern.search(line)
                if m and path_contains in m.group(1):
                    n += 1
        return n


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _answers(endpoint: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{endpoint}/moto-api/", timeout=1.0) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:  # it answered, even if not 2xx
        return exc.code < 500
    except OSError:
        return False


def _start(log_path: Path) -> S3Server:
    port = _free_port()
    endpoint = f"http://{HOST}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; log: {log_path}")
        if _answers(endpoint):
            return S3Server(endpoint=endpoint, log_path=log_path, process=proc)
        time.sleep(0.1)
    _stop(proc)
    raise RuntimeError(
        f"moto server did not answer on {endpoint} within {START_TIMEOUT_S:.0f}s; log: {log_path}"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1:<free port> for the whole session (see :class:`S3Server`)."""
    if find_spec("moto") is None or find_spec("boto3") is None or find_spec("flask") is None:
        pytest.skip("the S3 tests need moto[server] and boto3: pip install -e '.[dev]'")
    log_dir = tmp_path_factory.mktemp("s3server")
    server = None
    for attempt in range(3):  # the free port can be taken between probing and binding it
        try:
            server = _start(log_dir / f"moto-{attempt}.log")
            break
        except RuntimeError:
            if attempt == 2:
                raise
    assert server is not None
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            _stop(server.process)


class Outage:
    """A TCP proxy in front of the S3 server that can go down and come back on the same port, so a store
    "dies" (connections refused, open ones reset) and returns with its objects (moto keeps them in memory,
    so the server itself must stay up).

    ``endpoint`` is the proxy's ``http://127.0.0.1:<port>``; :meth:`down` and :meth:`up` switch it;
    :meth:`close` stops it.
    """

    def __init__(self, server: S3Server) -> None:
        import threading

        self.upstream = server.endpoint.rsplit(":", 1)
        self.upstream_port = int(self.upstream[1])
        self.port = _free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.storage_options = {**server.storage_options, "aws_endpoint": self.endpoint}
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        """Listen again on the same port."""
        import threading

        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        """Stop listening (new connections are refused) and reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
