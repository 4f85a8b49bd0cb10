"""A JSON-able stand-in of any value a source row may hold (what quarantine's ``raw`` and nested metadata keep)."""

from __future__ import annotations

import hashlib
from typing import Any


def describe(v: Any) -> Any:
    """A JSON-able stand-in of any value: bytes by length and sha256 (never inlined), other non-JSON
    values by ``str``, lists and objects recursively (for quarantine's ``raw`` and nested values)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes, sha256 {hashlib.sha256(bytes(v)).hexdigest()}>"
    if isinstance(v, list):
        return [describe(x) for x in v]
    if isinstance(v, dict):
        return {k: describe(x) for k, x in v.items()}
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
