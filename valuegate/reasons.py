"""Why the selection drops a sample, as data: a :class:`Reason` is a code and its parameters; words are rendered
from it where a person reads them (the ``reason`` column, the run summary, the dataset card, the report).

Each code has a :class:`ReasonForm`: the sentence of one sample (with the sample's own numbers) and its *kind*
(the same without them, so that drops can be counted: ``value -0.3 < 0`` → ``value < 0``). Nothing reads a
reason back out of its words: counts group by the code and the policy's parameters
(:func:`kinds_of`). A fault detector's code (``cut``, ``echo``, ... of :mod:`valuegate.engine.faults`) has
no form of its own: it renders through the ``suspect`` form with the detector's sentence.

A new selection policy adds its codes with :func:`register_reason` beside the policy; a baseline policy
(:mod:`valuegate.engine.baseline_registry`) gets ``not_in_<rank>_<policy>`` with the words of its rank
(:data:`RANKED`, registered by ``tasks/select.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RANKED", "REASON_FORMS", "Reason", "ReasonForm", "kinds_of", "register_reason"]


@dataclass(frozen=True)
class ReasonForm:
    """How a reason code reads.

    Attributes:
        code: the ``reason_code`` (a short name a person can count).
        words: the sentence of one sample, a :meth:`str.format` template over the reason's parameters.
        kind: the sentence without the sample's own numbers (only the policy's parameters and ``code``,
            ``why``), what drops are counted by.
    """

    code: str
    words: str
    kind: str


#: code → form; the forms of the selection policies (tasks/select.py). Fault detectors' codes use ``suspect``.
REASON_FORMS: dict[str, ReasonForm] = {}


def register_reason(form: ReasonForm) -> ReasonForm:
    """Add (or replace) the form of a reason code."""
    REASON_FORMS[form.code] = form
    return form


SUSPECT = "suspect"


def form_of(code: str) -> ReasonForm:
    """The form of ``code``: its own, else (a fault detector's code) the ``suspect`` form."""
    return REASON_FORMS.get(code) or REASON_FORMS[SUSPECT]


@dataclass(frozen=True)
class Reason:
    """Why one sample is dropped: its code and the parameters its words need.

    Attributes:
        code: the ``reason_code``.
        params: the template parameters (the sample's numbers and the policy's: ``value``, ``threshold``,
            ``fraction``, ``column``, ...; a suspect reason: ``why``, ``suspect``).
    """

    code: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def words(self) -> str:
        """The sentence of this sample (the ``reason`` column)."""
        return form_of(self.code).words.format(code=self.code, **self.params)

    def kind(self) -> str:
        """The sentence without the sample's numbers, what drops are counted by."""
        return form_of(self.code).kind.format(code=self.code, **self.params)


for _form in (
    # a fault detector fired (its code, its sentence ``why``), or no detector but the suspect score (``suspect``)
    ReasonForm(SUSPECT, "{why} ({code}: suspect {suspect:.3g} > {threshold:g})", "{code}: {why}"),
    ReasonForm("negative_value", "value {value:.4g} < 0", "value < 0"),
    ReasonForm("below_threshold", "value {value:.4g} < threshold {threshold:g}", "value < threshold {threshold:g}"),
    ReasonForm("not_in_top", "not in the top {fraction:.0%} (value {value:.4g} < {cut:.4g})",
               "not in the top {fraction:.0%}"),
    ReasonForm("not_sampled", "not in the random {fraction:.0%} (seed {seed})", "not in the random {fraction:.0%}"),
    ReasonForm("no_ifd", "no ifd (no prompt)", "no ifd (no prompt)"),
    ReasonForm("ifd_at_least_1", "ifd {value:.4g} >= 1 (the prompt does not help)",
               "ifd >= 1 (the prompt does not help)"),
):
    register_reason(_form)

#: how a baseline's drop reads, by how it ranks (``top``: highest first, ``lowest``, ``longest``): the
#: words and the kind of ``not_in_<rank>_<policy>``, over ``fraction``, ``column``, ``value`` and ``cut``
RANKED = {
    "top": ("not in the top {fraction:.0%} by {column} ({column} {value:.4g} < {cut:.4g})",
            "not in the top {fraction:.0%} by {column}"),
    "lowest": ("not in the lowest {fraction:.0%} by {column} ({column} {value:.4g} > {cut:.4g})",
               "not in the lowest {fraction:.0%} by {column}"),
    "longest": ("not in the longest {fraction:.0%} ({column} {value:.4g} < {cut:.4g})",
                "not in the longest {fraction:.0%}"),
}

UNLIKE = "unlike the validation set"  # the sentence of a suspect score no detector explains


def kinds_of(codes: Sequence[str | None], whys: Sequence[str | None], params: Mapping[str, Any]) -> list[str]:
    """The kind of each row's reason ("" for a kept row, whose code is empty), from its code, the detector's
    sentence (``suspect_reason``; only the suspect form reads it) and the policy's parameters ``params``
    (``fraction``, ``threshold``, the baseline's ``column``)."""
    return [Reason(c, {**params, "why": w or UNLIKE}).kind() if c else "" for c, w in zip(codes, whys, strict=True)]
