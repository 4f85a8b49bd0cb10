"""Scheduled deployments of the refresh flow (``valuegate serve``) and the local Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any


def refresh_deployment(name: str, cron: str, config: str | None, timezone: str = "UTC") -> Any:
    """The deployment object of ``refresh`` on a cron schedule (parameters: the config path)."""
    from prefect.schedules import Cron

    from valuegate.flows.refresh import refresh

    return refresh.to_deployment(name=name, schedule=Cron(cron, timezone=timezone),
                                 parameters={"config": config} if config else {},
                                 description="valuegate refresh: ingest → extract → score → gate → release")


def register_deployment(name: str, cron: str, config: str | None) -> str:
    """Register the scheduled deployment with the Prefect API without serving it. Returns its id."""
    return str(refresh_deployment(name, cron, config).apply())


def serve_refresh(name: str, cron: str, config: str | None) -> None:
    """Register the deployment and run its scheduled flow runs in this process (blocks; Ctrl-C stops)."""
    from prefect import serve

    serve(refresh_deployment(name, cron, config))


def start_local_server(port: int = 4200, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``prefect server start`` bound to 127.0.0.1 only, as a child process that dies with this one (see
    :func:`valuegate.flows.child_processes.dies_with_parent`).

    Its UI talks to the API on ``port``: Prefect's UI takes its API URL from ``PREFECT_UI_API_URL`` (else
    ``PREFECT_API_URL``, else host and ``PREFECT_SERVER_API_PORT``), never from ``--port``, so without these
    any port but 4200 served a UI that called 4200 ("Oops. Something went wrong.").
    """
    from valuegate.flows.child_processes import dies_with_parent

    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_API_PORT": str(port), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, preexec_fn=dies_with_parent())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_local_server(port: int = 4200, grace_s: float = 30.0) -> int:
    """:func:`start_local_server` and block until it exits or this process gets SIGTERM, SIGINT or SIGHUP;
    on a signal, terminate the server, wait for it (``grace_s``, then kill) and return 0.

    Returns:
        0 after a stop by signal, else the server's own exit code.
    """
    import threading

    proc = start_local_server(port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in STOP_SIGNALS}
    try:
        while proc.poll() is None and not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0 if stop.is_set() else proc.returncode
