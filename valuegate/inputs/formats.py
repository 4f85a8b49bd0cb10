"""Which format a file's columns are, and each row in the canonical sample fields (docs/your-data.md).

A file is one of these formats, recognised from its columns in this order:

======================  ===============================================  ================================
format                  columns                                          sample
======================  ===============================================  ================================
``prompt_response``     ``prompt``, ``response`` (``system`` optional)   prompt/response
``messages``            ``messages``: OpenAI ``[{role, content}]``       chat
``sharegpt``            ``conversations``: ``[{from, value}]``           chat
``alpaca``              ``instruction``, ``output`` (``input``,          prompt/response
                        ``system``, ``history`` optional)
``text``                ``text``                                         plain text
======================  ===============================================  ================================

A column mapping (``[data.fields]``, ``valuegate.score(..., fields=...)``, ``valuegate score --field
prompt=question``) names the source column of a canonical field (:data:`MAPPABLE`): ``{"prompt":
"question", "response": "answer"}`` reads ``question`` as the prompt. It applies to a file that has every
column it names; a file that has some of them only is an error naming the missing ones.

Canonical fields (what :func:`valuegate.inputs.rows.check_row` checks): ``prompt`` + ``response``,
``messages`` (``({role, content}, ...)`` with roles system/user/assistant/tool), or ``text``, each with
an optional ``images``. An Alpaca row is ``prompt = instruction`` (``instruction + "\\n\\n" + input`` when
``input`` is not empty), ``response = output``; with a non-empty ``system`` or ``history`` (a list of
``[instruction, output]`` pairs before it, as LLaMA-Factory reads it) it is a chat: the system turn,
the history's turns, then the instruction and the output. A prompt/response row with a non-empty
``system`` is a chat the same way. ShareGPT roles: human/user → user, gpt/assistant/model/chatgpt/bard →
assistant, system → system, tool/observation/function/function_call → tool (turns may also be
``{role, content}``); a ``system`` column becomes a first system turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from valuegate.engine.sample import Problem, SampleKind
from valuegate.errors import ValuegateError

# the canonical fields a column mapping may name (key: canonical field, value: the file's column)
MAPPABLE = ("prompt", "response", "system", "messages", "text", "images")
FORMAT_WORDS = {"prompt_response": "prompt/response", "messages": "chat (OpenAI messages)",
                "sharegpt": "chat (ShareGPT conversations)", "alpaca": "Alpaca (instruction/input/output)",
                "text": "plain text"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function": "tool", "function_call": "tool"}
# the columns of each format that make the sample (every other column is carried through as metadata)
FORMAT_COLUMNS = {"prompt_response": ("prompt", "response", "system"), "messages": ("messages",),
                  "sharegpt": ("conversations", "system"), "alpaca": ("instruction", "input", "output", "system",
                                                                      "history"), "text": ("text",)}
# plausible source columns of each canonical field, for `valuegate init`'s guess of a mapping (first wins)
GUESSES = {"prompt": ("question", "query", "problem", "input", "instruction", "prompt", "q", "source", "context"),
           "response": ("answer", "output", "response", "completion", "solution", "target", "a", "chosen")}


@dataclass(frozen=True)
class Format:
    """A file's format and the column mapping in effect.

    Attributes:
        name: one of :data:`FORMAT_WORDS`.
        fields: canonical field → the file's column, for the fields the mapping renames (empty: none).
    """

    name: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def words(self) -> str:
        """The format in words, with the mapping: ``"prompt/response (prompt = question, response = answer)"``."""
        mapped = ", ".join(f"{k} = {v}" for k, v in self.fields.items())
        return FORMAT_WORDS[self.name] + (f" ({mapped})" if mapped else "")

    @property
    def columns(self) -> set[str]:
        """The file's columns that make the sample (not carried as metadata; ``images`` is handled apart)."""
        return {self.fields.get(c, c) for c in FORMAT_COLUMNS[self.name]}

    def source_name(self, canonical: str) -> str:
        """The file's column behind a canonical field (itself when not mapped)."""
        return self.fields.get(canonical, canonical)


def recognise(columns: list[str] | set[str], source: str, fields: dict[str, str] | None = None) -> Format:
    """The format of a file with these columns (see the module docstring for the order).

    Raises:
        ValuegateError: a mapping naming columns the file lacks (some, not all), or no format's columns,
            naming the file, the columns it has and how to map them.
    """
    cols = set(columns)
    fields = dict(fields or {})
    bad = [k for k in fields if k not in MAPPABLE]
    if bad:
        raise ValuegateError(f"data.fields: unknown field {bad[0]!r}; map one of {', '.join(MAPPABLE)}")
    present = {k: v for k, v in fields.items() if v in cols}
    if fields and present and len(present) < len(fields):
        missing = sorted(v for v in fields.values() if v not in cols)
        raise ValuegateError(f"{source}: data.fields names column(s) {', '.join(map(repr, missing))} the file "
                             f"lacks; found {sorted(cols)}")
    mapping = fields if present else {}
    named = {k for k in cols if k not in mapping.values()} | set(mapping)
    if {"prompt", "response"} <= named:
        return Format("prompt_response", mapping)
    for name, needed in (("messages", {"messages"}), ("sharegpt", {"conversations"}),
                         ("alpaca", {"instruction", "output"}), ("text", {"text"})):
        if needed <= named:
            return Format(name, mapping)
    guess = guess_fields(sorted(cols))
    hint = (f" (e.g. prompt = {guess['prompt']!r}, response = {guess['response']!r})" if guess else "")
    raise ValuegateError(
        f"{source}: no sample fields: expected columns 'prompt' and 'response', 'messages' (OpenAI chat), "
        f"'conversations' (ShareGPT), 'instruction' and 'output' (Alpaca), or 'text'; found "
        f"{sorted(cols) or 'no columns'}. Name yours in the config's [data.fields]{hint}, or "
        "--field prompt=COLUMN --field response=COLUMN")


def guess_fields(columns: list[str]) -> dict[str, str] | None:
    """A prompt/response mapping from common column names (:data:`GUESSES`, case-insensitive), or None."""
    lower = {c.lower(): c for c in columns}
    out: dict[str, str] = {}
    for canonical, names in GUESSES.items():
        hit = next((lower[n] for n in names if n in lower and lower[n] not in out.values()), None)
        if hit is None:
            return None
        out[canonical] = hit
    return out


def not_a_string(name: str, v: Any) -> Problem:
    """The problem of a field ``name`` that holds ``v``, not a string."""
    return Problem(name, "expected a string", detail=f"got {type(v).__name__ if v is not None else 'null'}")


def _string(record: dict[str, Any], name: str) -> tuple[str | None, Problem | None]:
    v = record.get(name)
    return (v, None) if isinstance(v, str) else (None, not_a_string(name, v))


def _optional_string(record: dict[str, Any], name: str) -> tuple[str, Problem | None]:
    v = record.get(name)
    return (v or "", None) if v is None or isinstance(v, str) else ("", not_a_string(name, v))


def _history(value: Any, name: str) -> tuple[list[dict[str, str]] | None, Problem | None]:
    if value is None or (isinstance(value, (list, tuple)) and not value) or value == "":
        return [], None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, Problem(name, "a string that is not a JSON list of [instruction, output] pairs")
    if not isinstance(value, (list, tuple)):
        return None, Problem(name, "expected a list of [instruction, output] pairs")
    turns = []
    for j, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            return None, Problem(name, "expected a pair of strings [instruction, output]", f"[{j}]")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns, None


def _chat_or_pair(prompt: str, response: str, system: str, history: list[dict[str, str]],
                  images: Any) -> tuple[SampleKind, dict[str, Any]]:
    if not system.strip() and not history:
        return "prompt_response", {"prompt": prompt, "response": response, "images": images}
    turns = ([{"role": "system", "content": system}] if system.strip() else []) + history + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return "messages", {"messages": turns, "images": images}


def canonical(record: dict[str, Any], fmt: Format) -> tuple[SampleKind | None, dict[str, Any], Problem | None]:
    """One row in the canonical fields.

    Returns:
        ``(kind, fields, None)``, or ``(None, {}, problem)`` for a row whose format fields are malformed (named
        by the file's column).
    """
    f = fmt.source_name
    images = record.get(f("images"))
    if fmt.name == "text":
        return "text", {"text": record.get(f("text")), "images": images}, None
    if fmt.name == "messages":
        return "messages", {"messages": record.get(f("messages")), "images": images}, None
    if fmt.name == "prompt_response":
        system, why = _optional_string(record, f("system"))
        if why is not None:
            return None, {}, why
        p, r = record.get(f("prompt")), record.get(f("response"))
        if system.strip() and isinstance(p, str) and isinstance(r, str):
            return (*_chat_or_pair(p, r, system, [], images), None)
        return "prompt_response", {"prompt": p, "response": r, "images": images}, None
    if fmt.name == "alpaca":
        instruction, why = _string(record, "instruction")
        output, why2 = _string(record, "output")
        extra, why3 = _optional_string(record, "input")
        system, why4 = _optional_string(record, "system")
        history, why5 = _history(record.get("history"), "history")
        why = why or why2 or why3 or why4 or why5
        if why is not None or instruction is None or output is None:
            return None, {}, why
        if not output.strip():
            return None, {}, Problem("output", "empty")
        prompt = instruction + ("\n\n" + extra if extra.strip() else "")
        return (*_chat_or_pair(prompt, output, system, history or [], images), None)
    # sharegpt
    conv = record.get("conversations")
    if isinstance(conv, str):
        import json

        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            return None, {}, Problem("conversations", "a string that is not a JSON list of turns")
    if not isinstance(conv, (list, tuple)) or not conv:
        return None, {}, Problem("conversations", "must be a non-empty list of {from, value} turns")
    system, why = _optional_string(record, "system")
    if why is not None:
        return None, {}, why
    turns = [{"role": "system", "content": system}] if system.strip() else []
    for j, t in enumerate(conv):
        if not isinstance(t, dict):
            return None, {}, Problem("conversations", "not an object with from and value", f"[{j}]")
        who, content = (t.get("from"), t.get("value")) if "from" in t else (t.get("role"), t.get("content"))
        role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            return None, {}, Problem("conversations", f"from must be one of {', '.join(SHAREGPT_ROLES)}", f"[{j}]",
                                     f"got {who!r}")
        turns.append({"role": role, "content": content})
    return "messages", {"messages": turns, "images": images}, None


def source_names(fmt: Format) -> dict[str, str]:
    """Canonical field → the file's name for it, for a row check's problem (``prompt: empty`` of a file whose
    prompts are its ``question`` column reads ``question: empty``; ShareGPT's turns are ``conversations``)."""
    return {"sharegpt": {"messages": "conversations"},
            "alpaca": {"prompt": "instruction", "response": "output"}}.get(fmt.name, fmt.fields)
