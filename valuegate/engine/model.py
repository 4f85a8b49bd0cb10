"""Load a causal LM and its tokenizer (or a vision-language model and its processor); encode samples for it
(:mod:`valuegate.engine.encoding`); the model's fingerprint.

Supported: any Hugging Face causal LM whose LM head is a linear layer reachable through
``get_output_embeddings()`` and whose base model returns the final normed hidden state (Llama, Qwen2,
Mistral, GPT-2, Phi, Gemma and Gemma-2 at least), by hub id, local path, or the embedded default alias;
and image-text-to-text models (Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, LLaVA), loaded with their
processor (``valuegate/engine/vlm.py``), whose base model returns the language model's final normed hidden state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from valuegate.digests import sha256_labelled
from valuegate.engine.encoding import EncodedSample, encode_text_sample, resolve_template
from valuegate.engine.sample import Sample
from valuegate.engine.vlm import VisionProcessor, is_vision_config, load_vision_processor
from valuegate.errors import ValuegateError
from valuegate.settings import ExtractSettings, ModelSettings

__all__ = [
    "LoadedModel",
    "encode_sample",
    "encode_samples",
    "load_model",
    "load_tokenizer",
]

@dataclass
class LoadedModel:
    """A model ready for forward-only extraction.

    Attributes:
        model: the ``PreTrainedModel`` in eval mode.
        tokenizer: its tokenizer.
        name: the resolved model name or path.
        device: where it runs.
        head_weight: ``(V, d)`` float32 copy of the LM head weight (the head is applied in float32).
        head_bias: ``(V,)`` float32 or None.
        logit_scale: multiplier of the raw head output (``1/logits_scaling`` for Granite, ``logit_scale``
            for Cohere, else 1).
        softcap: final logit soft-capping constant (Gemma-2) or None.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None
    is_vision: bool = False

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head, V."""
        return int(self.head_weight.shape[0])

    @property
    def hidden_size(self) -> int:
        """Columns of the LM head, d."""
        return int(self.head_weight.shape[1])

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     **model_inputs: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states, the LM head's input.

        Args:
            input_ids: ``(B, T)`` int64, right-padded. attention_mask: ``(B, T)`` int64.
            model_inputs: a VLM's image inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``,
                ...; see :func:`valuegate.engine.vlm.batch_model_inputs`).

        Returns:
            ``(B, T, d)`` in the model's dtype.
        """
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    **model_inputs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``W h (+ b)`` in float32. hidden: ``(N, d)``; returns ``(N, V)``."""
        return F.linear(hidden.float(), self.head_weight, self.head_bias)

    def scaled_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The logits the model's softmax reads, from :meth:`raw_logits` ``(N, V)``: the logit scale, and
        the final soft-cap (Gemma-2) when the model has one. Returns ``raw`` itself when neither applies."""
        if self.softcap is not None:
            return self.softcap * torch.tanh(raw * (self.logit_scale / self.softcap))
        if self.logit_scale != 1.0:
            return raw * self.logit_scale
        return raw


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValuegateError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValuegateError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return dev


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model_path(cfg: ModelSettings) -> str:
    """The directory or hub id to load: the alias of the embedded default resolves to its cache dir."""
    if cfg.name in ("smollm2-135m", ""):
        from valuegate.default_model import ensure_default_model

        return str(ensure_default_model())
    return cfg.name


def _logit_transform(config: object) -> tuple[float, float | None]:
    text_cfg = getattr(config, "text_config", None) or config
    scale = 1.0
    if getattr(text_cfg, "logits_scaling", None):  # Granite divides
        scale = 1.0 / float(text_cfg.logits_scaling)
    elif getattr(text_cfg, "logit_scale", None) and text_cfg.model_type.startswith("cohere"):
        scale = float(text_cfg.logit_scale)
    cap = getattr(text_cfg, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def _load_error(cfg: ModelSettings, path: str, exc: Exception) -> ValuegateError:
    hint = "" if Path(path).exists() else (
        " (not a local directory; hub ids need network access or a populated Hugging Face cache)")
    return ValuegateError(f"cannot load model {cfg.name!r}{hint}: {str(exc).splitlines()[0]}")


def _vision_config(cfg: ModelSettings, path: str) -> object | None:
    """The config of an image-text-to-text model at ``path``, or None for a text model (or no config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None  # the tokenizer/model load reports the cause

    return config if is_vision_config(config) else None


def load_tokenizer(cfg: ModelSettings) -> object:
    """The model's tokenizer alone (cheap: lets inputs be checked before any weight is read).

    Raises:
        ValuegateError: the model cannot be found.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg)
    config = _vision_config(cfg, path)
    if config is not None:

        return load_vision_processor(path, config, cfg.revision, cfg.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg, path, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(cfg: ModelSettings, tokenizer: object | None = None, progress: bool = True) -> LoadedModel:
    """Load model + tokenizer (+ merged adapter) for extraction.

    Args:
        cfg: model settings.
        tokenizer: an already loaded tokenizer of the same model (else loaded here).
        progress: let transformers show its weight-loading bar.

    Raises:
        ValuegateError: unknown model, unreadable adapter, or a head this engine cannot read.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    path = resolve_model_path(cfg)

    vision = isinstance(tokenizer, VisionProcessor)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    device = _pick_device(cfg.device)
    dtype = _pick_dtype(cfg.dtype, device)
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(path, dtype=dtype, revision=cfg.revision,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg, path, exc) from exc
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if cfg.adapter:
        try:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
        except (OSError, ValueError) as exc:
            raise ValuegateError(f"cannot load adapter {cfg.adapter!r}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValuegateError(f"model {cfg.name!r}: no linear LM head found through get_output_embeddings()")
    bias = getattr(head, "bias", None)
    scale, cap = _logit_transform(model.config)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=str(path), device=device,
        head_weight=weight.detach().float().contiguous(),
        head_bias=None if bias is None else bias.detach().float().contiguous(),
        logit_scale=scale, softcap=cap, is_vision=vision,
    )


def encode_sample(tokenizer: object, sample: Sample, loss_on: str, max_length: int,
                  truncation: str = "truncate", template: str = "auto") -> EncodedSample:
    """Tokenize one sample and mark the counted predictions: a vision-language model's processor encodes its
    own (:meth:`valuegate.engine.vlm.VisionProcessor.encode`), a tokenizer through
    :func:`valuegate.engine.encoding.encode_text_sample` (what counts, truncation, refusals).

    Raises:
        ValuegateError: the sample cannot be valued (the message names file, row and field; a
            :class:`~valuegate.engine.encoding.Refusal` carries its reason as data,
            :func:`~valuegate.engine.encoding.refusal_of` gives one for any other).
    """
    if isinstance(tokenizer, VisionProcessor):
        return tokenizer.encode(sample, loss_on, max_length, truncation)
    return encode_text_sample(tokenizer, sample, loss_on, max_length, truncation, template)


def encode_samples(tokenizer: object, samples: list[Sample], loss_on: str, max_length: int,
                   truncation: str = "truncate", template: str = "auto") -> list[EncodedSample]:
    """:func:`encode_sample` over a list (order kept)."""
    return [encode_sample(tokenizer, s, loss_on, max_length, truncation, template) for s in samples]


# --------------------------------------------------------------------------------------------------
# Model fingerprint: everything that changes a feature, computed without loading the weights.
# --------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_digest(directory: str | Path) -> str:
    """sha256 over the weight files of a model or adapter directory, cached by (path, size, mtime).

    The cache (``$VALUEGATE_HOME/weights-digests.json``) makes later runs free; a rewritten file has a
    new mtime and is hashed again.
    """
    from valuegate.home import valuegate_home

    d = Path(directory).resolve()
    files = [f for f in d.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise ValuegateError(f"{d}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint")
    key = json.dumps(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    cache_path = valuegate_home() / "weights-digests.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_labelled((f.name, f) for f in sorted(files))
    cache[key] = digest
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def fingerprint_settings(cfg: ModelSettings, ex: ExtractSettings, tokenizer: object,
                         lowest_likelihood_ratio: float) -> dict[str, object]:
    """The resolved settings a feature depends on (the input of :func:`model_fingerprint`)."""
    from valuegate.engine.columns import FEATURE_FORMAT

    path = resolve_model_path(cfg)
    local = Path(path).is_dir()
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "format": FEATURE_FORMAT,
        "model": "local" if local and cfg.name != "smollm2-135m" else cfg.name,
        "weights": weights_digest(path) if local else None,
        "revision": cfg.revision,
        "adapter": weights_digest(cfg.adapter) if cfg.adapter else None,
        "dtype": str(_pick_dtype(cfg.dtype, _pick_device(cfg.device))),
        "loss_on": ex.loss_on,
        "lowest_likelihood_ratio": float(lowest_likelihood_ratio),
        "hard_fraction": float(ex.hard_fraction),
        "support_k": ex.support_k,
        "hidden_dim": ex.hidden_dim,
        "error_dim": ex.error_dim,
        "sketch_dim": ex.sketch_dim,
        "seed": ex.seed,
        "max_length": ex.max_length,
        "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16],
        # how prompt/response samples are rendered (absent when "none": the rendering before extract.template,
        # so the features of a base model without a template keep their fingerprint)
        **({"template": rendered} if (rendered := _fingerprint_template(ex, tokenizer)) != "none" else {}),
        "vocab": len(tokenizer),
        **(tokenizer.fingerprint() if hasattr(type(tokenizer), "fingerprint") else {}),
    }


def _fingerprint_template(ex: ExtractSettings, tokenizer: object) -> str:

    if isinstance(tokenizer, VisionProcessor):
        return "none"  # a vision-language processor renders its samples itself (valuegate/engine/vlm.py)
    return resolve_template(ex.template, tokenizer)


def model_fingerprint(settings: dict[str, object]) -> str:
    """sha256 (hex) of the canonical JSON of :func:`fingerprint_settings`."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
