"""Images of samples in a workspace: store them at ingestion, attach their bytes to samples read back
from the store, make them reachable from a release (by content hash) and export them for a consumer.

Releases reference images by content hash rather than copying them: every release of a refresh
schedule would otherwise copy the same pictures again (a release is cut per run), while the workspace's
``images`` table is add-only and keyed by the sha256 of the bytes, so a hash in a release's ``images``
column resolves to exactly the bytes that were valued for as long as the workspace exists.
:func:`export_images` materialises them as files for a trainer that reads the release elsewhere.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

from valuegate.engine.sample import Sample
from valuegate.errors import ValuegateError

__all__ = ["attach_image_data", "export_images", "image_rows", "read_image_data", "store_sample_images"]


def image_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """Rows of the ``images`` table for the images of ``samples`` (header read only: no pixel decode)."""
    from PIL import Image

    rows: dict[str, dict[str, Any]] = {}
    for s in samples:
        for sha, data in zip(s.images or (), s.image_data or (), strict=True):
            if sha in rows:
                continue
            with Image.open(io.BytesIO(data)) as img:
                rows[sha] = {"sha256": sha, "data": data, "width": img.width, "height": img.height,
                             "format": img.format or "unknown", "mode": img.mode}
    return list(rows.values())


def store_sample_images(ws: Any, samples: list[Sample]) -> int:
    """Store the images of ``samples`` (each needs its ``image_data``). Returns the distinct images."""
    from valuegate.storage import images as istore

    missing = [s for s in samples if s.images and s.image_data is None]
    if missing:
        raise ValuegateError(f"{missing[0].source}: row {missing[0].row}: images: bytes not at hand to store")
    return istore.write_images(ws, image_rows(samples))


def read_image_data(ws: Any, hashes: list[str]) -> dict[str, bytes]:
    """sha256 → bytes for the hashes the workspace holds."""
    from valuegate.storage import images as istore

    return {h: r["data"] for h, r in istore.read_images(ws, hashes, columns=["sha256", "data"]).items()}


def attach_image_data(ws: Any, samples: list[Sample]) -> list[Sample]:
    """``samples`` with the bytes of their images filled in from the workspace (others unchanged).

    Raises:
        ValuegateError: an image hash the workspace does not hold (names the sample's source and row).
    """
    need = sorted({h for s in samples if s.images and s.image_data is None for h in s.images})
    if not need:
        return samples
    found = read_image_data(ws, need)
    out = []
    for s in samples:
        if s.images and s.image_data is None:
            lost = [h for h in s.images if h not in found]
            if lost:
                raise ValuegateError(f"{s.source}: row {s.row}: images: image {lost[0][:16]}… is not in the "
                                     f"workspace's image table; ingest its source again")
            s = replace(s, image_data=tuple(found[h] for h in s.images))
        out.append(s)
    return out


def export_images(ws: Any, hashes: list[str], dest: str | Path) -> dict[str, Path]:
    """Write the images of ``hashes`` as ``<dest>/<sha256>.<ext>`` (existing files kept). Returns the paths.

    Raises:
        ValuegateError: a hash the workspace does not hold.
    """
    from valuegate.storage import images as istore

    rows = istore.read_images(ws, hashes)
    lost = sorted(set(hashes) - set(rows))
    if lost:
        raise ValuegateError(f"image {lost[0]} is not in the workspace's image table ({len(lost)} missing)")
    out_dir = Path(dest)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for sha, r in rows.items():
        ext = {"JPEG": "jpg", "unknown": "bin"}.get(r["format"], str(r["format"]).lower())
        p = out_dir / f"{sha}.{ext}"
        if not p.exists():
            tmp = p.with_name(f".{p.name}.tmp")
            tmp.write_bytes(r["data"])
            tmp.replace(p)
        paths[sha] = p
    return paths
