"""valuegate stops the Prefect servers it starts (issue 15, processes): ``valuegate server`` on SIGTERM,
SIGINT and SIGHUP and, on Linux, under ``kill -9``; the temporary API server of a ``valuegate run`` killed
with ``kill -9``. Real processes, watched with psutil."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from tiny import run_config

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a valuegate child: its own PREFECT_HOME, no API URL of the test harness."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def start_server(port: int, env: dict[str, str]) -> subprocess.Popen:
    """``valuegate server --port port``, returned once its API answers (the server child is up)."""
    proc = subprocess.Popen([sys.executable, "-m", "valuegate.cli", "server", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"valuegate server did not come up (exit {proc.poll()})")
        time.sleep(0.5)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def gone(procs: list[psutil.Process], within_s: float = 20) -> list[psutil.Process]:
    """The processes of ``procs`` still alive after ``within_s`` seconds (waited on, not slept)."""
    _, alive = psutil.wait_procs(procs, timeout=within_s)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_valuegate_server_stops_its_prefect_server(tmp_path, sig):
    port = free_port()
    server = start_server(port, clean_env(tmp_path))
    children = psutil.Process(server.pid).children(recursive=True)
    assert children, "valuegate server started no child"
    try:
        server.send_signal(sig)
        assert server.wait(timeout=60) == 0
        assert gone(children) == [] and not listening(port)
    finally:
        for p in [psutil.Process(server.pid)] if server.poll() is None else []:
            p.kill()
        for p in children:
            if p.is_running():
                p.kill()


@linux_only
def test_kill_9_of_valuegate_server_takes_its_prefect_server(tmp_path):
    port = free_port()
    server = start_server(port, clean_env(tmp_path))
    children = psutil.Process(server.pid).children(recursive=True)
    try:
        server.kill()
        server.wait()
        assert gone(children) == [] and not listening(port)
    finally:
        for p in children:
            if p.is_running():
                p.kill()


def tiny_config(tmp_path: Path, model_dir: Path) -> str:
    return run_config(tmp_path, model_dir, train=(12, 41), valid=(4, 42),
                      extract={"support_k": 4, "batch_size": None}, select={"policy": "keep_all"})


def api_server_child(run: subprocess.Popen, deadline_s: float = 180) -> psutil.Process:
    """The temporary Prefect API server (uvicorn ``prefect.server.api.server:create_app``) the run started."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert run.poll() is None, f"the run exited ({run.returncode}) before its API server was seen"
        for child in psutil.Process(run.pid).children(recursive=True):
            try:
                if any("prefect.server.api.server:create_app" in part for part in child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError("no temporary API server child appeared")


@linux_only
def test_kill_9_of_a_run_takes_its_temporary_api_server(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir())
    run = subprocess.Popen([sys.executable, "-m", "valuegate.cli", "run", "--config", config],
                           env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = None
    try:
        api = api_server_child(run)
        run.kill()
        run.wait()
        assert gone([api]) == []
    finally:
        if run.poll() is None:
            run.kill()
        if api is not None and api.is_running():
            api.kill()


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow_run(client, name: str, state) -> str:
    """A flow run of a placeholder flow, put in ``state`` (as a killed run leaves it)."""
    from prefect import flow

    @flow(name="stale-probe")
    def probe() -> None:
        return None

    run = client.create_flow_run(probe, name=name)
    client.set_flow_run_state(run.id, state, force=True)
    return str(run.id)


def test_the_next_run_marks_a_killed_run_of_its_workspace_crashed(harness, tmp_path, tiny_model_dir):
    """A run killed with kill -9 stays Running on the API; the next refresh on the workspace sets it Crashed
    (its process is gone), leaves a run whose process lives as it is, and forgets finished runs."""
    import socket as socket_mod

    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from valuegate.flows import results_dir
    from valuegate.flows.refresh import refresh
    from valuegate.flows.stale_runs import RUNS_DIR

    config = tiny_config(tmp_path, tiny_model_dir())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    live = os.getpid()
    host = socket_mod.gethostname()
    runs = results_dir(str(tmp_path / "ws")) / RUNS_DIR
    runs.mkdir(parents=True)
    with get_client(sync_client=True) as client:
        killed = _flow_run(client, "killed", Running())
        alive = _flow_run(client, "alive", Running())
        done = _flow_run(client, "done", Completed())
    for rid, pid in ((killed, dead.pid), (alive, live), (done, dead.pid)):
        (runs / f"{rid}.json").write_text(json.dumps({"flow_run_id": rid, "pid": pid, "host": host}))
    state = refresh(config=config, return_state=True)
    own = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        states = {rid: client.read_flow_run(rid).state for rid in (killed, alive, done)}
    assert states[killed].type.value == "CRASHED" and f"process {dead.pid}" in states[killed].message
    assert own in states[killed].message
    assert states[alive].type.value == "RUNNING" and states[done].type.value == "COMPLETED"
    # the killed and the finished runs are forgotten; the live one and this run are recorded
    assert sorted(p.stem for p in runs.glob("*.json")) == sorted([alive, own])
    assert json.loads((runs / f"{own}.json").read_text())["pid"] == os.getpid()


def _ignore_sigint() -> None:
    """As a shell starts a background job (``cmd &``) or a scheduler its task: SIGINT inherited ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_during_extraction_stops_the_run_at_once_with_exit_130(tmp_path, tiny_model_dir, sig):
    """Issue 26: SIGINT to a run's pid during extraction was ignored (the flow finished minutes later, rc 0).
    Now SIGINT and SIGTERM stop it where Python next runs, with one line and exit 130, leaving no release,
    no temporary file, and the feature rows committed so far readable (a re-run extracts the rest)."""
    from valuegate.storage.lance import Workspace

    n = 600
    config = run_config(tmp_path, tiny_model_dir(), train=(n, 43), valid=(4, 44),
                        extract={"batch_size": 1}, select={"policy": "keep_all"})
    ws = tmp_path / "ws"
    run = subprocess.Popen([sys.executable, "-m", "valuegate.cli", "run", "--config", config],
                           env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, preexec_fn=_ignore_sigint)
    try:
        deadline = time.monotonic() + 240
        while not list(ws.glob("features__*.lance")):  # extraction has started
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before extracting"
            time.sleep(0.2)
        run.send_signal(sig)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    assert err.strip().splitlines().count("valuegate: interrupted") == 1 and "Traceback" not in err, err
    assert not list(ws.rglob("manifest.json")) and not [p for p in ws.rglob("*.tmp")]
    (table,) = [p.name[: -len(".lance")] for p in ws.glob("features__*.lance")]
    stored = Workspace(str(ws)).count(table)
    assert stored < n, f"every sample was extracted ({stored}): the signal did not stop the run"


def test_a_dead_prefect_api_url_is_one_line_before_the_run_starts(tmp_path, tiny_model_dir):
    """Issue 26: PREFECT_API_URL pointing at a port nobody listens on ended in Prefect's 110-line traceback."""
    config = tiny_config(tmp_path, tiny_model_dir())
    url = f"http://127.0.0.1:{free_port()}/api"
    p = subprocess.run([sys.executable, "-m", "valuegate.cli", "run", "--config", config],
                       env={**clean_env(tmp_path), "PREFECT_API_URL": url}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith(f"valuegate: error: PREFECT_API_URL {url}: no Prefect API answers there")
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "ws").exists()
