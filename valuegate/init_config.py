"""``valuegate init TRAIN VALID``: inspect two data files and write a commented starter ``vg.toml``.

Each file is read the way ``valuegate run`` will ingest it (:func:`valuegate.inputs.readers.iter_source_records`,
the first :data:`INSPECT_ROWS` rows of its first file): its file type (by suffix; for an unknown suffix the
content is sniffed, to say what to rename it to), the format its columns are
(:func:`valuegate.inputs.formats.recognise`: prompt/response, OpenAI messages, ShareGPT, Alpaca, text; when
none, a column mapping guessed from common names, :func:`valuegate.inputs.formats.guess_fields`, written to
``[data.fields]``), how many of the inspected rows are usable samples (:func:`valuegate.inputs.rows.row_sample`),
and in the
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
FORMATS = {".jsonl": "JSON lines", ".ndjson": "JSON lines", ".json": "JSON lines", ".parquet": "Parquet",
           ".csv": "CSV", ".arrow": "Arrow"}


@dataclass
class FileShape:
    """What :func:`inspect_file` found in one file.

    Attributes:
        path: the source as given. format: ``"JSON lines"``, ``"JSON array"``, ``"Parquet"``, ``"CSV"``,
            ``"Arrow"``, ``"save_to_disk folder"``, or ``"N shards (...)"``. rows: rows inspected. more: whether
            the source has rows past them. columns: column names, in order of first appearance.
        kind: the recognised format (:data:`valuegate.inputs.formats.FORMAT_WORDS`). fields: the column
            mapping used (given, or guessed; empty when the columns are a known format).
        guessed: whether ``fields`` was guessed.
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
    fields: dict[str, str] = field(default_factory=dict)
    guessed: bool = False
    first_refusal: str = ""
    groups: dict[str, dict[str, int]] = field(default_factory=dict)

    def line(self) -> str:
        """One human line."""
        seen = f"the first {self.rows} rows" if self.more else f"{self.rows} rows"
        bad = (f"; {self.rows - self.usable} not usable, ingest will quarantine them (first: {self.first_refusal})"
               if self.usable < self.rows else "")
        from valuegate.inputs.formats import Format

        return (f"{self.path}: {self.format}, {seen}, {Format(self.kind, self.fields).words} samples"
                + (" (a guessed mapping: check it)" if self.guessed else "")
                + f"; columns: {', '.join(self.columns)}{bad}")


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


def inspect_file(path: str | os.PathLike, max_rows: int = INSPECT_ROWS,
                 fields: dict[str, str] | None = None) -> FileShape:
    """Read the first ``max_rows`` rows of a data source as ingest reads them and describe them.

    ``fields``: a column mapping to use; without one, a source in none of the known formats gets a mapping
    guessed from common column names when one fits (``question``/``answer``, ...).

    Raises:
        ValuegateError: one line naming the file: missing, of an unsupported type (with what its content
            looks like), unreadable, without rows, without sample fields (with the columns it has), or with
            no usable row among those inspected (with the first row's reason).
    """
    from valuegate.inputs.formats import guess_fields, recognise
    from valuegate.inputs.readers import READABLE_SUFFIXES, is_json_array, iter_source_records, source_files
    from valuegate.inputs.rows import row_sample

    p = Path(path)
    if p.exists() and not p.is_dir() and p.suffix.lower() not in READABLE_SUFFIXES:
        raise ValuegateError(f"{p}: unsupported file type {p.suffix.lower() or '(none)'}{_sniff(p)}; use one of "
                             + ", ".join(READABLE_SUFFIXES) + " or a save_to_disk folder")
    files = source_files(path)
    first_file = files[0]
    suffix = first_file.suffix.lower()
    chunks = iter_source_records(first_file, chunk_rows=max_rows)
    first = next(chunks, [])
    more = next(chunks, None) is not None or len(files) > 1
    records = [rec for _, rec, _, _ in first if rec is not None]
    if not records:
        why = next((reason for _, rec, _, reason in first if rec is None), "")
        raise ValuegateError(f"{first_file}: no rows" + (f" that parse (first: {why})" if why else ""))
    columns = list(dict.fromkeys(k for rec in records for k in rec))
    guessed = False
    if not fields:
        try:
            recognise(columns, str(first_file))
        except ValuegateError:
            fields = guess_fields(columns)
            guessed = fields is not None
            if fields is None:
                raise
    fmt = recognise(columns, str(first_file), fields)  # no sample fields: the message names the file and columns
    usable, refusal = 0, ""
    for row, rec, _, reason in first:
        sample, why = row_sample(rec, fmt, row, str(first_file)) if rec is not None else (None, reason)
        usable += sample is not None
        refusal = refusal or ("" if sample is not None else f"row {row}: {why}")
    if usable == 0:
        raise ValuegateError(f"{first_file}: no usable row among the {len(first)} inspected ({fmt.words} samples); "
                             f"first: {refusal}")
    kind_of_file = ("save_to_disk folder" if first_file.is_dir()
                    else "JSON array" if suffix == ".json" and is_json_array(first_file) else FORMATS[suffix])
    shown = f"{len(files)} shards ({kind_of_file})" if len(files) > 1 else kind_of_file
    shape = FileShape(Path(path), shown, len(first), more, columns, fmt.name, usable, fields=dict(fmt.fields),
                      guessed=guessed, first_refusal=refusal)
    shape.groups = group_candidates([rec for _, rec, _, _ in first], columns, fmt.columns)
    return shape


def group_candidates(records: list[dict[str, Any] | None], columns: list[str],
                     sample_columns: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, int]]:
    """``{column: {value: rows}}`` of each column that looks like groups: every row a non-empty string,
    not a sample field, 2 to :data:`MAX_GROUPS` distinct values, at least :data:`MIN_ROWS_PER_GROUP` rows per
    value on average. Fewest groups first."""
    out: dict[str, dict[str, int]] = {}
    rows = [r for r in records if r is not None]
    for col in columns:
        if col in sample_columns or col == "images":
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
    from valuegate.settings import ExtractSettings, GateSettings, ModelSettings, SelectSettings

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
    fields = train.fields or valid.fields
    field_lines = []
    if fields:
        guessed = train.guessed or valid.guessed
        field_lines = ["", "[data.fields]", "# which of your columns is which sample field" + (
            " (guessed from the column names: check it)" if guessed else ""),
            *(f"{k} = {_toml(v)}" for k, v in fields.items())]
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
        "# docs/configuration.md. Next: valuegate run --config " + out.name,
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
        *field_lines,
        "",
        "[model]",
        "# The model whose forward pass values the samples (the one you fine-tune, or a small one of its family).",
        model_line,
        "",
        "[extract]",
        "# How prompt/response (and Alpaca) rows are rendered: auto = with the model's chat template when it has",
        "# one (user turn = prompt, assistant turn = response: what an instruct model is fine-tuned on);",
        "# none = prompt + response as they are (base models, continuation data); chat = the template or an error.",
        f"template = {_toml(ExtractSettings().template)}",
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


def inspect_pair(train: str | os.PathLike, valid: str | os.PathLike,
                 fields: dict[str, str] | None = None) -> tuple[FileShape, FileShape]:
    """Both sources, read with one column mapping (``fields``, else the one guessed for either).

    Raises:
        ValuegateError: as :func:`inspect_file`, or the two need different guessed mappings.
    """
    t = inspect_file(train, fields=fields)
    mapping = fields or t.fields or None
    try:
        v = inspect_file(valid, fields=mapping)
    except ValuegateError:
        if not mapping or fields:
            raise
        v = inspect_file(valid)
    if v.fields and t.fields and v.fields != t.fields:
        raise ValuegateError(f"{t.path} and {v.path} need different column mappings ({t.fields} and {v.fields}); "
                             "give them the same columns, or name them with --field")
    return t, v


def write_config(train: str | os.PathLike, valid: str | os.PathLike, out: str | os.PathLike = "vg.toml",
                 model: str | None = None, force: bool = False,
                 fields: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """Inspect both sources, write the commented config to ``out`` and check that it loads (``fields``: a
    column mapping to use instead of recognising or guessing one).

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
    shapes = inspect_pair(train, valid, fields)
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
    mapping = shapes[0].fields or shapes[1].fields
    if mapping:
        said.append("[data.fields] " + ", ".join(f"{k} = {v}" for k, v in mapping.items())
                    + (" (guessed from the column names: check it)" if shapes[0].guessed or shapes[1].guessed else ""))
    if group is not None:
        sizes = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:8]) + (", ..." if len(counts) > 8 else "")
        said.append(f"group_by = {group} ({len(counts)} groups: {sizes})")
    else:
        said.append(f"no group_by: no column of {shapes[0].path.name} has 2 to {MAX_GROUPS} string values "
                    "(set select.group_by to check retention per group)")
    return dest, said
