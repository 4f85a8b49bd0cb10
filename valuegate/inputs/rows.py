"""Row checks: canonical sample fields (:mod:`valuegate.inputs.formats`) → a :class:`Sample`, or a reason.

A sample is one of three shapes:

- ``prompt`` + ``response``: rendered with the model's chat template (user turn = the prompt, assistant
  turn = the response) or as ``prompt + response`` with ``extract.template = "none"``
  (:func:`valuegate.engine.model.encode_sample`);
- ``messages``: a chat list of ``{role, content}``, rendered with the tokenizer's chat template;
- ``text``: plain text.

Prompt/response and chat samples may carry images (an ``images`` column; see ``valuegate/engine/images.py``): a
prompt marks where each image goes with ``<image>`` (none: the images go before the prompt), a chat puts
them in its user/system turns, as ``{"type": "image"}`` parts of a list content (the processors' chat
convention) or as ``<image>`` markers in a string content. Every image is opened and checked with Pillow;
a bad image refuses its row with the reason.

Row checks return ``(sample, reason)`` verdicts (:func:`check_row`, :func:`row_sample`);
:func:`samples_from_records` turns the first refusal into a :class:`ValuegateError` that names the file,
the 0-based row and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from valuegate.engine.sample import Sample, SampleKind
from valuegate.errors import ValuegateError
from valuegate.inputs.formats import Format, canonical, recognise, source_reason

CHAT_ROLES = ("system", "user", "assistant", "tool")
IMAGE_MARKER = "<image>"  # where an image goes in a prompt or a string chat turn


def sample_kind(columns: list[str], source: str, fields: dict[str, str] | None = None) -> SampleKind:
    """The sample shape a file's columns give its rows (Alpaca rows with a system or history turn are chats)."""
    name = recognise(columns, source, fields).name
    return {"sharegpt": "messages", "alpaca": "prompt_response"}.get(name, name)  # type: ignore[return-value]


def row_sample(record: dict[str, Any], fmt: Format, row: int, source: str) -> tuple[Sample | None, str]:
    """One raw row of a file of format ``fmt``: its sample, or ``(None, "column: reason")`` naming the
    file's column."""
    kind, fields, why = canonical(record, fmt)
    if kind is None:
        return None, why
    sample, why = check_row(fields, kind, row, source)
    return sample, (source_reason(why, fmt) if sample is None else "")

def _image_parts(content: Any, j: int, role: str) -> tuple[list[dict[str, str]] | None, str]:
    """A turn's content as ``{"type": "text"|"image"}`` parts (``<image>`` markers of a string split out)."""
    if isinstance(content, str):
        pieces = content.split(IMAGE_MARKER)
        parts: list[dict[str, str]] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts, ""
    if not isinstance(content, (list, tuple)):
        return None, f"messages[{j}].content must be a string or a list of parts"
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})  # the image itself comes from the row's images, in order
        else:
            return None, f"messages[{j}].content[{k}] must be {{type: text, text}} or {{type: image}}"
    return parts, ""


def _parse_messages(value: Any, with_images: bool = False) -> tuple[tuple[dict[str, Any], ...] | None, str]:
    if isinstance(value, str):  # CSV or a JSON-encoded column
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "messages is a string that is not a JSON list of turns"
    if not isinstance(value, (list, tuple)) or not value:
        return None, "messages must be a non-empty list of {role, content} turns"
    turns = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict):
            return None, f"messages[{j}] is not an object with role and content"
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            return None, f"messages[{j}].role must be one of {', '.join(CHAT_ROLES)} (got {role!r})"
        if with_images:
            parts, why = _image_parts(content, j, role)
            if parts is None:
                return None, why
            if role in ("assistant", "tool") and any(p["type"] == "image" for p in parts):
                return None, f"messages[{j}]: an image in a {role} turn (images go in user or system turns)"
            if not any(p["type"] == "image" or p["text"].strip() for p in parts):
                return None, f"messages[{j}].content must not be empty"
            has_image = any(p["type"] == "image" for p in parts)
            turns.append({"role": role, "content": parts if has_image else "".join(p["text"] for p in parts)})
            continue
        if not isinstance(content, str) or not content.strip():
            return None, f"messages[{j}].content must be a non-empty string"
        turns.append({"role": role, "content": content})
    return tuple(turns), ""


def _count_image_slots(sample_kind_: SampleKind, prompt: str | None, turns: tuple[dict[str, Any], ...] | None) -> int:
    if sample_kind_ == "prompt_response":
        return (prompt or "").count(IMAGE_MARKER)
    return sum(1 for t in turns or () if not isinstance(t["content"], str)
               for p in t["content"] if p["type"] == "image")


def _with_images(record: dict[str, Any], sample: Sample, source: str) -> tuple[Sample | None, str]:
    """Open and check the row's images and attach them (hashes and bytes) to its sample."""
    from valuegate.engine.images import images_from_field

    base = Path(source).parent if source and Path(source).suffix else None
    imgs, why = images_from_field(record.get("images"), base)
    if imgs is None:
        return None, why
    if not imgs:
        return sample, ""
    if sample.kind == "text":
        return None, "images: text samples cannot carry images (give prompt/response or messages)"
    slots = _count_image_slots(sample.kind, sample.prompt, sample.messages)
    if sample.kind == "messages" and slots != len(imgs):
        return None, (f"images: {len(imgs)} images but {slots} image placeholders in the user turns "
                      f"({{type: image}} parts or {IMAGE_MARKER} markers)")
    if sample.kind == "prompt_response" and slots not in (0, len(imgs)):
        return None, f"images: {len(imgs)} images but {slots} {IMAGE_MARKER} markers in the prompt (give one each, or none)"
    if sample.kind == "prompt_response" and IMAGE_MARKER in sample.response:
        return None, f"response: an {IMAGE_MARKER} marker in the response (images go in the prompt)"
    return Sample(sample.kind, sample.row, sample.source, prompt=sample.prompt, response=sample.response,
                  messages=sample.messages, images=tuple(i.sha256 for i in imgs),
                  image_data=tuple(i.data for i in imgs)), ""


def check_row(record: dict[str, Any], kind: SampleKind, row: int, source: str) -> tuple[Sample | None, str]:
    """Validate one row. Returns ``(sample, "")`` when kept, ``(None, "field: reason")`` when refused.

    A row with a non-empty ``images`` field has every image opened and checked (``valuegate/engine/images.py``);
    relative image paths are relative to the folder of ``source``.
    """
    sample, why = _check_fields(record, kind, row, source)
    if sample is None or record.get("images") is None:
        return sample, why
    return _with_images(record, sample, source)


def _check_fields(record: dict[str, Any], kind: SampleKind, row: int, source: str) -> tuple[Sample | None, str]:
    if kind == "prompt_response":
        for name in ("prompt", "response"):
            v = record.get(name)
            if not isinstance(v, str):
                return None, f"{name}: expected a string, got {type(v).__name__ if v is not None else 'null'}"
        if not record["response"].strip():
            return None, "response: empty"
        # an empty prompt is allowed (continuation data); the response alone counts
        return Sample(kind, row, source, prompt=record["prompt"], response=record["response"]), ""
    if kind == "messages":
        turns, why = _parse_messages(record.get("messages"), _has_images(record.get("images")))
        if turns is None:
            return None, f"messages: {why}"
        return Sample(kind, row, source, messages=turns), ""
    v = record.get("text")
    if not isinstance(v, str):
        return None, f"text: expected a string, got {type(v).__name__ if v is not None else 'null'}"
    if not v.strip():
        return None, "text: empty"
    return Sample(kind, row, source, text=v), ""


def _has_images(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip() not in ("", "[]")
    return not isinstance(value, (list, tuple)) or len(value) > 0



def samples_from_records(records: list[dict[str, Any]], source: str,
                         fields: dict[str, str] | None = None) -> list[Sample]:
    """All rows as samples; the first refused row raises an error naming file, row and field.

    Args:
        records: the raw rows. source: file name for messages. fields: a column mapping
            (:mod:`valuegate.inputs.formats`).
    """
    if not records:
        raise ValuegateError(f"{source}: the file has no rows")
    fmt = recognise(list(dict.fromkeys(k for r in records for k in r)), source, fields)
    out = []
    for i, record in enumerate(records):
        sample, why = row_sample(record, fmt, i, source)
        if sample is None:
            raise ValuegateError(f"{source}: row {i}: {why}")
        out.append(sample)
    return out


def samples_from_frame(df: pl.DataFrame, source: str, records: list[dict[str, Any]] | None = None,
                       fields: dict[str, str] | None = None) -> list[Sample]:
    """All rows of a frame as samples (see :func:`samples_from_records`); ``records``: the raw rows when
    the frame may have coerced them (JSON lines), checked instead of the frame."""
    if df.height == 0:
        raise ValuegateError(f"{source}: the file has no rows")
    return samples_from_records(records if records is not None else df.to_dicts(), source, fields)


def read_samples(path: str | os.PathLike, fields: dict[str, str] | None = None) -> tuple[pl.DataFrame, list[Sample]]:
    """Read a source (any of :mod:`valuegate.inputs.readers`) and validate every row.

    Returns:
        the frame as read (every input column, in order) and one sample per row.
    """
    from valuegate.inputs.readers import read_records

    records, _ = read_records(path)
    if not records:
        raise ValuegateError(f"{path}: the file has no rows")
    try:
        df = pl.DataFrame(records, infer_schema_length=None, strict=False)
    except Exception as exc:  # polars raises many types; the user needs the file and the cause
        raise ValuegateError(f"{path}: cannot be read as a table: {exc}") from exc
    return df, samples_from_records(records, str(path), fields)
