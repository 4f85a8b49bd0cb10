"""The workspace's image store: one row per distinct image, keyed by the sha256 of its bytes.

Samples and validation sets refer to their images by content hash (the ``images`` column of
``samples`` and ``valset__<name>``); the bytes live here once, however many samples (or releases) use
them. Rows are only ever added (merge on ``sha256``, existing rows kept): a hash always resolves to the
same bytes, so a release that lists hashes stays reproducible without copying any image.
"""

from __future__ import annotations

import pyarrow as pa

from valuegate.storage import schemas
from valuegate.storage.lance import Workspace, sql_in


def images_uri(ws: Workspace) -> str:
    """Where the image table lives."""
    return f"{ws.uri}/{schemas.IMAGES}.lance"


def images_exist(ws: Workspace) -> bool:
    """Whether any image was ever stored."""
    return ws.table_exists(schemas.IMAGES)


def write_images(ws: Workspace, rows: list[dict]) -> int:
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


def read_images(ws: Workspace, hashes: list[str], columns: list[str] | None = None,
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
