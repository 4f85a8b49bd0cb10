"""The ``valuegate`` command line. An error prints one line, ``valuegate: error: <message>``, without a
traceback, and exits with its class's code (:mod:`valuegate.errors`: 2 bad input, 3 gate failed, 4 cluster
lost, 70 internal error). The settings flags are derived from the settings model (:mod:`valuegate.cli_flags`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from valuegate import __version__
from valuegate.cli_flags import add_setting_flag, add_setting_flags, setting_overrides
from valuegate.errors import KINDS, BadInput, DamagedTable, ValuegateError, kind_of
from valuegate.home import prefect_home

EXIT_USER_ERROR = BadInput.exit_code

# the settings sections each command reads (its flags: valuegate.cli_flags)
_MODEL_SIDE = ("model", "extract")
_RUN_SETTINGS = ("workspace", "data", "ingest", "model", "extract", "score", "select", "gate", "release", "runner",
                 "progress_seconds")

# the exit codes, rendered from the error kinds (valuegate.errors.KINDS: data, never read back out of a message)
EXIT_CODES_HELP = "exit codes:\n  0    success\n" + "".join(f"  {k.exit_code:<4} {k.meaning}\n" for k in KINDS) + """\
  130  interrupted (SIGINT or SIGTERM): stopped within a batch, nothing half-written; a re-run resumes
Every error is one line on stderr: valuegate: error: <message>."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="valuegate", description="Forward-only data valuation (For-Value) "
                                 "of LLM fine-tuning data.", epilog=EXIT_CODES_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"valuegate {__version__}")
    ap.add_argument("--config", help="TOML settings file (flags override it; env vars VALUEGATE_* too)")
    sub = ap.add_subparsers(dest="command", required=True)
    # --config is accepted before or after the subcommand (`valuegate run --config vg.toml`)
    cfg = argparse.ArgumentParser(add_help=False)
    cfg.add_argument("--config", default=argparse.SUPPRESS, help="TOML settings file")

    s = sub.add_parser("score", parents=[cfg], help="value every sample of TRAIN against the validation set VALID",
                       description="Value every sample of TRAIN against VALID (JSON lines, a JSON array, CSV, "
                       "Parquet or a save_to_disk folder; prompt/response, OpenAI messages, ShareGPT, Alpaca or "
                       "text, or any columns named with --field prompt=COLUMN --field response=COLUMN: "
                       "docs/your-data.md) and write a Parquet table with keep and reason per select.policy.")
    s.add_argument("train", help="training file")
    s.add_argument("valid", help="validation file")
    s.add_argument("--out", required=True, help="output .parquet file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_setting_flag(s, ("data", "fields"))
    add_setting_flags(s, (*_MODEL_SIDE, "score", "select", "progress_seconds"))

    w = argparse.ArgumentParser(add_help=False)
    w.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("ingest", parents=[w, cfg], help="add files to a dataset of the workspace",
                       description="Read JSONL / Parquet / CSV files or Hugging Face save_to_disk folders into "
                       "dataset NAME: dedup by content, refused rows to quarantine, re-ingest is a no-op.")
    i.add_argument("name", help="dataset name")
    i.add_argument("files", nargs="+", help="files or folders")
    add_setting_flag(i, ("data", "fields"))
    add_setting_flags(i, ("workspace", "ingest"))

    e = sub.add_parser("extract", parents=[w, cfg], help="extract features of a dataset (only what is missing)")
    e.add_argument("name", help="dataset name")
    add_setting_flags(e, ("workspace", *_MODEL_SIDE, "progress_seconds"))

    v = sub.add_parser("valset", parents=[cfg], help="versioned validation sets")
    vsub = v.add_subparsers(dest="valset_command", required=True)
    vr = vsub.add_parser("register", parents=[w, cfg], help="register FILE as the next version of NAME")
    vr.add_argument("name")
    vr.add_argument("file")
    add_setting_flag(vr, ("data", "fields"))
    add_setting_flags(vr, ("workspace", "ingest"))
    vl = vsub.add_parser("list", parents=[w, cfg], help="list validation sets or the versions of one")
    vl.add_argument("name", nargs="?")
    add_setting_flags(vl, ("workspace",))
    vp = vsub.add_parser("prune", parents=[w, cfg], help="prune NAME@vN (its rows may then be cleaned up)")
    vp.add_argument("ref", help="NAME@vN")
    add_setting_flags(vp, ("workspace",))
    vs = vsub.add_parser("show", parents=[w, cfg], help="show NAME[@VERSION]")
    vs.add_argument("ref", help="NAME or NAME@vN")
    vs.add_argument("--rows", type=int, default=5, help="rows to print")
    add_setting_flags(vs, ("workspace",))

    ss = sub.add_parser("score-set", parents=[w, cfg], help="score a dataset against a validation-set version")
    ss.add_argument("name", help="dataset name")
    ss.add_argument("--valset", required=True, help="NAME or NAME@vN (latest when no version)")
    add_setting_flags(ss, ("workspace", *_MODEL_SIDE, "score", "progress_seconds"))

    r = sub.add_parser("run", parents=[w, cfg], help="run the refresh DAG (ingest → extract → score → gate → "
                       "release); with no --config, the embedded demo", epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--json", action="store_true",
                   help="end with the run's summary as one JSON object (for machines) instead of a few lines")
    add_setting_flags(r, _RUN_SETTINGS)

    sv = sub.add_parser("serve", parents=[cfg], help="register refresh as a cron-scheduled deployment and serve it")
    sv.add_argument("--cron", default="0 3 * * *", help="schedule (default: every night at 03:00 UTC)")
    sv.add_argument("--name", default="nightly", help="deployment name")
    srv = sub.add_parser("server", parents=[cfg], help="start the local Prefect server on 127.0.0.1 (blocks)",
                         description="Start the local Prefect server on 127.0.0.1 (blocks until stopped). A run "
                         "reaches it through the environment variable PREFECT_API_URL: in another shell, "
                         "`export PREFECT_API_URL=http://127.0.0.1:PORT/api`, then `valuegate run --config "
                         "vg.toml`; its flow runs, logs and artifacts show in the UI at http://127.0.0.1:PORT. "
                         "Without PREFECT_API_URL a run starts a temporary server of its own. See docs/your-data.md.")
    srv.add_argument("--port", type=int, default=4200)

    rel = sub.add_parser("release", parents=[cfg], help="list, show, diff and roll back releases")
    rsub = rel.add_subparsers(dest="release_command", required=True)
    for cmd, helptext in (("list", "releases of NAME, the current one marked"), ("show", "one release's manifest")):
        p_ = rsub.add_parser(cmd, parents=[w, cfg], help=helptext)
        p_.add_argument("name", nargs="?", default=None, help="release name (default: the config's)")
        if cmd == "show":
            p_.add_argument("version", nargs="?", help="version (default: current)")
        add_setting_flags(p_, ("workspace",))
    rd = rsub.add_parser("diff", parents=[w, cfg], help="ids that entered and left between two releases, and why")
    rd.add_argument("name")
    rd.add_argument("a")
    rd.add_argument("b")
    add_setting_flags(rd, ("workspace",))
    rr = rsub.add_parser("rollback", parents=[w, cfg], help="make the previous passed release current")
    rr.add_argument("name")
    rr.add_argument("--to", help="an explicit version")
    add_setting_flags(rr, ("workspace",))

    it = sub.add_parser("init", help="inspect TRAIN and VALID and write a commented vg.toml for `valuegate run`",
                        description="Inspect TRAIN and VALID (format, the columns that form a sample, a group_by "
                        "column) and write a commented config; then run `valuegate run --config vg.toml`.")
    it.add_argument("train", help="training source: a file (JSON lines, a JSON array, CSV, Parquet), a "
                    "save_to_disk folder, a folder of shards or a glob")
    it.add_argument("valid", help="validation file")
    add_setting_flag(it, ("data", "fields"))
    it.add_argument("--model", help="hub id or local directory (default: the embedded smollm2-135m)")
    it.add_argument("--out", default="vg.toml", help="config file to write (default vg.toml)")
    it.add_argument("--force", action="store_true", help="overwrite an existing --out")

    vf = sub.add_parser("verify", parents=[w, cfg], help="check every table and release; repair what can be derived "
                        "again", description="Read every table whole and check every release against its "
                        "manifest (sha256). A damaged features, feature_sets or scores table is dropped (the "
                        "next run extracts and scores again); samples, validation sets and releases are only "
                        "reported, never rewritten. Exit 0: sound (or repaired), 6: damage left to fix.")
    vf.add_argument("--no-repair", action="store_true", help="only report; drop nothing")
    add_setting_flags(vf, ("workspace",))

    f = sub.add_parser("fetch-model", parents=[cfg], help="fetch and convert the embedded default model into the cache")
    f.add_argument("--home", help="cache directory (default $VALUEGATE_HOME or ~/.cache/valuegate)")
    return ap


def _cmd_score(args: argparse.Namespace) -> int:
    from valuegate.api import score_inputs
    from valuegate.file_scoring import summary_line
    from valuegate.settings import load_settings

    settings = load_settings(args.config, setting_overrides(args))
    out = Path(args.out)
    if out.suffix.lower() != ".parquet":
        raise ValuegateError(f"--out {out}: the output is Parquet; give a path ending in .parquet")
    if not out.parent.exists():
        raise ValuegateError(f"--out {out}: directory {out.parent} does not exist")
    df, report = score_inputs(args.train, args.valid, settings, progress=not args.quiet)  # as valuegate.score
    tmp = out.with_name(f".{out.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, out)  # never leave a half-written output under the final name
    print(summary_line(df, report, settings, str(out)), file=sys.stderr)
    return 0


def _settings_and_ws(args: argparse.Namespace):
    from valuegate.settings import load_settings
    from valuegate.storage.lance import Workspace

    settings = load_settings(args.config, setting_overrides(args))
    return settings, Workspace.from_env(settings.workspace)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from valuegate.inputs.readers import source_files
    from valuegate.storage.samples import ensure_sample_tables
    from valuegate.tasks.ingest import ingest_file

    settings, ws = _settings_and_ws(args)
    ensure_sample_tables(ws)
    totals = {"rows": 0, "kept": 0, "new": 0, "dup": 0, "quarantined": 0, "left": 0}
    for f in [f for spec in args.files for f in source_files(spec)]:
        rep = ingest_file(ws, args.name, f, settings.ingest.max_chars, fields=settings.data.fields)
        print(rep.line(), file=sys.stderr)
        for k, v in (("rows", rep.rows), ("kept", rep.kept), ("new", rep.new_samples), ("dup", rep.duplicates),
                     ("quarantined", rep.quarantined), ("left", rep.left)):
            totals[k] += v
    print(f"ingested into {args.name}: {totals['rows']} rows, {totals['kept']} kept, {totals['new']} new samples, "
          f"{totals['dup']} duplicates, {totals['quarantined']} quarantined, {totals['left']} ids left "
          f"({ws.uri})", file=sys.stderr)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from valuegate.tasks.extract import extract_dataset

    settings, ws = _settings_and_ws(args)
    rep = extract_dataset(ws, args.name, settings, progress=not args.quiet)
    print(rep.line(), file=sys.stderr)
    for u in (rep.refused or [])[:5]:
        print(f"  refused {u.id[:12]}: {u.message}", file=sys.stderr)
    return 0


def _cmd_valset(args: argparse.Namespace) -> int:
    from valuegate.storage.valsets import read_valset, read_valset_versions
    from valuegate.tasks.validation_set import register_valset

    settings, ws = _settings_and_ws(args)
    if args.valset_command == "register":
        rec, new = register_valset(ws, args.name, args.file, settings.ingest.max_chars, settings.data.fields)
        what = "registered" if new else "unchanged content: already registered as"
        print(f"{what} {rec['name']}@v{rec['version']} ({rec['rows']} rows, content {rec['content_hash'][:12]})")
        return 0
    if args.valset_command == "list":
        rows = read_valset_versions(ws, args.name)
        if not rows:
            print("no validation sets" + (f" named {args.name!r}" if args.name else ""), file=sys.stderr)
        for r in rows:
            flag = " (pruned)" if r["pruned"] else ""
            print(f"{r['name']}@v{r['version']}  rows={r['rows']}  content={r['content_hash'][:12]}  "
                  f"at={r['at']:%Y-%m-%d %H:%M:%S}  source={r['source']}{flag}")
        return 0
    if args.valset_command == "prune":
        from valuegate.storage.valsets import parse_ref, prune_valset_version

        name, version = parse_ref(args.ref)
        if version is None:
            raise ValuegateError(f"prune {args.ref!r}: name the version, e.g. {name}@v1")
        rec = prune_valset_version(ws, name, version)
        print(f"pruned {rec['name']}@v{rec['version']}")
        return 0
    rec, rows = read_valset(ws, args.ref)
    print(f"{rec['name']}@v{rec['version']}: {rec['rows']} rows, content {rec['content_hash']}, "
          f"registered {rec['at']:%Y-%m-%d %H:%M:%S} from {rec['source']}")
    for r in rows.sort_by("row").slice(0, args.rows).to_pylist():
        body = r["text"] or r["messages"] or f"{r['prompt']!r} → {r['response']!r}"
        print(f"  row {r['row']}: {body[:120]}")
    return 0


def _cmd_score_set(args: argparse.Namespace) -> int:
    from valuegate.tasks.score import score_dataset

    settings, ws = _settings_and_ws(args)
    rep = score_dataset(ws, args.name, args.valset, settings, progress=not args.quiet)
    for part in (rep.extract_train, rep.extract_valid):
        print(part.line(), file=sys.stderr)
    print(rep.line(), file=sys.stderr)
    return 0


# the embedded demo, package data of valuegate.demo (infra/demo/ in the checkout)
DEMO_CONFIG = resources.files("valuegate.demo") / "demo.toml"


def _cmd_run(args: argparse.Namespace) -> int:
    from valuegate.settings import check_run_inputs, load_settings

    config = args.config
    overrides = setting_overrides(args)
    with contextlib.ExitStack() as stack:
        if config is None:  # the demo's data resolve against its folder; its workspace is ./valuegate-workspace
            config = str(stack.enter_context(resources.as_file(DEMO_CONFIG)))
            print(f"valuegate: no --config: running the embedded demo ({config})", file=sys.stderr)
        # a config mistake is one line here, before Prefect is even imported (let alone its server started)
        settings = load_settings(config, overrides)
        check_run_inputs(settings)  # a missing source: one line before any server starts or table is made
        from valuegate.flows import child_processes, user_errors
        from valuegate.flows.refresh import refresh
        from valuegate.run_summary import summary_json, summary_lines

        user_errors.quiet_user_error_tracebacks()  # a user error raised in a step: its one line below, no Prefect traceback
        child_processes.check_api_reachable()  # PREFECT_API_URL set: it must answer (one line, not Prefect's traceback)
        child_processes.start_temporary_api_dying_with_process()  # no PREFECT_API_URL: Prefect's temporary server, gone with us
        summary = refresh(config=config, overrides=overrides)
    if args.json:
        print(json.dumps(summary_json(summary, settings.release.name), indent=1, default=str))
    else:
        print("\n".join(summary_lines(summary, settings.release.name, settings.extract.max_length)))
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from valuegate.storage import releases as rstore
    from valuegate.tasks.release import diff_releases, format_diff, release_summary, rollback

    settings, root = _settings_and_ws(args)  # the workspace (local or s3://, with its storage options)
    name = getattr(args, "name", None) or settings.release.name
    if args.release_command == "list":
        rows = rstore.list_releases(root, name)
        if not rows:
            print(f"no releases named {name!r} in {root.uri}", file=sys.stderr)
        for m in rows:
            print(release_summary(m))
    elif args.release_command == "show":
        version = args.version or rstore.read_current(root, name)
        if version is None:
            raise ValuegateError(f"release {name!r} has no current version; give one")
        print(json.dumps(rstore.read_manifest(root, name, version), indent=1, default=str))
    elif args.release_command == "diff":
        print(format_diff(diff_releases(root, name, args.a, args.b)))
    else:
        print(f"{name}: current is now {rollback(root, name, args.to)}")
    return 0


def _serve_config(args: argparse.Namespace) -> str:
    """The config file a served deployment runs: ``--config`` (absolute), else the embedded demo's file
    (package data on disk in a regular install)."""
    if args.config:
        return str(Path(args.config).resolve())
    with resources.as_file(DEMO_CONFIG) as path:
        return str(path)


def _cmd_serve(args: argparse.Namespace) -> int:
    from valuegate.flows.serve import serve_refresh

    config = _serve_config(args)
    print(f"valuegate: serving deployment refresh/{args.name} on cron {args.cron!r} "
          f"(config: {config}); Ctrl-C stops", file=sys.stderr)
    serve_refresh(args.name, args.cron, config)
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from valuegate.flows.serve import run_local_server

    print(f"valuegate: Prefect server on http://127.0.0.1:{args.port} (API: /api); "
          f"export PREFECT_API_URL=http://127.0.0.1:{args.port}/api to use it", file=sys.stderr)
    return run_local_server(args.port)  # SIGTERM, SIGINT, SIGHUP: stops the server, then returns


def _cmd_init(args: argparse.Namespace) -> int:
    import shlex

    from valuegate.init_config import write_config

    fields = setting_overrides(args).get("data", {}).get("fields")
    path, said = write_config(args.train, args.valid, args.out, args.model, args.force, fields)
    for line in said:
        print(f"valuegate: {line}", file=sys.stderr)
    print(f"valuegate: wrote {path}; next:", file=sys.stderr)
    print(f"valuegate run --config {shlex.quote(str(path))}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from valuegate.flows import forget_derived_results
    from valuegate.storage.verify import check_releases, check_tables, repair

    settings, ws = _settings_and_ws(args)
    findings = check_tables(ws) + check_releases(ws)
    dropped = [] if args.no_repair else repair(ws, findings)
    if dropped:
        forget_derived_results(settings.workspace)
    for f in findings:
        if not f.damaged:
            print(f"ok       {f.kind} {f.name}" + (f" ({f.detail})" if f.detail else ""))
        elif f.name in dropped:
            print(f"REPAIRED {f.kind} {f.name}: {f.problem}; dropped: the next run derives it again")
        else:
            what = ("run `valuegate verify` without --no-repair to drop it" if f.derived else
                    "never rewritten: restore it from a copy (a release: cut a new one with `valuegate run`)")
            print(f"DAMAGED  {f.kind} {f.name}: {f.problem}; {what}")
    left = [f for f in findings if f.damaged and f.name not in dropped]
    print(f"valuegate verify {ws.uri}: {len(findings)} checked, {len(dropped)} repaired, {len(left)} damaged",
          file=sys.stderr)
    return DamagedTable.exit_code if left else 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from valuegate.default_model import ensure_default_model

    path = ensure_default_model(Path(args.home) if args.home else None)
    print(path)
    return 0


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (not the one at creation)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _progress_to_stderr(wanted: bool) -> Iterator[None]:
    """While the command runs, print the progress lines of long steps on stderr (logged when stderr is not a
    terminal; on one, a bar shows instead); nothing when not ``wanted``."""
    from valuegate.engine.progress import LOGGER

    logger = logging.getLogger(LOGGER)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s valuegate: %(message)s", "%H:%M:%S"))
    if wanted:
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``valuegate`` console script."""
    # No usage telemetry from a local Prefect server (the machine may have no internet, and its insert
    # races other processes on the shared SQLite database); a user may still turn it on explicitly.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary API server of a run creates its database on first start: Prefect's 20 s wait is too
    # short on a loaded 2-core machine (a fresh install's first run timed out there); 120 s is generous.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Progress lines of long steps (valuegate/engine/progress.py) reach Prefect's UI in a run.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "valuegate.progress")
    # valuegate's own Prefect home (database, logs), not the ~/.prefect every Prefect user of the machine shares
    home = prefect_home(os.environ)
    if home is not None:
        os.environ["PREFECT_HOME"] = str(home)
    args = _parser().parse_args(argv)
    # run, serve, server: Prefect's own handlers print them
    wanted = args.command not in ("run", "serve", "server") and not getattr(args, "quiet", False)
    handlers = {"score": _cmd_score, "fetch-model": _cmd_fetch_model, "ingest": _cmd_ingest,
                "extract": _cmd_extract, "valset": _cmd_valset, "score-set": _cmd_score_set, "run": _cmd_run,
                "release": _cmd_release, "serve": _cmd_serve, "server": _cmd_server,
                "init": _cmd_init, "verify": _cmd_verify}
    previous = _stop_on_signals()
    try:
        with _progress_to_stderr(wanted):
            return handlers[args.command](args)
    except (ValuegateError, AssertionError) as exc:  # the error's kind (data) says the exit code and the words
        kind = kind_of(exc)
        assert kind is not None
        if kind.traceback:  # a broken invariant: a bug, so its traceback too
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            print(f"valuegate: error: internal error: {exc or type(exc).__name__} (a bug in valuegate; please "
                  "report it with the traceback above)", file=sys.stderr)
        else:
            print(f"valuegate: error: {exc}", file=sys.stderr)
        return kind.exit_code
    except KeyboardInterrupt:
        print("valuegate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a full disk or a damaged table met outside the workspace's own calls
        from valuegate.storage.failures import store_failure

        failure = store_failure(exc)
        if failure is None:
            raise
        print(f"valuegate: error: {failure}", file=sys.stderr)
        return failure.kind.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


EXIT_INTERRUPTED = 130


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM: stop where Python next runs (within a batch) by raising KeyboardInterrupt; every
    write is atomic, so nothing half-written is left, and ``main`` says ``valuegate: interrupted``."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_on_signals() -> dict[int, object]:
    """Install :func:`_interrupt` for SIGINT and SIGTERM (also where SIGINT was inherited ignored, as a
    shell's background job or a scheduler starts it); returns the handlers to put back. Prefect's flow
    engine hands SIGTERM back to this handler after marking the run Crashed."""
    previous: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread (an embedding caller): left alone
            previous[sig] = signal.signal(sig, _interrupt)
    return previous


if __name__ == "__main__":
    sys.exit(main())
