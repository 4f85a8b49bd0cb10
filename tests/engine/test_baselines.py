"""The baselines a user would pick instead (issue 18, item 1): perplexity, IFD, RDS and length as columns of
every scored frame, each checked against a plain reference written here with transformers directly, and each
as a selection policy (plus seeded random) on hand-made frames."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from tiny import random_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from valuegate.errors import ValuegateError
from valuegate.settings import SelectSettings, load_settings
from valuegate.storage import schemas
from valuegate.storage.lance import Workspace
from valuegate.tasks.select import dropped_reason_counts, select_samples

BASELINE_COLUMNS = ["perplexity", "length", "ifd", "rds_mean", "rds_max"]


# --------------------------------------------------------------------------------------------------
# The plain reference: model(input_ids).logits → cross-entropy on the response tokens, with and without the
# prompt; the mean of the final hidden states at the positions that predict a response token.
# --------------------------------------------------------------------------------------------------

class Reference:
    def __init__(self, model_dir):
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # the response alone starts from the tokenizer's BOS, else its EOS (a context-free start token), so
        # that every response token is predicted, as with the prompt
        self.start = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def _loss(self, ids: list[int], first: int) -> float:
        """Mean cross-entropy of ``ids[first:]``, each predicted from what precedes it."""
        logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return float(F.cross_entropy(logits[first - 1:-1], torch.tensor(ids[first:])))

    @torch.no_grad()
    def _pooled(self, ids: list[int], first: int) -> np.ndarray:
        hidden = self.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return hidden[first - 1:-1].mean(0).double().numpy()

    def row(self, prompt: str, response: str) -> dict:
        full, first = self._ids(prompt + response), len(self._ids(prompt))
        assert full[:first] == self._ids(prompt)  # the tiny tokenizer splits on whitespace
        cond = self._loss(full, first)
        uncond = self._loss([self.start, *self._ids(response)], 1)
        return {"perplexity": np.exp(cond), "length": len(full) - first, "ifd": cond / uncond,
                "hidden": self._pooled(full, first)}

    def frame(self, train: list[dict], valid: list[dict]) -> dict[str, np.ndarray]:
        t = [self.row(r["prompt"], r["response"]) for r in train]
        v = np.stack([self.row(r["prompt"], r["response"])["hidden"] for r in valid])
        th = np.stack([r["hidden"] for r in t])
        cos = (th / np.linalg.norm(th, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
        return {"perplexity": np.array([r["perplexity"] for r in t]), "length": np.array([r["length"] for r in t]),
                "ifd": np.array([r["ifd"] for r in t]), "rds_mean": cos.mean(1), "rds_max": cos.max(1)}


def _settings(model_dir, ws_uri: str | None = None, **score):
    # prompt + response as they are: what the plain reference below tokenizes
    over = {"model": {"name": str(model_dir), "device": "cpu"},
            "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8, "batch_size": 3, "template": "none"},
            "score": score}
    if ws_uri:
        over["workspace"] = ws_uri
    return load_settings(overrides=over)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("baselines")
    train, valid = random_rows(10, seed=31), random_rows(5, seed=32)
    return write_jsonl(d / "train.jsonl", train), write_jsonl(d / "valid.jsonl", valid), train, valid


@pytest.mark.parametrize("signals", [True, False])
def test_score_columns_equal_the_plain_reference(files, tiny_model_dir, signals):
    from valuegate.file_scoring import score_files

    model = tiny_model_dir()
    train_path, valid_path, train, valid = files
    df, _ = score_files(str(train_path), str(valid_path), _settings(model, signals=signals), progress=False)
    ref = Reference(model).frame(train, valid)
    for col in BASELINE_COLUMNS:
        assert df[col].null_count() == 0, col
        np.testing.assert_allclose(df[col].to_numpy(), ref[col], rtol=2e-4, atol=1e-6, err_msg=col)
    assert df["length"].to_list() == df["n_tokens"].to_list()
    assert (df["ifd"] > 0).all()


def test_exact_method_gives_the_same_columns(files, tiny_model_dir):
    from valuegate.file_scoring import score_files

    train_path, valid_path, _, _ = files
    model = tiny_model_dir()
    sparse, _ = score_files(str(train_path), str(valid_path), _settings(model), progress=False)
    exact, _ = score_files(str(train_path), str(valid_path), _settings(model, method="exact"), progress=False)
    for col in BASELINE_COLUMNS:
        np.testing.assert_allclose(exact[col].to_numpy(), sparse[col].to_numpy(), rtol=1e-5, err_msg=col)


def test_text_samples_have_no_ifd(tmp_path, tiny_model_dir):
    """A text sample has no prompt: its IFD is undefined (null), the other baselines are there."""
    from valuegate.file_scoring import score_files

    train = write_jsonl(tmp_path / "t.jsonl", random_rows(4, seed=5, kind="text"))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(4, seed=6, kind="text"))
    df, _ = score_files(str(train), str(valid), _settings(tiny_model_dir()), progress=False)
    assert df["ifd"].null_count() == 4
    assert df.select(["perplexity", "length", "rds_mean", "rds_max"]).null_count().sum_horizontal().item() == 0


def test_chat_samples_get_an_ifd(tmp_path, tiny_model_dir):
    from valuegate.file_scoring import score_files

    train = write_jsonl(tmp_path / "t.jsonl", random_rows(4, seed=7, kind="messages"))
    valid = write_jsonl(tmp_path / "v.jsonl", random_rows(4, seed=8, kind="messages"))
    df, _ = score_files(str(train), str(valid), _settings(tiny_model_dir()), progress=False)
    assert df["ifd"].null_count() == 0 and (df["ifd"] > 0).all()


def test_store_path_stores_the_unconditional_loss_and_scores_the_same(files, tmp_path, tiny_model_dir):
    """The unconditional loss is a feature column (same extraction run, keyed by the fingerprint); the scores
    run, read_score_run and `valuegate score` carry the same baseline columns."""
    from valuegate.file_scoring import score_files
    from valuegate.storage import features as fstore
    from valuegate.storage import samples as sstore
    from valuegate.storage.scores import read_score_run
    from valuegate.tasks.ingest import ingest_file
    from valuegate.tasks.score import score_dataset
    from valuegate.tasks.validation_set import register_valset

    train_path, valid_path, _, _ = files
    model = tiny_model_dir()
    ws = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(ws)
    ingest_file(ws, "d", train_path, 10_000)
    register_valset(ws, "val", valid_path, 10_000)
    settings = _settings(model, ws.uri)
    rep = score_dataset(ws, "d", "val", settings, progress=False)
    feats = fstore.read_features(ws, rep.model_fp, columns=["id", "mean_loss", "uncond_loss"]).to_pylist()
    assert len(feats) == 15 and all(r["uncond_loss"] is not None and r["uncond_loss"] > 0 for r in feats)
    assert "uncond_loss" in schemas.features_schema(8, 8).names
    df = read_score_run(ws, rep.run_id, "d")
    files_df, _ = score_files(str(train_path), str(valid_path), settings, progress=False)
    by_row = df.sort("row")
    for col in BASELINE_COLUMNS:  # the store keeps the mean hidden state in float16 (feature format 7)
        tol = {"rtol": 0, "atol": 2**-11} if col.startswith("rds") else {"rtol": 1e-5}
        np.testing.assert_allclose(by_row[col].to_numpy(), files_df[col].to_numpy(), err_msg=col, **tol)
    stored = pl.from_arrow(ws.read(schemas.SCORES))
    assert set(BASELINE_COLUMNS) <= set(stored.columns) and stored["ifd"].null_count() == 0


# --------------------------------------------------------------------------------------------------
# The policies, on a hand-made frame.
# --------------------------------------------------------------------------------------------------

FRAME = pl.DataFrame({
    "id": ["a", "b", "c", "d", "e", "f"],
    "value": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    "ifd": [0.5, 0.9, 1.2, None, 0.7, 0.95],
    "perplexity": [3.0, 50.0, 7.0, 2.0, 9.0, 120.0],
    "rds_mean": [0.1, 0.9, -0.2, 0.5, 0.3, 0.8],
    "length": [12, 40, 40, 3, 7, 100],
})


def _kept(policy: str, frame: pl.DataFrame = FRAME, **cfg) -> list[str]:
    out = select_samples(frame, SelectSettings(policy=policy, **cfg))
    return out.filter(pl.col("keep"))["id"].to_list()


def test_rds_columns_equal_the_float64_cosines_across_chunks():
    """rds_mean through the mean unit vector and rds_max, in float32 chunks, equal the plain float64 cosine
    matrix's mean and max (a zero row has cosine 0 with everything)."""
    from valuegate.engine.cheap_baselines import rds_columns

    rng = np.random.default_rng(5)
    t, v = rng.normal(size=(25, 16)) * 40, rng.normal(size=(7, 16))
    t[3] = 0
    unit = lambda x: np.divide(x, np.linalg.norm(x, axis=1, keepdims=True), out=np.zeros_like(x),  # noqa: E731
                               where=np.linalg.norm(x, axis=1, keepdims=True) > 0)
    cos = unit(t) @ unit(v).T
    mean, mx = rds_columns(t, v, rows=4)
    np.testing.assert_allclose(mean, cos.mean(1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(mx, cos.max(1), rtol=0, atol=1e-6)
    assert mx[3] == 0 and mean[3] == 0


def test_ifd_keeps_the_highest_ifd_below_one():
    # budget ceil(0.5 · 6) = 3 among the IFD < 1 samples: f 0.95, b 0.9, e 0.7
    assert _kept("ifd", fraction=0.5) == ["b", "e", "f"]
    # a budget larger than the eligible samples keeps all of them, never one at IFD >= 1 or without IFD
    assert _kept("ifd", fraction=1.0) == ["a", "b", "e", "f"]
    cfg = SelectSettings(policy="ifd", fraction=0.5)
    out = select_samples(FRAME, cfg)
    why = dict(zip(out["id"], out["reason"], strict=True))
    assert why["c"].startswith("ifd 1.2 >= 1") and why["d"].startswith("no ifd")
    assert why["a"].startswith("not in the top 50% by ifd") and why["f"] == ""
    assert dropped_reason_counts(out, cfg) == {"ifd >= 1 (the prompt does not help)": 1,
                                          "no ifd (no prompt)": 1, "not in the top 50% by ifd": 1}


def test_perplexity_drops_the_highest():
    assert _kept("perplexity", fraction=0.5) == ["a", "c", "d"]
    out = select_samples(FRAME, SelectSettings(policy="perplexity", fraction=0.5))
    assert dict(zip(out["id"], out["reason"], strict=True))["f"].startswith("not in the lowest 50% by perplexity")


def test_rds_keeps_the_most_similar():
    assert _kept("rds", fraction=0.5) == ["b", "d", "f"]


def test_length_keeps_the_longest_ties_by_id():
    assert _kept("length", fraction=0.5) == ["b", "c", "f"]
    assert _kept("length", fraction=0.3) == ["b", "f"]  # 40 and 40: b before c


def test_random_is_seeded_and_independent_of_row_order():
    big = pl.DataFrame({"id": [f"s{i:02d}" for i in range(40)], "value": np.linspace(-1, 1, 40)})
    one = _kept("random", big, fraction=0.25, seed=3)
    assert len(one) == 10
    assert _kept("random", big.reverse(), fraction=0.25, seed=3) == sorted(one, reverse=True)
    assert set(_kept("random", big, fraction=0.25, seed=4)) != set(one)
    # not the value order: a random fraction is not a top fraction
    assert set(one) != set(_kept("top_fraction", big, fraction=0.25))
    out = select_samples(big, SelectSettings(policy="random", fraction=0.25, seed=3))
    assert set(out.filter(~pl.col("keep"))["reason"]) == {"not in the random 25% (seed 3)"}


@pytest.mark.parametrize("policy,column", [("ifd", "ifd"), ("perplexity", "perplexity"), ("rds", "rds_mean"),
                                           ("length", "length")])
def test_a_policy_without_its_column_is_one_line(policy, column):
    with pytest.raises(ValuegateError, match=f"select.policy = {policy} needs the {column!r} column"):
        select_samples(FRAME.drop(column), SelectSettings(policy=policy))


def test_a_non_finite_baseline_is_refused():
    bad = FRAME.with_columns(pl.Series("perplexity", [3.0, float("nan"), 7.0, 2.0, 9.0, 1.0]))
    with pytest.raises(ValuegateError, match=r"perplexity.*not finite"):
        select_samples(bad, SelectSettings(policy="perplexity"))


def test_a_release_puts_the_baselines_in_scores_not_in_data():
    from valuegate.dataset_card import release_frames

    selected = select_samples(FRAME.with_columns(pl.lit("p").alias("prompt"), pl.Series("rds_max", [0.0] * 6)),
                              SelectSettings(policy="length", fraction=0.5))
    data, scores = release_frames(selected)
    assert data.columns == ["id", "value", "prompt"]
    assert set(BASELINE_COLUMNS) <= set(scores.columns) and data.height == 3
