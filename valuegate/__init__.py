"""valuegate: forward-only data valuation (For-Value) of LLM fine-tuning data.

``import valuegate`` is cheap: the API's names load on first use.

- :func:`valuegate.score` (``train``, ``valid`` → polars.DataFrame): value every training sample, as
  ``valuegate score`` (:mod:`valuegate.api`).
- :func:`valuegate.load_release` (workspace, name → polars.DataFrame): the kept rows of the current release.
- :class:`valuegate.Workspace`: datasets, validation sets, features, scores runs and releases in a store.
- :class:`valuegate.Settings`, :func:`valuegate.load_settings`, :class:`valuegate.ValuegateError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"score": "valuegate.api", "load_release": "valuegate.api", "Workspace": "valuegate.api", "Settings": "valuegate.settings",
         "load_settings": "valuegate.settings", "ValuegateError": "valuegate.errors"}
__all__ = ["Settings", "ValuegateError", "Workspace", "__version__", "load_release", "load_settings", "score"]

if TYPE_CHECKING:
    from valuegate.api import Workspace, load_release, score
    from valuegate.errors import ValuegateError
    from valuegate.settings import Settings, load_settings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'valuegate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
