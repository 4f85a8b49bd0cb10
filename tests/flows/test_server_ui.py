"""``valuegate server --port P`` serves a Prefect UI that talks to the API on P (issue 16): its
``/ui-settings`` names P, and a flow-run page renders in headless Chromium instead of "Oops. Something went
wrong." (the UI called port 4200 whatever the port). SIGTERM stops the server and its child."""

from __future__ import annotations

import shutil
import signal
import subprocess

import httpx
import psutil
from test_processes import clean_env, free_port, gone, listening, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OOPS = "Oops. Something went wrong."


def _dom(url: str, profile: str) -> str:
    """The DOM of ``url`` after its scripts ran (headless Chromium, up to 20 s of virtual time)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
    return subprocess.run([CHROMIUM, *flags, "--dump-dom", url], check=True, timeout=180,
                          capture_output=True, text=True).stdout


def _post(url: str, body: dict) -> dict:
    """POST to the fresh server until it answers 2xx (seen once under load: a 5xx while its SQLite database
    was still busy after start-up, and the test read a missing "id"); at most 60 s."""
    import time

    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(url, json=body, timeout=10)
        if r.is_success or time.monotonic() > deadline:
            assert r.is_success, (r.status_code, r.text[:500])
            return r.json()
        time.sleep(1)


def test_the_ui_talks_to_the_port_it_was_given(tmp_path):
    port = free_port()
    assert port != 4200
    server = start_server(port, clean_env(tmp_path))
    children = psutil.Process(server.pid).children(recursive=True)
    base = f"http://127.0.0.1:{port}"
    try:
        ui = httpx.get(f"{base}/ui-settings", timeout=10).json()
        assert ui["api_url"] == f"{base}/api"
        if CHROMIUM is not None:  # the UI's own page, rendered: a flow run made through the API
            flow = _post(f"{base}/api/flows/", {"name": "ui-check"})
            run = _post(f"{base}/api/flow_runs/", {"flow_id": flow["id"], "name": "ui-check-run"})
            dom = _dom(f"{base}/runs/flow-run/{run['id']}", str(tmp_path / "profile"))
            assert OOPS not in dom and "ui-check-run" in dom, dom[-2000:]
        # SIGTERM: the command stops its Prefect server before it exits
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert gone(children) == [] and not listening(port)
    finally:
        if server.poll() is None:
            server.kill()
        for p in children:
            if p.is_running():
                p.kill()
