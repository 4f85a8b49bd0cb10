"""Config mistakes are one line on stderr and exit code 2, before anything runs (issue 15): unknown keys at
every level (file and environment), a malformed TOML, a missing config file, contradictory gate bounds and a
workspace that is a file; relative paths in a config file resolve against the file's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import random_rows, write_jsonl

from valuegate.cli import DEMO_CONFIG, EXIT_USER_ERROR, main
from valuegate.settings import load_settings


def _one_error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err and err.startswith("valuegate: error: ")
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def _list(cfg, tmp_path):
    """A cheap command that loads the settings: ``valset list`` in a fresh workspace."""
    return ["valset", "list", "--config", cfg, "--workspace", tmp_path / "ws"]


@pytest.mark.parametrize(("toml", "message"), [
    ('[select]\npolciy = "keep_all"\n', "unknown key select.polciy (did you mean select.policy?)"),
    ('[gate]\nmin_retained = 0.3\n', "unknown key gate.min_retained (did you mean gate.min_retained_fraction?)"),
    ('[selct]\npolicy = "keep_all"\n', "unknown key selct (did you mean select?)"),
    ('workspce = "ws"\n', "unknown key workspce (did you mean workspace?)"),
    ('[data]\nsources = []\nzzz = 1\n', "unknown key data.zzz"),
])
def test_unknown_keys_in_the_file_name_the_file_the_key_and_the_nearest(toml, message, tmp_path, capsys):
    cfg = tmp_path / "vg.toml"
    cfg.write_text(toml)
    assert _one_error_line(capsys, _list(cfg, tmp_path)) == f"valuegate: error: {cfg}: {message}"


def test_unknown_key_in_the_environment_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VALUEGATE_SELECT__POLCIY", "keep_all")
    err = _one_error_line(capsys, ["valset", "list", "--workspace", tmp_path / "ws"])
    assert err == ("valuegate: error: environment variable VALUEGATE_SELECT__POLCIY: unknown key select.polciy "
                   "(did you mean select.policy?)")
    monkeypatch.delenv("VALUEGATE_SELECT__POLCIY")
    monkeypatch.setenv("VALUEGATE_SELET__POLICY", "keep_all")
    assert "unknown key selet.policy (did you mean select.policy?)" in _one_error_line(
        capsys, ["valset", "list", "--workspace", tmp_path / "ws"])


def test_other_valuegate_variables_are_not_settings_and_stay_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("VALUEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VALUEGATE_SELECT__POLICY", "keep_all")
    assert load_settings().select.policy == "keep_all"


def test_unknown_key_in_code_overrides_is_refused_too():
    from valuegate.errors import ValuegateError

    with pytest.raises(ValuegateError, match=r"unknown key select\.polciy \(did you mean select\.policy\?\)"):
        load_settings(overrides={"select": {"polciy": "keep_all"}})


@pytest.mark.parametrize("command", ["run", "score", "list"])
def test_malformed_toml_is_one_line_with_file_line_and_column(command, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[select]\npolicy = "keep_all\n')
    argv = {"run": ["run", "--config", bad, "--workspace", tmp_path / "ws"],
            "score": ["score", "--config", bad, tmp_path / "t.jsonl", tmp_path / "v.jsonl", "--out",
                      tmp_path / "o.parquet"],
            "list": _list(bad, tmp_path)}[command]
    err = _one_error_line(capsys, argv)
    assert err.startswith(f"valuegate: error: {bad}: invalid TOML: ") and "(at line 2, column" in err
    assert not (tmp_path / "ws").exists()


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[release]\nname = "caf\xe9"\n'.encode("latin-1"))
    err = _one_error_line(capsys, _list(bad, tmp_path))
    assert err.startswith(f"valuegate: error: {bad}: ") and "UTF-8" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_missing_config_file_is_one_line(where, tmp_path, capsys):
    nope = tmp_path / "nope.toml"
    argv = ["--config", nope, "valset", "list"] if where == "before" else _list(nope, tmp_path)
    assert _one_error_line(capsys, argv) == f"valuegate: error: {nope}: config file not found"


def test_contradictory_gate_bounds_are_refused_before_the_run_starts(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "t.jsonl", random_rows(4, seed=1))
    cfg = tmp_path / "vg.toml"
    cfg.write_text(f'workspace = "ws"\n[data]\nsources = ["{src.name}"]\n'
                   '[gate]\nmin_retained_fraction = 0.9\nmax_retained_fraction = 0.5\n')
    err = _one_error_line(capsys, ["run", "--config", cfg])
    assert "gate.min_retained_fraction = 0.9" in err and "gate.max_retained_fraction = 0.5" in err
    assert not (tmp_path / "ws").exists()  # nothing ingested, nothing extracted
    # the same when one side comes from the environment
    cfg.write_text('[gate]\nmax_retained_fraction = 0.5\n')
    monkeypatch.setenv("VALUEGATE_GATE__MIN_RETAINED_FRACTION", "0.6")
    err = _one_error_line(capsys, _list(cfg, tmp_path))
    assert "gate.min_retained_fraction = 0.6" in err and "gate.max_retained_fraction = 0.5" in err
    monkeypatch.setenv("VALUEGATE_GATE__MIN_RETAINED_FRACTION", "0.5")
    assert main([str(a) for a in _list(cfg, tmp_path)]) == 0  # equal bounds are not a contradiction


@pytest.mark.parametrize("how", ["flag", "config", "env", "below"])
def test_workspace_that_is_a_file_is_one_line(how, tmp_path, capsys, monkeypatch):
    f = tmp_path / "wsfile"
    f.write_text("not a workspace\n")
    cfg = tmp_path / "vg.toml"
    cfg.write_text('workspace = "wsfile"\n' if how == "config" else "")
    argv = ["valset", "list", "--config", cfg]
    if how == "flag":
        argv += ["--workspace", f]
    elif how == "below":
        argv += ["--workspace", f / "sub"]
    elif how == "env":
        monkeypatch.setenv("VALUEGATE_WORKSPACE", str(f))
    where = f"{f / 'sub'}: {f}" if how == "below" else f
    assert _one_error_line(capsys, argv) == f"valuegate: error: workspace {where} is a file, not a directory"


def test_relative_paths_in_a_config_resolve_against_its_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "models" / "m").mkdir(parents=True)
    cfg = conf / "vg.toml"
    cfg.write_text('workspace = "ws"\n[data]\nsources = ["data/t.jsonl", "/abs/x.jsonl", "s3://b/k.jsonl"]\n'
                   'valset_file = "data/v.jsonl"\n[model]\nname = "models/m"\nadapter = "lora"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(Path("..") / "conf" / "vg.toml")
    assert s.workspace == str(conf / "ws")
    assert s.data.sources == [str(conf / "data" / "t.jsonl"), "/abs/x.jsonl", "s3://b/k.jsonl"]
    assert s.data.valset_file == str(conf / "data" / "v.jsonl")
    assert s.model.name == str(conf / "models" / "m") and s.model.adapter == str(conf / "lora")
    # a model name that is no path next to the config stays a hub id / alias
    cfg.write_text('[model]\nname = "HuggingFaceTB/SmolLM2-135M"\n')
    assert load_settings(cfg).model.name == "HuggingFaceTB/SmolLM2-135M"
    # flags and the environment stay relative to the working directory
    monkeypatch.setenv("VALUEGATE_DATA__VALSET_FILE", "v.jsonl")
    s = load_settings(cfg, {"workspace": "here", "model": {"adapter": "a"}})
    assert (s.workspace, s.model.adapter, s.data.valset_file) == ("here", "a", "v.jsonl")


def test_cli_uses_the_config_folder_for_the_workspace(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = conf / "vg.toml"
    cfg.write_text('workspace = "ws"\n[release]\nname = "r"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["release", "list", "--config", str(cfg)]) == 0
    assert str(conf / "ws") in capsys.readouterr().err


def test_embedded_demo_config_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(DEMO_CONFIG)
    assert all(Path(p).is_file() for p in s.data.sources) and Path(s.data.valset_file).is_file()
    assert s.workspace == "./valuegate-workspace"  # the default: where the demo runs (cli chdirs to the repo)


def test_config_relative_paths_are_normalised(tmp_path, monkeypatch):
    """`../data/x.jsonl` in a config is one canonical path (no `..`): the path keys ingest's source, so the same
    file reached through two configs must be the same source."""
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "vg.toml"
    cfg.write_text('[data]\nsources = ["../data/x.jsonl"]\nvalset_file = "../data/v.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    s = load_settings(cfg)
    assert s.data.sources == [str(tmp_path / "data" / "x.jsonl")]
    assert s.data.valset_file == str(tmp_path / "data" / "v.jsonl")


def test_a_config_that_is_a_directory_says_so(tmp_path, capsys):
    folder = tmp_path / "proj"
    folder.mkdir()
    err = _one_error_line(capsys, _list(folder, tmp_path))
    assert err == f"valuegate: error: --config {folder}: a directory; give the TOML file (none in it: " \
                  "`valuegate init` writes one)"
    (folder / "vg.toml").write_text("")
    assert _one_error_line(capsys, _list(folder, tmp_path)).endswith(f"e.g. {folder / 'vg.toml'}")


@pytest.mark.parametrize(("fields", "message"), [
    ('{ promt = "q" }', "unknown field 'promt': map one of prompt, response, system, messages, text, images"),
    ('{ prompt = "q", response = "q" }', "two fields name the same column"),
])
def test_a_bad_column_mapping_is_one_line(tmp_path, capsys, fields, message):
    cfg = tmp_path / "vg.toml"
    cfg.write_text(f"[data]\nfields = {fields}\n")
    assert message in _one_error_line(capsys, _list(cfg, tmp_path))


def _float_keys() -> list[str]:
    from valuegate.settings import setting_fields

    return [".".join(path) for path, field in setting_fields() if field.annotation is float]


def test_every_float_setting_is_covered():
    assert {"select.suspect_threshold", "select.threshold", "gate.max_quarantine_rate"} <= set(_float_keys())


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_setting_that_is_not_finite_is_refused_naming_its_key(key, value, tmp_path, capsys, monkeypatch):
    """Issue 26: NaN or -inf suspect_threshold was accepted, every row dropped, the manifest said null."""
    monkeypatch.setenv("VALUEGATE_" + "__".join(part.upper() for part in key.split(".")), value)
    err = _one_error_line(capsys, ["valset", "list", "--workspace", tmp_path / "ws"])
    assert f"{key}: " in err and "finite" in err, err


@pytest.mark.parametrize("how", ["flag", "file"])
@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_a_nan_threshold_from_a_flag_or_a_file_is_refused(how, value, tmp_path, capsys):
    cfg = tmp_path / "vg.toml"
    if how == "flag":
        cfg.write_text("")
        argv = ["run", "--config", cfg, "--workspace", tmp_path / "ws", f"--select.suspect-threshold={value}"]
    else:
        cfg.write_text(f"[select]\nsuspect_threshold = {value}\n")
        argv = _list(cfg, tmp_path)
    assert "select.suspect_threshold: Input should be a finite number" in _one_error_line(capsys, argv)
