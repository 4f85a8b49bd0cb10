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
            flow = httpx.post(f"{base}/api/flows/", json={"name": "ui-check"}, timeout=10).json()
            run = httpx.post(f"{base}/api/flow_runs/", json={"flow_id": flow["id"], "name": "ui-check-run"},
                             timeout=10).json()
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
