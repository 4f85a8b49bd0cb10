"""Versioned validation sets: ``valset__<name>`` tables (one Lance version per registration, tagged ``vN``)
and the ``valset_versions`` registry."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from valuegate.errors import ValuegateError
from valuegate.names import check_name
from valuegate.storage import schemas
from valuegate.storage.lance import sql_str
from valuegate.storage.store import Store


def valset_uri(ws: Store, name: str) -> str:
    """Where a validation set's table lives."""
    return f"{ws.uri}/{schemas.valset_table(name)}.lance"


def valset_exists(ws: Store, name: str) -> bool:
    """Whether any version of ``name`` was registered."""
    return bool(read_valset_versions(ws, name))


def read_valset_versions(ws: Store, name: str | None = None) -> list[dict]:
    """Registry rows (of one set), oldest first."""
    if not ws.table_exists(schemas.VALSET_VERSIONS):
        return []
    where = None if name is None else f"name = {sql_str(name)}"
    rows = ws.read(schemas.VALSET_VERSIONS, where=where).to_pylist()
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


class VersionTaken(ValuegateError):
    """Another registration of the same set tagged the version this one was about to take."""


def write_valset_version(ws: Store, name: str, rows: pa.Table, content_hash: str, source: str) -> dict:
    """Register a new version: overwrite the set's table (a new Lance version), tag it ``vN``, record it.

    The tag is the claim: when another registration of ``name`` already tagged ``vN`` (two runs registering
    at once), nothing is recorded and :class:`VersionTaken` is raised, for the caller to re-read the registry
    (:func:`valuegate.tasks.validation_set.register_valset` waits for the other's record and returns it when the
    content is the same). An overwrite that lost the race only adds an untagged Lance version.

    Raises:
        VersionTaken: ``vN`` is tagged already, or the registry holds this content already (recorded by
            another run since the caller looked).
    """
    previous = read_valset_versions(ws, name)
    version = 1 + max((r["version"] for r in previous), default=0)
    table = schemas.valset_table(name)
    tag = f"v{version}"
    if any(r["content_hash"] == content_hash and not r["pruned"] for r in previous):
        raise VersionTaken(f"validation set {name}: this content was just registered by another run")
    if ws.table_exists(table) and tag in ws.tags(table):
        raise VersionTaken(f"validation set {name}: {tag} is being registered by another run")
    lance_version = ws.overwrite(table, rows.cast(schemas.valset_schema), schemas.valset_schema)
    try:
        ws.tag(table, tag, lance_version)
    except ValuegateError as exc:
        if tag in ws.tags(table):
            raise VersionTaken(f"validation set {name}: {tag} is being registered by another run") from exc
        raise
    record = {"name": name, "version": version, "lance_version": lance_version, "content_hash": content_hash,
              "rows": rows.num_rows, "source": source, "at": dt.datetime.now(dt.timezone.utc), "pruned": False}
    ws.ensure(schemas.VALSET_VERSIONS, schemas.valset_versions_schema)
    ws.append(schemas.VALSET_VERSIONS, pa.Table.from_pylist([record], schema=schemas.valset_versions_schema),
              schemas.valset_versions_schema)
    return record


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@vN`` / ``name@N`` → (name, N or None for the latest)."""
    name, _, ver = ref.partition("@")
    if not name:
        raise ValuegateError(f"validation set reference {ref!r}: expected NAME or NAME@vN")
    check_name(name, "validation set")
    if not ver:
        return name, None
    digits = ver[1:] if ver.lower().startswith("v") else ver
    if not digits.isdigit():
        raise ValuegateError(f"validation set reference {ref!r}: the version must look like v3")
    return name, int(digits)


def read_valset(ws: Store, ref: str) -> tuple[dict, pa.Table]:
    """The registry record and the rows of ``name@vN`` (latest when no version is given).

    Raises:
        ValuegateError: unknown set or version, or a pruned version.
    """
    name, version = parse_ref(ref)
    versions = read_valset_versions(ws, name)
    if not versions:
        known = sorted({r["name"] for r in read_valset_versions(ws)})
        raise ValuegateError(f"no validation set named {name!r} in {ws.uri}"
                             + (f" (known: {', '.join(known)})" if known else "; register one with "
                                "`valuegate valset register NAME FILE`"))
    if version is None:
        record = versions[-1]
    else:
        match = [r for r in versions if r["version"] == version]
        if not match:
            raise ValuegateError(f"{name}@v{version} does not exist (versions: "
                                 + ", ".join(f"v{r['version']}" for r in versions) + ")")
        record = match[0]
    if record["pruned"]:
        raise ValuegateError(f"{name}@v{record['version']} was pruned")
    rows = ws.read(schemas.valset_table(name), version=f"v{record['version']}")
    return record, rows


def prune_valset_version(ws: Store, name: str, version: int) -> dict:
    """Prune ``name@vN``: drop its tag (so Lance may clean up its data) and mark it pruned in the registry.

    Scores computed against it keep their ``name@vN`` provenance; reading the version afterwards is an
    error that says it was pruned.
    """
    rows = [r for r in read_valset_versions(ws, name) if r["version"] == version]
    if not rows:
        raise ValuegateError(f"{name}@v{version} does not exist")
    record = {**rows[0], "pruned": True}
    table = schemas.valset_table(name)
    if f"v{version}" in ws.tags(table):
        ws.delete_tag(table, f"v{version}")
    ws.upsert(schemas.VALSET_VERSIONS, pa.Table.from_pylist([record], schema=schemas.valset_versions_schema),
              on=["name", "version"])
    return record
