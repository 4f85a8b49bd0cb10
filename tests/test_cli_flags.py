"""The CLI's setting flags come from the settings model (issue 17): every leaf setting has its flag
``--<section>.<key>`` whose help is the field's description and default, each flag sets its setting, and the
short flags valuegate always had (``--batch-size``, ``--model``, ``--runner``...) still set the same ones."""

from __future__ import annotations

import argparse
import types
import typing

import pytest

from valuegate.cli import _parser, main
from valuegate.cli_flags import dest_of, flag_of, setting_overrides, shown_default
from valuegate.settings import SHORT_FLAGS, Choices, load_settings, setting_fields

LEAVES = setting_fields()


def _words(text: str) -> str:
    return " ".join(text.split())


def test_every_leaf_setting_has_a_flag_with_its_description_and_default_in_run_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # argparse wraps at the terminal width: one line per help text
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = _words(capsys.readouterr().out)
    assert len(LEAVES) > 40  # the model's sections, not an empty walk
    for path, field in LEAVES:
        assert field.description, f"{'.'.join(path)} has no description"
        default = field.get_default(call_default_factory=True)
        assert f"{flag_of(path)} " in text or f"{flag_of(path)}," in text, path
        assert f"{_words(field.description)} " in text, path
        repeat = (" Repeat the flag for each item." if isinstance(default, list)
                  else " Repeat the flag for each KEY=VALUE." if isinstance(default, dict) else "")
        assert f"{_words(field.description)}{repeat} (default: {shown_default(default)})" in text, path
    assert "(default: 16)" in text and "(default: smollm2-135m)" in text and "(default: unset)" in text


def _other_value(field) -> tuple[list[str], typing.Any]:
    """A value unlike the field's default, as command-line words and as the setting then holds it."""
    ann = field.annotation
    default = field.get_default(call_default_factory=True)
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if ann is bool:
        return [], not default
    if typing.get_origin(ann) is typing.Literal:
        value = next(c for c in typing.get_args(ann) if c != default)
        return [value], value
    known = [m.known() for m in field.metadata if isinstance(m, Choices)]  # a registry's values (select.policy)
    if known:
        value = next(c for c in known[0] if c != default)
        return [value], value
    if typing.get_origin(ann) is list:
        return ["mean_loss:two"], ["mean_loss:two"]
    if typing.get_origin(ann) is dict:
        return ["prompt=question"], {"prompt": "question"}
    if ann is int:
        return [str((default or 0) + 1)], (default or 0) + 1
    if ann is float:
        value = 0.25 if default == 0.5 else 0.5
        return [str(value)], value
    return ["other1"], "other1"


@pytest.mark.parametrize(("path", "field"), LEAVES, ids=[".".join(p) for p, _ in LEAVES])
def test_each_flag_sets_its_setting(path, field, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # workspace and file settings are relative paths here
    words, value = _other_value(field)
    flag = flag_of(path)
    if field.annotation is bool:
        flag = flag if value else flag.replace("--", "--no-", 1)
    args = _parser().parse_args(["run", flag, *words])
    settings = load_settings(None, setting_overrides(args))
    node = settings
    for part in path:
        node = getattr(node, part)
    assert node == value
    assert setting_overrides(_parser().parse_args(["run"])) == {}  # an unset flag masks nothing


@pytest.mark.parametrize(("dotted", "short"), sorted(SHORT_FLAGS.items()))
def test_the_short_flags_set_the_same_settings(dotted, short):
    path = tuple(dotted.split("."))
    field = dict(LEAVES)[path]
    words, value = _other_value(field)
    args = _parser().parse_args(["run", short, *words])
    node = setting_overrides(args)
    for part in path:
        node = node[part]
    assert node == value
    assert setting_overrides(args) == setting_overrides(_parser().parse_args(["run", flag_of(path), *words]))


def test_commands_take_the_sections_they_read():
    """score and extract take the model-side flags, ingest and valset register the ingest ones, every
    workspace command --workspace; only run takes them all."""
    def dests(*argv: str) -> set[str]:
        parser = _parser()
        sub = parser
        for word in argv:  # walk down to the subcommand's parser
            action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = action.choices[word]
        return {a.dest for a in sub._actions}

    assert {"batch_size", "method", "extract.max_batch_tokens"} <= dests("score")
    assert "workspace" not in dests("score")
    assert {"workspace", "ingest.max_chars"} <= dests("ingest") and "batch_size" not in dests("ingest")
    assert {"workspace", "model", "batch_size"} <= dests("extract")
    assert {"workspace", "ingest.max_chars"} <= dests("valset", "register")
    assert {"workspace", "aggregate", "normalize"} <= dests("score-set")
    assert {dest_of(p) for p, _ in LEAVES} <= dests("run")
