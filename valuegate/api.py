"""The Python API: :func:`score` for files or in-memory frames, :class:`Workspace` for the store.

Both run the functions the command line runs (``valuegate score``, ``ingest``, ``valset register``,
``extract``, ``score-set``, ``release list``), so the numbers are the CLI's. Settings are the one settings
model (:class:`valuegate.settings.Settings`): pass a ``Settings`` object, a ``config`` TOML file, and/or
keyword sections such as ``model={"name": "Qwen/Qwen2.5-0.5B"}`` or ``score={"aggregate": "nearest"}``
(keyword sections win; ``VALUEGATE_*`` environment variables apply when no ``Settings`` object is given,
as on the command line). A mistake is a :class:`~valuegate.errors.ValuegateError` naming the key, file,
row or field.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

import polars as pl

from valuegate.errors import ValuegateError
from valuegate.settings import Settings, _describe, _unknown_in, _unknown_key, load_settings

if TYPE_CHECKING:
    import datasets
    import pandas

    from valuegate.engine.sample import Sample
    from valuegate.file_scoring import FileScoring
    from valuegate.storage import lance
    from valuegate.tasks.extract import StoreExtractReport
    from valuegate.tasks.ingest import FileReport
    from valuegate.tasks.score import ScoreRunReport

TableLike = Union[str, os.PathLike, pl.DataFrame, pl.LazyFrame, "pandas.DataFrame", "datasets.Dataset"]
"""What :func:`score` reads: a JSONL / Parquet / CSV path, or a frame whose columns form samples
(``prompt`` + ``response``, ``messages`` or ``text``; every other column is carried through)."""


def resolve_settings(settings: Settings | None = None, config: str | os.PathLike | None = None,
                     sections: Mapping[str, Any] | None = None) -> Settings:
    """One :class:`Settings` from a ``Settings`` object or a TOML ``config`` (not both) and keyword sections.

    Args:
        settings: a resolved ``Settings`` (left unchanged; the result is a copy with ``sections`` applied).
        config: a TOML file, read as ``--config`` is (relative paths follow its folder; ``VALUEGATE_*``
            environment variables apply).
        sections: ``{section: {key: value}}`` and optionally ``workspace``; None values are ignored.

    Raises:
        ValuegateError: an unknown section or key (with the nearest valid one), an invalid value.
        TypeError: both ``settings`` and ``config``.
    """
    sections = dict(sections or {})
    unknown = _unknown_in(sections)
    if unknown:
        raise ValuegateError("settings: " + "; ".join(_unknown_key(k) for k in unknown))
    for key, value in sections.items():
        if key != "workspace" and not isinstance(value, Mapping):
            raise ValuegateError(f"settings: section {key} must be a dict of keys, e.g. {key}={{...}}; "
                                 f"got {type(value).__name__}")
    clean: dict[str, Any] = {k: {f: v for f, v in sec.items() if v is not None} for k, sec in sections.items()
                             if k != "workspace"}
    workspace = sections.get("workspace")
    if workspace is not None:
        clean["workspace"] = os.fspath(workspace)
    if settings is None:
        return load_settings(config, clean)
    if config is not None:
        raise TypeError("give a Settings object or a config file, not both")
    merged = settings.model_dump()
    for key, value in clean.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    try:
        return Settings.model_validate(merged)
    except Exception as exc:  # pydantic's ValidationError: one line naming the key
        raise ValuegateError(f"invalid settings: {_describe(exc)}") from exc


def _as_polars(obj: Any, role: str) -> tuple[pl.DataFrame, str]:
    """An in-memory table as a polars frame, with what it was (for messages)."""
    if isinstance(obj, pl.DataFrame):
        return obj, "polars.DataFrame"
    if isinstance(obj, pl.LazyFrame):
        return obj.collect(), "polars.LazyFrame"
    pd, ds = sys.modules.get("pandas"), sys.modules.get("datasets")  # loaded when such an object exists
    if pd is not None and isinstance(obj, pd.DataFrame):
        return pl.from_pandas(obj), "pandas.DataFrame"
    if ds is not None and isinstance(obj, ds.Dataset):
        return obj.to_polars(), "datasets.Dataset"
    if ds is not None and isinstance(obj, ds.DatasetDict):
        raise TypeError(f"{role}: a datasets.DatasetDict with splits {list(obj)}; pass one split, "
                        f"e.g. {role}=ds[{next(iter(obj), 'train')!r}]")
    if type(obj).__module__.startswith("pyarrow") and type(obj).__name__ == "Table":
        return pl.from_arrow(obj), "pyarrow.Table"
    raise TypeError(f"{role}: expected a path, a polars or pandas DataFrame or a datasets.Dataset; "
                    f"got {type(obj).__module__}.{type(obj).__qualname__}")


def read_input(obj: TableLike, role: str, fields: dict[str, str] | None = None) -> tuple[pl.DataFrame, list[Sample]]:
    """Rows of a path or a frame and their samples.

    Args:
        obj: a path (read as ``valuegate score`` reads it) or a frame.
        role: ``"train"`` or ``"valid"``: names a frame in messages, e.g. ``train (pandas.DataFrame): row 3: ...``.
        fields: a column mapping (``data.fields``, :mod:`valuegate.inputs.formats`).

    Returns:
        the frame (n rows, every input column in order) and its n samples.

    Raises:
        ValuegateError: no sample columns (the message lists the columns), a bad row (row and field), no rows.
        TypeError: ``obj`` is none of the kinds above.
    """
    from valuegate.inputs.rows import read_samples, samples_from_frame

    if isinstance(obj, (str, os.PathLike)):
        return read_samples(os.fspath(obj), fields)
    df, what = _as_polars(obj, role)
    return df, samples_from_frame(df, f"{role} ({what})", fields=fields)


def score_inputs(train: TableLike, valid: TableLike, settings: Settings,
                 progress: bool = False) -> tuple[pl.DataFrame, FileScoring]:
    """:func:`score` with resolved settings, also returning what the scoring did (``valuegate score`` prints its
    summary from it). Returns ``(table, FileScoring)``; the table is described in :func:`score`."""
    from valuegate.engine.model_cache import kept_model, shared_model
    from valuegate.file_scoring import score_samples

    train_df, train_samples = read_input(train, "train", settings.data.fields)
    _, valid_samples = read_input(valid, "valid", settings.data.fields)
    t_src = os.fspath(train) if isinstance(train, (str, os.PathLike)) else "train"
    v_src = os.fspath(valid) if isinstance(valid, (str, os.PathLike)) else "valid"
    # the model stays loaded in this process for the next call with the same model (a notebook's second call)
    return score_samples(train_df, train_samples, valid_samples, settings, progress, kept_model(settings.model),
                         t_src, v_src, loader=shared_model)


def score(train: TableLike, valid: TableLike, settings: Settings | None = None, *,
          config: str | os.PathLike | None = None, progress: bool = False, fields: dict[str, str] | None = None,
          **sections: Any) -> pl.DataFrame:
    """Value every training sample against the validation samples: the table ``valuegate score`` writes.

    Args:
        train: n training rows: a path (JSON lines, a JSON array, CSV, Parquet, a ``save_to_disk`` folder, a
            folder or glob of shards), a polars or pandas DataFrame, or a ``datasets.Dataset``; its columns form
            samples (``prompt`` + ``response``, OpenAI ``messages``, ShareGPT ``conversations``, Alpaca
            ``instruction``/``input``/``output``, or ``text``: docs/your-data.md), every other column is
            carried through.
        valid: m validation rows, the same kinds.
        settings: a :class:`~valuegate.settings.Settings` (e.g. ``load_settings("vg.toml")``).
        config: a TOML settings file instead (as ``--config``).
        progress: progress bars on stderr.
        fields: which of your columns is which canonical field, e.g. ``{"prompt": "question", "response":
            "answer"}`` (the config's ``[data.fields]``; applies to both inputs where they have those columns).
        **sections: settings sections as dicts, e.g. ``model={"name": "Qwen/Qwen2.5-0.5B", "device": "cuda"}``,
            ``extract={"max_length": 512}``, ``score={"aggregate": "nearest"}``.

    Returns:
        For the ``mean`` and ``nearest`` aggregates n rows: every input column of ``train``, then ``row``
        (0..n-1), ``value`` (float; above zero: the sample helps the validation loss to first order),
        ``nearest_rows`` (list of the k validation rows it aligns with best), ``n_tokens``, ``truncated``,
        ``mean_loss``, ``self_influence``, and with ``score.signals`` ``suspect`` (robust z against the
        validation set; high: unlike it), ``suspect_reason`` and one column per signal; then ``keep`` (bool)
        and ``reason`` (why dropped, empty when kept): what the configured ``select.policy`` of a run
        would decide (the select step's own code; with a policy that needs a column the scores lack, e.g.
        ``suspect`` without signals, neither, and a warning). For ``pairwise``
        n·m rows: ``train_row``, ``valid_row``, ``value``.

    The model stays loaded in the process (one model: ``valuegate.engine.model_cache``), so the next call
    with the same model settings starts at once; ``valuegate.engine.model_cache.clear_model_cache()`` frees it.

    Raises:
        ValuegateError: a bad setting, file, row or field (one line naming it).
        TypeError: an input of another kind.
    """
    if fields is not None:
        sections["data"] = {**sections.get("data", {}), "fields": dict(fields)}
    resolved = resolve_settings(settings, config, sections)
    return score_inputs(train, valid, resolved, progress)[0]


class Workspace:
    """A valuegate workspace (a local folder or an ``s3://`` URI): datasets, validation sets, features,
    scores runs and releases, through the functions the CLI's workspace commands run.

    Args:
        path_or_uri: the workspace; default: the settings' ``workspace`` (``./valuegate-workspace``).
        settings: a :class:`~valuegate.settings.Settings`; or ``config``: a TOML file (as ``--config``).
        progress: progress bars on stderr.
        **sections: settings sections as dicts (``model={...}``, ``extract={...}``, ``score={...}``), used
            by every call; a call's own keyword sections override them for that call.

    Example (the model is a hub id, a local folder or ``"smollm2-135m"``)::

        ws = valuegate.Workspace("ws", model={"name": "smollm2-135m"})
        ws.ingest("train", "train.jsonl")
        ws.register_valset("val", "valid.jsonl")
        run = ws.score("train", "val")          # extracts what is missing, writes one scores run
        scores = ws.scores("train", run.run_id)  # polars.DataFrame, one row per sample
    """

    def __init__(self, path_or_uri: str | os.PathLike | None = None, settings: Settings | None = None, *,
                 config: str | os.PathLike | None = None, progress: bool = False, **sections: Any) -> None:
        from valuegate.storage.lance import Workspace as Store

        if path_or_uri is not None:
            sections["workspace"] = os.fspath(path_or_uri)
        self.settings: Settings = resolve_settings(settings, config, sections)
        self.progress = progress
        self.store: lance.Workspace = Store.from_env(self.settings.workspace)

    def __repr__(self) -> str:
        return f"valuegate.Workspace({self.uri!r})"

    @property
    def uri(self) -> str:
        """The workspace's path or URI."""
        return self.store.uri

    def _settings(self, sections: dict[str, Any]) -> Settings:
        return resolve_settings(self.settings, None, sections) if sections else self.settings

    def ingest(self, name: str, *files: str | os.PathLike) -> list[FileReport]:
        """Add files (JSONL / Parquet / CSV, a ``save_to_disk`` folder) to dataset ``name``, as ``valuegate
        ingest``: dedup by content, refused rows to quarantine, an unchanged file is a no-op.

        Returns:
            one report per file (``rows``, ``kept``, ``new_samples``, ``duplicates``, ``quarantined`` with
            ``reasons``, ``left``, ``unchanged``; ``line()`` says it in words).
        """
        from valuegate.inputs.readers import source_files
        from valuegate.storage.samples import ensure_sample_tables
        from valuegate.tasks.ingest import ingest_file

        if not files:
            raise ValuegateError(f"ingest {name!r}: no files given")
        ensure_sample_tables(self.store)
        return [ingest_file(self.store, name, f, self.settings.ingest.max_chars, fields=self.settings.data.fields)
                for spec in files for f in source_files(os.fspath(spec))]

    def register_valset(self, name: str, file: str | os.PathLike) -> dict[str, Any]:
        """Register ``file`` as the next version of validation set ``name`` (identical content: the existing
        version), as ``valuegate valset register``.

        Returns:
            the version record: ``name``, ``version`` (int), ``rows``, ``content_hash``, ``source``, ``at``,
            ``pruned``, and ``new`` (False when identical content was already registered).
        """
        from valuegate.tasks.validation_set import register_valset

        record, new = register_valset(self.store, name, os.fspath(file), self.settings.ingest.max_chars,
                                      self.settings.data.fields)
        return {**record, "new": new}

    def extract(self, name: str, **sections: Any) -> StoreExtractReport:
        """Extract the features of dataset ``name`` that the settings' fingerprint does not have yet, as
        ``valuegate extract`` (the model loads only when something is missing).

        Returns:
            the report: ``model_fp``, ``requested``, ``already``, ``extracted``, ``truncated``, ``refused``
            (``(id, reason)`` pairs); ``line()`` says it in words.
        """
        from valuegate.tasks.extract import extract_dataset

        return extract_dataset(self.store, name, self._settings(sections), progress=self.progress)

    def score(self, name: str, valset: str, **sections: Any) -> ScoreRunReport:
        """Score dataset ``name`` against validation set ``valset`` (``NAME``: its latest version, or
        ``NAME@vN``) and write one scores run, as ``valuegate score-set`` (missing features are extracted).

        Returns:
            the report: ``run_id``, ``valset`` (``NAME@vN``), ``n_train``, ``n_valid``, ``model_fp``,
            ``extract_train`` / ``extract_valid`` (extraction reports), ``truncated``, ``unscored``; the
            scores themselves: :meth:`scores`.
        """
        from valuegate.tasks.score import score_dataset

        return score_dataset(self.store, name, valset, self._settings(sections), progress=self.progress)

    def scores(self, name: str, run_id: str) -> pl.DataFrame:
        """The scores run ``run_id`` of dataset ``name``: one row per scored sample with ``id``, its content
        (``kind``, ``prompt``, ``response``, ``messages``, ``text``), its metadata columns, ``value``,
        ``nearest_ids``, ``n_tokens``, ``truncated``, ``mean_loss``, ``self_influence``, ``suspect``, the
        per-signal columns, ``valset`` and ``model_fp``."""
        from valuegate.storage.scores import read_score_run

        return read_score_run(self.store, run_id, name)

    def releases(self, name: str | None = None) -> list[dict[str, Any]]:
        """Manifests of the complete releases of ``name`` (default: the settings' ``release.name``), oldest
        first, each with ``version`` (``vNNNN``) and ``current`` (bool), as ``valuegate release list``."""
        from valuegate.storage.releases import list_releases

        return list_releases(self.store, name or self.settings.release.name)


__all__ = ["TableLike", "Workspace", "read_input", "resolve_settings", "score", "score_inputs"]


def load_release(workspace: str | os.PathLike, name: str, version: str | None = None) -> pl.DataFrame:
    """The kept rows of a release: the current one (``CURRENT``), or ``version``.

    Args:
        workspace: the workspace (a folder or an ``s3://`` URI).
        name: the release name (``release.name``).
        version: ``vNNNN`` (or N); None: the current release.

    Returns:
        ``data.parquet`` of that release as a polars DataFrame (``id``, the sample fields, metadata,
        ``value``); ``.to_pandas()`` or ``datasets.Dataset.from_polars(...)`` from there. (``datasets``
        itself reads the current release with ``load_dataset("<workspace>/releases/<name>")``.)

    Raises:
        ValuegateError: no release of that name is current (or the version is not a complete release).
    """
    from valuegate.storage import releases as rstore
    from valuegate.storage.lance import Workspace as Store

    root = Store.from_env(os.fspath(workspace))
    if version is None:
        version = rstore.read_current(root, name)
        if version is None:
            names = rstore.list_release_names(root)
            raise ValuegateError(f"release {name!r}: none is current in {root.uri}"
                                 + (f" (releases: {', '.join(names)})" if names else " (no releases yet)"))
    return rstore.read_release_data(root, name, version)
