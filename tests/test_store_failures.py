"""A full device and a damaged table end in one line and a documented exit code, never a traceback (issue 26):
``no space left on device while writing <what>`` (exit 5; nothing half-written is visible, the re-run after
freeing space completes), and ``table <name> is damaged (...); run `valuegate verify``` (exit 6)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from tiny import random_rows, write_jsonl

from valuegate.cli import main
from valuegate.errors import DamagedTable, NoSpace
from valuegate.storage.failures import store_failure


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def test_exit_codes_are_their_own():
    assert (NoSpace.exit_code, DamagedTable.exit_code) == (5, 6)


def test_store_failure_reads_what_lance_and_the_os_say():
    import errno

    full = store_failure(OSError(errno.ENOSPC, "No space left on device", "/ws/x.parquet"))
    assert isinstance(full, NoSpace) and "while writing /ws/x.parquet" in str(full)
    lance = RuntimeError("lance error: LanceError(IO): Generic LocalFileSystem error: failed to fill whole buffer")
    damaged = store_failure(lance, table="samples", workspace="/ws")
    assert isinstance(damaged, DamagedTable) and "table samples is damaged" in str(damaged)
    assert "valuegate verify --workspace /ws" in str(damaged)
    gone = RuntimeError("lance error: Not found: ws/features__ab12.lance/data/0101.lance, local.rs:273:40")
    assert "table features__ab12 is damaged" in str(store_failure(gone))
    assert store_failure(ValueError("Invalid user input: column 'x' not found")) is None


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_a_full_disk_is_one_line_exit_5_and_the_rerun_after_freeing_space_completes(tmp_path):
    rows = random_rows(3000, seed=3)
    for r in rows:
        r["response"] = r["response"] * 20
    data = write_jsonl(tmp_path / "big.jsonl", rows)  # ~1 MB of rows: more than the 600 kB device holds
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ingest = f"{sys.executable} -m valuegate.cli ingest t {data} --workspace {mnt}/ws"
    script = (f"mount -t tmpfs -o size=600k tmpfs {mnt} && {{ {ingest}; echo rc=$?; }} && "
              f"mount -o remount,size=32m {mnt} && {{ {ingest}; echo rc=$?; }}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    full, _, rest = out.stderr.partition("\n")
    assert full.startswith("valuegate: error: no space left on device while writing table "), out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.split() == ["rc=5", "rc=0"], out.stdout + out.stderr
    assert "3000 rows, 3000 kept" in rest, rest


def test_a_damaged_table_is_one_line_naming_it_exit_6(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "t.jsonl", random_rows(40, seed=5))
    ws = tmp_path / "ws"
    model = tiny_model_dir()
    assert main(["ingest", "t", str(data), "--workspace", str(ws)]) == 0
    capsys.readouterr()
    (fragment,) = sorted((ws / "samples.lance" / "data").iterdir())[:1]
    with open(fragment, "r+b") as fh:
        fh.truncate(fragment.stat().st_size // 2)
    code = main(["extract", "t", "--workspace", str(ws), "--quiet", "--model.name", str(model),
                 "--model.device", "cpu"])
    err = capsys.readouterr().err
    assert code == 6, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("valuegate: error: table samples is damaged") and "valuegate verify" in err
    assert ".rs:" not in err


def test_damage_found_outside_the_workspace_calls_is_translated_at_the_cli(tmp_path, capsys, monkeypatch):
    from valuegate import cli

    def reads_a_zeroed_file(args):
        raise ValueError(f"Invalid input, file does not appear to be a Lance file (invalid magic: [0, 0, 0, 0]) "
                         f"{tmp_path}/ws/scores.lance/data/x.lance")

    monkeypatch.setattr(cli, "_cmd_fetch_model", reads_a_zeroed_file)
    assert main(["fetch-model"]) == 6
    err = capsys.readouterr().err
    assert err.startswith("valuegate: error: table scores is damaged") and len(err.strip().splitlines()) == 1


_RELEASE_ON_A_FULL_DISK = """
import os, sys
import numpy as np, polars as pl
from valuegate.errors import NoSpace
from valuegate.storage import releases as store
ws = sys.argv[1]
version = store.allocate_version(ws, "r")
rng = np.random.default_rng(0)
data = pl.DataFrame({"id": [str(i) for i in range(200_000)], "value": rng.random(200_000),
                     "noise": rng.random(200_000)})
try:
    store.write_release(ws, "r", version, data, {"gate": {"passed": True}})
except NoSpace as exc:
    print("NoSpace", exc)
left = sorted(os.path.relpath(os.path.join(d, f), ws) for d, _, fs in os.walk(ws) for f in fs)
print("files", *left)
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_a_release_on_a_full_disk_names_its_file_and_leaves_no_temporary(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=400k tmpfs {mnt} && "
              f"{sys.executable} -c '{_RELEASE_ON_A_FULL_DISK}' {mnt}/ws")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    said, files = out.stdout.strip().splitlines()
    assert said.startswith(f"NoSpace no space left on device while writing {mnt}/ws/releases/r/v0001/data.parquet"), \
        out.stdout + out.stderr
    assert files.split() == ["files", "releases/r/v0001/.allocated"]  # no temporary, no manifest
