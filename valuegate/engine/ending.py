"""Per-sample token statistics the fault detectors read, from the forward pass extraction already runs.

- **End-of-answer surprisal** (``end_loss``): ``−log p(end | prompt, response)``, the model's surprise that the
  answer stops where it stops. "End" is any of the tokens that close an assistant turn: the tokenizer's EOS and
  the token the chat template puts right after an assistant message (:func:`end_token_ids`). It is read at the
  position that predicts the first end token among the counted targets (chat-rendered samples: the template's
  end-of-turn token follows the response and is itself counted), else at the last token of the sample (plain
  text: the prediction just past the end of the response). A truncated sample has no end: NaN.
- **Surprisal spike** (``max_loss``): the largest ``−log p_t[y_t]`` over the counted positions: a deleted span or
  an injected token leaves one position the model could not have predicted.
- **Prompt overlap** (``prompt_overlap``): the longest run of the response's tokens (consecutive counted
  targets) that stands verbatim in the prompt (the tokens before the first counted target), as a share of the
  response's tokens: near 1 for an answer that repeats its question, small for an answer that reuses the
  prompt's words in its own sentences (a reading-comprehension answer quoting its context, a grammar
  transformation), where a share of shared bigrams was high too.

All three come from tensors the extraction already holds; the only extra work is one ``(d → V)`` head row per
sample whose end lies past the counted positions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["block_inputs", "end_log_probs", "end_positions", "end_token_ids", "feature_inputs", "prompt_overlap"]


@lru_cache(maxsize=8)
def _end_ids_cached(tokenizer: object) -> tuple[int, ...]:
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063valuegate-end\u2063"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that cannot render this minimal chat: EOS alone
            text = ""
        at = text.find(marker)
        if at >= 0:
            rest = text[at + len(marker):]
            enc = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            first = next((t for t in enc if t in special), None)
            if first is not None:
                ids.add(int(first))
    return tuple(sorted(ids))


def end_token_ids(tokenizer: object) -> tuple[int, ...]:
    """The token ids that end an assistant turn: EOS and the chat template's end-of-turn token (the first
    special token the template puts after an assistant message). Empty when the tokenizer has neither."""
    try:
        return _end_ids_cached(tokenizer)
    except TypeError:  # an unhashable tokenizer object: compute without the cache
        return _end_ids_cached.__wrapped__(tokenizer)


def end_positions(ids: torch.Tensor, counted: torch.Tensor, lengths: list[int], end_ids: tuple[int, ...],
                  truncated: list[bool]) -> list[int | None]:
    """Per sample of a batch, the position whose next-token prediction is "the answer ends here".

    Args:
        ids: ``(B, T)`` right-padded token ids. counted: ``(B, T)`` bool, counted predictions (position t
            predicts ``ids[t+1]``). lengths: real tokens per sample. end_ids: :func:`end_token_ids`.
        truncated: per sample, whether it was cut at ``max_length`` (no end then).

    Returns:
        per sample the position, or None (truncated, or no counted position).
    """
    out: list[int | None] = []
    ends = torch.tensor(end_ids, dtype=ids.dtype, device=ids.device) if end_ids else None
    for b, n in enumerate(lengths):
        pos = torch.nonzero(counted[b, : max(n - 1, 0)]).reshape(-1)
        if truncated[b] or pos.numel() == 0:
            out.append(None)
            continue
        if ends is not None:
            hits = pos[torch.isin(ids[b, pos + 1], ends)]
            if hits.numel():
                out.append(int(hits[0]))
                continue
        out.append(n - 1)
    return out


def end_log_probs(lm, hidden: torch.Tensor, positions: list[int | None], end_ids: tuple[int, ...]) -> torch.Tensor:
    """``log Σ_{e ∈ end_ids} p(e)`` at each sample's end position (NaN where None or no end id).

    Args:
        lm: the :class:`~valuegate.engine.model.LoadedModel` (its float32 head and logit transform).
        hidden: ``(B, T, d)`` final hidden states. positions: :func:`end_positions`.

    Returns:
        ``(B,)`` float32 on the CPU.
    """
    out = torch.full((len(positions),), float("nan"), dtype=torch.float32)
    rows = [b for b, p in enumerate(positions) if p is not None]
    if not rows or not end_ids:
        return out
    h = hidden[torch.tensor(rows, device=hidden.device), torch.tensor([positions[b] for b in rows],
                                                                       device=hidden.device)]
    logp = torch.log_softmax(lm.scaled_logits(lm.raw_logits(h)), dim=-1)
    idx = torch.tensor(end_ids, device=logp.device)
    out[torch.tensor(rows)] = torch.logsumexp(logp[:, idx], dim=1).float().cpu()
    return out


def prompt_overlap(input_ids: np.ndarray, counted: np.ndarray) -> float:
    """The longest run of the response's tokens found verbatim in the prompt, over the response's length (see
    the module docstring). ``O(response × prompt)``: one vectorised step per response token.

    Args:
        input_ids: ``(T,)`` the sample's token ids. counted: ``(T−1,)`` bool, counted predictions.

    Returns:
        in ``[0, 1]``; 0 when nothing is counted or there is no prompt.
    """
    pos = np.flatnonzero(counted)
    if pos.size < 1 or pos[0] < 1:
        return 0.0
    prompt = np.asarray(input_ids[: pos[0] + 1])
    targets = np.asarray(input_ids)[pos + 1]
    run = np.zeros(prompt.size + 1, dtype=np.int64)  # run[j + 1]: the common run ending at prompt[j]
    best = 0
    for tok in targets.tolist():
        nxt = np.zeros_like(run)
        hit = prompt == tok
        nxt[1:][hit] = run[:-1][hit] + 1
        run = nxt
        best = max(best, int(run.max()))
    return best / targets.size


def block_inputs(block, hard_fraction: float) -> dict[str, np.ndarray]:
    """The fault detectors' per-sample inputs of a token block (the exact path; the sparse path reads them
    from :class:`~valuegate.engine.forvalue.SparseFeatures`).

    Args:
        block: a :class:`~valuegate.engine.forvalue.TokenBlock` of whole samples, with log-likelihoods.
        hard_fraction: the share of hardest positions ``hard_mean_loss`` averages.

    Returns:
        name → ``(n_samples,)`` float64: ``mean_loss``, ``hard_mean_loss``, ``max_loss``, ``end_loss``,
        ``prompt_overlap``, ``n_tokens``.
    """
    n = block.n_samples
    nll = -block.log_likelihood.double().cpu()
    sample = block.sample.cpu()
    tokens = torch.bincount(sample, minlength=n).double()
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, sample, nll)
    hard = block.hardest(hard_fraction)
    hard_nll = -hard.log_likelihood.double().cpu()
    hard_tokens = torch.bincount(hard.sample.cpu(), minlength=n).double()
    hard_total = torch.zeros(n, dtype=torch.float64).index_add_(0, hard.sample.cpu(), hard_nll)
    mx = torch.full((n,), float("-inf"), dtype=torch.float64).scatter_reduce_(0, sample, nll, reduce="amax")
    stats = {k: v.double().cpu().numpy() for k, v in (block.sample_stats or {}).items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mean_loss": (total / tokens.clamp_min(1)).numpy(),
                "hard_mean_loss": (hard_total / hard_tokens.clamp_min(1)).numpy(),
                "max_loss": mx.numpy(), "end_loss": -stats.get("end_log_prob", np.full(n, np.nan)),
                "prompt_overlap": stats.get("prompt_overlap", np.full(n, np.nan)),
                "n_tokens": tokens.numpy()}


def feature_inputs(feats: list) -> dict[str, np.ndarray]:
    """The fault detectors' per-sample inputs of in-memory :class:`~valuegate.engine.forvalue.SparseFeatures`
    (name → ``(n,)`` float64; ``uncond_loss`` is not among them: the caller adds it)."""
    def col(get) -> np.ndarray:
        return np.array([get(f) for f in feats], dtype=np.float64)

    return {"mean_loss": col(lambda f: f.mean_loss),
            "hard_mean_loss": col(lambda f: f.hard.mean_loss if f.hard is not None else f.mean_loss),
            "max_loss": col(lambda f: f.max_loss), "end_loss": col(lambda f: f.end_loss),
            "prompt_overlap": col(lambda f: f.prompt_overlap), "self_influence": col(lambda f: f.self_influence),
            "n_tokens": col(lambda f: f.n_tokens)}
