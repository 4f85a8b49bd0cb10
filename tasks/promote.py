"""The ``promote`` step: move CURRENT to a release whose gate passed, forward only."""

from __future__ import annotations

from dataclasses import dataclass

from valuegate.settings import Settings
from valuegate.storage import releases as rstore
from valuegate.storage.store import open_store

# only the steps after scoring run this module: it stays out of the cached steps' code fingerprint
# (valuegate.flows.after_scoring)
AFTER_SCORING = True

__all__ = ["PromoteResult", "run"]


@dataclass(frozen=True)
class PromoteResult:
    """What :func:`run` did.

    Attributes:
        current (bool): whether the release became current.
        previous (str | None): promoted: the version it actually replaced (what the promotion found current,
            None: none was); not promoted: the newer release another run promoted meanwhile, which stays
            current.
        reason (str | None): why it was not promoted (``"not promoted: newer release vNNNN is current"``).
        message (str | None): not promoted: the full line for the run's log (how to roll back to it).
    """

    current: bool
    previous: str | None
    reason: str | None = None
    message: str | None = None


def run(settings: Settings, version: str) -> PromoteResult:
    """Promote release ``version`` of ``settings.release.name`` (only called after its gate passed).

    Raises:
        ValuegateError: ``version`` is not a complete release.
    """
    try:
        previous = rstore.promote(open_store(settings.workspace), settings.release.name, version)
    except rstore.NewerIsCurrent as newer:
        return PromoteResult(False, newer.current, newer.reason, str(newer))
    return PromoteResult(True, previous, None)
