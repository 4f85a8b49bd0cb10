"""One loaded model kept in the process, for repeated calls (``valuegate.score`` in a notebook).

A one-off call pays the model load (seconds to minutes, the largest part of a small call's time: see
docs/benchmarks.md); the next call with the same model reuses it. The key is everything that changes the
loaded model: the model settings (name, revision, adapter, dtype and device as resolved, remote code) and
the digests of the weight files of a local model directory and of an adapter, so a model rewritten in
place is loaded again. One model is kept: a call with another key replaces it (memory stays one model's).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from valuegate.engine.model import (
    LoadedModel,
    _pick_device,
    _pick_dtype,
    load_model,
    resolve_model_path,
    weights_digest,
)
from valuegate.settings import ModelSettings

__all__ = ["clear_model_cache", "kept_model", "model_key", "model_loads", "shared_model"]

_LOCK = threading.Lock()
_CACHE: dict[str, LoadedModel] = {}
_LOADS: dict[str, int] = {}


def model_key(cfg: ModelSettings) -> str:
    """The cache key of ``cfg``: its settings with device and dtype resolved, and the weights' digests."""
    path = resolve_model_path(cfg)
    device = _pick_device(cfg.device)
    key = {**cfg.model_dump(mode="json"), "device": str(device), "dtype": str(_pick_dtype(cfg.dtype, device)),
           "weights": weights_digest(path) if Path(path).is_dir() else None,
           "adapter_weights": weights_digest(cfg.adapter) if cfg.adapter else None}
    return json.dumps(key, sort_keys=True)


def shared_model(cfg: ModelSettings, tokenizer: object | None = None, progress: bool = False) -> LoadedModel:
    """The model of ``cfg``, loaded on the first call with its key and reused by the next (thread-safe)."""
    key = model_key(cfg)
    with _LOCK:
        lm = _CACHE.get(key)
        if lm is None:
            _CACHE.clear()  # one model at a time
            lm = _CACHE[key] = load_model(cfg, tokenizer, progress)
            _LOADS[key] = _LOADS.get(key, 0) + 1
        return lm


def kept_model(cfg: ModelSettings) -> LoadedModel | None:
    """The model of ``cfg`` when this process keeps it loaded, else None (loads nothing)."""
    with _LOCK:
        return _CACHE.get(model_key(cfg))


def model_loads(cfg: ModelSettings) -> int:
    """How many times this process loaded the model of ``cfg`` through :func:`shared_model`."""
    return _LOADS.get(model_key(cfg), 0)


def clear_model_cache() -> None:
    """Drop the kept model (its memory is freed once nothing else holds it)."""
    with _LOCK:
        _CACHE.clear()
