"""The result cache under ``<workspace>/.prefect-results`` is read only as the project's plain JSON (issue 15):
a planted record that names another serializer, or a JSON one that imports code, is a cache miss
(recomputed, with a warning), never executed."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest
from tiny import run_config


class _Touch:
    """Unpickling this creates ``path`` (what a planted payload would do instead)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_record(marker: Path, like: dict) -> bytes:
    """A result record in Prefect's format whose metadata names the pickle serializer and whose payload
    creates ``marker`` when unpickled (``like``: a genuine record, for the other metadata fields)."""
    meta = {**like["metadata"], "serializer": {"type": "pickle", "picklelib": "pickle"}}
    payload = base64.b64encode(pickle.dumps(_Touch(str(marker)))).decode()
    return json.dumps({"metadata": meta, "result": payload}).encode()


def _json_record_running(marker: Path, like: dict, how: str) -> bytes:
    """A record that names a JSON serializer and still runs ``touch marker`` when read: through an object
    hook the metadata chooses (``hook``), or through Prefect's own decoder of ``__class__`` (``class``)."""
    meta = dict(like["metadata"])
    if how == "hook":  # subprocess.Popen(dict) runs the dict's keys as argv
        meta["serializer"] = {"type": "json", "jsonlib": "json", "object_decoder": "subprocess.Popen"}
        result = json.dumps({"touch": 0, str(marker): 0})
    else:
        meta["serializer"] = {"type": "json"}
        result = json.dumps({"__class__": "subprocess.run", "data": [["touch", str(marker)]]})
    return json.dumps({"metadata": meta, "result": result}).encode()


@pytest.mark.parametrize("how", ["pickle", "hook", "class"])
def test_a_planted_record_is_refused_by_the_stores_storage(tmp_path, how):
    """The storage every cached step and the resume record use: a planted record does not exist for Prefect
    (exists() is False, so the step runs and overwrites it) and its payload never runs."""
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    from valuegate.flows.trusted_results import results_storage

    store = ResultStore(result_storage=results_storage(tmp_path / "results"), serializer=JSONSerializer(),
                        cache_result_in_memory=False)
    store.write({"kept": 3}, key="genuine")
    assert store.exists("genuine") and store.read("genuine").result == {"kept": 3}
    like = json.loads((tmp_path / "results" / "genuine").read_bytes())
    marker = tmp_path / "marker"
    planted = _pickle_record(marker, like) if how == "pickle" else _json_record_running(marker, like, how)
    (tmp_path / "results" / "planted").write_bytes(planted)
    assert not store.exists("planted")
    with pytest.raises(Exception, match="not a plain JSON record"):
        store.read("planted")
    assert not marker.exists()
    # overwriting it with a genuine record makes it readable again
    store.write([1, "a"], key="planted")
    assert store.read("planted").result == [1, "a"]


def _config(tmp_path: Path, model_dir: Path) -> str:
    return run_config(tmp_path, model_dir, train=(12, 31), valid=(4, 32), extract={"support_k": 4},
                      select={"policy": "keep_all"})


def _score_record(results: Path) -> Path:
    """The score step's cached record (its result names the scores run and the model)."""
    found = []
    for p in results.iterdir():
        if p.is_file():
            try:
                rec = json.loads(p.read_bytes())
                result = json.loads(rec["result"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(result, dict) and {"run_id", "model_fp"} <= set(result):
                found.append(p)
    assert len(found) == 1, found
    return found[0]


def test_a_planted_pickle_record_in_the_workspace_is_recomputed_not_run(prefect_harness, tmp_path, tiny_model_dir):
    from valuegate.flows.refresh import refresh

    config = _config(tmp_path, tiny_model_dir())
    first = refresh(config=config)
    record = _score_record(tmp_path / "ws" / ".prefect-results")
    marker = tmp_path / "marker"
    record.write_bytes(_pickle_record(marker, json.loads(record.read_bytes())))
    again = refresh(config=config)
    assert not marker.exists()
    # recomputed: not answered by the cache, a new scores run
    assert "score" not in again["cached_steps"] and again["run_id"] != first["run_id"]
    # the step's result was written again, as the project's JSON
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json"
    third = refresh(config=config)
    assert "score" in third["cached_steps"] and third["run_id"] == again["run_id"]

