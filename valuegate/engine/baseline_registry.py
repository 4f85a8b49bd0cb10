"""The baselines' registry: what a user would reach for instead of valuegate (perplexity, IFD, RDS+, length),
each a column of every scored frame and scores run and, when it names one, a selection policy.

A baseline is a function of :class:`BaselineInputs` returning its ``(n,)`` column, decorated with
:func:`register` (its column, its type, which side its filter drops, the report's label, and the
``select.policy`` keeping ``select.fraction`` of the rows by it, if any). Everything that lists baselines
reads this registry: the scored columns (:mod:`valuegate.engine.score_columns`, the stored schema
``storage/schemas.py``, a release's scores.parquet), the select step's policies and reason codes
(``tasks/select.py``), the ``select.policy`` setting's check (:mod:`valuegate.settings`), the report's detection
table (:mod:`valuegate.engine.detection`, ``tasks/report.py``). The built-in ones are in the modules of
:data:`BASELINE_MODULES` (:mod:`valuegate.engine.cheap_baselines`); docs/extending.md "A baseline".

numpy only (the store's schema reads it: no torch, no pyarrow).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["BASELINE_MODULES", "Baseline", "BaselineInputs", "baseline_names", "baseline_policies",
           "compute_baselines", "register", "registered", "unregister"]

# the modules whose baselines register themselves on import (a new built-in baseline: its module here)
BASELINE_MODULES = ("valuegate.engine.cheap_baselines",)


@dataclass
class BaselineInputs:
    """What every baseline may read, for n training samples.

    Attributes:
        mean_loss: ``(n,)`` float64 mean response loss with the prompt, nats. n_tokens: ``(n,)`` counted tokens.
        uncond_loss: ``(n,)`` mean loss of the response alone, None or NaN where undefined; None: not
            extracted. hidden: ``(n, d)`` and valid_hidden ``(n_v, d)`` pooled final hidden states (any positive
            scale).
    """

    mean_loss: np.ndarray
    n_tokens: np.ndarray
    uncond_loss: Sequence[float | None] | np.ndarray | None
    hidden: np.ndarray
    valid_hidden: np.ndarray
    _cache: dict[str, object] = field(default_factory=dict, repr=False)

    def shared(self, key: str, compute: Callable[[], object]) -> object:
        """``compute()`` once per inputs, for baselines that come out of one computation (``rds_mean`` and
        ``rds_max``)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


@dataclass(frozen=True)
class Baseline:
    """One registered baseline.

    Attributes:
        column: its column name. compute: ``BaselineInputs -> (n,)`` values (None where undefined).
        dtype: the stored type, ``float64`` or ``int32``. flags: the side its filter drops (+1 high values,
            -1 low ones; the report's detection table). label: the report's name for that filter.
        policy: the ``select.policy`` keeping ``select.fraction`` of the rows by it (None: a column only);
            rank: how that policy ranks (``top`` highest first, ``lowest``, ``longest``). reason_codes: codes
            its policy writes besides ``not_in_<rank>_<policy>``.
    """

    column: str
    compute: Callable[[BaselineInputs], Sequence | np.ndarray]
    dtype: Literal["float64", "int32"] = "float64"
    flags: float = 1.0
    label: str = ""
    policy: str | None = None
    rank: Literal["top", "lowest", "longest"] = "top"
    reason_codes: tuple[str, ...] = ()

    @property
    def drop_code(self) -> str:
        """The reason code of a row its policy leaves out."""
        return f"not_in_{self.rank}_{self.policy}"


_REGISTRY: dict[str, Baseline] = {}


def register(column: str, *, flags: float, label: str, dtype: Literal["float64", "int32"] = "float64",
             policy: str | None = None, rank: Literal["top", "lowest", "longest"] = "top",
             reason_codes: tuple[str, ...] = ()) -> Callable:
    """Decorator: register ``compute(inputs) -> (n,)`` as the baseline ``column`` (see :class:`Baseline`).
    Registering a column again replaces it (in registration order's place)."""
    _load_builtins()  # the built-ins keep their places before any later registration

    def wrap(compute: Callable[[BaselineInputs], Sequence | np.ndarray]):
        _REGISTRY[column] = Baseline(column, compute, dtype, flags, label, policy, rank, reason_codes)
        return compute
    return wrap


def unregister(column: str) -> None:
    """Remove a registered baseline (tests)."""
    _REGISTRY.pop(column, None)


def registered() -> list[Baseline]:
    """Every registered baseline, in registration order (the built-ins first)."""
    _load_builtins()
    return list(_REGISTRY.values())


def baseline_names() -> tuple[str, ...]:
    """The baseline columns, in registration order."""
    return tuple(b.column for b in registered())


def baseline_policies() -> dict[str, Baseline]:
    """``select.policy`` name → the baseline it keeps the rows by."""
    return {b.policy: b for b in registered() if b.policy}


def compute_baselines(inputs: BaselineInputs) -> dict[str, list]:
    """Every baseline column of n training samples: ``{column: (n,) values}`` in registration order."""
    return {b.column: list(b.compute(inputs)) for b in registered()}


_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BASELINE_MODULES:
            importlib.import_module(name)
