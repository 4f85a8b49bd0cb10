"""The names the engine produces: the feature layout's version and the signal and baseline columns.

Plain constants and the baseline registry's names (no torch, no pyarrow), so the store's schemas
(``storage/schemas.py``) and the engine share one definition.
"""

from valuegate.engine.baseline_registry import baseline_names

# Version of the feature layout: part of every model fingerprint, bumped when a stored feature changes.
FEATURE_FORMAT = 8  # 3: the `truncated` column; 4: `uncond_loss` (IFD's pass of the response alone);
# 5: `rows`/`hard_rows` stored in float16 (self_influence of the stored rows), the `sketch` column (issue 19);
# 6: `rows`/`hard_rows` in int8 with a float32 scale per support entry (`rows_scale`, `hard_rows_scale`;
# valuegate/engine/quantize.py), issue 19; 7: `mean_hidden` (float16 mean hidden state) replaces `pooled_hidden`
# (float32 Σ_t h_t), and the int8 rows are stored as one `binary` value per sample (Lance decodes those bytes
# about 4x faster than `list<int8>`), issue 19; 8: `max_loss`, `end_loss` and `prompt_overlap`, the per-sample
# statistics the fault detectors read (valuegate/engine/ending.py, valuegate/engine/faults.py), issue 27

# The stored precision of the sparse rows (`rows`, `hard_rows`, with their scales), of the `sketch`
# column and of `mean_hidden`: numpy/Arrow names. The store's readers give the rows back in float32; the
# streaming mean scan multiplies the int8 steps themselves (valuegate/engine/aggregate.py: block_inner_products).
STORED_ROW_DTYPE = "int8"
SKETCH_DTYPE = "float16"
HIDDEN_DTYPE = "float16"

# The signals of valuegate/engine/signals.py (documented there), on all counted tokens; each also exists on the
# hardest fraction of them with a ``hard_`` prefix. Every one is a column of a scores run.
BASE_SIGNALS = (
    "value_mean", "value_nearest", "cosine_mean", "cosine_nearest", "per_token_mean", "centred_value_mean",
    "centred_cosine_mean", "centred_cosine_nearest", "log_self_influence", "mean_loss",
)
SIGNAL_COLUMNS = BASE_SIGNALS + tuple(f"hard_{s}" for s in BASE_SIGNALS)


# The built-in fault detectors of valuegate/engine/faults.py (issue 27): each has a calibrated score column
# ``fault_<code>`` in every scored frame and scores run, beside ``suspect`` (the largest), ``fault`` (its code)
# and ``suspect_reason`` (its sentence). A detector registered later still feeds those three.
FAULT_CODES = ("mismatch", "echo", "garbled", "cut")
FAULT_SCORE_COLUMNS = tuple(f"fault_{c}" for c in FAULT_CODES)

# The per-sample columns of every scored frame, by group, in the order valuegate/engine/score_columns.py gives
# them after `value` (and the nearest validation samples): `valuegate score`'s output, the stored scores table
# (storage/schemas.py) and a release's scores.parquet (valuegate/dataset_card.py) all take their names from here;
# the baselines' from valuegate/engine/baseline_registry.py, at call time (a baseline registered later counts).
MEASURE_COLUMNS = ("n_tokens", "truncated", "mean_loss", "self_influence")
VERDICT_COLUMNS = ("suspect", "fault", "suspect_reason", *FAULT_SCORE_COLUMNS)
SIGNAL_OUTPUT_COLUMNS = tuple(c for c in SIGNAL_COLUMNS if c != "mean_loss")  # mean_loss is a measure


def sample_score_columns() -> tuple[str, ...]:
    """The per-sample score columns, in order: measures, baselines (registered), verdict, signals."""
    return (*MEASURE_COLUMNS, *baseline_names(), *VERDICT_COLUMNS, *SIGNAL_OUTPUT_COLUMNS)
