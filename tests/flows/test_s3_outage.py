"""An S3 workspace whose server goes away in the middle of a release and comes back (issue 26, also-try).

The store sits behind :class:`s3server.Outage`, a proxy that refuses connections while "down" and answers
again, with every object, once "up". The outage starts when the release step uploads ``data.parquet``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from s3server import Outage
from test_flow import _config, _run

pytestmark = pytest.mark.integration


@pytest.fixture
def outage(s3_server):
    proxy = Outage(s3_server)
    yield proxy
    proxy.close()


def _s3_config(tmp_path, tiny_model_dir, outage, monkeypatch, bucket: str) -> tuple[str, str]:
    uri = f"s3://{bucket}/ws"
    for k, v in {"AWS_ENDPOINT_URL": outage.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "VALUEGATE_RESULTS_DIR": str(tmp_path / "results")}.items():
        monkeypatch.setenv(k, v)
    config = _config(tmp_path, tiny_model_dir())
    path = Path(config)
    path.write_text(path.read_text().replace(f'workspace = "{tmp_path / "ws"}"', f'workspace = "{uri}"'))
    return config, uri


def _down_at_data_upload(monkeypatch, outage, back_after_s: float | None) -> list[str]:
    """Take the store down when the release uploads its data file (and bring it back ``back_after_s`` later,
    or never); returns the list of upload keys seen, in order."""
    from valuegate.storage.objstore import Root

    real = Root.upload_file
    seen: list[str] = []

    def upload(self, src, key):
        seen.append(key)
        if key.endswith("/data.parquet") and seen.count(key) == 1:
            outage.down()
            if back_after_s is not None:
                threading.Timer(back_after_s, outage.up).start()
        return real(self, src, key)

    monkeypatch.setattr(Root, "upload_file", upload)
    return seen


def _ws(uri: str, outage):
    from valuegate.storage.lance import Workspace

    return Workspace(uri, outage.storage_options)


def test_a_short_outage_mid_release_heals_by_retrying(prefect_harness, tmp_path, tiny_model_dir,
                                                                    s3_server, outage, monkeypatch):
    from valuegate.storage import releases as store

    s3_server.make_bucket("vg-outage-short")
    config, uri = _s3_config(tmp_path, tiny_model_dir, outage, monkeypatch, "vg-outage-short")
    seen = _down_at_data_upload(monkeypatch, outage, back_after_s=1.0)
    out, _ = _run(config)
    # the upload met the outage (connections refused for a second); the request's own retries, or the release
    # step's, wrote it once the store was back
    assert "releases/r/v0001/data.parquet" in seen
    ws = _ws(uri, outage)
    assert out["version"] == "v0001" and out["current"] and store.read_current(ws, "r") == "v0001"
    assert [r["version"] for r in store.list_releases(ws, "r")] == ["v0001"]
    store.read_release_data(ws, "r", "v0001", verify=True)  # every file matches its manifest's sha256


def test_a_long_outage_is_one_line_and_a_rerun_finishes_the_release(prefect_harness, tmp_path, tiny_model_dir,
                                                                    s3_server, outage, monkeypatch, capsys):
    from valuegate.cli import main
    from valuegate.errors import StoreUnreachable
    from valuegate.storage import releases as store

    s3_server.make_bucket("vg-outage-long")
    config, uri = _s3_config(tmp_path, tiny_model_dir, outage, monkeypatch, "vg-outage-long")
    _down_at_data_upload(monkeypatch, outage, back_after_s=None)  # down for the rest of the run
    capsys.readouterr()
    rc = main(["run", "--config", config])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("valuegate: error:")]
    assert rc == StoreUnreachable.exit_code == 7, err[-3000:]
    assert len(line) == 1 and "Traceback" not in err, err[-3000:]
    assert outage.endpoint.split("//")[1] in line[0] and "run again" in line[0], line[0]

    outage.up()  # the store is back, with every object: nothing half-written is visible, a re-run finishes
    ws = _ws(uri, outage)
    assert store.list_releases(ws, "r") == [] and store.read_current(ws, "r") is None
    monkeypatch.undo()
    _s3_config(tmp_path, tiny_model_dir, outage, monkeypatch, "vg-outage-long")
    out, _ = _run(config)
    assert out["version"] == "v0001" and out["current"] and out["resumed"]
    assert [r["version"] for r in store.list_releases(ws, "r")] == ["v0001"]
    store.read_release_data(ws, "r", "v0001", verify=True)
