"""The dataset card of a release: its ``README.md``, so that ``datasets.load_dataset(<release dir>)`` reads
the kept rows and the Hugging Face Hub shows what they are.

The card is a YAML header in the form ``datasets`` reads (``configs``: the ``default`` config whose
``train`` split is ``data.parquet``; ``dataset_info``: the features of ``data.parquet``'s Arrow schema and
the split's size; ``license`` only when one is given) and a body for people: where the rows come from
(source files and their sha256), the validation set, the model fingerprint, the selection policy and the
gate's thresholds, the gate's verdict and the counts.

A release splits the scored samples in two (:func:`release_frames`): ``data.parquet`` holds the training
columns of the kept rows (the sample fields its rows use, its metadata with ``source`` relative to the
sources' common folder, and ``value``), ``scores.parquet`` every scored sample with the per-signal columns
(:func:`score_columns`), ``kept`` and the drop ``reason``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from valuegate.engine.baseline_registry import baseline_names
from valuegate.engine.columns import MEASURE_COLUMNS, SIGNAL_OUTPUT_COLUMNS, VERDICT_COLUMNS

__all__ = [
    "CARD_FILE",
    "card_extra",
    "card_features",
    "data_schema",
    "release_frames",
    "render_card",
    "score_columns",
    "write_card",
]

CARD_FILE = "README.md"

#: Columns of a scored sample that describe its score, not the sample: they go to ``scores.parquet`` only.


def score_columns() -> tuple[str, ...]:
    """The score columns of a release's scores.parquet: those of valuegate/engine/columns.py, in the order the
    file has always had (the baselines, registered ones included, after the signals: a release of the same
    scores stays the same bytes)."""
    return ("nearest_ids", "nearest_values", *MEASURE_COLUMNS, *VERDICT_COLUMNS, *SIGNAL_OUTPUT_COLUMNS,
            *baseline_names(), "valset", "model_fp")


def release_frames(selected: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a :func:`valuegate.tasks.select.select_samples` table into what a release stores.

    Args:
        selected: every scored sample, ``(n_scored, columns)``: ``id``, ``value``, ``keep``, ``reason``, the
            content and metadata columns and any of :func:`score_columns`.

    Returns:
        ``(data, scores)``: ``data`` the kept rows, ``(n_kept, columns)``, without ``keep``, ``reason``,
        ``reason_code`` and the score columns (``id``, the content and metadata columns, ``value``); ``scores``
        every scored sample, ``(n_scored, columns)``: ``id``, ``value``, the score columns it has, ``reason`` and
        ``reason_code`` (empty when kept); the release adds ``kept``.
    """
    score_cols = [c for c in score_columns() if c in selected.columns]
    decision = [c for c in ("keep", "reason", "reason_code") if c in selected.columns]
    data = selected.filter(pl.col("keep")).drop(*decision, *score_cols)
    # the sample fields no kept row uses (messages and text of prompt/response data) are left out
    empty = [c for c in CONTENT_COLUMNS if c in data.columns and data.height and data[c].null_count() == data.height]
    data = data.drop(empty)
    if "source" in data.columns and data.height:
        data = data.with_columns(pl.Series("source", relative_sources(data["source"].to_list()), dtype=pl.String))
    scores = selected.select("id", "value", *score_cols, *(c for c in ("reason", "reason_code") if c in selected.columns))
    return data, scores


# the sample fields of a scored row; those null in every kept row are not written to data.parquet
CONTENT_COLUMNS = ("prompt", "response", "messages", "text", "images")


def relative_sources(sources: list[str | None]) -> list[str | None]:
    """Source paths relative to the folder that holds them all (a file's name when there is one folder), so
    a release names its inputs without the machine's absolute paths (the manifest keeps those, with hashes)."""
    import os

    given = sorted({s for s in sources if s})
    if not given:
        return sources
    base = os.path.commonpath([os.path.dirname(s) for s in given]) if len(given) > 1 else os.path.dirname(given[0])
    return [Path(os.path.relpath(s, base)).as_posix() if s and base else s for s in sources]


# --------------------------------------------------------------------------------------------------
# Features (the YAML form of datasets' Features)
# --------------------------------------------------------------------------------------------------


def _value_name(t: pa.DataType) -> str | None:
    """datasets' dtype name of a plain Arrow type, or None when it has none."""
    if pa.types.is_dictionary(t):
        return _value_name(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"  # data.parquet stores 32-bit offsets
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_floating(t):
        return f"float{t.bit_width}"  # Arrow says halffloat, float, double
    if pa.types.is_date(t):
        return "date32" if pa.types.is_date32(t) else "date64"
    if pa.types.is_integer(t):
        return str(t)  # int64, uint8, ...
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, tz={t.tz}]" if t.tz else f"timestamp[{t.unit}]"
    if pa.types.is_time(t) or pa.types.is_duration(t):
        return str(t)  # time64[us], duration[ms]
    if pa.types.is_decimal(t):
        return f"decimal{t.bit_width}({t.precision}, {t.scale})"
    return None


def _spec(t: pa.DataType) -> dict[str, Any] | None:
    """The YAML feature of one Arrow type (without ``name``): ``{"dtype": ...}``, ``{"struct": [...]}`` or
    ``{"list": ..., ["length": n]}``; None when ``datasets`` has no equivalent (a map, a union)."""
    name = _value_name(t)
    if name is not None:
        return {"dtype": name}
    if pa.types.is_struct(t):
        fields = [_named(f) for f in t]
        return None if any(f is None for f in fields) else {"struct": fields}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _spec(t.value_type)
        if inner is None:
            return None
        item = inner["dtype"] if "dtype" in inner else inner.get("struct", inner)
        return {"list": item, **({"length": t.list_size} if pa.types.is_fixed_size_list(t) else {})}
    return None


def _named(f: pa.Field) -> dict[str, Any] | None:
    spec = _spec(f.type)
    return None if spec is None else {"name": f.name, **spec}


def card_features(schema: pa.Schema) -> list[dict[str, Any]] | None:
    """The ``dataset_info.features`` of a card for an Arrow schema, as ``datasets`` writes them
    (``Features._to_yaml_list``): one ``{"name", "dtype" | "list" | "struct"}`` per column; None when a
    column has no ``datasets`` type (the card then leaves the features for ``datasets`` to infer)."""
    fields = [_named(f) for f in schema]
    return None if any(f is None for f in fields) else fields  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------


def _yaml(header: dict[str, Any]) -> str:
    import yaml  # prefect's dependency

    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000)


def _cell(x: Any) -> str:
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows), ""]


def render_card(record: dict[str, Any], schema: pa.Schema, dropped: dict[str, int] | None = None,
                license: str | None = None) -> str:
    """The ``README.md`` of a release.

    Args:
        record: the release's manifest or completion record (``name``, ``version``, ``inputs``,
            ``valset``, ``model_fp``, ``policy``, ``thresholds``, ``gate``, ``counts``, ``run_id``,
            ``created``, ``settings``; ``data_rows`` when known, else ``counts["released"]``).
        schema: the Arrow schema of its ``data.parquet``.
        dropped: ``{reason: dropped samples}`` (see :func:`valuegate.tasks.select.dropped_reason_counts`).
        license: an SPDX id or Hub license name for the header; None leaves the field out.

    Returns:
        the card: a YAML front matter between ``---`` lines, then Markdown.
    """
    counts = record.get("counts") or {}
    kept = record.get("data_rows", counts.get("released"))
    header: dict[str, Any] = {}
    if license:
        header["license"] = license
    header["pretty_name"] = f"{record.get('name')} {record.get('version')}"
    header["tags"] = ["valuegate"]
    header["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": "data.parquet"}]}]
    features = card_features(schema)
    info: dict[str, Any] = {"features": features} if features is not None else {}
    if kept is not None:
        info["splits"] = [{"name": "train", "num_examples": int(kept)}]
    if info:
        header["dataset_info"] = info

    gate = record.get("gate") or {}
    passed = gate.get("passed") is True
    policy, thresholds = record.get("policy") or {}, record.get("thresholds") or {}
    model = (record.get("settings") or {}).get("model") or {}
    model_name = model.get("name") or model.get("path") if isinstance(model, dict) else None
    lines = [f"# {record.get('name')} {record.get('version')}", "",
             f"Training rows kept by valuegate from the samples of its "
             f"scoring run `{record.get('run_id')}` ({record.get('created', 'time unknown')}): "
             f"**{kept}** of {counts.get('scored', '?')} scored samples, selected by the policy "
             f"`{policy.get('policy')}`. The release's gate **{'passed' if passed else 'FAILED'}**.", "",
             "```python", "from datasets import load_dataset", "",
             'rows = load_dataset("path/to/this/folder", split="train")  # data.parquet', "```", "",
             "## Files", ""]
    lines += _table(("file", "what it holds"), [
        ("data.parquet", "the kept rows, the training columns only: "
         + ", ".join(f"`{n}`" for n in schema.names) + " (`value`: the value the policy read)"),
        ("scores.parquet", "every scored sample: `id`, `value`, the per-signal columns (nearest validation "
         "samples, token count, truncation, mean loss, self-influence, the suspect score and its reason, the "
         "signals behind it), `reason` (why it was dropped, empty when kept) and `kept`; "
         "`load_dataset(\"parquet\", data_files=\"scores.parquet\")` reads it"),
        ("report.html", "the report for people: distributions, groups, dropped samples, the change since "
         "the previous release"),
        ("gate/", "the gate's Great Expectations Data Docs"),
        ("manifest.json", "the provenance record (written last: a release without it is incomplete)"),
    ])
    lines += ["## Sources", ""]
    lines += _table(("file", "sha256"), [(i.get("source", i.get("path")), f"`{i.get('sha256')}`")
                                         for i in record.get("inputs") or []])
    lines += ["## Validation set and model", "",
              f"- validation set: `{record.get('valset')}` (name@version)",
              *([f"- model: `{model_name}`"] if model_name else []),
              f"- model fingerprint: `{record.get('model_fp')}`", "", "## Policy and thresholds", ""]
    lines += _table(("setting", "value"), [(f"select.{k}", v) for k, v in policy.items()]
                    + [(f"gate.{k}", v) for k, v in thresholds.items()])
    lines += ["## Gate", "", f"**{'passed' if passed else 'FAILED'}**"
              + ("" if passed else ": " + "; ".join(str(f) for f in gate.get("failures") or [])), ""]
    ingested = (counts["dataset_rows"] + counts["dataset_quarantined"]
                if {"dataset_rows", "dataset_quarantined"} <= counts.keys() else counts.get("rows"))
    scored = counts.get("scored")
    rows = [("ingested rows", ingested), ("quarantined rows", counts.get("dataset_quarantined",
                                                                          counts.get("quarantined"))),
            ("samples in the dataset", counts.get("dataset_rows")), ("scored", scored),
            ("kept (data.parquet)", kept),
            ("dropped", scored - kept if isinstance(scored, int) and isinstance(kept, int) else None),
            ("truncated at max_length", counts.get("truncated")), ("not scored", counts.get("unscored"))]
    lines += ["## Counts", ""]
    lines += _table(("", "samples"), [(k, v) for k, v in rows if v is not None])
    if dropped:
        lines += ["Dropped, by reason:", ""]
        lines += _table(("reason", "samples"), list(dropped.items()))
    return "---\n" + _yaml(header) + "---\n\n" + "\n".join(lines)


def data_schema(data: pl.DataFrame) -> pa.Schema:
    """The Arrow schema of a release's rows as polars exports them (large offsets and dictionaries are
    read as the plain types ``data.parquet`` stores, see :func:`card_features`)."""
    return data.head(0).to_arrow(compat_level=pl.CompatLevel.oldest()).schema


def card_extra(directory: Path, manifest: dict[str, Any], data: pl.DataFrame,
               dropped: dict[str, int] | None = None) -> dict[str, Path]:
    """Render the card of a release about to be staged into ``directory`` (created) and return it as the
    ``extra`` entry of :func:`valuegate.storage.releases.stage_release`: ``{"README.md": path}``.

    Args:
        manifest: the release's manifest (:func:`valuegate.tasks.release.build_manifest`).
        data: its kept rows, ``(n_kept, columns)``, as they go into ``data.parquet``.
        dropped: ``{reason: dropped samples}``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    text = render_card({**manifest, "data_rows": data.height}, data_schema(data), dropped)
    return {CARD_FILE: write_card(directory / CARD_FILE, text)}


def write_card(path: Path, text: str) -> Path:
    """Write the card (temp file, then rename); returns ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
