"""One normalised sample: the unit the engine encodes and values (docs/ARCHITECTURE.md §3), and the
:class:`Problem` of a row that cannot become one.

Ingestion (``tasks/ingest.py``) builds them from rows; the model side (``valuegate/engine/model.py``)
encodes them into token blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

SampleKind = Literal["prompt_response", "messages", "text"]


class Problem(NamedTuple):
    """Why a row cannot become a sample, as data: quarantine keeps its words (``str``) and counts its
    :attr:`kind`; nothing reads it back out of the words.

    Attributes:
        field: the field as the file names it (``prompt``, ``instruction``, ``conversations``, ``images``;
            ``line`` or ``element`` for a row that does not parse).
        what: what is wrong, in the same words for every row with this problem.
        at: where in the field, for a list or a line (``[2].role``, ``[0]``, `` 7``); "" for the whole field.
        detail: this row's own particulars (a value, a size, a parser's message); "" when none.
    """

    field: str
    what: str
    at: str = ""
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.field}{self.at}: {self.words}"

    @property
    def words(self) -> str:
        """What is wrong, with the row's detail: ``malformed JSON (Expecting value)``."""
        return self.what + (f" ({self.detail})" if self.detail else "")

    @property
    def kind(self) -> str:
        """What rows are counted by: the field and what is wrong, without the row's own place and detail."""
        return f"{self.field}: {self.what}"

    def named(self, names: dict[str, str]) -> Problem:
        """The same problem with the field named as ``names`` maps it (a canonical field → the file's column)."""
        return self._replace(field=names.get(self.field, self.field))


@dataclass(frozen=True)
class Sample:
    """One normalised sample.

    Attributes:
        kind: which of the three shapes it has.
        row: 0-based row in its source file.
        source: the file it came from.
        prompt: prompt text (``prompt_response``), else None.
        response: response text (``prompt_response``), else None.
        messages: chat turns ``({"role", "content"}, ...)`` (``messages``), else None; with images, a
            turn's content may be a list of ``{"type": "text", "text"}`` / ``{"type": "image"}`` parts.
        text: plain text (``text``), else None.
        images: sha256 of each image's bytes, in placeholder order (None: a text-only sample).
        image_data: the images' bytes, same order (None when not at hand, e.g. read back from the store
            before :func:`valuegate.storage.images.attach_image_data`).
    """

    kind: SampleKind
    row: int
    source: str
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    text: str | None = None
    images: tuple[str, ...] | None = None
    image_data: tuple[bytes, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def counted_field(self) -> str:
        """The field whose tokens the response-only loss counts (used in error messages)."""
        return {"prompt_response": "response", "messages": "messages", "text": "text"}[self.kind]

    @property
    def longest_field(self) -> tuple[str, str]:
        """The field of most characters and where in it, named when the sample is refused as oversized:
        ``("prompt", "")`` or ``("response", "")``, ``("messages", "[i]")`` (the longest turn), or
        ``("text", "")``."""
        if self.kind == "prompt_response":
            return ("prompt" if len(self.prompt or "") > len(self.response or "") else "response"), ""
        if self.kind == "messages" and self.messages:
            sizes = [len(m["content"]) if isinstance(m["content"], str)
                     else sum(len(p.get("text", "")) for p in m["content"]) for m in self.messages]
            return "messages", f"[{max(range(len(sizes)), key=sizes.__getitem__)}]"
        return self.counted_field, ""
