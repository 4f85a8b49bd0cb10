"""``valuegate init TRAIN VALID``: inspect two data files and write a commented starter ``vg.toml``.

Each file is read the way ``valuegate run`` will ingest it (:func:`valuegate.tasks.ingest.iter_source_records`,
the first :data:`INSPECT_ROWS` rows): its format (by suffix; for an unknown suffix the content is sniffed, to
say what to rename it to), the sample shape its columns form (:func:`valuegate.tasks.ingest.sample_kind`),
how many of the inspected rows are usable samples (:func:`valuegate.tasks.ingest.check_row`), and in the
training file a plausible ``select.group_by`` column: a string column, not a sample field, with 2 to
:data:`MAX_GROUPS` distinct values and at most one value per :data:`MIN_ROWS_PER_GROUP` rows on average.
A guess that cannot be made is an error naming the file and what it has, never a silent default.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valuegate.errors import ValuegateError

INSPECT_ROWS = 10_000
MAX_GROUPS = 50
MIN_ROWS_PER_GROUP = 3
SAMPLE_FIELDS = ("prompt", "response", "messages", "text", "images")
KIND_WORDS = {"prompt_response": "prompt/response", "messages": "chat (messages)", "text": "plain text"}
FORMATS = {".jsonl": "JSON lines", ".ndjson": "JSON lines", ".json": "JSON lines", ".parquet": "Parquet",
           ".csv": "CSV", ".arrow": "Arrow"}


@dataclass
class FileShape:
    """What :func:`inspect_file` found in one file.

    Attributes:
        path: the file. format: ``"JSON lines"``, ``"Parquet"``, ``"CSV"``, ``"Arrow"`` or
            ``"save_to_disk folder"``. rows: rows inspected. more: whether the file has rows past them.
        columns: column names, in order of first appearance. kind: the sample shape.
        usable: inspected rows that are valid samples. first_refusal: ``"row N: field: reason"`` of the
            first refused row, or "". groups: ``{column: {value: rows}}`` of the group_by candidates.
    """

    path: Path
    format: str
    rows: int
    more: bool
    columns: list[str]
    kind: str
    usable: int
    first_refusal: str = ""
    groups: dict[str, dict[str, int]] = field(default_factory=dict)

    def line(self) -> str:
        """One human line."""
        seen = f"the first {self.rows} rows" if self.more else f"{self.rows} rows"
        bad = (f"; {self.rows - self.usable} not usable, ingest will quarantine them (first: {self.first_refusal})"
               if self.usable < self.rows else "")
        return (f"{self.path}: {self.format}, {seen}, {KIND_WORDS[self.kind]} samples; columns: "
                f"{', '.join(self.columns)}{bad}")


def _sniff(p: Path) -> str:
    """What an unsupported file looks like, as a hint: ``" (it looks like JSON lines: rename it to x.jsonl)"``."""
    try:
        with p.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return ""
    if head.startswith(b"PAR1"):
        suffix, what = ".parquet", "Parquet"
    elif head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        suffix, what = ".jsonl", "JSON lines"
    elif b"," in head.split(b"\n", 1)[0]:
        suffix, what = ".csv", "CSV"
    else:
        return ""
    return f" (it looks like {what}: rename it to {p.with_suffix(suffix).name})"


def inspect_file(path: str | os.PathLike, max_rows: int = INSPECT_ROWS) -> FileShape:
    """Read the first ``max_rows`` rows of a data file as ingest reads them and describe them.

    Raises:
        ValuegateError: one line naming the file: missing, of an unsupported type (with what its content
            looks like), unreadable, without rows, without sample fields (with the columns it has), or with
            no usable row among those inspected (with the first row's reason).
    """
    from valuegate.tasks.ingest import READABLE_SUFFIXES, check_row, iter_source_records, sample_kind

    p = Path(path)
    if not p.exists():
        raise ValuegateError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if not p.is_dir() and suffix not in (*READABLE_SUFFIXES, ".arrow"):
        raise ValuegateError(f"{p}: unsupported file type {suffix or '(none)'}{_sniff(p)}; use one of "
                             + ", ".join(READABLE_SUFFIXES) + ", a save_to_disk folder or .arrow")
    chunks = iter_source_records(p, chunk_rows=max_rows)
    first = next(chunks, [])
    more = next(chunks, None) is not None
    records = [rec for _, rec, _, _ in first if rec is not None]
    if not records:
        why = next((reason for _, rec, _, reason in first if rec is None), "")
        raise ValuegateError(f"{p}: no rows" + (f" that parse (first: {why})" if why else ""))
    columns = list(dict.fromkeys(k for rec in records for k in rec))
    kind = sample_kind(columns, str(p))  # no sample fields: the message names the file and its columns
    usable, refusal = 0, ""
    for row, rec, _, reason in first:
        sample, why = check_row(rec, kind, row, str(p)) if rec is not None else (None, reason)
        usable += sample is not None
        refusal = refusal or ("" if sample is not None else f"row {row}: {why}")
    if usable == 0:
        raise ValuegateError(f"{p}: no usable row among the {len(first)} inspected ({KIND_WORDS[kind]} samples); "
                             f"first: {refusal}")
    shape = FileShape(p, "save_to_disk folder" if p.is_dir() else FORMATS[suffix], len(first), more, columns,
                      kind, usable, refusal)
    shape.groups = group_candidates([rec for _, rec, _, _ in first], columns)
    return shape


def group_candidates(records: list[dict[str, Any] | None], columns: list[str]) -> dict[str, dict[str, int]]:
    """``{column: {value: rows}}`` of each column that looks like groups: every row a non-empty string,
    not a sample field, 2 to :data:`MAX_GROUPS` distinct values, at least :data:`MIN_ROWS_PER_GROUP` rows per
    value on average. Fewest groups first."""
    out: dict[str, dict[str, int]] = {}
    rows = [r for r in records if r is not None]
    for col in columns:
        if col in SAMPLE_FIELDS:
            continue
        counts: dict[str, int] = {}
        for r in rows:
            v = r.get(col)
            if not isinstance(v, str) or not v.strip():
                break
            counts[v] = counts.get(v, 0) + 1
            if len(counts) > MAX_GROUPS:
                break
        else:
            if 2 <= len(counts) <= MAX_GROUPS and len(counts) * MIN_ROWS_PER_GROUP <= len(rows):
                out[col] = counts
    return dict(sorted(out.items(), key=lambda kv: len(kv[1])))


def _name(stem: str, fallback: str) -> str:
    """A valid dataset / validation-set / release name from a file's stem."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:64]
    return name or fallback


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (the config's folder), as settings resolve it; POSIX separators."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def config_text(train: FileShape, valid: FileShape, out: Path, model: str | None) -> tuple[str, str | None]:
    """The commented TOML for ``out`` and the chosen group_by column (None: none found)."""
    from valuegate.settings import GateSettings, ModelSettings, SelectSettings

    base = out.parent
    dataset = _name(train.path.stem, "train")
    valset = _name(valid.path.stem, "val")
    valset = f"{valset}-val" if valset == dataset else valset
    model_default = ModelSettings.model_fields["name"].default
    if model is None:
        model_line = f"name = {_toml(model_default)}  # the embedded default; a hub id or a local folder instead"
    else:
        local = Path(model).expanduser()
        shown = _relative(local, base) if local.exists() and not local.is_absolute() else model
        model_line = f"name = {_toml(shown)}"
    sel, gate = SelectSettings(), GateSettings()
    group = next(iter(train.groups), None)
    if group is not None:
        counts = train.groups[group]
        others = [c for c in train.groups if c != group]
        group_lines = [f"group_by = {_toml(group)}  # {len(counts)} groups in the inspected rows; the gate checks "
                       "retention in each"]
        if others:
            group_lines.append("# other columns that look like groups: " + ", ".join(others))
    else:
        group_lines = ["# no column of the training file looks like groups (a string column with 2 to "
                       f"{MAX_GROUPS} values, not a sample field);",
                       '# group_by = "COLUMN"  # name one to have the gate check retention per group']
    lines = [
        f"# valuegate settings written by `valuegate init` from {train.path.name} and {valid.path.name}.",
        "# Relative paths are relative to this file's folder. Every key, its default and its meaning:",
        "# README, Configuration. Next: valuegate run --config " + out.name,
        "",
        "# Where the tables, features and releases live: a folder, or s3://bucket/prefix.",
        f"workspace = {_toml('valuegate-workspace')}",
        "",
        "[data]",
        f"# {train.line()}",
        f"dataset = {_toml(dataset)}  # the dataset the sources are ingested into (dedup by content)",
        f"sources = [{_toml(_relative(train.path, base))}]",
        f"# {valid.line()}",
        f"valset = {_toml(valset)}  # registered as a new version whenever valset_file's content changes",
        f"valset_file = {_toml(_relative(valid.path, base))}",
        "",
        "[model]",
        "# The model whose forward pass values the samples (the one you fine-tune, or a small one of its family).",
        model_line,
        "",
        "[select]",
        "# Which samples a release keeps. suspect: drop the samples that look unlike the validation set;",
        "# also drop_negative, top_fraction (with fraction), threshold, keep_all.",
        f"policy = {_toml(sel.policy)}",
        f"suspect_threshold = {sel.suspect_threshold}  # largest suspect score kept (robust z units)",
        *group_lines,
        "",
        "[gate]",
        "# A release becomes current only when these hold; otherwise the previous release stays current.",
        f"min_retained_fraction = {gate.min_retained_fraction}  # fewest kept / scored samples",
        f"max_retained_fraction = {gate.max_retained_fraction}  # most kept / scored samples",
        f"min_group_retention = {gate.min_group_retention}  # fewest kept / scored in every group of group_by",
        f"max_quarantine_rate = {gate.max_quarantine_rate}  # most refused / ingested rows",
        "",
        "[release]",
        f"name = {_toml(dataset)}  # releases/<name>/<version>/ in the workspace",
    ]
    return "\n".join(lines) + "\n", group


def write_config(train: str | os.PathLike, valid: str | os.PathLike, out: str | os.PathLike = "vg.toml",
                 model: str | None = None, force: bool = False) -> tuple[Path, list[str]]:
    """Inspect both files, write the commented config to ``out`` and check that it loads.

    Returns:
        the config's path and the lines to tell the user (what was found in each file, the group_by choice).

    Raises:
        ValuegateError: a file cannot be used (see :func:`inspect_file`), ``out`` exists and ``force`` is
            not set, or its folder does not exist.
    """
    from valuegate.settings import load_settings

    dest = Path(out)
    if dest.suffix.lower() != ".toml":
        raise ValuegateError(f"--out {dest}: a config file is TOML; give a path ending in .toml")
    if not dest.parent.is_dir():
        raise ValuegateError(f"--out {dest}: directory {dest.parent} does not exist")
    if dest.exists() and not force:
        raise ValuegateError(f"{dest} exists; pass --force to overwrite it, or --out another file")
    shapes = inspect_file(train), inspect_file(valid)
    text, group = config_text(*shapes, dest, model)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_settings(tmp)  # what `valuegate run --config` will read; a mistake here is a bug of init
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    counts = shapes[0].groups.get(group, {}) if group else {}
    said = [s.line() for s in shapes]
    if group is not None:
        sizes = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:8]) + (", ..." if len(counts) > 8 else "")
        said.append(f"group_by = {group} ({len(counts)} groups: {sizes})")
    else:
        said.append(f"no group_by: no column of {shapes[0].path.name} has 2 to {MAX_GROUPS} string values "
                    "(set select.group_by to check retention per group)")
    return dest, said
