"""What a cache key reads of a workspace: its URI and its tables' versions (read only).

The flows key their cached steps on these (``flows/refresh.py``, ``flows/validation.py``) without opening
a workspace themselves.
"""

from __future__ import annotations

from valuegate.storage.store import open_store

__all__ = ["table_versions", "workspace_uri"]


def workspace_uri(workspace: str) -> str:
    """The URI of the workspace ``workspace`` names (a directory or an object-store URI), as stored rows
    and cache keys record it."""
    return open_store(workspace).uri


def table_versions(workspace: str, names: list[str]) -> dict[str, int | None]:
    """The latest Lance version of each table (None: not created yet). Any commit moves it, so a key holding
    it is never reused once a table changed."""
    ws = open_store(workspace)
    return {n: (ws.version(n) if ws.table_exists(n) else None) for n in names}
