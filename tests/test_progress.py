"""Progress of long steps on a non-terminal stderr (issue 28 item 2): log lines with done / total, rate and
ETA at least every 15 s during extraction, for the IFD pass and the main pass, and commits as the rows come."""

from __future__ import annotations

import datetime as dt
import itertools
import re

from tiny import random_rows, write_jsonl

from valuegate.cli import main
from valuegate.engine.model import load_tokenizer
from valuegate.engine.progress import Progress, progress_every
from valuegate.inputs.identity import sample_from_record
from valuegate.settings import tiny_settings
from valuegate.storage import features as fstore
from valuegate.storage import samples as sstore
from valuegate.storage.lance import Workspace
from valuegate.tasks.extract import cached_model, dataset_fingerprint, extract_to_store
from valuegate.tasks.ingest import ingest_file

LINE = re.compile(r"^(\d\d:\d\d:\d\d) valuegate: (?P<desc>[^:]+): (?P<done>\d+)/(?P<total>\d+) samples "
                  r"\(\d+%\), [\d.e+-]+ samples/s, (?P<tail>ETA \S+|done in \S+)$")


def test_extract_logs_progress_lines_on_a_non_terminal_stderr(tmp_path, tiny_model_dir, capsys):
    """`valuegate extract` with stderr captured (not a terminal): every pass logs done / total, rate and ETA;
    one line per update here (progress_seconds = 0, batches of 2, so many updates), never 15 s apart."""
    wsdir = str(tmp_path / "ws")
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(40, seed=3))
    assert main(["ingest", "d", str(train), "--workspace", wsdir]) == 0
    capsys.readouterr()
    assert main(["extract", "d", "--workspace", wsdir, "--model", str(tiny_model_dir()), "--batch-size", "2",
                 "--progress-seconds", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [m for m in map(LINE.match, err) if m]
    by_pass: dict[str, list[re.Match]] = {}
    for m in lines:
        by_pass.setdefault(m["desc"], []).append(m)
    assert set(by_pass) == {"train (IFD)", "train"}, err
    for desc, ms in by_pass.items():
        assert len(ms) >= 10, (desc, err)  # one line per batch of 2 (at least per 4 samples)
        assert all(int(m["total"]) == 40 for m in ms)
        dones = [int(m["done"]) for m in ms]
        assert dones == sorted(dones) and dones[-1] == 40
        assert ms[-1]["tail"].startswith("done in") and ms[0]["tail"].startswith("ETA")
    stamps = [dt.datetime.strptime(m.group(1), "%H:%M:%S") for m in lines]
    gaps = [(b - a).total_seconds() % 86400 for a, b in itertools.pairwise(stamps)]
    assert max(gaps) <= 15, gaps


def test_quiet_extract_prints_no_progress(tmp_path, tiny_model_dir, capsys):
    wsdir = str(tmp_path / "ws")
    train = write_jsonl(tmp_path / "t.jsonl", random_rows(6, seed=4))
    assert main(["ingest", "d", str(train), "--workspace", wsdir, "--quiet"]) == 0
    assert main(["extract", "d", "--workspace", wsdir, "--model", str(tiny_model_dir()), "--quiet",
                 "--progress-seconds", "0"]) == 0
    assert not [x for x in capsys.readouterr().err.splitlines() if LINE.match(x)]


def test_rows_are_committed_as_time_passes(tmp_path, tiny_model_dir):
    """With ``commit_seconds = 0`` every block is its own commit, however many rows ``write_every`` allows:
    a crash loses at most the rows of the last minute (the default), not of the last 256 samples."""
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    ingest_file(ws, "d", str(write_jsonl(tmp_path / "t.jsonl", random_rows(12, seed=5))), 10_000)
    settings = tiny_settings(tiny_model_dir())
    settings = settings.model_copy(update={"extract": settings.extract.model_copy(update={"batch_size": 3})})
    ids, fps, fp = dataset_fingerprint(ws, "d", settings, load_tokenizer(settings.model), 1.0)
    samples = [sample_from_record(r) for r in sstore.read_samples_by_id(ws, ids).to_pylist()]
    rep = extract_to_store(ws, cached_model({}, settings.model, None, False), ids, samples, settings.extract, fp,
                           fps, write_every=1000, progress=False, commit_seconds=0.0)
    assert rep.extracted == 12 and rep.batches == 4  # 4 batches of 3, each committed
    assert len(set(fstore.read_features(ws, fp, ids, ["batch"])["batch"].to_pylist())) == 4
    rep = extract_to_store(ws, cached_model({}, settings.model, None, False), ids, samples, settings.extract, fp,
                           fps, progress=False)
    assert rep.extracted == 0 and rep.already == 12


def test_progress_line_says_done_total_rate_and_eta(caplog):
    caplog.set_level("INFO", logger="valuegate.progress")
    with progress_every(0):
        bar = Progress(4, "score", bar=False)
        bar.update(1)
        bar.update(3)
        bar.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "valuegate.progress"]
    assert re.fullmatch(r"score: 1/4 samples \(25%\), [\d.e+-]+ samples/s, ETA \S+", msgs[0]), msgs
    assert re.fullmatch(r"score: 4/4 samples \(100%\), [\d.e+-]+ samples/s, done in \d+s", msgs[1]), msgs
    assert len(msgs) == 3  # and the closing line


def test_a_short_step_logs_nothing(caplog):
    caplog.set_level("INFO", logger="valuegate.progress")
    with progress_every(3600), Progress(4, "score", bar=False) as bar:
        bar.update(4)
    assert not [r for r in caplog.records if r.name == "valuegate.progress"]
