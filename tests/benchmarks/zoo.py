"""The corruption zoo of ``bench_baselines``: seeded generators that damage a prompt/response row.

Each generator takes the rows (dicts with ``prompt``, ``response`` and a class column), the index of the row
to corrupt and a ``numpy.random.Generator``, and returns the corrupted response, or None where it does not
apply (a response without a number has no "wrong final answer"; a one-word response cannot be shuffled).
A trailing end marker of the source data (DataInf's ``</s>``) is kept on every corrupted response, so no
generator is detectable by the marker alone.

- ``copy``: the response is the input copied from the prompt (its last line, without a trailing ``->`` / ``=``).
- ``swap``: the response of a random row of another class.
- ``truncate``: the first half of the response's words (at least one word dropped).
- ``shuffle``: the response's words in a random (different) order.
- ``wrong``: the last number of the response replaced by a wrong one (± 1..20).
- ``junk``: 1-3 junk tokens (random letters and symbols) inserted at random word boundaries.
- ``delete``: a span of the response's words deleted (a third of them, not the last word: unlike
  ``truncate``); with fewer than three words, the first word.

:func:`corrupt_rows` applies them: the same seed gives the same zoo.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

MARKERS = ("</s>",)
GENERATORS: dict[str, Callable[[list[dict], int, np.random.Generator, str], str | None]] = {}


def _generator(name: str):
    def register(fn):
        GENERATORS[name] = fn
        return fn
    return register


def _split(response: str) -> tuple[str, list[str], str, list[str]]:
    """Leading whitespace, the words, the end marker (``""`` when none) and the separators: ``seps[k]`` is
    the whitespace after word ``k`` (the last is ``""``). Keeping the separators is what lets a corrupted
    multi-line answer keep its newlines: a generator that joined words by spaces would leave a formatting
    tell (a one-line answer among multi-line ones) that a detector could key on instead of the fault."""
    marker = next((m for m in MARKERS if response.endswith(m)), "")
    body = response[:len(response) - len(marker)]
    lead = body[:len(body) - len(body.lstrip())]
    rest = body[len(lead):]
    words = re.findall(r"\S+", rest)
    seps = re.findall(r"\s+", rest.rstrip())
    seps.append(rest[len(rest.rstrip()):])
    return lead, words, marker, seps


def _join(lead: str, words: list[str], marker: str, seps: list[str]) -> str:
    """The inverse of :func:`_split`: ``seps[k]`` follows ``words[k]`` (as many separators as words)."""
    return lead + "".join(w + s for w, s in zip(words, seps, strict=True)) + marker


@_generator("copy")
def copy_input(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    lines = [ln.strip() for ln in rows[i]["prompt"].strip().splitlines() if ln.strip()]
    if not lines:
        return None
    text = re.sub(r"\s*(->|=|:)\s*$", "", lines[-1]).strip()
    lead, _, marker, _ = _split(rows[i]["response"])
    return lead + text + marker if text else None


@_generator("swap")
def swap_class(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    others = [j for j, r in enumerate(rows) if r[cls] != rows[i][cls] and r["response"] != rows[i]["response"]]
    return rows[int(rng.choice(others))]["response"] if others else None


@_generator("truncate")
def truncate(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    lead, words, marker, seps = _split(rows[i]["response"])
    if len(words) < 2:
        return None
    k = min(len(words) - 1, max(1, len(words) // 2))
    return _join(lead, words[:k], marker, [*seps[:k - 1], seps[-1]])


@_generator("shuffle")
def shuffle_words(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    lead, words, marker, seps = _split(rows[i]["response"])
    if len(set(words)) < 2:
        return None
    for _ in range(20):
        perm = [words[k] for k in rng.permutation(len(words))]
        if perm != words:
            return _join(lead, perm, marker, seps)
    return None


@_generator("wrong")
def wrong_answer(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    response = rows[i]["response"]
    nums = list(re.finditer(r"-?\d+", response))
    if not nums:
        return None
    m = nums[-1]
    delta = int(rng.integers(1, 21)) * (1 if rng.random() < 0.5 else -1)
    return response[:m.start()] + str(int(m.group()) + delta) + response[m.end():]


_JUNK = "qxzjkvwQXZJ#@%&*~^|0123456789"


@_generator("junk")
def junk_tokens(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    lead, words, marker, seps = _split(rows[i]["response"])
    words, seps = list(words), list(seps)
    for _ in range(int(rng.integers(1, 4))):
        junk = "".join(rng.choice(list(_JUNK), size=int(rng.integers(3, 7))))
        at = int(rng.integers(0, len(words) + 1))
        words.insert(at, junk)
        seps.insert(at if at < len(words) - 1 else at - 1, " ")
    return _join(lead, words, marker, seps)


@_generator("delete")
def delete_span(rows: list[dict], i: int, rng: np.random.Generator, cls: str) -> str | None:
    lead, words, marker, seps = _split(rows[i]["response"])
    if len(words) < 2:
        return None
    if len(words) < 3:
        return _join(lead, words[1:], marker, seps[1:])
    span = max(1, len(words) // 3)
    start = int(rng.integers(0, len(words) - span))  # the span never covers the last word
    return _join(lead, words[:start] + words[start + span:], marker, seps[:start] + seps[start + span:])


def corrupt_rows(rows: list[dict], kinds: list[str], per_kind: int, seed: int, cls: str,
                 pool: list[int] | None = None) -> list[dict]:
    """``per_kind`` corrupted copies of rows per generator in ``kinds``, each a new dict with the corrupted
    ``response`` and ``corruption`` = the generator's name (the other columns as the source row's).

    Args:
        rows: the source rows (``prompt``, ``response``, ``cls``). cls: the class column (``swap`` takes
            responses of other classes).
        pool: indices of ``rows`` that may be corrupted (default: all); for each kind, rows are drawn
            without replacement from the pool, skipping those the generator does not apply to.
        seed: the zoo is a function of (rows, kinds, per_kind, seed, pool).

    Returns:
        up to ``len(kinds) · per_kind`` rows (fewer when a generator applies to too few rows).
    """
    pool = list(range(len(rows))) if pool is None else list(pool)
    out = []
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, k])
        made = 0
        for i in rng.permutation(pool):
            if made == per_kind:
                break
            new = GENERATORS[kind](rows, int(i), rng, cls)
            if new is None or new == rows[int(i)]["response"]:
                continue
            out.append({**rows[int(i)], "response": new, "corruption": kind})
            made += 1
    return out
