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


def prefect_home(environ: dict[str, str] | os._Environ) -> Path | None:
    """The ``PREFECT_HOME`` valuegate's commands set when the user chose none: ``<valuegate_home()>/prefect``,
    so that the Prefect database, logs and profiles of valuegate's runs and its local server are its own, not
    the ``~/.prefect`` every other Prefect user and project on the machine shares.

    None (Prefect's own choice stands) when ``PREFECT_HOME`` or ``PREFECT_PROFILES_PATH`` is set, or when the
    profiles of ``~/.prefect`` name an API (``PREFECT_API_URL``: a Prefect Cloud login or a server the user
    runs), which must stay in force.
    """
    if environ.get("PREFECT_HOME") or environ.get("PREFECT_PROFILES_PATH"):
        return None
    profiles = Path.home() / ".prefect" / "profiles.toml"
    try:
        if "PREFECT_API_URL" in profiles.read_text(encoding="utf-8", errors="replace"):
            return None
    except OSError:
        pass
    return valuegate_home() / "prefect"
