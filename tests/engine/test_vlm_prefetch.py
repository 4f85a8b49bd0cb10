"""VLM encoding overlapped with the forward (tasks/extract.py ``iter_sample_blocks``): the same features with
any number of encoding threads, in the input order; a refusal or a failure in a worker names the sample and
leaves no thread behind (tiny models built in-process, generated images)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from test_vlm import _lm, _samples, pictures, vlm_dir  # noqa: F401 - fixtures
from tiny_vlm import VLM_FAMILIES

from valuegate.engine.extraction import (
    ENCODE_WINDOW_BATCHES,
    encode_workers,
    extract_sparse,
    extract_sparse_samples,
    iter_sample_blocks,
)
from valuegate.engine.model import encode_samples
from valuegate.errors import ValuegateError


def _settings(settings):
    # batch 2 → windows of 8 samples: 14 samples make two windows, the second one partial
    return settings.extract.model_copy(update={"batch_size": 2, "max_length": 512})


def _fields(f):
    hard = f.hard
    return [f.token_ids, f.rows, f.mean_hidden, f.pooled_error, f.error_sum, np.float64(f.mean_loss),
            np.float64(f.self_influence), np.int64(f.n_tokens),
            *([] if hard is None else [hard.token_ids, hard.rows, hard.error_sum])]


def _no_encoder_threads() -> bool:
    return not any(t.name.startswith("valuegate-encode") for t in threading.enumerate())


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_prefetch_gives_the_features_of_inline_encoding(vlm_dir, pictures, family):  # noqa: F811
    settings, lm = _lm(vlm_dir, family)
    ex = _settings(settings)
    samples = _samples(pictures, 14, 7)
    assert len(samples) > ex.batch_size * ENCODE_WINDOW_BATCHES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the forward's thread count alone may move the last bits: hold it
    try:
        inline = extract_sparse_samples(lm, samples, ex, progress=False, workers=0)
        for workers in (1, 3):
            pre = extract_sparse_samples(lm, samples, ex, progress=False, workers=workers)
            for a, b in zip(inline, pre, strict=True):  # bit for bit, sample by sample
                for x, y in zip(_fields(a), _fields(b), strict=True):
                    assert np.array_equal(x, y)
    finally:
        torch.set_num_threads(threads)
    # at the default thread counts (the forward gets the cores the encoders leave): float tolerance
    default = extract_sparse_samples(lm, samples, ex, progress=False)
    assert torch.get_num_threads() == threads  # restored
    # and against the pre-encoded path (one length sort over all samples, other batches)
    whole = extract_sparse(lm, encode_samples(lm.tokenizer, samples, "response", 512), ex, progress=False)
    for a, b, c in zip(inline, default, whole, strict=True):
        np.testing.assert_array_equal(a.token_ids, c.token_ids)
        for x, y, z in zip(_fields(a)[1:5], _fields(b)[1:5], _fields(c)[1:5], strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(z, x, rtol=1e-4, atol=1e-5)
    assert _no_encoder_threads()


def test_order_and_blocks_cover_every_sample_once(vlm_dir, pictures):  # noqa: F811
    settings, lm = _lm(vlm_dir, "qwen2-vl")
    ex = _settings(settings)
    samples = _samples(pictures, 11, 3)
    seen = [i for idx, _ in iter_sample_blocks(lm, samples, ex, progress=False, workers=2) for i in idx]
    assert sorted(seen) == list(range(len(samples)))
    # windows in input order: every index of window k comes before any index of window k + 1
    w = ex.batch_size * ENCODE_WINDOW_BATCHES
    assert [i // w for i in seen] == sorted(i // w for i in seen)


def test_corrupt_image_is_refused_naming_the_sample(vlm_dir, pictures):  # noqa: F811
    settings, lm = _lm(vlm_dir, "llava")
    ex = _settings(settings)
    samples = _samples(pictures, 12, 2)
    bad = 9  # in the second window: found by a worker while the model runs the first
    data = samples[bad].image_data
    samples[bad] = dataclasses.replace(samples[bad], image_data=(data[0][: len(data[0]) // 3], *data[1:]))
    with pytest.raises(ValuegateError, match=rf"row {samples[bad].row}: images\[0\]: the image cannot be decoded"):
        extract_sparse_samples(lm, samples, ex, progress=False, workers=2)
    assert _no_encoder_threads()
    refused: list = []
    done = [i for idx, _ in iter_sample_blocks(lm, samples, ex, progress=False, refused=refused, workers=2)
            for i in idx]
    assert [i for i, _ in refused] == [bad] and "cannot be decoded" in str(refused[0][1])
    assert refused[0][1].reason == "cannot be encoded"
    assert sorted(done) == [i for i in range(len(samples)) if i != bad]


def test_failure_in_a_worker_names_the_sample_and_does_not_hang(vlm_dir, pictures, monkeypatch):  # noqa: F811
    settings, lm = _lm(vlm_dir, "idefics3")
    ex = _settings(settings)
    samples = _samples(pictures, 20, 4)
    target = samples[13].row
    real = type(lm.tokenizer).encode

    def encode(self, sample, *args, **kwargs):
        if sample.row == target:
            raise RuntimeError("processor exploded")
        return real(self, sample, *args, **kwargs)

    monkeypatch.setattr(type(lm.tokenizer), "encode", encode)
    for workers in (0, 2):
        with pytest.raises(ValuegateError, match=rf"row {target}: encoding the sample failed: RuntimeError: "
                                                 "processor exploded"):
            extract_sparse_samples(lm, samples, ex, progress=False, workers=workers)
        assert _no_encoder_threads()


def test_encode_workers_default_and_fingerprint(vlm_dir):  # noqa: F811
    from valuegate.engine.model import fingerprint_settings

    settings, lm = _lm(vlm_dir, "llava")
    ex = settings.extract
    assert ex.encode_workers is None and 1 <= encode_workers(ex) <= 4
    assert encode_workers(ex.model_copy(update={"encode_workers": 0})) == 0
    # the worker count never changes a feature, so it is not in the fingerprint
    a = fingerprint_settings(settings.model, ex, lm.tokenizer, 1.0)
    b = fingerprint_settings(settings.model, ex.model_copy(update={"encode_workers": 3}), lm.tokenizer, 1.0)
    assert a == b
