"""Runs of a workspace that died without finishing are marked Crashed by the next run (issue 15).

A flow run killed with ``kill -9`` never reports its end: the Prefect API shows it Running forever. So each
``refresh`` run leaves a small record in the workspace's results folder, ``runs/<flow run id>.json``
(``{"flow_run_id", "pid", "host", "started"}``), and at its start looks at the records already there: a run
whose Prefect state is final is done (its record is removed); one still not final whose process is gone
(same host, pid not alive) is set Crashed through the Prefect API (forced, with a message naming the process
and the run that found it), and its record removed. A record of another host, or of a live pid, is left as
it is (that run may still be running). Best effort: a failure here is a warning, never the run's error.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from valuegate.flows import results_dir

RUNS_DIR = "runs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _records(where: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(where.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            if isinstance(rec, dict) and {"flow_run_id", "pid", "host"} <= set(rec):
                out.append((path, rec))
        except (OSError, ValueError):
            continue
    return out


def crash_stale_runs(workspace: str, flow_run_id: str, logger: Any) -> list[str]:
    """Mark this workspace's dead, unfinished flow runs Crashed, then record ``flow_run_id`` as running.

    Args:
        workspace: the workspace (path or URI) whose results folder keeps the records.
        flow_run_id: the calling flow run's id.
        logger: where the warnings and the crashed runs are logged (a run logger).

    Returns:
        the ids of the flow runs set Crashed.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    base = results_dir(workspace)
    if base is None:
        return []
    where = base / RUNS_DIR
    link = next((p for p in (base, where) if p.is_symlink()), None)
    if link is not None:  # records are deleted here: never through a link (issue 26)
        logger.warning(f"{link} is a symbolic link: the records of earlier runs there are left alone")
        return []
    host = socket.gethostname()
    crashed = []
    try:
        where.mkdir(parents=True, exist_ok=True)
        with get_client(sync_client=True) as client:
            for path, rec in _records(where):
                rid = str(rec["flow_run_id"])
                if rid == flow_run_id or rec["host"] != host:
                    continue
                try:
                    run = client.read_flow_run(rid)
                except ObjectNotFound:  # another API's run: nothing to mark here
                    if not _alive(int(rec["pid"])):
                        path.unlink(missing_ok=True)
                    continue
                if run.state is not None and run.state.is_final():
                    path.unlink(missing_ok=True)
                    continue
                if _alive(int(rec["pid"])):
                    continue
                message = (f"process {rec['pid']} on {host} ended without finishing this run "
                           f"(found by flow run {flow_run_id})")
                client.set_flow_run_state(rid, Crashed(message=message), force=True)
                path.unlink(missing_ok=True)
                crashed.append(rid)
                logger.warning(f"flow run {run.name} ({rid}) marked Crashed: {message}")
        record = {"flow_run_id": flow_run_id, "pid": os.getpid(), "host": host,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = where / f".{flow_run_id}.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(where / f"{flow_run_id}.json")
    except Exception as exc:  # e.g. an unwritable folder or an API hiccup: the run goes on
        logger.warning(f"could not check this workspace's earlier runs for crashes: {exc}")
    return crashed


def check_stale_runs(workspace: str) -> list[str]:
    """:func:`crash_stale_runs` for the flow run in progress (the one call at the start of ``refresh``)."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    return crash_stale_runs(workspace, str(flow_run.id), get_run_logger())
