"""The baselines a user would pick instead of valuegate (issue 18), as columns of every scored frame: what
they mean, and IFD's extra forward pass. Their columns are computed in :mod:`valuegate.engine.cheap_baselines`
and registered in :mod:`valuegate.engine.baseline_registry` (a new baseline: docs/extending.md).

All but IFD come from the extraction valuegate already runs; IFD needs one more forward pass, of the
response alone (:func:`unconditional_losses`), run in the same extraction and stored with the features
(``uncond_loss``, keyed by the fingerprint like every feature).

Columns (one value per training sample):

- ``perplexity``: ``exp(mean_loss)``, the exponential of the mean response loss (nats) over the counted
  tokens. A perplexity filter drops the highest.
- ``length``: the counted tokens (the response's tokens, or every token of a text sample), equal to
  ``n_tokens``. A stable baseline at scale (arXiv 2410.09335): keep the longest.
- ``ifd``: Instruction-Following Difficulty (Cherry LLM, Li et al. 2024; Superfiltering, Li et al. 2024):
  ``mean_loss / uncond_loss``, the mean response loss with the prompt over the mean loss of the same response
  alone. Defined as the ratio of mean cross-entropies, as in the Cherry LLM paper (Superfiltering's code
  takes the ratio of perplexities instead: the same side of 1, another ranking). ``IFD >= 1`` means the
  prompt does not help predict the response (the papers filter such samples out). The response alone is
  tokenized on its own and starts from the tokenizer's BOS token (its EOS when it has no BOS), a
  context-free start, so every response token is predicted in both passes (Cherry LLM on GPT-2-style
  tokenizers leaves the first response token unpredicted). Null for text samples (no prompt), image-text
  samples (not run), and a response that cannot be encoded alone. For chat samples the "response alone" is
  the assistant turns' contents joined by newlines, without the template (an approximation: the
  conditional loss also counts the template tokens of assistant turns).
- ``rds_mean`` / ``rds_max``: RDS+-style embedding similarity (Ivison et al., arXiv 2503.01807): the cosine
  of the sample's mean-pooled final hidden state with each validation sample's, averaged (the mean of the
  cosines, not the cosine with the mean vector: every validation sample counts as one query, as RDS+ scores
  each query) and maximised over the validation set. The pooled state is the plain mean over the counted
  positions, the one the features store (``mean_hidden``, float16); RDS+ itself pools with position weights over
  every token of the base model's input: a difference of pooling, not of method.

With ``extract.lowest_likelihood_ratio < 1`` a training sample's features cover only its hardest counted
tokens, and so do ``mean_loss``, ``n_tokens`` and the pooled state: the baselines then read those tokens
(IFD's unconditional loss always covers the whole response).
"""

from __future__ import annotations

import numpy as np
import torch

from valuegate.engine.encoding import EncodedSample
from valuegate.engine.model import LoadedModel
from valuegate.engine.progress import Progress
from valuegate.engine.sample import Sample
from valuegate.settings import ExtractSettings

__all__ = ["encode_unconditional", "unconditional_losses", "unconditional_text"]


def unconditional_text(sample: Sample) -> str | None:
    """The response of ``sample`` without its prompt: a prompt/response sample's response, a chat's assistant
    turns joined by newlines; None for text samples (no prompt) and image-text samples."""
    if sample.images:
        return None
    if sample.kind == "prompt_response":
        return sample.response
    if sample.kind == "messages":
        turns = [m["content"] for m in sample.messages or () if m.get("role") == "assistant"
                 and isinstance(m.get("content"), str)]
        return "\n".join(turns) if turns else None
    return None


def encode_unconditional(tokenizer: object, sample: Sample, max_length: int) -> EncodedSample | None:
    """The response alone as token ids: a start token (BOS, else EOS) then the response's tokens, each of which
    counts; cut at ``max_length``. None when the sample has no response alone, or it has no token."""
    text = unconditional_text(sample)
    if not text:
        return None
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is not None and (not ids or ids[0] != start):
        ids = [start, *ids]
    ids = ids[:max_length]
    if len(ids) < 2:
        return None
    return EncodedSample(input_ids=np.asarray(ids, dtype=np.int64), counted=np.ones(len(ids) - 1, dtype=bool))


def _log_likelihood(lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` ``(N,)`` float32 at hidden states ``(N, d)``, with the model's logit scale and cap:
    the target's logit minus the log-sum-exp of the row (no ``(N, V)`` log-probabilities written)."""
    logits = lm.scaled_logits(lm.raw_logits(hidden))
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def tight_batches(lengths: list[int], max_tokens: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length (stable), cut into batches of at most ``max_tokens`` padded tokens
    whose padding is at most ``max_padding`` of their real tokens (a batch closes when the next, longer sample
    would pad it beyond that): few batches, little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        padded = n * (len(cur) + 1)
        if cur and (padded > max_tokens or padded > (1 + max_padding) * (real + n)):
            out.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        out.append(cur)
    return out


def unconditional_losses(lm: LoadedModel, samples: list[Sample], cfg: ExtractSettings, progress: bool = True,
                         desc: str = "IFD", bar: Progress | None = None,
                         batch_tokens: int | None = None) -> np.ndarray:
    """Mean loss (nats) of each sample's response alone: one forward pass over the responses sorted by length,
    in batches of at most ``batch_tokens`` padded tokens (default ``batch_size`` × the longest response, so
    never more than a batch of extraction; the batch holds as many short responses as fit, not
    ``batch_size``) and at most 10% padding (:func:`tight_batches`), the head in float32 at the counted
    positions only, in chunks within ``prob_budget_mb``.

    Args:
        progress, desc: a bar on a terminal, else log lines (:class:`~valuegate.engine.progress.Progress`).
        bar: count the samples on this progress instead (not closed here: a caller running the pass in
            windows keeps one).
        batch_tokens: padded tokens per batch (at most ``max_batch_tokens``).

    Returns:
        ``(len(samples),)`` float64, NaN where undefined (see :func:`unconditional_text`; a vision-language
        model runs no unconditional pass).
    """
    from valuegate.engine.extraction import _chunks_by_budget, counted_mask, pad_batch

    out = np.full(len(samples), np.nan)
    own = bar is None
    tracker = Progress(len(samples), desc, bar=progress) if own else bar
    if lm.is_vision or not samples:
        tracker.update(len(samples))
        if own:
            tracker.close()
        return out
    enc: list[EncodedSample] = []
    which: list[int] = []
    for i, s in enumerate(samples):
        e = encode_unconditional(lm.tokenizer, s, cfg.max_length)
        if e is not None:
            enc.append(e)
            which.append(i)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    max_rows = max(1, (cfg.prob_budget_mb << 20) // (lm.vocab_size * 4 * 2))
    tracker.update(len(samples) - len(enc))
    lengths = [len(e.input_ids) for e in enc]
    budget = min(cfg.max_batch_tokens, batch_tokens or cfg.batch_size * max(lengths, default=1))
    for batch in tight_batches(lengths, budget):
        items = [enc[i] for i in batch]
        ids, mask = pad_batch(items, pad_id, lm.device)
        with torch.inference_mode():
            hidden = lm.final_hidden(ids, mask)
            counted = counted_mask(items, mask)
            counts = [e.n_counted for e in items]
            for lo, hi in _chunks_by_budget(counts, max_rows):
                c = counted[lo:hi]
                ll = _log_likelihood(lm, hidden[lo:hi][c], ids[lo:hi, 1:][c[:, :-1]]).double().cpu().numpy()
                bounds = np.concatenate([[0], np.cumsum(counts[lo:hi])])
                for k in range(hi - lo):
                    out[which[batch[lo + k]]] = -ll[bounds[k]:bounds[k + 1]].mean()
        tracker.update(len(batch))
    if own:
        tracker.close()
    return out
