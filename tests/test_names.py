"""Names of datasets, validation sets and releases: one rule (valuegate.names), checked by every entry point
that takes one (issue 15): the CLI refuses a bad name with one line, before anything is written."""

from __future__ import annotations

import pytest
from test_settings_errors import _one_error_line
from tiny import random_rows, write_jsonl

from valuegate.errors import ValuegateError
from valuegate.names import MAX_NAME_LENGTH, check_name, is_valid_name

BAD = ["", "../evil", "a/b", "train\n", ".hidden", "-x", "a b", "x" * (MAX_NAME_LENGTH + 1), "x" * 300, "naïve",
       "val@v1"]
GOOD = ["train", "a", "7", "demo-val", "v1.2_rc-3", "x" * MAX_NAME_LENGTH]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name):
    assert is_valid_name(name) and check_name(name, "dataset") == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_with_the_rule(name):
    assert not is_valid_name(name)
    with pytest.raises(ValuegateError) as exc:
        check_name(name, "release")
    msg = str(exc.value)
    assert msg.startswith("release name ") and f"1 to {MAX_NAME_LENGTH} letters" in msg
    assert "\n" not in msg and len(msg) < 200  # one readable line, even for a 300-character name




@pytest.mark.parametrize("name", ["../evil", "", "x" * 300, "train\n"])
def test_cli_ingest_refuses_a_bad_dataset_name(name, tmp_path, capsys):
    src = write_jsonl(tmp_path / "t.jsonl", random_rows(3, seed=1))
    err = _one_error_line(capsys, ["ingest", name, src, "--workspace", tmp_path / "ws"])
    assert "dataset name " in err and "letters, digits" in err


@pytest.mark.parametrize("name", ["../evil", "x" * 300, "val\n"])
def test_cli_valset_register_refuses_a_bad_name(name, tmp_path, capsys):
    src = write_jsonl(tmp_path / "v.jsonl", random_rows(3, seed=2))
    err = _one_error_line(capsys, ["valset", "register", name, src, "--workspace", tmp_path / "ws"])
    assert "validation set name " in err and "letters, digits" in err


@pytest.mark.parametrize("argv", [["list", "../evil"], ["list", "demo\n"], ["show", "x" * 300, "v0001"],
                                  ["rollback", "a/b"], ["diff", "../x", "v0001", "v0002"]])
def test_cli_release_commands_refuse_a_bad_name(argv, tmp_path, capsys):
    err = _one_error_line(capsys, ["release", *argv, "--workspace", tmp_path / "ws"])
    assert "release name " in err and "letters, digits" in err


@pytest.mark.parametrize(("toml", "key", "kind"), [
    ('[data]\ndataset = "../evil"\n', "data.dataset", "dataset"),
    ('[data]\ndataset = "%s"\n' % ("d" * 300), "data.dataset", "dataset"),
    ('[data]\nvalset = "../evil@v2"\n', "data.valset", "validation set"),
    ('[release]\nname = "a/b"\n', "release.name", "release"),
])
def test_cli_refuses_bad_names_in_the_config(toml, key, kind, tmp_path, capsys):
    cfg = tmp_path / "vg.toml"
    cfg.write_text(toml)
    err = _one_error_line(capsys, ["valset", "list", "--config", cfg, "--workspace", tmp_path / "ws"])
    assert f"{key}: {kind} name " in err and "letters, digits" in err


def test_cli_refuses_a_bad_valset_version_in_the_config(tmp_path, capsys):
    cfg = tmp_path / "vg.toml"
    cfg.write_text('[data]\nvalset = "val@latest"\n')
    err = _one_error_line(capsys, ["valset", "list", "--config", cfg, "--workspace", tmp_path / "ws"])
    assert "data.valset" in err and "v3" in err
