"""Which tokens carry a sample's value: per-token contributions to the mean For-Value.

The stored sparse rows of a sample are a sum over its counted positions, ``R = Σ_t r_t`` with
``r_t[u] = a_t[u] · P_h h_t`` on the sample's support ``U``, so its ``mean`` value against a validation set
splits exactly into per-token parts::

    value_mean(z) = ⟨R, R̄'⟩ = Σ_t c_t,   c_t = Σ_{u ∈ U} a_t[u] (P_h h_t · R̄'[u])

where ``R̄'`` is the mean of the validation samples' rows. ``c_t`` is attributed to the token the position
predicts (the target ``y_t``). One forward pass of the few samples shown; the validation side comes from
the feature store, never from a second forward pass (the report step reads it: ``tasks/report.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from valuegate.engine.extraction import iter_token_blocks, projections
from valuegate.engine.forvalue import error_rows_on_support, hardest_positions
from valuegate.engine.model import LoadedModel, encode_sample
from valuegate.engine.sample import Sample
from valuegate.settings import ExtractSettings

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

__all__ = ["TokenContributions", "mean_rows", "token_contributions"]


@dataclass
class TokenContributions:
    """One sample's tokens and the part of its mean value each counted token carries.

    Attributes:
        tokens: the decoded text of every token of the sample, in order.
        contributions: per token, ``c_t`` of the position that predicts it, or None for tokens that are
            not counted (the prompt, the first token).
        total: ``Σ_t c_t`` (equals the sample's sparse ``value_mean``).
    """

    tokens: list[str]
    contributions: list[float | None]
    total: float


def mean_rows(valid: sp.csr_matrix, vocab: int, width: int) -> np.ndarray:
    """``R̄'`` as a dense ``(V, width)`` float32 array from the validation rows' ``(n, V·width)`` CSR."""
    mean = np.asarray(valid.mean(axis=0), dtype=np.float32).reshape(vocab, width)
    return mean


def token_contributions(lm: LoadedModel, samples: list[Sample], valid_mean: np.ndarray,
                        cfg: ExtractSettings) -> list[TokenContributions]:
    """Per-token contributions of each sample to its mean value (see the module docstring).

    Args:
        lm: the model the features were extracted with. samples: the samples to explain.
        valid_mean: ``(V, width)`` mean validation rows (:func:`mean_rows`).
        cfg: the extraction settings of the features (support, projection, loss mode).

    Returns:
        one :class:`TokenContributions` per sample, in order.
    """
    ph, _ = projections(cfg, lm.hidden_size, lm.vocab_size)
    encoded = [encode_sample(lm.tokenizer, s, cfg.loss_on, cfg.max_length, template=cfg.template) for s in samples]
    rv = torch.from_numpy(valid_mean)
    out: list[TokenContributions | None] = [None] * len(samples)
    for idx, block in iter_token_blocks(lm, encoded, cfg, samples, 1.0, False):
        # with lowest_likelihood_ratio < 1 only the hardest positions carry value (as in the features)
        kept = hardest_positions(block.log_likelihood, block.sample, block.n_samples, cfg.lowest_likelihood_ratio)
        hp = block.hidden.cpu() if ph is None else block.hidden.cpu() @ ph.T
        k = min(cfg.support_k, lm.vocab_size)
        top = torch.topk(block.probs, k, dim=1).indices.cpu()
        for j, (lo, hi) in enumerate(block.bounds()):
            rows = torch.arange(lo, hi)[kept[lo:hi].cpu()]
            y = block.targets[rows].cpu()
            support = torch.unique(torch.cat([y, top[rows].reshape(-1)]))
            jac = None if block.logit_jac is None else block.logit_jac[rows].cpu()
            err = error_rows_on_support(block.probs[rows].cpu(), y, support, jac)
            c = (err * (hp[rows] @ rv[support].T)).sum(1).double().numpy()
            enc = encoded[idx[j]]
            positions = np.flatnonzero(enc.counted)[kept[lo:hi].cpu().numpy()]
            contrib: list[float | None] = [None] * len(enc.input_ids)
            for p, v in zip(positions, c, strict=True):
                contrib[p + 1] = float(v)
            tokens = [lm.tokenizer.decode([int(t)]) for t in enc.input_ids]
            out[idx[j]] = TokenContributions(tokens, contrib, float(c.sum()))
    return out  # type: ignore[return-value]
