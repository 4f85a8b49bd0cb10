"""The data contract: the pyarrow schema of every table valuegate keeps, in one place.

Tables of a workspace (docs/ARCHITECTURE.md §3.1):

- ``samples``: one row per distinct sample content, keyed by ``id`` = sha256 of the normalised sample.
- ``members``: which sample sits at which row of which source file of which dataset, with the row's
  other columns as they came (``metadata``, JSON). A dataset's current samples are the ids of the latest
  ingest of each of its sources. (Source, row and metadata are not on ``samples``: they belong to a row of
  a file, and one content can sit in many files: keeping them apart is what makes dedup across files,
  idempotent re-ingest and "which ids left" exact.)
- ``ingests``: the completion record of each ingested file (its content hash, counts, ids that left).
- ``quarantine``: refused rows with the raw content and the reason.
- ``feature_sets``: one row per model fingerprint: the resolved settings and the feature table's name.
- ``features__<fp>``: one table per model fingerprint, keyed by ``id``. (One table per fingerprint, not
  one table keyed by (id, model_fp): vector columns have a fixed width per model, and a vector index must
  never mix two models' spaces.)
- ``valset__<name>``: the samples of a validation set; each registration overwrites it, so every
  version is a Lance version, tagged ``v1``, ``v2``, ...
- ``valset_versions``: the registry of validation-set versions (content hash, rows, source, time).
- ``scores``: one row per (run, sample) of a scoring run, with its provenance.
- ``images``: the bytes of every image of an image-text sample, once per sha256 of the bytes (samples and
  validation sets list the hashes in their ``images`` column; releases carry the same hashes).

Nothing here imports torch or LanceDB.
"""

from __future__ import annotations

import pyarrow as pa

from valuegate.engine.baseline_registry import registered
from valuegate.engine.columns import (  # noqa: F401  (re-exported: the store names its columns so)
    BASE_SIGNALS,
    FAULT_SCORE_COLUMNS,
    FEATURE_FORMAT,
    HIDDEN_DTYPE,
    SIGNAL_COLUMNS,
    SKETCH_DTYPE,
    STORED_ROW_DTYPE,
)

SAMPLES = "samples"
MEMBERS = "members"
INGESTS = "ingests"
QUARANTINE = "quarantine"
FEATURE_SETS = "feature_sets"
VALSET_VERSIONS = "valset_versions"
SCORES = "scores"
IMAGES = "images"
FEATURES_PREFIX = "features__"
VALSET_PREFIX = "valset__"

TIMESTAMP = pa.timestamp("us", tz="UTC")

SAMPLE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),          # prompt_response | messages | text
    pa.field("prompt", pa.string()),
    pa.field("response", pa.string()),
    pa.field("messages", pa.string()),                      # canonical JSON of the turns
    pa.field("text", pa.string()),
    pa.field("images", pa.list_(pa.string())),              # sha256 of each image's bytes (rows of `images`)
]

samples_schema = pa.schema([*SAMPLE_FIELDS, pa.field("first_seen", TIMESTAMP)])

# where a row came from: the key of members and quarantine rows
ROW_ADDRESS_FIELDS = [
    pa.field("key", pa.string(), nullable=False),            # dataset/source/row (storage.samples.row_key)
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
]

members_schema = pa.schema([
    *ROW_ADDRESS_FIELDS,
    pa.field("id", pa.string(), nullable=False),
    pa.field("metadata", pa.string()),                      # JSON of the row's other columns
    pa.field("source_hash", pa.string(), nullable=False),
])

ingests_schema = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_hash", pa.string(), nullable=False),
    pa.field("at", TIMESTAMP, nullable=False),
    pa.field("rows", pa.int64()),
    pa.field("kept", pa.int64()),
    pa.field("new_samples", pa.int64()),
    pa.field("duplicates", pa.int64()),
    pa.field("quarantined", pa.int64()),
    pa.field("left_ids", pa.list_(pa.string())),
])

quarantine_schema = pa.schema([
    *ROW_ADDRESS_FIELDS,
    pa.field("source_hash", pa.string(), nullable=False),
    pa.field("raw", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("at", TIMESTAMP, nullable=False),
])

images_schema = pa.schema([
    pa.field("sha256", pa.string(), nullable=False),          # of the bytes: the key
    pa.field("data", pa.large_binary(), nullable=False),      # the file's bytes as ingested
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),                          # PNG, JPEG, ... (Pillow's name)
    pa.field("mode", pa.string()),                            # Pillow mode (RGB, L, ...)
])

feature_sets_schema = pa.schema([
    pa.field("model_fp", pa.string(), nullable=False),
    pa.field("table", pa.string(), nullable=False),
    pa.field("settings", pa.string(), nullable=False),      # JSON of everything in the fingerprint
    pa.field("hidden_size", pa.int32()),
    pa.field("vocab_size", pa.int32()),
    pa.field("row_width", pa.int32()),
    pa.field("error_dim", pa.int32()),
    pa.field("created", TIMESTAMP),
])


ROW_STEPS_FIELD_METADATA = {"lance-encoding:structural-encoding": "miniblock"}
"""Field metadata of the int8 row columns: Lance's mini-block layout for their bytes (a scan of
``list<int8>`` rows decoded at about 200 MB/s on 2 cores, of these bytes at about 750 MB/s; issue 19)."""


def features_schema(hidden_size: int, error_dim: int, sketch_dim: int = 0) -> pa.Schema:
    """Schema of a ``features__<fp>`` table (feature format 7).

    ``rows`` holds the sparse rows ``(|U|, row_width)`` row-major as the bytes of their int8 steps
    (:data:`STORED_ROW_DTYPE`, one ``binary`` value per sample, :data:`ROW_STEPS_FIELD_METADATA`),
    ``rows_scale`` ``(|U|,)`` float32 the step of each support entry's block
    (:mod:`valuegate.engine.quantize`: a row is ``steps · rows_scale``, what the store's readers return as
    ``list<float32>``), ``token_ids`` the support ``U`` (int32); ``hard_rows`` / ``hard_rows_scale`` likewise.
    ``self_influence`` is ``Σ_u ‖R[u]‖²`` of the stored rows, in float64. ``mean_hidden`` ``(d,)`` float16
    is the mean final hidden state over the counted positions (the RDS baselines, the local suspect
    reference, the signals' centre ``Σ_j n_j h̄_j / Σ_j n_j``, vector search; a mean stays in float16's range
    where ``Σ_t h_t`` of a long sample need not). ``pooled_error`` ``(k_e,)`` is a dense vector for search.
    ``error_sum`` stays float32 (|U| floats: the centred rows ``R − error_sum ⊗ P_h μ`` are a difference).
    ``sketch`` ``(sketch_dim,)`` float16 is the count sketch of the stored rows
    (:func:`valuegate.engine.sketch.count_sketch` of the CSR row with columns ``token·row_width + j``,
    seed ``extract.seed``); absent when ``sketch_dim`` is 0.
    """
    sketch = [pa.field("sketch", pa.list_(pa.type_for_alias(SKETCH_DTYPE), sketch_dim))] if sketch_dim > 0 else []
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("truncated", pa.bool_()),                  # the sample was cut at max_length
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rows", pa.binary(), nullable=False, metadata=ROW_STEPS_FIELD_METADATA),
        pa.field("rows_scale", pa.list_(pa.float32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("mean_loss", pa.float32()),
        pa.field("uncond_loss", pa.float32()),              # mean loss of the response alone (null: no prompt)
        pa.field("max_loss", pa.float32()),                 # the largest token surprisal (valuegate/engine/ending.py)
        pa.field("end_loss", pa.float32()),                 # −log p(end of answer) (null: truncated, no end token)
        pa.field("prompt_overlap", pa.float32()),           # longest verbatim run of the prompt in the response, share
        pa.field("dropped_mass", pa.float32()),
        pa.field("self_influence", pa.float64()),
        pa.field("mean_hidden", pa.list_(pa.type_for_alias(HIDDEN_DTYPE), hidden_size)),
        pa.field("pooled_error", pa.list_(pa.float32(), max(error_dim, 1))),
        pa.field("error_sum", pa.list_(pa.float32()), nullable=False),  # Σ_t a_t on the support
        # the same rows on the hardest `hard_fraction` of the counted positions (null when not extracted)
        pa.field("hard_token_ids", pa.list_(pa.int32())),
        pa.field("hard_rows", pa.binary(), metadata=ROW_STEPS_FIELD_METADATA),
        pa.field("hard_rows_scale", pa.list_(pa.float32())),
        pa.field("hard_error_sum", pa.list_(pa.float32())),
        pa.field("hard_n_tokens", pa.int32()),
        pa.field("hard_mean_loss", pa.float32()),
        pa.field("batch", pa.int64()),
        pa.field("seconds", pa.float32()),                  # this sample's share of its batch's time
        *sketch,
    ])


valset_schema = pa.schema([
    *SAMPLE_FIELDS,
    pa.field("row", pa.int64(), nullable=False),
    pa.field("metadata", pa.string()),
])

valset_versions_schema = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("version", pa.int32(), nullable=False),         # 1, 2, ... (tag "v{version}")
    pa.field("lance_version", pa.int64(), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("rows", pa.int64(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("at", TIMESTAMP, nullable=False),
    pa.field("pruned", pa.bool_()),
])

def _baseline_field(b) -> pa.Field:
    return pa.field(b.column, {"float64": pa.float64(), "int32": pa.int32()}[b.dtype])


scores_schema = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
    pa.field("aggregate", pa.string(), nullable=False),
    pa.field("normalize", pa.string(), nullable=False),
    pa.field("nearest_ids", pa.list_(pa.string())),
    pa.field("nearest_values", pa.list_(pa.float64())),
    pa.field("n_tokens", pa.int32()),
    pa.field("truncated", pa.bool_()),                       # valued on its first max_length tokens only
    pa.field("mean_loss", pa.float32()),
    pa.field("self_influence", pa.float64()),
    # the baselines of valuegate/engine/baseline_registry.py (null in rows of an older valuegate; ifd null without
    # a prompt): perplexity, length, ifd, rds_mean, rds_max, then any registered at import
    *[_baseline_field(b) for b in registered()],
    pa.field("suspect", pa.float64()),                       # the largest fault detector score, null when off
    pa.field("fault", pa.string()),                          # the detector that gives it (valuegate/engine/faults.py)
    pa.field("suspect_reason", pa.string()),                 # its sentence
    *[pa.field(name, pa.float64()) for name in FAULT_SCORE_COLUMNS],  # each built-in detector's score
    # every signal of valuegate/engine/signals.py but mean_loss (above; null when not computed)
    *[pa.field(name, pa.float64()) for name in SIGNAL_COLUMNS if name != "mean_loss"],
    pa.field("valset", pa.string(), nullable=False),         # name@vN
    pa.field("model_fp", pa.string(), nullable=False),
    pa.field("settings", pa.string(), nullable=False),       # JSON of the resolved settings
    pa.field("at", TIMESTAMP, nullable=False),
])


def current_scores_schema() -> pa.Schema:
    """:data:`scores_schema` with a field for every baseline registered since it was built (a baseline
    registered after import, e.g. in a test), placed after the others' (an older table gains it as null)."""
    have = set(scores_schema.names)
    extra = [_baseline_field(b) for b in registered() if b.column not in have]
    if not extra:
        return scores_schema
    at = scores_schema.get_field_index("suspect")
    fields = list(scores_schema)
    return pa.schema(fields[:at] + extra + fields[at:])


def features_table(model_fp: str) -> str:
    """Name of the feature table of a fingerprint."""
    return f"{FEATURES_PREFIX}{model_fp[:16]}"


def valset_table(name: str) -> str:
    """Name of the table of a validation set."""
    return f"{VALSET_PREFIX}{name}"
