"""A sample's identity: its normalised record as stored and the content id that names it everywhere.

Two rows are one sample when their content is the same after representation-only normalisation (Unicode NFC,
``\\r\\n`` → ``\\n``, messages as canonical JSON); metadata never enters the id, images count by the
sha256 of their bytes.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

from valuegate.engine.sample import Sample

CONTENT_FIELDS = ("kind", "prompt", "response", "messages", "text", "images")


def _norm_text(s: str | None) -> str | None:
    """Unicode NFC and ``\\r\\n`` → ``\\n``: representation only, never the words or spacing."""
    if s is None:
        return None
    return unicodedata.normalize("NFC", s.replace("\r\n", "\n"))


def sample_record(sample: Sample) -> dict[str, Any]:
    """The normalised content of a sample as stored (``messages`` as canonical JSON)."""
    msgs = None
    if sample.messages is not None:
        msgs = json.dumps([{"role": m["role"], "content": _norm_content(m["content"])} for m in sample.messages],
                          ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return {"kind": sample.kind, "prompt": _norm_text(sample.prompt), "response": _norm_text(sample.response),
            "messages": msgs, "text": _norm_text(sample.text), "images": list(sample.images or ())}


def _norm_content(content: Any) -> Any:
    if isinstance(content, str):
        return _norm_text(content)
    return [{**p, "text": _norm_text(p["text"])} if p.get("type") == "text" else dict(p) for p in content]


def sample_id(record: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a normalised record's content fields (images by the sha256
    of their bytes, never by path: the same picture under two names is one sample)."""
    canon = json.dumps({k: record.get(k) for k in CONTENT_FIELDS}, ensure_ascii=False, sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def sample_from_record(record: dict[str, Any], row: int = 0, source: str = "store") -> Sample:
    """Rebuild a :class:`Sample` from a stored record (inverse of :func:`sample_record`)."""
    msgs = tuple(json.loads(record["messages"])) if record.get("messages") else None
    return Sample(record["kind"], row, source, prompt=record.get("prompt"), response=record.get("response"),
                  messages=msgs, text=record.get("text"), images=tuple(record.get("images") or ()) or None)
