"""valuegate's local cache root (the embedded model, weight digests, cached results of object-store
workspaces)."""

from __future__ import annotations

import os
from pathlib import Path


def valuegate_home() -> Path:
    """``$VALUEGATE_HOME`` if set, else ``$XDG_CACHE_HOME/valuegate``, else ``~/.cache/valuegate``.

    A relative ``$XDG_CACHE_HOME`` is ignored, as the XDG spec says it must be.
    """
    env = os.environ.get("VALUEGATE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).expanduser().is_absolute():
        return Path(xdg).expanduser() / "valuegate"
    return Path.home() / ".cache" / "valuegate"
