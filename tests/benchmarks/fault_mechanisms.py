"""Per-row inputs of candidate fault-detector mechanisms that valuegate does not extract, for
``bench_faults_variants`` (issue 27): one extra forward pass per row of a ``bench_faults`` set, cached.

For each training and validation row of a set, as ``bench_faults`` built and scored it (the same rows, in the
same order, encoded as valuegate encodes them at the default settings):

- ``prompt_mean`` ``(n, d)``: the mean final hidden state over the positions the model read before answering (up
  to and including the one that predicts the first counted target): what was *asked*, untouched by a fault of
  the answer;
- ``prompt_last`` ``(n, d)``: the final hidden state at that last position (the model about to answer);
- ``end`` ``(n, 3)``: at the position where the answer ends (the one predicting the chat template's end-of-turn
  token), ``log p`` of the end tokens, of the tokens that are whitespace with a line break in it, and of the
  tokens that are sentence-final punctuation alone (``.``, ``!``, ``?``, ``...``); NaN where the row has no end.

Cached in ``<out>/faults-mechanisms-<key>.npz`` (``key`` as ``bench_faults.set_key``); delete it after a change
to the model or the encoding.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.bench_engine import DEFAULT_DATA

STOPS = set(".!?\u2026\u3002\uff01\uff1f")


def set_args(key: str, data: Path = DEFAULT_DATA) -> tuple[str, argparse.Namespace]:
    """``(set name, bench_faults' arguments)`` of a cached set's key (``gsm8k-v30-c250-p12-s0``, ``demo``)."""
    m = re.fullmatch(r"(.+)-v(\d+)-c(\d+)-p(\d+)-s(\d+)", key)
    if m is None:
        return key, argparse.Namespace(valid=0, clean=0, per_type=0, seed=0, data=data)
    name, v, c, p, s = m.groups()
    return name, argparse.Namespace(valid=int(v), clean=int(c), per_type=int(p), seed=int(s), data=data)


def token_classes(tok, end_ids: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """``(line-break token ids, sentence-stop token ids)`` of a tokenizer's vocabulary (never an end token)."""
    ids = sorted(set(tok.get_vocab().values()) - set(end_ids) - set(tok.all_special_ids))
    texts = tok.batch_decode([[i] for i in ids])
    breaks = [i for i, t in zip(ids, texts, strict=True) if t and not t.strip() and ("\n" in t or "\r" in t)]
    stops = [i for i, t in zip(ids, texts, strict=True) if t.strip() and set(t.strip()) <= STOPS]
    return breaks, stops


def mechanism_inputs(key: str, out: Path, data: Path = DEFAULT_DATA) -> dict[str, np.ndarray]:
    """The cached inputs of one set (computing them on a miss): ``{train,valid}_{prompt_mean,prompt_last,end}``."""
    path = out / f"faults-mechanisms-{key}.npz"
    if path.exists():
        return dict(np.load(path))
    import torch

    from tests.benchmarks.bench_faults import build_set
    from valuegate.api import resolve_settings
    from valuegate.engine.ending import end_token_ids
    from valuegate.engine.model import encode_sample, load_model
    from valuegate.engine.sample import Sample

    settings = resolve_settings(None, None, {})
    lm = load_model(settings.model, progress=False)
    ex, tok = settings.extract, lm.tokenizer
    ends = list(end_token_ids(tok))
    breaks, stops = token_classes(tok, tuple(ends))
    name, a = set_args(key, data)
    train, valid = build_set(name, a)
    t0 = time.perf_counter()
    res: dict[str, np.ndarray] = {}
    for role, df in (("train", train), ("valid", valid)):
        mean, last, end = [], [], []
        for i, r in enumerate(df.iter_rows(named=True)):
            sample = Sample(kind="prompt_response", row=i, source="bench", prompt=r["prompt"], response=r["response"])
            e = encode_sample(tok, sample, ex.loss_on, ex.max_length, ex.truncation, ex.template)
            with torch.inference_mode():
                h = lm.final_hidden(torch.tensor(e.input_ids)[None], torch.ones(1, len(e.input_ids),
                                                                                 dtype=torch.long))[0].float()
            first = int(np.flatnonzero(e.counted)[0])
            mean.append(h[:first + 1].mean(0).numpy())
            last.append(h[first].numpy())
            hit = [t for t in np.flatnonzero(np.isin(e.input_ids, ends)) if t >= 1 and e.counted[t - 1]]
            if not hit:
                end.append([np.nan] * 3)
                continue
            lp = torch.log_softmax(lm.scaled_logits(lm.raw_logits(h[hit[0] - 1][None])), -1)[0]
            end.append([float(torch.logsumexp(lp[ids], 0)) for ids in (ends, breaks, stops)])
        res[f"{role}_prompt_mean"], res[f"{role}_prompt_last"] = np.array(mean), np.array(last)
        res[f"{role}_end"] = np.array(end, dtype=np.float64)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, **res)
    print(f"mechanism inputs of {key}: {train.height + valid.height} rows in {time.perf_counter() - t0:.0f}s",
          flush=True)
    return res
