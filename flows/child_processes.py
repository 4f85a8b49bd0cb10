"""Child processes that never outlive valuegate: the Prefect servers it starts.

Two children: ``prefect server start`` under ``valuegate server`` (see :mod:`valuegate.flows.serve`), and
the temporary API server Prefect itself starts for a run when no ``PREFECT_API_URL`` is set (Prefect 3.8's
``SubprocessASGIServer``: ``python -m uvicorn ... prefect.server.api.server:create_app``). A signal the parent
can catch is handled where the child is started (the server command terminates its child and waits); one it
cannot (``kill -9``) is covered by the kernel: on Linux each child is started with ``PR_SET_PDEATHSIG``, so
it gets SIGTERM when the process that started it dies, however it dies. Elsewhere only the catchable signals
are covered.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from functools import partial
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _pdeathsig(parent: int, sig: int) -> None:
    """In the forked child, before exec: get ``sig`` when the parent dies; if it died already, now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return  # no such call here: the catchable signals still stop the child
    if os.getppid() != parent:  # the parent died between fork and prctl
        os.kill(os.getpid(), sig)


def dies_with_parent(sig: int = signal.SIGTERM) -> Any:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this process dies (Linux;
    None elsewhere). Start the child from a thread that lives as long as the process (the kernel tracks the
    thread that forked)."""
    if not sys.platform.startswith("linux"):
        return None
    return partial(_pdeathsig, os.getpid(), int(sig))


def _api_server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer

    class DyingWithParentASGIServer(SubprocessASGIServer):
        """Prefect's temporary API server, its process started with :func:`dies_with_parent`.

        ``_run_uvicorn_command`` is Prefect 3.8.8's own (same command, environment and settings) with the
        ``preexec_fn`` added; everything else (port choice, health wait, the atexit stop) is Prefect's.
        """

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect
            from prefect.settings import get_current_settings

            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                          "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                      "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env,
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=dies_with_parent(),
            )

    return DyingWithParentASGIServer


def start_temporary_api_dying_with_process() -> str | None:
    """Start, from the calling (main) thread, the temporary API server Prefect would start on its first
    client, as a child that dies with this process even under ``kill -9``. Returns its API URL, or None
    when none is needed (``PREFECT_API_URL`` set, or Prefect's ephemeral server turned off).

    Prefect keeps one temporary server per process (``SubprocessASGIServer()`` returns the instance
    registered for no port): registering this one first makes Prefect's own clients use it, and Prefect
    stops it at exit as its own.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    cls = _api_server_class()
    existing = cls._instances.get(None)
    if existing is not None and existing.running:
        return existing.api_url  # started already (by Prefect or by an earlier call)
    cls._instances.pop(None, None)
    server = cls()
    server.start()
    return server.api_url


def check_api_reachable(timeout_s: float = 10.0) -> None:
    """When ``PREFECT_API_URL`` is set, make sure a Prefect API answers there before a run starts (else
    Prefect fails deep in its client with a long traceback, issue 26).

    Raises:
        ValuegateError: one line naming the URL and what to do.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    from valuegate.errors import ValuegateError

    url = PREFECT_API_URL.value()
    if not url:
        return
    try:
        answer = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValuegateError(f"PREFECT_API_URL {url}: no Prefect API answers there ({why}); start one "
                             "(`valuegate server`) or unset PREFECT_API_URL to run with a temporary one") from exc
    if answer.status_code != 200:
        raise ValuegateError(f"PREFECT_API_URL {url}: the health check answered HTTP {answer.status_code}; "
                             "is it a Prefect API?")
