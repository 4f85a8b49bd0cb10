"""The refresh DAG: ingest → validation-set → extract → score → select → allocate → gate → release →
report → promote.

Wiring only: every step is a module of ``tasks/`` named as the step (``-`` → ``_``) whose ``run`` holds the
logic; the task here is a thin wrapper with the policy in its decorator (name, retries, cache) that logs
what the step returns. Retries only where a retry can help (I/O), never on the gate or deterministic
compute. Cached steps return plain JSON (``dataclasses.asdict`` of the step's result):
:mod:`valuegate.flows.trusted_results` reads nothing else back.

Caching and resuming (results persist under ``<workspace>/.prefect-results``, see :mod:`valuegate.flows`):

* ``ingest``, ``validation-set``, ``extract`` and ``score`` are cached on what their results depend on
  (source bytes and the dataset tables' versions; the validation file's bytes and the registry's version;
  the dataset's ids, the pinned validation version and its content, the model's files and every
  model/extract setting, and for ``score`` every score setting too). Any change is a new key, so a cached result is never stale; an unchanged input skips the step
  (a re-run after a crash does not score again; a new aggregate or normalisation scores again without
  extracting).
* ``select``, ``gate``, ``release``, ``report`` and ``promote`` are never cached: every run cuts, checks and
  writes its own release. One exception makes a re-run *resume* instead of duplicating: right after a run
  allocates a version it records it, keyed on everything the release is cut from (the scores run, the
  settings, the input hashes and the release that was current), and it clears the record once it has
  promoted (or found a newer release current). A run that stops before that, by an exception, a failed
  gate or SIGKILL, leaves the record; a later run with exactly those inputs takes that version over
  (writing again whatever files a crash left incomplete, re-running the gate) instead of writing a copy.
  While a run works on a version it holds an exclusive ``flock`` on a claim file beside the records
  (``release-claims/<name>-<version>.lock``); the kernel drops it when the process dies, so a version is
  taken over only from a run that is gone, never from one still running with the same inputs.
* A release is complete only when every file is in it: the release step stages data, scores and the
  gate's Data Docs; the report step renders the report from the completion record in memory, copies it
  in and only then writes ``manifest.json``. An incomplete version is never listed, read or promoted.
  Versions a run leaves incomplete with other inputs (or whose resume record was lost) stay unlisted,
  and the next run's allocate step empties every one whose claim is free down to its ``.allocated``
  marker (numbers are never reused), with its staging folders (:func:`valuegate.storage.releases.clean_abandoned`;
  on an object store only those untouched for an hour).

Runners (``settings.runner``): ``local`` runs every step in the flow's process. ``dask`` and ``ray`` first extract the training ids still missing for the fingerprint in
deterministic shards, one ``extract-shard`` task per shard on a ``DaskTaskRunner``/``RayTaskRunner`` (a
local cluster of ``workers`` processes started and stopped here, or the cluster at ``address``); then
``extract`` runs as with ``local`` (the validation features), ``score`` plans the run (``plan-scores``)
and one ``score-shard`` task per shard scores it on the cluster (same scores).

Every step's wall time goes into the returned summary, the summary artifact and (for the steps before
the release is written) the manifest's ``timings``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from valuegate.default_model import DEFAULT_MODEL_ALIAS, default_model_dir
from valuegate.digests import sha256_path
from valuegate.engine.encoding import Unvalued
from valuegate.errors import ClusterLost, GateFailed, InternalError, ValuegateError
from valuegate.flows import (
    KeyedOn,
    code_fingerprint,
    files_stat,
    persisted,
)
from valuegate.flows.stale_runs import check_stale_runs
from valuegate.flows.user_errors import retry_unless_user_error
from valuegate.flows.validation import register_validation_version
from valuegate.inputs.readers import source_files
from valuegate.settings import Settings, check_run_inputs, load_settings, needs_unconditional
from valuegate.storage import schemas
from valuegate.storage.versions import table_versions, workspace_uri
from valuegate.tasks import allocate as allocate_step
from valuegate.tasks import extract as extract_step
from valuegate.tasks import gate as gate_step
from valuegate.tasks import ingest as ingest_step
from valuegate.tasks import promote as promote_step
from valuegate.tasks import release as release_step
from valuegate.tasks import report as report_step
from valuegate.tasks import score as score_step
from valuegate.tasks import select as select_step
from valuegate.tasks.extract import ExtractResult
from valuegate.tasks.release import staging_dir
from valuegate.tasks.score import unscored_counts
from valuegate.tasks.select import check_group_by, dropped_reason_counts


def _docs_dir(settings: Settings, version: str) -> str:
    """Where the gate renders its Data Docs before the release copies them in: beside the release on a
    local workspace, a local temporary folder for an object-store one."""
    return staging_dir(settings, version, "gate")


def _scoring_settings(settings: Settings) -> Settings:
    """The settings scoring runs with: the selection policy's aggregate is the one scored."""
    return settings.model_copy(update={"score": settings.score.model_copy(
        update={"aggregate": settings.select.aggregate})})


# --------------------------------------------------------------------------------------------------
# cache keys: everything a cached step's result depends on
# --------------------------------------------------------------------------------------------------


def _ingest_key(params: dict[str, Any]) -> dict[str, Any]:
    """Source bytes, ingest settings, and the versions of the tables ingestion writes and counts (so a
    change to the dataset by anyone, this step included, is a new key)."""
    s: Settings = params["settings"]
    return {"workspace": workspace_uri(s.workspace), "dataset": s.data.dataset,
            "ingest": s.ingest.model_dump(mode="json"), "fields": s.data.fields,
            "sources": [_source_key(src) for src in s.data.sources],
            "tables": table_versions(s.workspace, [schemas.MEMBERS, schemas.QUARANTINE, schemas.INGESTS]),
            "code": code_fingerprint()}


def _source_key(spec: str) -> list[Any]:
    """A configured source's files and their content hashes (a folder or glob, expanded); one that cannot be
    read is keyed by its spelling alone, and the step's body says what is wrong with it."""
    try:
        return [[str(Path(p).resolve()), sha256_path(p)] for p in source_files(spec)]
    except (ValuegateError, OSError):
        return [spec, None]


def _score_key(params: dict[str, Any]) -> dict[str, Any]:
    """The dataset's ids, the pinned validation version and its content, the model (its files when local)
    and every model/extract/score setting (as scored)."""
    s = _scoring_settings(params["settings"])
    valset = params["valset"]
    model_dir = str(default_model_dir()) if s.model.name in (DEFAULT_MODEL_ALIAS, "") else s.model.name
    return {"workspace": workspace_uri(s.workspace), "dataset": s.data.dataset, "dataset_fp": params["dataset_fp"],
            "valset": [valset["valset"], valset["content_hash"]],
            "model": s.model.model_dump(mode="json"), "model_files": files_stat(model_dir),
            "adapter_files": files_stat(s.model.adapter), "extract": s.extract.model_dump(mode="json", exclude={"encode_workers"}),
            "score": s.score.model_dump(mode="json"), "unconditional": needs_unconditional(s),
            "code": code_fingerprint()}


def _extract_key(params: dict[str, Any]) -> dict[str, Any]:
    """What the features depend on: the key of ``score`` (:func:`_score_key`) but the score settings (a
    new aggregate or normalisation scores the stored features again, it extracts nothing)."""
    key = _score_key(params)
    del key["score"]
    return key


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------


@task(name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error,
      cache_policy=KeyedOn(parts=_ingest_key), result_serializer="json")
def ingest_sources(settings: Settings) -> dict[str, Any]:
    """Ingest every configured source into the dataset (:func:`valuegate.tasks.ingest.run`; unchanged files
    are no-ops).

    Returns:
        :class:`~valuegate.tasks.ingest.IngestResult` as a dict: this call's counts (``rows``, ``kept``,
        ``new_samples``, ``duplicates``, ``quarantined``, ``left``), the dataset as it stands
        (``dataset_rows``, ``dataset_quarantined``) and ``dataset_fp``, the sha256 of its sorted distinct
        ids (what scoring is keyed on).
    """
    log = get_run_logger()
    return dataclasses.asdict(ingest_step.run(settings, on_file=lambda rep: log.info(rep.line())))


@task(name="extract", cache_policy=KeyedOn(parts=_extract_key), result_serializer="json")
def extract_features(settings: Settings, valset: dict[str, Any], dataset_fp: str) -> dict[str, Any]:
    """Extract the features still missing for the dataset and the pinned validation version
    (:func:`valuegate.tasks.extract.run`; deterministic and idempotent: no retries).

    Args:
        valset: the pinned validation version (``valset``: ``name@vN``, ``content_hash``).
        dataset_fp: the dataset's id fingerprint from ``ingest``; part of the cache key (the body extracts
            the dataset as stored).

    Returns:
        :class:`~valuegate.tasks.extract.ExtractResult` as a dict.
    """
    res = extract_step.run(_scoring_settings(settings), valset["valset"])
    get_run_logger().info(res.line())
    return dataclasses.asdict(res)


@task(name="score", cache_policy=KeyedOn(parts=_score_key), result_serializer="json")
def score_against_valset(settings: Settings, valset: dict[str, Any], dataset_fp: str,
                         extracted: dict[str, Any]) -> dict[str, Any]:
    """Score the dataset on the stored features and write one scores run (:func:`valuegate.tasks.score.run`;
    deterministic: no retries).

    Args:
        valset, dataset_fp: as ``extract``; with the settings, the cache key.
        extracted: what ``extract`` returned (the fingerprints, the samples the model refused).

    Returns:
        :class:`~valuegate.tasks.score.ScoreResult` as a dict: ``run_id`` (the scores run), ``model_fp``,
        ``n_train``, ``truncated``, ``unscored``, ``unscored_ids``, ``timings`` (``read``, ``score``,
        ``write``).
    """
    res, line = score_step.run(_scoring_settings(settings), ExtractResult.from_dict(extracted))
    get_run_logger().info(line)
    return dataclasses.asdict(res)


@task(name="plan-shards", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)
def plan_shards(settings: Settings) -> dict[str, Any]:
    """The training ids still without features for the fingerprint, cut into deterministic shards (the
    feature set is registered here, before any shard runs)."""
    return dataclasses.asdict(extract_step.shard_plan(settings))


@task(name="extract-shard", task_run_name="extract-shard-{shard}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def extract_shard_task(shard: int, settings: Settings, ids: list[str], model_fp: str, fp_settings: dict,
                       lowest_likelihood_ratio: float) -> dict[str, Any]:
    """Extract one shard on whichever worker the task runner gives it (retried: a lost worker or a failed
    write; a retry extracts only the ids the failed attempt did not commit)."""
    return extract_step.extract_shard(workspace_uri(settings.workspace), ids, settings, model_fp, fp_settings,
                                      lowest_likelihood_ratio)


def _task_runner(settings: Settings):
    """The Prefect task runner of ``settings.runner`` (dask or ray; with no address a local cluster of
    ``workers`` single-threaded worker processes, started on enter and stopped on exit)."""
    r = settings.runner
    if r.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if r.address:
            return DaskTaskRunner(address=r.address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": r.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})
    if r.kind == "ray":
        from prefect_ray import RayTaskRunner

        if r.address:
            return RayTaskRunner(address=r.address)
        return RayTaskRunner(init_kwargs={"num_cpus": r.workers, "include_dashboard": False})
    raise ValuegateError(f"runner {r.kind!r} has no task runner (local runs every step in the flow)")


def _remote_options(settings: Settings):
    """Ray: a shard asks for a GPU when the model runs on one (one model replica per device)."""
    if settings.runner.kind == "ray" and settings.model.device.startswith("cuda"):
        from prefect_ray.context import remote_options

        return remote_options(num_gpus=1)
    return nullcontext()


# What a runner raises when the cluster (or a task's worker, too often) is gone rather than a shard failing:
# distributed's FutureCancelledError (scheduler-connection-lost), CommClosedError, KilledWorker (the
# scheduler gave up on a task whose workers kept dying); Ray's worker/actor/node/object-loss errors.
_CLUSTER_LOST = frozenset({"FutureCancelledError", "CancelledError", "CommClosedError", "StreamClosedError",
                           "KilledWorker", "WorkerCrashedError", "RayActorError", "ActorDiedError",
                           "NodeDiedError", "ObjectLostError", "OwnerDiedError", "RaySystemError",
                           "LocalRayletDiedError"})


def _cluster_lost(exc: BaseException) -> bool:
    return any(t.__name__ in _CLUSTER_LOST for t in type(exc).__mro__) or isinstance(exc, ConnectionError)


def _cluster_lost_error(settings: Settings, plan: dict[str, Any], exc: BaseException) -> ClusterLost:
    """The error of a run whose cluster went away: what happened, what is stored, how to resume."""
    r = settings.runner
    where = f"at {r.address}" if r.address else f"(local cluster of {r.workers} workers)"
    wanted = {i for shard in plan["shards"] for i in shard}
    try:
        done = extract_step.stored_count(settings, plan["model_fp"], wanted)
        stored = (f"{done} of the {len(wanted)} missing samples were extracted and are stored; run again "
                  f"(on a working cluster) to extract only the {len(wanted) - done} still missing")
    except Exception as read_exc:  # the store may be what went away
        stored = f"could not count what was stored ({read_exc}); run again to extract what is missing"
    return ClusterLost(f"lost the {r.kind} cluster {where} during sharded extraction "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {stored}")


def _extract_sharded(settings: Settings) -> dict[str, Any]:
    """dask/ray: extract the missing training features, one task per shard on the runner's workers.

    Starts no cluster when nothing is missing. Every shard finishes (or exhausts its retries) before the
    first failure is raised. Returns ``extracted``, ``shards``, ``missing``, ``workers`` (distinct worker
    processes), ``model_loads`` (model loads summed over those processes) and ``forward_s`` (the shards'
    extraction seconds, summed over workers).

    Raises:
        ClusterLost: the cluster went away (the message says what is stored and that a re-run resumes).
    """
    plan = plan_shards(settings)
    out = {"extracted": 0, "shards": len(plan["shards"]), "missing": plan["n_missing"], "workers": 0,
           "model_loads": 0, "forward_s": 0.0}
    if not plan["shards"]:
        return out
    fixed = {"settings": settings, "model_fp": plan["model_fp"], "fp_settings": plan["fp_settings"],
             "lowest_likelihood_ratio": plan["lowest_likelihood_ratio"]}
    try:
        with _task_runner(settings) as runner, _remote_options(settings):
            futures = [runner.submit(extract_shard_task, {"shard": k, "ids": ids, **fixed})
                       for k, ids in enumerate(plan["shards"])]
            wait(futures)
            results = [f.result() for f in futures]  # raises the first failed shard's exception
    except Exception as exc:
        if not _cluster_lost(exc):
            raise
        raise _cluster_lost_error(settings, plan, exc) from exc
    loads: dict[int, int] = {}
    for res in results:
        out["extracted"] += res["extracted"]
        out["forward_s"] = round(out["forward_s"] + res["seconds"], 3)
        loads[res["pid"]] = max(loads.get(res["pid"], 0), res["model_loads"])
    out["workers"], out["model_loads"] = len(loads), sum(loads.values())
    get_run_logger().info(f"extracted {out['extracted']} of {plan['n_missing']} missing samples in "
                          f"{out['shards']} shards on {out['workers']} {settings.runner.kind} workers "
                          f"({out['model_loads']} model loads)")
    return out


@task(name="plan-scores", cache_policy=KeyedOn(parts=_score_key), result_serializer="json")
def plan_scores(settings: Settings, valset: dict[str, Any], dataset_fp: str,
                extracted: dict[str, Any]) -> dict[str, Any]:
    """dask/ray: resolve the scores run the shards write into (:func:`valuegate.tasks.score.plan_run`), on
    the features ``extract`` stored.

    Cached on everything the scores depend on (the key of ``score``): a re-run with the same inputs gets the
    same run back and scores only the shards it does not hold yet.

    Returns:
        ``plan`` (:class:`~valuegate.tasks.score.ScoringPlan` as a dict) and the samples the run leaves out
        as ``score`` reports them: ``unscored`` ({reason: count}) and ``unscored_ids`` ([id, reason, message]).
    """
    ext = ExtractResult.from_dict(extracted)
    plan = score_step.plan_for(_scoring_settings(settings), ext)
    return {"plan": dataclasses.asdict(plan), "unscored": unscored_counts(ext.refused),
            "unscored_ids": ext.refused}


@task(name="score-shard", task_run_name="score-shard-{shard}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def score_shard_task(shard: int, settings: Settings, plan: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """Score one shard of the run on whichever worker the runner gives it and write its rows into the run
    (retried: a lost worker or a failed write; rows are inserted only if absent, so never twice)."""
    return score_step.score_shard(score_step.ScoringPlan(**plan), ids, _scoring_settings(settings))


def _score_sharded(settings: Settings, planned: dict[str, Any]) -> dict[str, Any]:
    """dask/ray: score the run of ``planned`` (from ``plan-scores``) in shards on the runner's workers;
    shards whose every row the run already holds (a resumed run) are not submitted again.

    Returns:
        what ``score`` returns (``run_id``, ``model_fp``, ``n_train``, ``timings`` with
        ``read``/``score``/``write`` summed over shards, ``truncated`` (rows of the run flagged),
        ``unscored`` and ``unscored_ids`` (from ``plan-scores``)) and ``score_shards`` (``shards``,
        ``submitted``, ``workers``, ``context_loads``).
    """
    plan = planned["plan"]
    shards, todo = score_step.shards_to_score(settings, plan)
    timings = {"read": 0.0, "score": 0.0, "write": 0.0}
    loads: dict[int, int] = {}
    if todo:
        try:
            with _task_runner(settings) as runner:
                futures = [runner.submit(score_shard_task, {"shard": k, "settings": settings, "plan": plan,
                                                            "ids": ids}) for k, ids in todo]
                wait(futures)
                results = [f.result() for f in futures]  # raises the first failed shard's exception
        except Exception as exc:
            if not _cluster_lost(exc):
                raise
            r = settings.runner
            raise ClusterLost(
                f"lost the {r.kind} cluster {f'at {r.address}' if r.address else ''} during sharded scoring "
                f"({type(exc).__name__}); the shards already written stay in scores run {plan['run_id']}: run "
                "again (on a working cluster) to score only the rest") from exc
        for res in results:
            loads[res["pid"]] = max(loads.get(res["pid"], 0), res["context_loads"])
            for key in ("read", "score", "write"):
                timings[key] += res[key]
    n, truncated = score_step.run_rows(settings, plan["run_id"])
    if n != len(plan["ids"]):
        raise InternalError(f"scores run {plan['run_id']} holds {n} rows for {len(plan['ids'])} samples "
                             "after every shard finished")
    unscored = planned.get("unscored", {})  # absent from a plan cached by an older valuegate
    said = (f"; {truncated} truncated at max_length" if truncated else "") + (
        f"; not scored: {', '.join(f'{k} {why}' for why, k in unscored.items())}" if unscored else "")
    get_run_logger().info(f"scored {len(plan['ids'])} samples in {len(shards)} shards ({len(todo)} submitted) "
                          f"on {len(loads)} {settings.runner.kind} workers ({sum(loads.values())} reads of the "
                          f"validation side){said}")
    return {"run_id": plan["run_id"], "model_fp": plan["fp_t"], "n_train": len(plan["ids"]),
            "timings": timings, "truncated": truncated,
            "unscored": unscored, "unscored_ids": [Unvalued(*p) for p in planned.get("unscored_ids", [])],
            "score_shards": {"shards": len(shards), "submitted": len(todo), "workers": len(loads),
                             "context_loads": sum(loads.values())}}


@task(name="select", cache_policy=NO_CACHE)
def select(settings: Settings, run_id: str) -> Any:
    """Apply the selection policy to the scored samples (:func:`valuegate.tasks.select.run`)."""
    return select_step.run(settings, run_id)


@task(name="allocate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def allocate_release(settings: Settings, resume: str | None, run_id: str, release_key: str) -> str:
    """The version this run writes, claimed for this run: :func:`valuegate.tasks.allocate.run`."""
    res = allocate_step.run(settings, resume, run_id, release_key)
    log = get_run_logger()
    if res.cleaned:
        log.info(f"cleaned {len(res.cleaned)} abandoned incomplete release version(s) of {settings.release.name}, "
                 f"their runs gone: {', '.join(res.cleaned)} (numbers stay taken)")
    for warning in res.warnings:
        log.warning(warning)
    if res.resumed:
        log.info(f"resuming release {settings.release.name}/{res.version}, left by a run with the same inputs")
    return res.version


@task(name="gate", cache_policy=NO_CACHE)
def gate(settings: Settings, selected: Any, counts: dict[str, int], valset: dict[str, Any],
         docs_dir: str) -> dict[str, Any]:
    """Great Expectations on the candidate release (:func:`valuegate.tasks.gate.run`; never retried: a
    verdict is not a transient error)."""
    res = gate_step.run(settings, selected, counts, valset, docs_dir)
    return {"passed": res.passed, "failures": res.failures, "docs_index": str(res.docs_index or "")}


@task(name="release", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def write_release_task(settings: Settings, selected: Any, manifest_parts: dict[str, Any], gate_result: dict,
                       version: str, docs_dir: str) -> dict[str, Any]:
    """Stage the release files (:func:`valuegate.tasks.release.run`); returns the completion record."""
    return release_step.run(settings, selected, manifest_parts, gate_result, version, docs_dir).record


@task(name="report", cache_policy=NO_CACHE)
def report(settings: Settings, selected: Any, version: str, previous: str | None, record: dict[str, Any]) -> str:
    """Render the report and complete the release (:func:`valuegate.tasks.report.run`); returns where the
    report is."""
    res = report_step.run(settings, selected, version, previous, record)
    for warning in res.warnings:
        get_run_logger().warning(warning)
    return res.path


@task(name="promote", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def promote_task(settings: Settings, version: str) -> dict[str, Any]:
    """Move CURRENT to the release, forward only (:func:`valuegate.tasks.promote.run`; only called after the
    gate passed).

    Returns:
        ``{"current": bool, "previous": str | None, "reason": str | None}``
        (:class:`~valuegate.tasks.promote.PromoteResult`).
    """
    res = promote_step.run(settings, version)
    if res.message:
        get_run_logger().warning(res.message)
    return {"current": res.current, "previous": res.previous, "reason": res.reason}


# --------------------------------------------------------------------------------------------------
# orchestration helpers: step timing, the resume record of a failed release
# --------------------------------------------------------------------------------------------------


class _Steps:
    """Runs tasks, recording each step's wall time (seconds) and which steps were answered by the cache."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.cached: list[str] = []

    def __call__(self, name: str, step: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            state = step(*args, return_state=True)
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
        if state.name == "Cached":
            self.cached.append(name)
        return state.result()  # raises the task's exception if it failed


# --------------------------------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------------------------------


@flow(name="refresh", log_prints=True)
def refresh(config: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """ingest → validation-set → extract → score → select → allocate → gate → release → report → promote, on the
    settings of ``config`` (+ overrides).

    Parameters are small references (a config path, a dict of overrides), never data.

    Returns:
        a summary: release ``version``; ``current``, whether it became current (an ordinary promotion
        never moves CURRENT back: when another run promoted a newer release meanwhile, ``current`` is
        False and ``reason`` says ``"not promoted: newer release vNNNN is current"``); ``previous``, the
        version its promotion actually replaced (None: none was current), or the newer one that stays
        current; counts (the ingest's counts, ``rows`` ... ``left``, beside ``scored`` and the rest),
        ``kept`` (samples the selection kept) and ``dropped_reasons`` ({reason kind: dropped samples}, most
        frequent first), ``gate`` (``passed``, ``failures``), ``timings`` (wall seconds per step:
        ``ingest``, ``validation-set``, ``extract``, ``score``, ``select``, ``allocate``, ``gate``,
        ``release``, ``report``, ``promote``, and ``total``), ``cached_steps`` (steps answered by the cache),
        ``resumed`` (whether the release was one a failed run left), ``unconditional`` (``setting``, the
        configured ``extract.unconditional``, and ``ran``, whether IFD's pass of the responses alone ran:
        without it ``ifd`` is null); with a dask/ray runner also
        ``shards`` (``missing``, ``shards``, ``extracted``, ``workers``, ``model_loads``; the shards' wall
        time counts in ``timings["extract"]``) and ``score_shards`` (``shards``, ``submitted``, ``workers``,
        ``context_loads``: reads of the validation side, one per worker process).

    Raises:
        GateFailed: the gate failed (the release is written for inspection but never becomes current,
            and the previous release stays current).
    """
    t_start = time.perf_counter()
    settings = load_settings(config, overrides)
    check_run_inputs(settings)  # a missing source: refused before anything is written
    check_stale_runs(settings.workspace)  # earlier runs here killed without finishing: marked Crashed
    name, ws = settings.release.name, settings.workspace
    step = _Steps()
    ingested = step("ingest", persisted(ingest_sources, ws), settings)
    counts = {k: v for k, v in ingested.items() if k != "dataset_fp"}
    check_group_by(settings)  # a group_by column the data lacks: said now, not at the gate after extraction
    valset = step("validation-set", persisted(register_validation_version, ws),
                  ws, settings.data.valset, settings.data.valset_file, settings.ingest.max_chars,
                  settings.data.fields)
    sharded = None
    if settings.runner.kind != "local":  # dask/ray: the training features first, in shards on the cluster
        t0 = time.perf_counter()
        sharded = _extract_sharded(settings)
        shard_wall = time.perf_counter() - t0
    # the validation features, and the training ones still missing (all of them with the local runner)
    extracted = step("extract", persisted(extract_features, ws), settings, valset, ingested["dataset_fp"])
    if sharded is None:
        run = step("score", persisted(score_against_valset, ws), settings, valset, ingested["dataset_fp"],
                   extracted)
    else:  # the run's plan here; the training rows scored in shards on the cluster
        planned = step("score", persisted(plan_scores, ws), settings, valset, ingested["dataset_fp"], extracted)
        t0 = time.perf_counter()
        run = _score_sharded(settings, planned)
        step.timings["score"] = round(step.timings["score"] + time.perf_counter() - t0, 3)
    if "extract" in step.cached:  # a cached answer extracts nothing
        step.timings["extract"] = 0.0
    # samples extracted: a scores run computed now on a cached extract answer extracted nothing; when both
    # steps are cached, the counts of the run that computed them (as the summary reported before the split)
    n_extracted = 0 if "extract" in step.cached and "score" not in step.cached else extracted["extracted"]
    if sharded is not None:
        step.timings["extract"] = round(step.timings["extract"] + shard_wall, 3)
        n_extracted += sharded["extracted"]
    selected = step("select", select, settings, run["run_id"])

    inputs = allocate_step.release_inputs(settings)
    previous = allocate_step.current_release(settings)
    same = allocate_step.unchanged_release(settings, previous, run["run_id"], inputs)
    if same is not None:  # the very release that is current: said, not written again
        get_run_logger().info(f"nothing changed since {previous}: release {name}/{previous} stays current")
        step.timings["total"] = round(time.perf_counter() - t_start, 3)
        return {"version": previous, "current": True, "previous": previous, "unchanged": True,
                "counts": same[0].get("counts", {}), "report": same[1],
                "model_fp": run["model_fp"], "kept": int(selected["keep"].sum()),
                "dropped_reasons": dropped_reason_counts(selected, settings.select),
                "gate": {"passed": True, "failures": []}, "valset": valset["valset"], "run_id": run["run_id"],
                "timings": dict(step.timings), "cached_steps": list(step.cached), "resumed": False,
                **_sharding(sharded, run)}
    release_key = allocate_step.release_key(settings, previous, run["run_id"], inputs)
    resume = allocate_step.pending_release(settings, release_key)
    version = step("allocate", allocate_release, settings, resume, run["run_id"], release_key)
    docs_dir = _docs_dir(settings, version)
    try:  # recorded for a resuming run since its allocation; the record is cleared once the run is done
        verdict = step("gate", gate, settings, selected, counts, valset, docs_dir)
        parts = {
            "run_id": run["run_id"], "model_fp": run["model_fp"], "valset": valset["valset"],
            "inputs": inputs, "policy": settings.select.model_dump(mode="json"),
            "thresholds": settings.gate.model_dump(mode="json"),
            "counts": {**counts, "scored": selected.height, "extracted": n_extracted,
                       "truncated": run.get("truncated", 0), "unscored": sum(run.get("unscored", {}).values())},
            "settings": json.loads(settings.model_dump_json()),
            "timings": dict(step.timings), "cached_steps": list(step.cached),
        }
        record = step("release", write_release_task, settings, selected, parts, verdict, version, docs_dir)
        report_path = step("report", report, settings, selected, version, previous, record)
        if not verdict["passed"]:
            step.timings["total"] = round(time.perf_counter() - t_start, 3)
            _artifacts(selected, parts["counts"], version, verdict, report_path, step, name)
            raise GateFailed(f"gate failed for release {name}/{version} (current stays "
                             f"{allocate_step.current_release(settings) or 'none'}): " + "; ".join(verdict["failures"]))
        promoted = step("promote", promote_task, settings, version)
        warning = allocate_step.remember_release(settings, release_key, None)  # done: nothing left to resume
        if warning:
            get_run_logger().warning(warning)
    finally:
        allocate_step.unclaim(settings, version)
    step.timings["total"] = round(time.perf_counter() - t_start, 3)
    _artifacts(selected, parts["counts"], version, verdict, report_path, step, name)
    return {"version": version, "current": promoted["current"], "previous": promoted["previous"],
            **({} if promoted["current"] else {"reason": promoted["reason"]}), "counts": parts["counts"],
            "report": report_path, "model_fp": run["model_fp"],
            "kept": int(selected["keep"].sum()), "dropped_reasons": dropped_reason_counts(selected, settings.select),
            "gate": {"passed": verdict["passed"], "failures": verdict["failures"]},
            "valset": valset["valset"], "run_id": run["run_id"],
            "unconditional": {"setting": settings.extract.unconditional,
                              "ran": bool(extracted.get("unconditional", True))},
            "timings": dict(step.timings), "cached_steps": list(step.cached), "resumed": version == resume,
            **_sharding(sharded, run)}


def _sharding(sharded: dict | None, run: dict) -> dict:
    """The summary's ``shards`` and ``score_shards`` entries on a cluster runner (none on the local one)."""
    return {} if sharded is None else {"shards": sharded, "score_shards": run["score_shards"]}


def artifact_key(kind: str, release: str) -> str:
    """A Prefect artifact key namespaced by release (keys allow lowercase letters, digits and dashes):
    ``artifact_key("release-summary", "My_Set")`` → ``"release-summary-my-set"``."""
    return f"{kind}-{re.sub(r'[^a-z0-9-]+', '-', release.lower()).strip('-')}"


def _artifacts(selected: Any, counts: dict[str, int], version: str, verdict: dict, report_path: str,
               step: _Steps, release: str) -> None:
    """Prefect artifacts, keyed by release (:func:`artifact_key`): lowest/highest valued samples; the summary
    (counts, wall time per step, the gate)."""
    cols = [c for c in ("id", "value", "keep", "reason", "prompt", "response", "text") if c in selected.columns]
    ranked = selected.sort("value").select(cols)
    for key, part in (("lowest-valued", ranked.head(10)), ("highest-valued", ranked.tail(10).reverse())):
        rows = [{k: (str(v)[:120] if isinstance(v, str) else v) for k, v in r.items()} for r in part.to_dicts()]
        create_table_artifact(key=artifact_key(key, release), table=rows,
                              description=f"{key} samples of release {release}/{version}")
    lines = [f"# release {version}", "", "| step | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", "| step | wall s | |", "|---|---:|---|"]
    lines += [f"| {k} | {v:.3f} | {'cached' if k in step.cached else ''} |" for k, v in step.timings.items()]
    lines += ["", f"gate: {'passed' if verdict['passed'] else 'FAILED'}"]
    lines += [f"- {f}" for f in verdict["failures"]]
    link = report_path if "://" in report_path else f"file://{report_path}"
    lines += ["", f"Report: [{report_path}]({link})"]
    if verdict.get("docs_index"):
        lines += ["", f"Data Docs: {verdict['docs_index']}"]
    create_markdown_artifact(key=artifact_key("release-summary", release), markdown="\n".join(lines))


__all__ = ["refresh"]
