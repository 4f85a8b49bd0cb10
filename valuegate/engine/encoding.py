"""Samples as a text model sees them: token ids, which predictions count, refusals; batches by length.

A prompt/response sample is rendered as it will be trained (the tokenizer's chat template, or prompt +
response), a chat with its template, a text as it is; a token counts when its characters reach into the
response or an assistant turn. A vision-language model's processor (:mod:`valuegate.engine.vlm`) renders
and encodes its samples with the same pieces; :func:`valuegate.engine.model.encode_sample` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from valuegate.engine.sample import Sample
from valuegate.errors import ValuegateError

__all__ = [
    "REFUSAL_REASONS",
    "EncodedSample",
    "Refusal",
    "Unvalued",
    "chat_text_and_spans",
    "counted_from_offsets",
    "encode_text_sample",
    "length_batches",
    "refusal_of",
    "resolve_loss_on",
    "resolve_template",
    "too_long",
]

# Why a sample reaching extraction is not valued: the reason a :class:`Refusal` carries (data, the keys of the
# counts of unscored samples; its message says it with the file, row and field).
TOO_LONG = "longer than max_length"
BEYOND = "every counted token lies beyond max_length"
NO_TOKEN = "no token to count"
NO_ASSISTANT = "no assistant turn to count"
CANNOT = "cannot be encoded"  # any other refusal: an image that does not decode, a processor's refusal, ...
REFUSAL_REASONS = (TOO_LONG, BEYOND, NO_ASSISTANT, NO_TOKEN, CANNOT)


class Refusal(ValuegateError):
    """A sample the model cannot value (a user error naming file, row and field), with why as data.

    Attributes:
        reason (str): one of :data:`REFUSAL_REASONS`, what the counts of unscored samples are keyed on.
    """

    def __init__(self, message: str, reason: str = CANNOT) -> None:
        super().__init__(message)
        self.reason = reason


def refusal_of(exc: ValuegateError) -> Refusal:
    """``exc`` as a :class:`Refusal` (a user error raised while encoding a sample that is no Refusal itself,
    e.g. an image that does not decode, is one for the reason :data:`CANNOT`)."""
    return exc if isinstance(exc, Refusal) else Refusal(str(exc), CANNOT)


class Unvalued(NamedTuple):
    """A sample left out of the scores: what every step and runner reports as ``unscored`` (a JSON list of
    three in a flow's results)."""

    id: str
    reason: str  # one of REFUSAL_REASONS
    message: str  # the refusal's one line (file, row, field)


@dataclass
class EncodedSample:
    """Token ids of one sample and which next-token predictions count.

    Attributes:
        input_ids: ``(T,)`` int64.
        counted: ``(T-1,)`` bool; ``counted[t]`` says whether the prediction of ``input_ids[t+1]`` from
            position t counts (``m_t`` of docs/ARCHITECTURE.md §4).
        truncated: the sample was cut at ``max_length``.
        image_tokens: ``(T,)`` bool, the tokens a VLM's processor put in for images (None: no image).
        token_inputs: a VLM's per-token model inputs, each ``(T,)`` int64 (``mm_token_type_ids``).
        image_inputs: a VLM's image tensors as its processor returned them for this sample alone.
    """

    input_ids: np.ndarray
    counted: np.ndarray
    truncated: bool = False
    image_tokens: np.ndarray | None = None
    token_inputs: dict[str, np.ndarray] | None = None
    image_inputs: dict[str, torch.Tensor] | None = None

    @property
    def n_counted(self) -> int:
        """Number of counted positions."""
        return int(self.counted.sum())


def resolve_loss_on(loss_on: str, sample: Sample) -> str:
    """``auto`` → ``response`` for prompt/response and chat samples, ``all`` for text."""
    if loss_on == "auto":
        return "all" if sample.kind == "text" else "response"
    if loss_on == "response" and sample.kind == "text":
        raise ValuegateError(f"{sample.source}: row {sample.row}: text samples have no response to count; "
                             "use --loss-on all (or give prompt/response or messages columns)")
    return loss_on


def resolve_template(template: str, tokenizer: object) -> str:
    """``extract.template`` resolved for a tokenizer: ``"chat"`` or ``"none"`` (``auto``: chat when the
    tokenizer has a chat template).

    Raises:
        ValuegateError: ``chat`` asked of a tokenizer without a chat template.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has else "none"
    if template == "chat" and not has:
        raise ValuegateError("extract.template = chat: this model's tokenizer has no chat template; set "
                             "extract.template = \"none\" (prompt + response as they are, for base models)")
    return template


def chat_text_and_spans(tokenizer: object, sample: Sample,
                         msgs: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat with the tokenizer's template; return the text and the assistant turns' char spans."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValuegateError(f"{sample.source}: row {sample.row}: messages need a tokenizer with a chat "
                             "template, and this model's tokenizer has none")
    msgs = list(sample.messages or ()) if msgs is None else msgs
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValuegateError(
                f"{sample.source}: row {sample.row}: messages: the chat template does not render turn {i} "
                "as a prefix of the conversation, so its assistant tokens cannot be located")
        spans.append((len(before), len(upto)))
    return full, spans


def too_long(sample: Sample, n_tokens: int, max_length: int) -> Refusal:
    """The refusal of a sample longer than ``max_length`` under ``extract.truncation = refuse``."""
    return Refusal(f"{sample.source}: row {sample.row}: {sample.counted_field}: {n_tokens} tokens, "
                   f"{TOO_LONG}={max_length} (extract.truncation = refuse)", TOO_LONG)


def encode_text_sample(tokenizer: object, sample: Sample, loss_on: str, max_length: int,
                  truncation: str = "truncate", template: str = "auto") -> EncodedSample:
    """Tokenize one sample for a text-only model and mark the counted predictions.

    A prompt/response sample is rendered as it will be trained (``template``, :func:`resolve_template`):
    with ``chat`` the tokenizer's chat template renders a user turn (the prompt) and an assistant turn (the
    response), and the assistant turn counts; with ``none`` the text is ``prompt + response`` (no separator).

    A token counts (``loss_on = response``) when its characters reach into the response (or an assistant
    turn): the text is tokenized once as a whole, as a model sees it, and token offsets decide. Special
    tokens the tokenizer appends after a counted token (e.g. EOS) count too. A sample longer than
    ``max_length`` is cut there and flagged ``truncated`` (``truncation = "truncate"``) or refused
    (``"refuse"``).

    Raises:
        Refusal: no token counts (e.g. every counted token was truncated away, or a chat has no assistant
            turn), or the sample is too long under ``refuse``, naming file, row and field, its ``reason`` one
            of :data:`REFUSAL_REASONS`.
        ValuegateError: the sample carries images (a refusal for :data:`CANNOT`, :func:`refusal_of`).
    """
    if sample.images:
        raise ValuegateError(f"{sample.source}: row {sample.row}: images: the model is a text-only model; "
                             "value image-text samples with a vision-language model")
    mode = resolve_loss_on(loss_on, sample)
    special = True
    if sample.kind == "prompt_response" and resolve_template(template, tokenizer) == "chat":
        text, spans = chat_text_and_spans(tokenizer, sample, [
            {"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.response}])
        special = False  # the template already holds the special tokens
    elif sample.kind == "prompt_response":
        text, spans = sample.prompt + sample.response, [(len(sample.prompt), len(sample.prompt + sample.response))]
    elif sample.kind == "messages":
        text, spans = chat_text_and_spans(tokenizer, sample)
        special = False  # the template already holds the special tokens
    else:
        text, spans = sample.text, [(0, len(sample.text))]
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = enc["offset_mapping"]
    in_target = np.ones(len(ids), dtype=bool) if mode == "all" else counted_from_offsets(offsets, spans)
    truncated = len(ids) > max_length
    if truncated and truncation == "refuse":
        raise too_long(sample, len(ids), max_length)
    ids, in_target = ids[:max_length], in_target[:max_length]
    counted = in_target[1:].copy()
    if not counted.any():
        why = BEYOND if truncated and in_target.size else (
            NO_ASSISTANT if mode == "response" and sample.kind == "messages" and not spans else NO_TOKEN)
        raise Refusal(f"{sample.source}: row {sample.row}: {sample.counted_field}: {why}"
                      f"{' (too short)' if why == NO_TOKEN else ''} (loss_on={mode}, max_length={max_length})", why)
    return EncodedSample(input_ids=ids, counted=counted, truncated=truncated)


def counted_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """``(T,)`` bool: tokens whose characters reach into a counted span, and zero-width special tokens right
    after a counted one (EOS)."""
    in_target = np.zeros(len(offsets), dtype=bool)
    for j, (a, b) in enumerate(offsets):
        if b > a:
            in_target[j] = any(a < hi and b > lo for lo, hi in spans)
        elif j > 0 and in_target[j - 1]:
            in_target[j] = True
    return in_target


def length_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group sample indices into batches of similar length (to minimise padding).

    Samples are sorted by length (stable), then cut into batches of at most ``batch_size`` samples and at
    most ``max_batch_tokens`` padded tokens (a single longer sample forms its own batch).

    Returns:
        lists of indices into ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= batch_size or lengths[i] * (len(cur) + 1) > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
