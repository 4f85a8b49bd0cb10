"""The workspace's image store: one row per distinct image, keyed by the sha256 of its bytes.

Samples and validation sets refer to their images by content hash (the ``images`` column of
``samples`` and ``valset__<name>``); the bytes live here once, however many samples (or releases) use
them. Rows are only ever added (merge on ``sha256``, existing rows kept): a hash always resolves to the
same bytes, so a release that lists hashes stays reproducible without copying any image.

Releases reference images by content hash rather than copying them: every release of a refresh
schedule would otherwise copy the same pictures again (a release is cut per run), while the table is
add-only, so a hash in a release's ``images`` column resolves to exactly the bytes that were valued for as
long as the workspace exists. :func:`export_images` materialises them as files for a trainer that reads
the release elsewhere; :func:`attach_image_data` gives samples read back from the store their bytes.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from valuegate.engine.sample import Sample
from valuegate.errors import ValuegateError
from valuegate.storage import schemas
from valuegate.storage.lance import sql_in
from valuegate.storage.store import Store

__all__ = ["attach_image_data", "export_images", "image_rows", "images_exist", "images_uri", "read_image_data",
           "read_images", "store_sample_images", "write_images"]


def images_uri(ws: Store) -> str:
    """Where the image table lives."""
    return f"{ws.uri}/{schemas.IMAGES}.lance"


def images_exist(ws: Store) -> bool:
    """Whether any image was ever stored."""
    return ws.table_exists(schemas.IMAGES)


def write_images(ws: Store, rows: list[dict]) -> int:
    """Store images (``sha256``, ``data``, ``width``, ``height``, ``format``, ``mode``) not stored yet.

    Returns:
        how many distinct hashes were given.
    """
    uniq = {r["sha256"]: r for r in rows}
    if not uniq:
        return 0
    ws.ensure(schemas.IMAGES, schemas.images_schema)
    ws.upsert(schemas.IMAGES, pa.Table.from_pylist(list(uniq.values()), schema=schemas.images_schema), "sha256",
              update=False)
    return len(uniq)


def read_images(ws: Store, hashes: list[str], columns: list[str] | None = None,
                chunk: int = 500) -> dict[str, dict]:
    """Rows of the image table by hash (missing hashes are absent from the answer)."""
    want = sorted(set(hashes))
    if not want or not images_exist(ws):
        return {}
    out: dict[str, dict] = {}
    for i in range(0, len(want), chunk):
        t = ws.read(schemas.IMAGES, where=sql_in("sha256", want[i:i + chunk]), columns=columns)
        out.update({r["sha256"]: r for r in t.to_pylist()})
    return out


def image_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """Rows of the ``images`` table for the images of ``samples`` (header read only: no pixel decode)."""
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
    missing = [s for s in samples if s.images and s.image_data is None]
    if missing:
        raise ValuegateError(f"{missing[0].source}: row {missing[0].row}: images: bytes not at hand to store")
    return write_images(ws, image_rows(samples))


def read_image_data(ws: Any, hashes: list[str]) -> dict[str, bytes]:
    """sha256 → bytes for the hashes the workspace holds."""
    return {h: r["data"] for h, r in read_images(ws, hashes, columns=["sha256", "data"]).items()}


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
    rows = read_images(ws, hashes)
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
