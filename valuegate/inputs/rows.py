"""Row checks: canonical sample fields (:mod:`valuegate.inputs.formats`) → a :class:`Sample`, or a :class:`Problem`.

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

Row checks return ``(sample, problem)`` verdicts (:func:`check_row`, :func:`row_sample`; the problem is data:
the field, what is wrong, where and the row's detail);
:func:`samples_from_records` turns the first refusal into a :class:`ValuegateError` that names the file,
the 0-based row and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from valuegate.engine.sample import Problem, Sample, SampleKind
from valuegate.errors import ValuegateError
from valuegate.inputs.formats import Format, canonical, not_a_string, recognise, source_names

CHAT_ROLES = ("system", "user", "assistant", "tool")
IMAGE_MARKER = "<image>"  # where an image goes in a prompt or a string chat turn


def sample_kind(columns: list[str], source: str, fields: dict[str, str] | None = None) -> SampleKind:
    """The sample shape a file's columns give its rows (Alpaca rows with a system or history turn are chats)."""
    name = recognise(columns, source, fields).name
    return {"sharegpt": "messages", "alpaca": "prompt_response"}.get(name, name)  # type: ignore[return-value]


def row_sample(record: dict[str, Any], fmt: Format, row: int, source: str) -> tuple[Sample | None, Problem | None]:
    """One raw row of a file of format ``fmt``: ``(sample, None)``, or ``(None, problem)`` naming the file's
    column."""
    kind, fields, why = canonical(record, fmt)
    if kind is None:
        return None, why
    sample, why = check_row(fields, kind, row, source)
    return sample, (why.named(source_names(fmt)) if why is not None else None)

def _image_parts(content: Any, j: int, role: str) -> tuple[list[dict[str, str]] | None, Problem | None]:
    """A turn's content as ``{"type": "text"|"image"}`` parts (``<image>`` markers of a string split out)."""
    if isinstance(content, str):
        pieces = content.split(IMAGE_MARKER)
        parts: list[dict[str, str]] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts, None
    if not isinstance(content, (list, tuple)):
        return None, Problem("messages", "content must be a string or a list of parts", f"[{j}]")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})  # the image itself comes from the row's images, in order
        else:
            return None, Problem("messages", "content parts must be {type: text, text} or {type: image}",
                                 f"[{j}].content[{k}]")
    return parts, None


def _parse_messages(value: Any, with_images: bool = False) -> tuple[tuple[dict[str, Any], ...] | None, Problem | None]:
    if isinstance(value, str):  # CSV or a JSON-encoded column
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, Problem("messages", "a string that is not a JSON list of turns")
    if not isinstance(value, (list, tuple)) or not value:
        return None, Problem("messages", "must be a non-empty list of {role, content} turns")
    turns = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict):
            return None, Problem("messages", "not an object with role and content", f"[{j}]")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            return None, Problem("messages", f"role must be one of {', '.join(CHAT_ROLES)}", f"[{j}]", f"got {role!r}")
        if with_images:
            parts, why = _image_parts(content, j, role)
            if parts is None:
                return None, why
            if role in ("assistant", "tool") and any(p["type"] == "image" for p in parts):
                return None, Problem("messages", "an image in an assistant or tool turn", f"[{j}]",
                                     "images go in user or system turns")
            if not any(p["type"] == "image" or p["text"].strip() for p in parts):
                return None, Problem("messages", "content must not be empty", f"[{j}]")
            has_image = any(p["type"] == "image" for p in parts)
            turns.append({"role": role, "content": parts if has_image else "".join(p["text"] for p in parts)})
            continue
        if not isinstance(content, str) or not content.strip():
            return None, Problem("messages", "content must be a non-empty string", f"[{j}]")
        turns.append({"role": role, "content": content})
    return tuple(turns), None


def _count_image_slots(sample_kind_: SampleKind, prompt: str | None, turns: tuple[dict[str, Any], ...] | None) -> int:
    if sample_kind_ == "prompt_response":
        return (prompt or "").count(IMAGE_MARKER)
    return sum(1 for t in turns or () if not isinstance(t["content"], str)
               for p in t["content"] if p["type"] == "image")


def _with_images(record: dict[str, Any], sample: Sample, source: str) -> tuple[Sample | None, Problem | None]:
    """Open and check the row's images and attach them (hashes and bytes) to its sample."""
    from valuegate.engine.images import images_from_field

    base = Path(source).parent if source and Path(source).suffix else None
    imgs, why = images_from_field(record.get("images"), base)
    if imgs is None:
        return None, why
    if not imgs:
        return sample, None
    if sample.kind == "text":
        return None, Problem("images", "text samples cannot carry images (give prompt/response or messages)")
    slots = _count_image_slots(sample.kind, sample.prompt, sample.messages)
    if sample.kind == "messages" and slots != len(imgs):
        return None, Problem("images", "not as many images as image placeholders in the user turns",
                             detail=f"{len(imgs)} images, {slots} placeholders: {{type: image}} parts or "
                             f"{IMAGE_MARKER} markers")
    if sample.kind == "prompt_response" and slots not in (0, len(imgs)):
        return None, Problem("images", f"not as many images as {IMAGE_MARKER} markers in the prompt",
                             detail=f"{len(imgs)} images, {slots} markers: give one each, or none")
    if sample.kind == "prompt_response" and IMAGE_MARKER in sample.response:
        return None, Problem("response", f"an {IMAGE_MARKER} marker in the response (images go in the prompt)")
    return Sample(sample.kind, sample.row, sample.source, prompt=sample.prompt, response=sample.response,
                  messages=sample.messages, images=tuple(i.sha256 for i in imgs),
                  image_data=tuple(i.data for i in imgs)), None


def check_row(record: dict[str, Any], kind: SampleKind, row: int, source: str) -> tuple[Sample | None, Problem | None]:
    """Validate one row. Returns ``(sample, None)`` when kept, ``(None, problem)`` when refused.

    A row with a non-empty ``images`` field has every image opened and checked (``valuegate/engine/images.py``);
    relative image paths are relative to the folder of ``source``.
    """
    sample, why = _check_fields(record, kind, row, source)
    if sample is None or record.get("images") is None:
        return sample, why
    return _with_images(record, sample, source)


def _check_fields(record: dict[str, Any], kind: SampleKind, row: int,
                  source: str) -> tuple[Sample | None, Problem | None]:
    if kind == "prompt_response":
        for name in ("prompt", "response"):
            v = record.get(name)
            if not isinstance(v, str):
                return None, not_a_string(name, v)
        if not record["response"].strip():
            return None, Problem("response", "empty")
        # an empty prompt is allowed (continuation data); the response alone counts
        return Sample(kind, row, source, prompt=record["prompt"], response=record["response"]), None
    if kind == "messages":
        turns, why = _parse_messages(record.get("messages"), _has_images(record.get("images")))
        if turns is None:
            return None, why
        return Sample(kind, row, source, messages=turns), None
    v = record.get("text")
    if not isinstance(v, str):
        return None, not_a_string("text", v)
    if not v.strip():
        return None, Problem("text", "empty")
    return Sample(kind, row, source, text=v), None


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
