"""The suspect signals: sparse equals exact at full support, centring equals a materialised Φ, and the
robust combination on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_forvalue import _setup, phi_from_block

from valuegate.engine.aggregate import compute_values
from valuegate.engine.extraction import extract_token_blocks
from valuegate.engine.model import encode_samples
from valuegate.engine.signals import (
    SuspectReference,
    calibrated_suspect,
    combine_suspect,
    hidden_neighbours,
    parse_suspect,
    robust_z,
)
from valuegate.errors import ValuegateError
from valuegate.storage.schemas import SIGNAL_COLUMNS


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_sparse_signals_equal_exact_at_full_support(tiny_model_dir, family, loss_on):
    """With the whole vocabulary as support and exact hidden states, the sparse path (centring through the
    stored error sums) computes every signal, reference and suspect score of the exact path (centring the
    hidden states of the token blocks)."""
    settings, lm, train, valid = _setup(tiny_model_dir(family), n_train=7, n_valid=4, loss_on=loss_on,
                                        support_k=10_000, hidden_dim=0, hard_fraction=0.4)
    settings.score.suspect = ["centred_cosine_nearest:low", "hard_log_self_influence:two", "mean_loss:high"]
    out = {}
    for method in ("exact", "sparse"):
        settings.score.method = method
        out[method] = compute_values(lm, train, valid, settings, progress=False)
    ex, sp = out["exact"], out["sparse"]
    assert set(ex.signals) == set(SIGNAL_COLUMNS) == set(sp.reference)
    for name in SIGNAL_COLUMNS:
        for a, b in ((ex.signals[name], sp.signals[name]), (ex.reference[name], sp.reference[name])):
            scale = max(np.abs(a).max(), 1e-12)
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-4 * scale, err_msg=name)
    np.testing.assert_allclose(sp.suspect, ex.suspect, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(sp.values, ex.values, rtol=0, atol=1e-4 * np.abs(ex.values).max())


def test_centred_value_is_the_inner_product_of_centred_gradients(tiny_model_dir):
    """``centred_value_mean`` against Φ materialised with ``h_t − μ`` (μ: mean validation hidden state)."""
    settings, lm, train, valid = _setup(tiny_model_dir("gpt2"), n_train=5, n_valid=3, loss_on="all")
    settings.score.method = "exact"
    vm = compute_values(lm, train, valid, settings, progress=False)
    ex = settings.extract
    tb = extract_token_blocks(lm, encode_samples(lm.tokenizer, train, "all", 64), ex, progress=False)
    vb = extract_token_blocks(lm, encode_samples(lm.tokenizer, valid, "all", 64), ex, progress=False)
    mu = vb.hidden.double().mean(0).float()
    pt = phi_from_block(tb.centred(mu))
    pv = phi_from_block(vb.centred(mu))
    want = np.array([np.mean([float((a * b).sum()) for b in pv]) for a in pt])
    np.testing.assert_allclose(vm.signals["centred_value_mean"], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # the hard signals value the hardest positions: with hard_fraction 1 they would equal the others
    raw = [float((a * b).sum()) for a in phi_from_block(tb) for b in phi_from_block(vb)]
    np.testing.assert_allclose(vm.signals["value_mean"], np.array(raw).reshape(5, 3).mean(1), rtol=1e-4)
    assert not np.allclose(vm.signals["hard_value_mean"], vm.signals["value_mean"])


def test_reference_is_leave_one_out(tiny_model_dir):
    settings, lm, train, valid = _setup(tiny_model_dir("llama"), n_train=3, n_valid=4)
    settings.score.method = "exact"
    settings.score.nearest_k = 10
    vm = compute_values(lm, train, valid, settings, progress=False)
    # scoring the validation set as training data (no self-exclusion) vs the reference (self excluded)
    vv = compute_values(lm, valid, valid, settings, progress=False)
    full = vv.values
    loo = (full.sum(1) - np.diag(full)) / 3
    np.testing.assert_allclose(vm.reference["value_mean"], loo, rtol=1e-6)
    np.testing.assert_allclose(vm.reference["value_nearest"], loo, rtol=1e-6)  # k ≥ n_v − 1: every other
    np.testing.assert_allclose(vv.signals["log_self_influence"], vm.reference["log_self_influence"], rtol=1e-9)
    # the local reference's neighbourhoods: a validation sample scored as training data is its own nearest
    # validation sample; in the reference (leave one out) it never is
    np.testing.assert_array_equal(vv.train_neighbours[:, 0], np.arange(4))
    assert vm.valid_neighbours.shape == (4, 3)
    assert not (vm.valid_neighbours == np.arange(4)[:, None]).any()


def test_robust_z_and_the_combination_on_hand_made_numbers():
    ref = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, MAD 1 → scale 1.4826
    np.testing.assert_allclose(robust_z(np.array([3.0, 4.4826]), ref), [0.0, 1.0])
    np.testing.assert_allclose(robust_z(np.array([5.0]), np.array([2.0, 2.0, 2.0, 4.0])), [(5 - 2) / np.std([2, 2, 2, 4])])
    sig = {"a": np.array([3.0, 3.0 - 2 * 1.4826, 3.0 + 1.4826]), "b": np.array([3.0, 3.0, 3.0 + 2 * 1.4826])}
    refs = {"a": ref, "b": ref}
    low = combine_suspect(sig, refs, [("a", "low")], "rms")
    np.testing.assert_allclose(low, [0.0, 2.0, 0.0])
    two = combine_suspect(sig, refs, [("a", "two"), ("b", "high")], "rms")
    np.testing.assert_allclose(two, [0.0, np.sqrt(4 / 2), np.sqrt((1 + 4) / 2)])
    np.testing.assert_allclose(combine_suspect(sig, refs, [("a", "two"), ("b", "high")], "max"), [0, 2, 2])
    # calibrated: the same combination over the reference itself is the yardstick
    spec = [("a", "two"), ("b", "high")]
    want = robust_z(two, combine_suspect(refs, refs, spec, "rms"))
    np.testing.assert_allclose(calibrated_suspect(sig, refs, spec, "rms"), want)
    assert parse_suspect(["a:low", "b"], ["a", "b"]) == [("a", "low"), ("b", "two")]
    for bad in (["c:low"], ["a:up"], []):
        with pytest.raises(ValuegateError):
            parse_suspect(bad, ["a", "b"])


def test_hidden_neighbours_rank_by_cosine_of_centred_means():
    mu = np.array([1.0, 1.0])
    valid = np.array([[2.0, 1.0], [1.0, 3.0], [3.0, 1.1], [0.0, 1.0]])  # centred: +x, +y, ~+x, -x
    got = hidden_neighbours(np.array([[5.0, 1.0], [1.0, 0.0]]), valid, mu, 2)
    # (1, 0) centred is -y: +x and -x tie at cosine 0 (lower index first), ~+x is slightly negative, +y is -1
    np.testing.assert_array_equal(got, [[0, 2], [0, 3]])
    loo = hidden_neighbours(valid, valid, mu, 5, loo=True)
    assert loo.shape == (4, 3) and not (loo == np.arange(4)[:, None]).any()
    assert loo[0, 0] == 2 and loo[2, 0] == 0
    with pytest.raises(ValuegateError, match="at least 2"):
        hidden_neighbours(valid[:1], valid[:1], mu, 1, loo=True)


def test_local_reference_judges_each_task_by_its_own_standard():
    """A validation set of two tasks, one with a low loss (6 samples) and one with a high loss (3): against
    the pooled set every clean sample of the high-loss task looks suspect; against its nearest validation
    samples it does not, while a corrupted low-loss sample (loss 3) still does."""
    loss_v = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 9.0, 9.5, 8.5])
    hid_v = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 3) + np.linspace(0, 0.01, 9)[:, None]
    loss_t = np.array([9.2, 1.0, 3.0])  # clean high-loss task, clean low-loss task, corrupted low-loss task
    hid_t = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    spec = [("mean_loss", "two")]
    glob = calibrated_suspect({"mean_loss": loss_t}, {"mean_loss": loss_v}, spec)
    assert glob[0] > glob[2]  # the pooled reference flags the clean high-loss sample above the corrupted one
    mu = hid_v.mean(0)
    ref = SuspectReference({"mean_loss": loss_v}, hidden_neighbours(hid_v, hid_v, mu, 2, loo=True))
    nb = hidden_neighbours(hid_t, hid_v, mu, 2)
    assert set(nb[0]) <= {6, 7, 8} and set(nb[1]) <= set(range(6))
    # by hand: the location is the neighbours' median, the scale the validation samples' own spread
    # around their neighbours' medians
    own = loss_v - np.median(loss_v[ref.neighbours], axis=1)
    scale = 1.4826 * np.median(np.abs(own - np.median(own)))
    want = (loss_t - np.median(loss_v[nb], axis=1)) / scale
    np.testing.assert_allclose(ref.z("mean_loss", loss_t, nb), want)
    local = calibrated_suspect({"mean_loss": loss_t}, ref, spec, neighbours=nb)
    assert local[2] > local[0] and local[2] > local[1]
    # a plain mapping is the global reference; a local one refuses samples without neighbourhoods
    np.testing.assert_allclose(combine_suspect({"mean_loss": loss_t}, SuspectReference({"mean_loss": loss_v}), spec),
                               combine_suspect({"mean_loss": loss_t}, {"mean_loss": loss_v}, spec))
    with pytest.raises(ValuegateError, match="neighbours"):
        combine_suspect({"mean_loss": loss_t}, ref, spec)


def test_signals_off_keeps_the_values(tiny_model_dir):
    settings, lm, train, valid = _setup(tiny_model_dir("llama"), n_train=4, n_valid=2)
    on = compute_values(lm, train, valid, settings, progress=False)
    settings.score.signals = False
    off = compute_values(lm, train, valid, settings, progress=False)
    assert off.signals is None and off.suspect is None
    np.testing.assert_allclose(off.values, on.values, rtol=1e-6)
    assert torch.is_tensor(torch.as_tensor(on.suspect)) and np.isfinite(on.suspect).all()


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_token_contributions_sum_to_the_mean_value(tiny_model_dir, ratio):
    """The per-token parts the report highlights add up to the sample's sparse mean value."""
    from valuegate.engine.explain import mean_rows, token_contributions
    from valuegate.engine.extraction import extract_sparse
    from valuegate.engine.signals import SparseSet

    settings, lm, train, valid = _setup(tiny_model_dir("llama"), n_train=4, n_valid=3, support_k=3, hidden_dim=6,
                                        lowest_likelihood_ratio=ratio)
    vm = compute_values(lm, train, valid, settings, progress=False)
    ex = settings.extract
    fv = extract_sparse(lm, encode_samples(lm.tokenizer, valid, ex.loss_on, 64), ex, progress=False)
    rows = SparseSet.from_features(fv, lm.vocab_size).matrix()
    got = token_contributions(lm, train, mean_rows(rows, lm.vocab_size, 6), ex)
    np.testing.assert_allclose([g.total for g in got], vm.signals["value_mean"], rtol=1e-4,
                               atol=1e-6 * np.abs(vm.signals["value_mean"]).max())
    for g, s in zip(got, train, strict=True):
        enc = encode_samples(lm.tokenizer, [s], ex.loss_on, 64)[0]
        carried = sum(c is not None for c in g.contributions)
        assert len(g.tokens) == len(enc.input_ids)
        assert carried == int(np.ceil(ratio * enc.n_counted - 1e-9))
        assert g.contributions[0] is None  # the first token is never predicted


def test_fit_suspect_learns_the_side_and_signal_that_flag_corruptions():
    """A logistic combination fitted on clean vs corrupted rows: it weights the signal that moves (either
    side, via |z|) over the one that does not, separates fresh rows, and refuses too few rows."""
    from valuegate.engine.detection import detection_auc
    from valuegate.engine.signals import fit_suspect

    rng = np.random.default_rng(0)
    clean = rng.normal(size=(60, 2)) * [1.0, 5.0] + [10.0, 0.0]   # feature 0 around 10, feature 1 noise
    high = clean[:20] + np.array([6.0, 0.0])                                  # one corruption: feature 0 high
    low = clean[20:40] - np.array([6.0, 0.0])                                 # another: feature 0 low
    fit = fit_suspect(clean, np.concatenate([high, low]), ["a", "b"])
    np.testing.assert_allclose(fit.centre, np.median(clean, axis=0))
    w = dict(zip(fit.terms, fit.weights, strict=True))
    assert w["|a|"] > 1.0 and w["|a|"] > 5 * abs(w["|b|"]) and w["|a|"] > 5 * abs(w["b"])
    fresh_clean = rng.normal(size=(50, 2)) * [1.0, 5.0] + [10.0, 0.0]
    fresh_bad = fresh_clean + np.array([[6.0, 0.0]] * 25 + [[-6.0, 0.0]] * 25)
    assert fit.score(fresh_bad).min() > np.median(fit.score(fresh_clean))
    scores = np.concatenate([fit.score(fresh_clean), fit.score(fresh_bad)])
    assert detection_auc(scores, np.r_[np.zeros(50, bool), np.ones(50, bool)]) > 0.97
    with pytest.raises(ValuegateError, match="at least"):
        fit_suspect(clean[:2], high, ["a", "b"])
    with pytest.raises(ValuegateError, match="names"):
        fit_suspect(clean, high, ["a"])
