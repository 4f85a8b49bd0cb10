"""The value signals: sparse equals exact at full support, centring equals a materialised Φ; the fault
detectors' inputs agree across the exact and sparse paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_forvalue import _setup, phi_from_block

from valuegate.engine.extraction import extract_token_blocks
from valuegate.engine.model import encode_samples
from valuegate.engine.oracle import compute_values
from valuegate.storage.schemas import SIGNAL_COLUMNS


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_sparse_signals_equal_exact_at_full_support(tiny_model_dir, family, loss_on):
    """With the whole vocabulary as support and exact hidden states, the sparse path (centring through the
    stored error sums) computes every signal and every fault detector input of the exact path (centring the
    hidden states of the token blocks)."""
    settings, lm, train, valid = _setup(tiny_model_dir(family), n_train=7, n_valid=4, loss_on=loss_on,
                                        support_k=10_000, hidden_dim=0, hard_fraction=0.4)
    out = {}
    for method in ("exact", "sparse"):
        settings.score.method = method
        out[method] = compute_values(lm, train, valid, settings, progress=False)
    ex, sp = out["exact"], out["sparse"]
    assert set(ex.signals) == set(SIGNAL_COLUMNS) == set(sp.signals)
    for name in SIGNAL_COLUMNS:
        a, b = ex.signals[name], sp.signals[name]
        scale = max(np.abs(a).max(), 1e-12)
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-4 * scale, err_msg=name)
    for side in ("train_inputs", "valid_inputs"):
        a, b = getattr(ex, side), getattr(sp, side)
        for name in ("mean_loss", "hard_mean_loss", "max_loss", "end_loss", "prompt_overlap", "n_tokens"):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=f"{side} {name}")
        np.testing.assert_allclose(b["self_influence"], a["self_influence"], rtol=1e-3, err_msg=side)
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


def test_signals_off_keeps_the_values(tiny_model_dir):
    settings, lm, train, valid = _setup(tiny_model_dir("llama"), n_train=4, n_valid=2)
    on = compute_values(lm, train, valid, settings, progress=False)
    settings.score.signals = False
    off = compute_values(lm, train, valid, settings, progress=False)
    assert off.signals is None and on.signals is not None
    np.testing.assert_allclose(off.values, on.values, rtol=1e-6)
    assert torch.is_tensor(torch.as_tensor(on.values)) and np.isfinite(on.values).all()


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
