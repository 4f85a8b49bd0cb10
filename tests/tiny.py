"""Tiny models and tokenizers built offline, in-process, for the tests (no downloads).

Every family the engine claims is built here from its config with random weights: Llama (tied and
untied head), GPT-2, Qwen2, Mistral, Phi (head with bias), Gemma and Gemma-2 (logit soft-capping).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging

WORDS = [f"w{i}" for i in range(40)] + ["user", "assistant", "system", "hello", "answer"]
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
FAMILIES = ["llama-tied", "llama", "gpt2", "qwen2", "mistral", "phi", "gemma", "gemma2"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer over :data:`WORDS` with ChatML-like special tokens and a chat template."""
    # A BPE trained on the word list (each word ends up one token). Not WordLevel: transformers 5 maps
    # qwen2 configs to Qwen2Tokenizer, which rebuilds a BPE from tokenizer.json and cannot read WordLevel.
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(WORDS)] * 3,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int):
    """A 2-layer config of the family, hidden size 32."""
    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "llama-tied":
        return LlamaConfig(tie_word_embeddings=True, **llama_like)
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=False, **llama_like)
    if family == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **llama_like)
    if family == "mistral":
        return MistralConfig(tie_word_embeddings=False, **llama_like)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    if family == "phi":
        return PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, **common)
    if family == "gemma":
        return GemmaConfig(head_dim=8, **llama_like)
    if family == "gemma2":
        # a small cap so the soft-capping Jacobian is far from 1 on random weights
        return Gemma2Config(head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=50.0,
                            query_pre_attn_scalar=8, sliding_window=64, **llama_like)
    raise ValueError(family)


def build_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Build, save (model + tokenizer) and return the directory of a tiny random model."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)))
    with torch.no_grad():  # random heads with a little spread so probabilities are not uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    # quietly: the first test to ask for a tiny model builds it, maybe inside its own captured output (a CLI
    # test that asserts its stderr is one line); which test that is depends on the order (an xdist worker's)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return directory


def phrase_maker(rng: np.random.Generator):
    """``phrase(lo, hi)``: ``lo`` to ``hi − 1`` random words of the tiny vocabulary, drawn from ``rng``."""
    words = WORDS[:40]

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words, int(rng.integers(lo, hi))))

    return phrase


def random_rows(n: int, seed: int, kind: str = "prompt_response") -> list[dict]:
    """Random samples of the given shape over the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    phrase = phrase_maker(rng)

    rows = []
    for i in range(n):
        if kind == "prompt_response":
            rows.append({"prompt": phrase(1, 7) + " ", "response": phrase(1, 8), "tag": f"r{i}"})
        elif kind == "text":
            rows.append({"text": phrase(3, 12), "tag": f"r{i}"})
        else:
            rows.append({"messages": [
                {"role": "system", "content": phrase(1, 3)},
                {"role": "user", "content": phrase(1, 5)},
                {"role": "assistant", "content": phrase(1, 5)},
                {"role": "user", "content": phrase(1, 4)},
                {"role": "assistant", "content": phrase(1, 6)},
            ], "tag": f"r{i}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_close_at_stored_precision(actual, desired, err_msg: str = "") -> None:
    """Scores computed from feature rows in their stored form (feature format 6: int8 steps, a step being
    ``1/127`` of its support entry's largest value) against the same scores from other rows of the same
    samples: the float32 rows of in-memory scoring, or rows extracted in another batch (whose float32
    values differ in the last bits, so a value near a rounding boundary can round the other way). Each
    stored entry is within half a step, so a sum of products ``Σ R·R'`` is within about ``1/254`` of
    ``Σ_u ‖R_u‖₁ max|R'_u|``: 1e-2 relative, and 1e-2 of the largest value where terms cancel."""
    actual, desired = np.asarray(actual, dtype=float), np.asarray(desired, dtype=float)
    np.testing.assert_allclose(actual, desired, rtol=1e-2, atol=1e-2 * float(np.abs(desired).max()),
                               err_msg=err_msg)


def run_config(folder: Path, model_dir: Path, *, train: tuple[int, int] = (12, 61), valid: tuple[int, int] = (4, 62),
               families: bool = False, relative: bool = False, workspace: str | None = None,
               **sections: dict) -> str:
    """Write ``train.jsonl``, ``valid.jsonl`` and a ``vg.toml`` for ``valuegate run`` on the tiny model into
    ``folder``; return the config's path.

    Args:
        train, valid: ``(rows, seed)`` of :func:`random_rows`. families: every training row gets a
            ``family`` of ``a``/``b`` alternately. relative: the config names the files and the workspace
            (``ws``) relative to its folder; else absolute. workspace: the workspace URI (overrides both).
        sections: per section, keys that update the defaults (data ``t``/``v``, the model on the CPU, extract
            ``support_k`` 8, ``hidden_dim`` 0, ``error_dim`` 8, ``batch_size`` 8, release ``r``); a key set
            to None is left out of the file.
    """
    rows = random_rows(train[0], seed=train[1])
    if families:
        for i, r in enumerate(rows):
            r["family"] = "ab"[i % 2]
    train_file = write_jsonl(folder / "train.jsonl", rows)
    valid_file = write_jsonl(folder / "valid.jsonl", random_rows(valid[0], seed=valid[1]))
    cfg: dict = {
        "workspace": workspace or ("ws" if relative else str(folder / "ws")),
        "data": {"dataset": "t", "sources": [train_file.name if relative else str(train_file)], "valset": "v",
                 "valset_file": valid_file.name if relative else str(valid_file)},
        "model": {"name": str(model_dir), "device": "cpu"},
        "extract": {"support_k": 8, "hidden_dim": 0, "error_dim": 8, "batch_size": 8},
        "release": {"name": "r"},
    }
    for name, keys in sections.items():
        cfg[name] = {**cfg.get(name, {}), **keys}
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for name, keys in cfg.items():
        if isinstance(keys, dict):
            lines += [f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items() if v is not None)]
    path = folder / "vg.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def autograd_head_gradient(model, input_ids: np.ndarray, counted: np.ndarray,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The oracle: gradient of the summed counted log-likelihood w.r.t. the LM head weight's *use*.

    The head's input is detached by a pre-hook, so a tied weight's embedding share is excluded; the
    logits go through the model's own forward (its soft-capping and scaling included). Only for tests
    and benchmarks: one backward pass per sample.

    Args:
        model: a causal LM. input_ids: ``(T,)``. counted: ``(T-1,)`` bool mask of counted predictions.
        dtype: precision of the log-softmax.

    Returns:
        ``(V, d)`` gradient in ``dtype``.
    """
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda mod, args: (args[0].detach(),))
    try:
        model.zero_grad(set_to_none=True)
        ids = torch.from_numpy(input_ids)[None]
        with torch.enable_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].to(dtype), -1)
            pos = torch.from_numpy(np.nonzero(counted)[0])
            logp[pos, ids[0, 1:][pos]].sum().backward()
        return head.weight.grad.to(dtype).clone()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
