"""Batched forward-only extraction: samples → token blocks → sparse features (the engine side).

One forward pass of the base model per length-sorted batch; the LM head is applied in float32 to the
counted positions only, in chunks of whole samples whose ``(positions, V)`` probability block fits
``prob_budget_mb``, so peak memory never holds float32 logits for a whole batch when V is large.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from valuegate.engine.encoding import EncodedSample, Refusal, length_batches, refusal_of
from valuegate.engine.ending import end_log_probs, end_positions, end_token_ids, prompt_overlap
from valuegate.engine.forvalue import (
    SparseFeatures,
    TokenBlock,
    gaussian_projection,
    logit_jacobian,
    sparse_features,
)
from valuegate.engine.model import LoadedModel, encode_sample
from valuegate.engine.progress import Progress
from valuegate.engine.quantize import quantize_rows
from valuegate.engine.sample import Sample
from valuegate.engine.sketch import count_sketch
from valuegate.engine.vlm import batch_model_inputs
from valuegate.errors import ValuegateError
from valuegate.settings import ExtractSettings

log = logging.getLogger(__name__)

__all__ = ["ExtractionStats", "block_features", "encode_workers", "extract_sparse", "extract_sparse_samples",
           "extract_token_blocks", "iter_sample_blocks", "iter_token_blocks", "pad_batch", "stored_features"]


@dataclass
class ExtractionStats:
    """What an extraction did: samples, counted tokens, padded tokens run through the model, seconds."""

    samples: int = 0
    counted_tokens: int = 0
    model_tokens: int = 0
    seconds: float = 0.0


def pad_batch(encoded: list[EncodedSample], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch. Returns ``input_ids`` and ``attention_mask``, both ``(B, T)`` int64.

    Right padding keeps every real token's position and causal context identical to the unpadded
    sample, whatever the tokenizer's own ``padding_side``.
    """
    t = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), t), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, :len(e.input_ids)] = torch.from_numpy(e.input_ids)
        mask[b, :len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


def counted_mask(encoded: list[EncodedSample], mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool, the shape of ``mask``: ``[b, t]`` says whether the prediction at position t of sample
    b counts (its ``EncodedSample.counted``; padding never does)."""
    counted = torch.zeros_like(mask, dtype=torch.bool)
    for b, e in enumerate(encoded):
        counted[b, :len(e.counted)] = torch.from_numpy(e.counted)
    return counted


def _chunks_by_budget(counts: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Cut consecutive samples into ``[lo, hi)`` runs whose counted rows sum to at most ``max_rows``."""
    out, lo, acc = [], 0, 0
    for i, c in enumerate(counts):
        if i > lo and acc + c > max_rows:
            out.append((lo, i))
            lo, acc = i, 0
        acc += c
    if lo < len(counts):
        out.append((lo, len(counts)))
    return out


def iter_token_blocks(lm: LoadedModel, encoded: list[EncodedSample], cfg: ExtractSettings,
                      samples: list[Sample] | None = None, lowest_likelihood_ratio: float = 1.0,
                      progress: bool = True, desc: str = "extract",
                      stats: ExtractionStats | None = None,
                      before: Callable[[list[list[int]], int], None] | None = None
                      ) -> Iterator[tuple[list[int], TokenBlock]]:
    """Run the model over the samples and yield token blocks of counted positions.

    Args:
        lm: the loaded model.
        encoded: token ids and masks, one per sample.
        cfg: batch size, token and memory budgets.
        samples: the samples (only to name file and row in errors).
        lowest_likelihood_ratio: keep only this fraction of each sample's counted positions, the hardest.
        progress: a progress bar when stderr is a terminal (else, and without it, a log line every ~10 s:
            :class:`~valuegate.engine.progress.Progress`).
        desc: label of the progress.
        stats: filled in as the work goes.
        before: called as ``before(batches, k)`` before the forward pass of batch ``k`` of ``batches`` (the
            whole plan: lists of indices into ``encoded``, length-sorted), e.g. to run another pass over
            the samples of the batches ahead (IFD's unconditional pass, ``tasks/extract.py``).

    Yields:
        ``(indices, block)``: ``indices[i]`` is the position in ``encoded`` of the block's sample i.

    Raises:
        ValuegateError: a sample's hidden states or probabilities are not finite (names file and row).
    """
    lengths = [len(e.input_ids) for e in encoded]
    batches = length_batches(lengths, cfg.batch_size, cfg.max_batch_tokens)
    bar = Progress(len(encoded), desc, bar=progress)
    try:
        yield from _forward_batches(lm, encoded, batches, cfg, samples, lowest_likelihood_ratio, stats, bar,
                                    before)
    finally:
        bar.close()


def _forward_batches(lm: LoadedModel, encoded: list[EncodedSample], batches: list[list[int]], cfg: ExtractSettings,
                     samples: list[Sample] | None, lowest_likelihood_ratio: float, stats: ExtractionStats | None,
                     bar: Progress, before: Callable[[list[list[int]], int], None] | None = None
                     ) -> Iterator[tuple[list[int], TokenBlock]]:
    """The forward passes of :func:`iter_token_blocks` over given batches (indices into ``encoded``)."""
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    factor = 3 if lm.softcap is None and lm.logit_scale == 1.0 else 4  # logits, log-probs, probs (+ jac)
    max_rows = max(1, (cfg.prob_budget_mb << 20) // (lm.vocab_size * 4 * factor))
    end_ids = () if lm.is_vision else end_token_ids(lm.tokenizer)
    for k, batch in enumerate(batches):
        if before is not None:
            before(batches, k)
        t0 = time.perf_counter()
        items = [encoded[i] for i in batch]
        ids, mask = pad_batch(items, pad_id, lm.device)
        extras = batch_model_inputs(items, ids.shape[1], lm.device, lm.model.dtype) if lm.is_vision else {}
        with torch.inference_mode():
            hidden = lm.final_hidden(ids, mask, **extras)
            counted = counted_mask(items, mask)
            counts = [e.n_counted for e in items]
            per_sample = _sample_stats(lm, items, hidden, ids, counted, end_ids)
            for lo, hi in _chunks_by_budget(counts, max_rows):
                block = _token_block(lm, hidden[lo:hi], ids[lo:hi], counted[lo:hi], counts[lo:hi])
                block.sample_stats = {k: v[lo:hi] for k, v in per_sample.items()}
                _check_finite(block, [batch[i] for i in range(lo, hi)], samples)
                block = block.hardest(lowest_likelihood_ratio)
                yield batch[lo:hi], block
        if stats is not None:
            stats.samples += len(batch)
            stats.counted_tokens += sum(counts)
            stats.model_tokens += int(ids.numel())
            stats.seconds += time.perf_counter() - t0
        bar.update(len(batch))


def _sample_stats(lm: LoadedModel, items: list[EncodedSample], hidden: torch.Tensor, ids: torch.Tensor,
                  counted: torch.Tensor, end_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-sample statistics of a batch beyond the counted positions (:mod:`valuegate.engine.ending`):
    ``end_log_prob`` and ``prompt_overlap``, each ``(B,)`` float32 on the CPU (NaN where undefined)."""
    lengths = [len(e.input_ids) for e in items]
    where = end_positions(ids, counted, lengths, end_ids, [bool(e.truncated) for e in items])
    overlap = torch.tensor([prompt_overlap(e.input_ids, e.counted) for e in items], dtype=torch.float32)
    return {"end_log_prob": end_log_probs(lm, hidden, where, end_ids), "prompt_overlap": overlap}


def _token_block(lm: LoadedModel, hidden: torch.Tensor, ids: torch.Tensor, counted: torch.Tensor,
                 counts: list[int]) -> TokenBlock:
    """Counted positions of a run of samples: ``hidden (b, T, d)``, ``ids (b, T)``, ``counted (b, T)``."""
    h = hidden[counted].float()
    targets = ids[:, 1:][counted[:, :-1]]
    sample = torch.repeat_interleave(torch.arange(len(counts), device=h.device),
                                     torch.tensor(counts, device=h.device))
    raw = lm.raw_logits(h)
    jac = logit_jacobian(raw, lm.logit_scale, lm.softcap)
    logits = lm.scaled_logits(raw)
    del raw
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    ll = logp.gather(1, targets[:, None])[:, 0]
    probs = logp.exp_()
    return TokenBlock(hidden=h, probs=probs, targets=targets, sample=sample, n_samples=len(counts),
                      logit_jac=jac, log_likelihood=ll)


def _check_finite(block: TokenBlock, indices: list[int], samples: list[Sample] | None) -> None:
    bad_rows = ~(torch.isfinite(block.hidden).all(1) & torch.isfinite(block.log_likelihood))
    if bool(bad_rows.any()):
        first = int(block.sample[bad_rows][0])
        idx = indices[first]
        where = f"{samples[idx].source}: row {samples[idx].row}" if samples else f"sample {idx}"
        raise ValuegateError(f"{where}: the model produced non-finite hidden states or probabilities "
                             "(try --dtype float32)")


def extract_token_blocks(lm: LoadedModel, encoded: list[EncodedSample], cfg: ExtractSettings,
                         samples: list[Sample] | None = None, lowest_likelihood_ratio: float = 1.0,
                         progress: bool = True, desc: str = "extract") -> TokenBlock:
    """All counted positions of all samples as one block, in the input order (for the exact path).

    Memory: ``(Σ counted positions) × V × 4`` bytes: meant for validation sets and small train sets.
    """
    parts: list[tuple[list[int], TokenBlock]] = list(
        iter_token_blocks(lm, encoded, cfg, samples, lowest_likelihood_ratio, progress, desc))
    order = [i for idx, _ in parts for i in idx]
    block = TokenBlock.concat([b for _, b in parts])
    # reorder rows so sample i of the block is encoded[i]
    new_sample = torch.from_numpy(np.asarray(order, dtype=np.int64))[block.sample]
    perm = torch.argsort(new_sample, stable=True)
    stats = None
    if block.sample_stats is not None:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        stats = {k: v[inverse] for k, v in block.sample_stats.items()}
    return TokenBlock(hidden=block.hidden[perm], probs=block.probs[perm], targets=block.targets[perm],
                      sample=new_sample[perm], n_samples=block.n_samples,
                      logit_jac=None if block.logit_jac is None else block.logit_jac[perm],
                      log_likelihood=block.log_likelihood[perm], sample_stats=stats)


def projections(cfg: ExtractSettings, hidden_size: int, vocab_size: int) -> tuple[torch.Tensor | None,
                                                                                   torch.Tensor | None]:
    """``P_h (k_h, d)`` and ``P_e (k_e, V)`` of the settings (None where the width is 0)."""
    ph = gaussian_projection(cfg.seed, hidden_size, cfg.hidden_dim) if cfg.hidden_dim else None
    pe = gaussian_projection(cfg.seed + 1, vocab_size, cfg.error_dim) if cfg.error_dim else None
    return ph, pe


def block_features(block: TokenBlock, cfg: ExtractSettings, ph: torch.Tensor | None, pe: torch.Tensor | None,
                   lowest_likelihood_ratio: float = 1.0) -> list[SparseFeatures]:
    """Sparse features of a block of whole samples: the main rows on the ``lowest_likelihood_ratio``
    hardest positions and, when ``cfg.hard_fraction < 1``, the hard rows on the ``hard_fraction`` hardest
    positions (both fractions of all counted positions, from the same forward pass)."""
    feats = sparse_features(block.hardest(lowest_likelihood_ratio), cfg.support_k, ph, pe)
    if cfg.hard_fraction < 1.0:
        hard = sparse_features(block.hardest(cfg.hard_fraction), cfg.support_k, ph, None)
        for f, h in zip(feats, hard, strict=True):
            f.hard = h
    return feats


def _stored_half(values: np.ndarray, label: str, what: str, hint: str = "") -> np.ndarray:
    """``values`` rounded to float16 (the stored dtype of the sketch and of ``mean_hidden``,
    ``engine/columns.py``); an error naming the sample and ``what`` when a value leaves its range."""
    with np.errstate(over="ignore"):  # checked below
        out = np.asarray(values).astype(np.float16)
    if not np.isfinite(out).all():
        big = float(np.abs(values).max())
        raise ValuegateError(f"{label}: a {what} value ({big:.4g}) exceeds the range of the stored float16 "
                             f"{what} ({float(np.finfo(np.float16).max):.0f})" + (f"; {hint}" if hint else ""))
    return out


def stored_features(feats: list[SparseFeatures], cfg: ExtractSettings,
                    labels: list[str] | None = None) -> list[SparseFeatures]:
    """The features as the feature store keeps them (feature format 7; ``storage/schemas.py``), in place.

    - ``rows`` and ``hard.rows`` rounded to int8 steps with one float32 scale per support entry
      (:func:`~valuegate.engine.quantize.quantize_rows`: each value within ``1/254`` of its block's
      largest; ``rows`` becomes the float32 ``q · scale`` a reader gets back, ``rows_scale`` the scales);
    - ``self_influence`` recomputed in float64 from the rounded rows, so every stored quantity is a
      function of the stored rows (``cosine(z, z) = 1`` and Cauchy–Schwarz hold on what is read back);
    - ``sketch``: :func:`~valuegate.engine.sketch.count_sketch` ``(cfg.sketch_dim,)`` of the rounded rows
      (CSR columns ``token·width + j``, seed ``cfg.seed``: train and validation rows share it), stored in
      float16, so it equals, up to that rounding, the sketch a reader computes from the stored rows;
      None when ``cfg.sketch_dim`` is 0 (the default). Costs about 1.4 ms per sample of 3,700 entries;
    - ``mean_hidden`` rounded to float16 (kept as the float32 of those values: every reader, stored or in
      memory, sees the same mean hidden state).

    Args:
        feats: one block's features (:func:`block_features`). labels: per sample, how an error names it.

    Raises:
        ValuegateError: a sketch or mean hidden value beyond float16's range (about 65,504), naming the
            sample.
    """
    import scipy.sparse as sp

    names = labels if labels is not None else [f"sample {i}" for i in range(len(feats))]
    for f, name in zip(feats, names, strict=True):
        f.mean_hidden = _stored_half(f.mean_hidden, name, "mean hidden state").astype(np.float32)
        _, f.rows_scale, f.rows = quantize_rows(f.rows)
        f.self_influence = float(np.square(f.rows, dtype=np.float64).sum())
        if f.hard is not None:
            _, f.hard.rows_scale, f.hard.rows = quantize_rows(f.hard.rows)
            f.hard.self_influence = float(np.square(f.hard.rows, dtype=np.float64).sum())
    if cfg.sketch_dim > 0 and feats:
        width = feats[0].rows.shape[1]
        lengths = np.array([f.token_ids.size for f in feats], dtype=np.int64)
        tok = np.concatenate([f.token_ids for f in feats]).astype(np.int64)
        indices = (tok[:, None] * width + np.arange(width)[None, :]).reshape(-1)
        data = np.concatenate([f.rows.reshape(-1) for f in feats]).astype(np.float64)
        indptr = np.concatenate([[0], np.cumsum(lengths * width)])
        m = sp.csr_matrix((data, indices, indptr), shape=(len(feats), (int(tok.max()) + 1) * width))
        for f, sk, name in zip(feats, count_sketch(m, cfg.sketch_dim, seed=cfg.seed), names, strict=True):
            f.sketch = _stored_half(sk, name, "feature sketch", "set extract.sketch_dim = 0")
    return feats


def extract_sparse(lm: LoadedModel, encoded: list[EncodedSample], cfg: ExtractSettings,
                   samples: list[Sample] | None = None, lowest_likelihood_ratio: float = 1.0,
                   progress: bool = True, desc: str = "extract",
                   stats: ExtractionStats | None = None) -> list[SparseFeatures]:
    """Sparse features of every sample, in the input order."""
    ph, pe = projections(cfg, lm.hidden_size, lm.vocab_size)
    if ph is not None:
        ph = ph.to(lm.device)
    if pe is not None:
        pe = pe.to(lm.device)
    out: list[SparseFeatures | None] = [None] * len(encoded)
    for idx, block in iter_token_blocks(lm, encoded, cfg, samples, 1.0, progress, desc, stats):
        for i, f in zip(idx, block_features(block, cfg, ph, pe, lowest_likelihood_ratio), strict=True):
            out[i] = f
    if any(f is None for f in out):  # pragma: no cover - every sample yields a block row
        raise ValuegateError("internal: a sample produced no features")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# From samples: encoding (a VLM's image decode + processor) overlapped with the forward passes.
# --------------------------------------------------------------------------------------------------

# A VLM's samples are encoded and length-sorted in windows of this many batches, in input order: the pool
# encodes the next windows while the model runs the current one. Fixed (never the worker count), so the
# batches, hence the features, are the same bit for bit with any number of encoding workers.
ENCODE_WINDOW_BATCHES = 4
# Windows encoded ahead of the one the model runs (bounds the decoded pixels held in memory).
PREFETCH_WINDOWS = 2
MAX_ENCODE_WORKERS = 4


def encode_workers(cfg: ExtractSettings) -> int:
    """Encoding threads of ``cfg``: ``encode_workers``, or by default the CPU cores (at most 4); 0 = inline."""
    if cfg.encode_workers is not None:
        return cfg.encode_workers
    return max(1, min(MAX_ENCODE_WORKERS, os.cpu_count() or 1))


_THREAD_STATE = threading.local()


def _encode_in_worker(tokenizer: object, sample: Sample, loss_on: str, max_length: int,
                      truncation: str = "truncate", template: str = "auto") -> EncodedSample | Refusal:
    """Encode one sample in a pool thread, with that thread's own copy of the processor (HF processors and
    fast tokenizers are not documented as thread-safe). A refusal (a ValuegateError) comes back as a Refusal;
    anything else is raised and reaches the consumer through the future."""
    own = getattr(_THREAD_STATE, "copies", None)
    if own is None:
        own = _THREAD_STATE.copies = {}
    tok = own.get(id(tokenizer))
    if tok is None:
        tok = own[id(tokenizer)] = copy.deepcopy(tokenizer)
    try:
        return encode_sample(tok, sample, loss_on, max_length, truncation, template)
    except ValuegateError as exc:
        return refusal_of(exc)


def _encode_inline(tokenizer: object, sample: Sample, loss_on: str, max_length: int,
                   index: int = 0, truncation: str = "truncate", template: str = "auto") -> EncodedSample | Refusal:
    try:
        return encode_sample(tokenizer, sample, loss_on, max_length, truncation, template)
    except ValuegateError as exc:
        return refusal_of(exc)
    except Exception as exc:
        raise _encode_failure(sample, index, exc) from exc


def _encode_failure(sample: Sample, index: int, exc: BaseException) -> ValuegateError:
    """The error of a sample whose encoding raised something else than a refusal (a bug, a library error)."""
    where = f"{sample.source}: row {sample.row}" if getattr(sample, "source", None) else f"sample {index}"
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ValuegateError(f"{where}: encoding the sample failed: {type(exc).__name__}{': ' + why if why else ''}")


def _encoded_windows(tokenizer: object, samples: list[Sample], cfg: ExtractSettings, window: int,
                     workers: int) -> Iterator[tuple[int, list[EncodedSample | Refusal]]]:
    """``(start, encodings)`` of consecutive windows of ``samples``, in order; an encoding is an
    :class:`EncodedSample` or a :class:`Refusal`. With ``workers`` threads, the next
    :data:`PREFETCH_WINDOWS` windows are encoded while the caller works on the current one.

    Raises:
        ValuegateError: encoding a sample failed with anything but a refusal (names the sample); the work
            still queued is cancelled, nothing is left running.
    """
    starts = range(0, len(samples), window)
    if workers == 0:
        for lo in starts:
            yield lo, [_encode_inline(tokenizer, s, cfg.loss_on, cfg.max_length, lo + k, cfg.truncation,
                                      cfg.template)
                       for k, s in enumerate(samples[lo:lo + window])]
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="valuegate-encode")
    pending: deque[tuple[int, list[Future]]] = deque()
    todo = iter(starts)

    def submit_next() -> None:
        lo = next(todo, None)
        if lo is not None:
            pending.append((lo, [pool.submit(_encode_in_worker, tokenizer, s, cfg.loss_on, cfg.max_length,
                                             cfg.truncation, cfg.template)
                                 for s in samples[lo:lo + window]]))

    try:
        for _ in range(1 + PREFETCH_WINDOWS):
            submit_next()
        while pending:
            lo, futures = pending.popleft()
            out: list[EncodedSample | str] = []
            for k, fut in enumerate(futures):
                try:
                    out.append(fut.result())
                except Exception as exc:
                    raise _encode_failure(samples[lo + k], lo + k, exc) from exc
            submit_next()  # before the caller's forward passes, so they overlap with its encoding
            yield lo, out
    finally:
        for _, futures in pending:
            for fut in futures:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def iter_sample_blocks(lm: LoadedModel, samples: list[Sample], cfg: ExtractSettings,
                       lowest_likelihood_ratio: float = 1.0, progress: bool = True, desc: str = "extract",
                       stats: ExtractionStats | None = None, refused: list[tuple[int, Refusal]] | None = None,
                       workers: int | None = None, truncated: set[int] | None = None,
                       before: Callable[[list[list[int]], int], None] | None = None
                       ) -> Iterator[tuple[list[int], TokenBlock]]:
    """Encode the samples and run the model over them: :func:`iter_token_blocks` from samples.

    A text model encodes every sample inline first (tokenizing is cheap) and batches them by length over
    the whole list, exactly as :func:`iter_token_blocks`. A vision-language model's samples are encoded
    (images decoded, resized, normalised) in windows of ``ENCODE_WINDOW_BATCHES × batch_size`` samples,
    by ``workers`` threads while the model runs the previous window; each window is batched by length.
    The batches depend on the samples and ``cfg`` only, so the features are identical with any
    ``workers`` (0: inline).

    Args:
        refused: where to collect ``(index, refusal)`` of samples the encoding refuses (None: raise the refusal).
        workers: encoding threads (None: :func:`encode_workers` of ``cfg``).
        truncated: where to collect the indices of samples cut at ``cfg.max_length`` (``cfg.truncation =
            "truncate"``; under ``"refuse"`` they are refused).
        before: as :func:`iter_token_blocks`, with indices into ``samples`` (a text model's batches only: a
            vision-language model's windows never call it).
        (the rest as :func:`iter_token_blocks`)

    Yields:
        ``(indices, block)``: ``indices[i]`` is the position in ``samples`` of the block's sample i.

    Raises:
        ValuegateError: a sample is refused and ``refused`` is None, its encoding fails (names it), or the
            model's outputs are not finite.
    """
    def refuse(i: int, why: Refusal) -> None:
        if refused is None:
            raise why
        refused.append((i, why))

    def kept(i: int, e: EncodedSample) -> None:
        if truncated is not None and e.truncated:
            truncated.add(i)

    if not lm.is_vision:
        keep, enc = [], []
        for i, s in enumerate(samples):
            e = _encode_inline(lm.tokenizer, s, cfg.loss_on, cfg.max_length, i, cfg.truncation, cfg.template)
            if isinstance(e, Refusal):
                refuse(i, e)
            else:
                keep.append(i)
                enc.append(e)
                kept(i, e)
        plan: list[list[int]] | None = None

        def mapped(batches: list[list[int]], k: int) -> None:  # the plan in indices into ``samples``, once
            nonlocal plan
            if plan is None:
                plan = [[keep[i] for i in b] for b in batches]
            before(plan, k)

        for idx, block in iter_token_blocks(lm, enc, cfg, [samples[i] for i in keep], lowest_likelihood_ratio,
                                            progress, desc, stats, mapped if before is not None else None):
            yield [keep[i] for i in idx], block
        return
    n_workers = encode_workers(cfg) if workers is None else workers
    window = max(1, cfg.batch_size * ENCODE_WINDOW_BATCHES)
    bar = Progress(len(samples), desc, bar=progress)
    windows = _encoded_windows(lm.tokenizer, samples, cfg, window, n_workers)
    # On CPU the forward's intra-op threads and the encoding threads share the cores: torch's OpenMP threads
    # spin between parallel regions and starve the encoders (on 2 cores, 2 encoders beside 2 torch threads
    # gained 1.1–1.2×, beside 1 torch thread 1.6×), so the forward gets the cores the encoders leave, for the run.
    torch_threads = torch.get_num_threads()
    if n_workers and lm.device.type == "cpu":
        torch.set_num_threads(max(1, min(torch_threads, (os.cpu_count() or 1) - n_workers)))
    try:
        for lo, encodings in windows:
            keep, enc = [], []
            for k, e in enumerate(encodings):
                if isinstance(e, Refusal):
                    refuse(lo + k, e)
                    bar.update(1)
                else:
                    keep.append(lo + k)
                    enc.append(e)
                    kept(lo + k, e)
            batches = length_batches([len(e.input_ids) for e in enc], cfg.batch_size, cfg.max_batch_tokens)
            for idx, block in _forward_batches(lm, enc, batches, cfg, [samples[i] for i in keep],
                                               lowest_likelihood_ratio, stats, bar):
                yield [keep[i] for i in idx], block
    finally:
        windows.close()  # cancels the prefetch and joins the pool, also on an error or an early stop
        bar.close()
        torch.set_num_threads(torch_threads)


def extract_sparse_samples(lm: LoadedModel, samples: list[Sample], cfg: ExtractSettings,
                           lowest_likelihood_ratio: float = 1.0, progress: bool = True, desc: str = "extract",
                           stats: ExtractionStats | None = None, workers: int | None = None
                           ) -> list[SparseFeatures]:
    """Sparse features of every sample, in the input order, encoding as :func:`iter_sample_blocks` does.

    Raises:
        ValuegateError: a sample is refused or its encoding fails (names it).
    """
    ph, pe = projections(cfg, lm.hidden_size, lm.vocab_size)
    ph = ph.to(lm.device) if ph is not None else None
    pe = pe.to(lm.device) if pe is not None else None
    out: list[SparseFeatures | None] = [None] * len(samples)
    for idx, block in iter_sample_blocks(lm, samples, cfg, 1.0, progress, desc, stats, None, workers):
        for i, f in zip(idx, block_features(block, cfg, ph, pe, lowest_likelihood_ratio), strict=True):
            out[i] = f
    if any(f is None for f in out):  # pragma: no cover - every sample yields a block row
        raise ValuegateError("internal: a sample produced no features")
    return out  # type: ignore[return-value]
