"""Vision-language models: the processor side of extraction (one code path for every family).

A VLM is detected from its config (a ``vision_config``); it loads with ``AutoProcessor`` and
``AutoModelForImageTextToText`` (``valuegate/engine/model.py``). :class:`VisionProcessor` stands where a text model's
tokenizer stands: it tokenizes text-only samples exactly like a tokenizer, and encodes image-text samples
with the processor, which expands each image placeholder into the family's image tokens (Qwen2-VL:
``grid_thw.prod() / merge_size²`` ``<|image_pad|>``; Idefics3/SmolVLM: tiles and a global image wrapped in
``<fake_token_around_image>``; LLaVA: one ``<image>`` per patch).

Which predictions count is derived from the processor's own chat template and its own placeholder
expansion, never from a hard-coded token id: the conversation is rendered with the processor's template,
the assistant turns' character spans are located as prefixes of it (as for text models), the
processor's ``text_replacement_offsets`` map those spans into the expanded text, and the tokenizer's
offsets of the expanded text decide which tokens lie in them. Image tokens (every token inside a
replaced placeholder) never count, nor does the prompt; a check refuses any encoding in which a counted
target is an image token.

Qwen2-VL / Qwen2.5-VL: their processor class cannot be built without torchvision (its video processor);
:class:`Qwen2VLComposedProcessor` composes the PIL image processor and the tokenizer behind the same call
(expansion, ``mm_token_type_ids``, replacement offsets), and is tested against the real class where
torchvision loads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valuegate.engine.encoding import (
    BEYOND,
    NO_TOKEN,
    EncodedSample,
    Refusal,
    chat_text_and_spans,
    counted_from_offsets,
    resolve_loss_on,
    too_long,
)
from valuegate.errors import ValuegateError

__all__ = [
    "QWEN_VL_TYPES",
    "Qwen2VLComposedProcessor",
    "VisionProcessor",
    "batch_model_inputs",
    "is_vision_config",
    "load_vision_processor",
]

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
IMAGE_MARKER = "<image>"  # tasks/ingest.py's marker in prompts


def is_vision_config(config: Any) -> bool:
    """Whether a model config is an image-text-to-text model (it has a vision tower config)."""
    return getattr(config, "vision_config", None) is not None


class Qwen2VLComposedProcessor:
    """Qwen2-VL's processor for images and text, without its video processor (no torchvision needed).

    Does what ``Qwen2VLProcessor.__call__`` does for text + images: the image processor gives
    ``pixel_values`` and ``image_grid_thw``; each ``<|image_pad|>`` of the text becomes
    ``grid_thw.prod() // merge_size²`` of them; the expanded text is tokenized; ``mm_token_type_ids`` is 1
    on image tokens, 0 elsewhere.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def apply_chat_template(self, conversation: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Render a conversation with the processor's chat template (text only; ``tokenize`` must be False)."""
        if tokenize:
            raise ValueError("Qwen2VLComposedProcessor renders text only; call it on the rendered text")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def __call__(self, text: list[str] | str, images: list[Any] | None = None, *,
                 return_offsets_mapping: bool = False, return_text_replacement_offsets: bool = False,
                 add_special_tokens: bool = True, return_tensors: str | None = "pt", **kwargs: Any) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        replacements: list[str] = []
        if images:
            data.update(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size ** 2
            replacements = [self.image_token * int(g.prod() // merge) for g in data["image_grid_thw"]]
        n_slots = sum(t.count(self.image_token) for t in texts)
        if n_slots != len(replacements):
            raise ValueError(f"The total number of {self.image_token} tokens in the prompts should be the same "
                             f"as the number of images passed. Found {n_slots} and {len(replacements)} images.")
        it = iter(replacements)
        expanded, offsets = [], []
        for t in texts:
            parts, reps, last, shift = [], [], 0, 0
            for m in re.finditer(re.escape(self.image_token), t):
                a, b = m.span()
                r = next(it)
                parts += [t[last:a], r]
                reps.append({"type": "image", "span": (a, b), "new_span": (a + shift, a + shift + len(r)),
                             "text": m.group(), "replacement": r})
                shift += len(r) - (b - a)
                last = b
            parts.append(t[last:])
            expanded.append("".join(parts))
            offsets.append(reps)
        enc = self.tokenizer(expanded, add_special_tokens=add_special_tokens,
                             return_offsets_mapping=return_offsets_mapping, return_tensors=return_tensors,
                             padding=len(expanded) > 1)
        data.update(enc)
        ids = enc["input_ids"]
        ids_t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
        mm = torch.zeros_like(ids_t)
        mm[ids_t == self.image_token_id] = 1
        mm[ids_t == self.video_token_id] = 2
        data["mm_token_type_ids"] = mm if isinstance(ids, torch.Tensor) else mm.tolist()
        if return_text_replacement_offsets:
            data["text_replacement_offsets"] = offsets
        return data


def load_vision_processor(path: str, config: Any, revision: str | None = None,
                          trust_remote_code: bool = False) -> VisionProcessor:
    """The processor of a VLM, wrapped as a :class:`VisionProcessor`.

    ``AutoProcessor`` first; for Qwen2-VL / Qwen2.5-VL, when their processor class cannot be built
    (torchvision missing), the image processor and tokenizer composed by :class:`Qwen2VLComposedProcessor`.

    Raises:
        ValuegateError: the processor cannot be loaded (names the model and the cause).
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    model_type = getattr(config, "model_type", "")
    try:
        processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if model_type not in QWEN_VL_TYPES:
            raise ValuegateError(f"cannot load the processor of {path!r}: {str(exc).strip().splitlines()[0]}") from exc
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        processor = Qwen2VLComposedProcessor(ip, tok, _saved_chat_template(path) or tok.chat_template)
    except (OSError, ValueError) as exc:
        raise ValuegateError(f"cannot load the processor of {path!r}: {str(exc).strip().splitlines()[0]}") from exc
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise ValuegateError(f"model {path!r}: its processor has no image token; not an image-text model")
    start = getattr(config, "vision_start_token_id", None)
    end = getattr(config, "vision_end_token_id", None)
    placeholder = image_token
    if start is not None and end is not None:  # Qwen2-VL writes <|vision_start|><|image_pad|><|vision_end|>
        placeholder = tok.convert_ids_to_tokens(int(start)) + image_token + tok.convert_ids_to_tokens(int(end))
    return VisionProcessor(processor, placeholder)


def _saved_chat_template(path: str) -> str | None:
    p = Path(path)
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text()
    if (p / "chat_template.json").is_file():
        return json.loads((p / "chat_template.json").read_text()).get("chat_template")
    return None


class VisionProcessor:
    """A VLM's processor where the engine expects a tokenizer.

    Attributes it does not define (``pad_token_id``, ``decode``, ``eos_token``...) are the tokenizer's;
    ``chat_template`` and ``apply_chat_template`` are the processor's; calling it tokenizes text.

    Args:
        processor: the HF processor (or :class:`Qwen2VLComposedProcessor`).
        placeholder: what stands for one image in a prompt (``<image>`` markers of prompt/response samples
            are replaced by it; chat templates write their own).
    """

    def __init__(self, processor: Any, placeholder: str) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder = placeholder
        self.image_token = processor.image_token

    def __getattr__(self, name: str) -> Any:
        if name in ("processor", "tokenizer", "placeholder", "image_token"):  # during unpickling
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs)

    @property
    def chat_template(self) -> str | None:
        """The processor's chat template (what renders image parts)."""
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, conversation: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Render with the processor's chat template (text only)."""
        return self.processor.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def fingerprint(self) -> dict[str, str]:
        """What of the processor changes a feature: its image processor's settings and the placeholder."""
        ip = getattr(self.processor, "image_processor", None)
        conf = ip.to_json_string() if ip is not None else ""
        return {"image_processor": hashlib.sha256(conf.encode()).hexdigest()[:16], "placeholder": self.placeholder}

    def render(self, sample: Any) -> tuple[str, list[tuple[int, int]], bool]:
        """The text the processor sees, the character spans whose tokens count (``loss_on = response``) and
        whether the tokenizer adds its special tokens (not for a chat template, which holds them)."""
        if sample.kind == "messages":
            text, spans = chat_text_and_spans(self, sample)
            return text, spans, False
        if sample.kind == "prompt_response":
            prompt = sample.prompt
            n = len(sample.images or ())
            if n and IMAGE_MARKER not in prompt:
                prompt = IMAGE_MARKER * n + prompt
            if n:
                prompt = prompt.replace(IMAGE_MARKER, self.placeholder)
            return prompt + sample.response, [(len(prompt), len(prompt) + len(sample.response))], True
        return sample.text, [(0, len(sample.text))], True

    def encode(self, sample: Any, loss_on: str, max_length: int, truncation: str = "truncate") -> Any:
        """Token ids, counted predictions and the model's image inputs of one sample.

        Returns:
            an :class:`~valuegate.engine.encoding.EncodedSample` whose ``image_inputs`` hold the processor's
            image tensors (``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``...) and
            ``token_inputs`` its per-token inputs (``mm_token_type_ids``), both None for a text sample.

        Raises:
            ValuegateError: the processor refuses the sample, ``max_length`` would cut an image, or no
                token counts (names file, row and field).
        """
        from valuegate.engine.images import decode_image

        mode = resolve_loss_on(loss_on, sample)
        where = f"{sample.source}: row {sample.row}"
        text, spans, special = self.render(sample)
        if not sample.images:
            enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            ids, offsets = np.asarray(enc["input_ids"], dtype=np.int64), [tuple(o) for o in enc["offset_mapping"]]
            regions: list[tuple[int, int]] = []
            out: dict[str, Any] = {}
        else:
            if sample.image_data is None:
                raise ValuegateError(f"{where}: images: the image bytes were not loaded (read the sample "
                                     "through the workspace)")
            images = []
            for k, b in enumerate(sample.image_data):
                try:  # checked at ingestion; bytes corrupted since (or a decoder that differs) end here
                    images.append(decode_image(b))
                except (OSError, ValueError, SyntaxError) as exc:
                    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ValuegateError(f"{where}: images[{k}]: the image cannot be decoded ({why})") from exc
            try:
                out = dict(self.processor(text=[text], images=images, return_offsets_mapping=True,
                                          return_text_replacement_offsets=True, add_special_tokens=special,
                                          return_tensors="pt"))
            except (ValueError, TypeError) as exc:
                raise ValuegateError(f"{where}: images: the processor refused the sample: "
                                     f"{str(exc).strip().splitlines()[0]}") from exc
            ids = out.pop("input_ids")[0].numpy().astype(np.int64)
            offsets = [tuple(int(x) for x in o) for o in out.pop("offset_mapping")[0].tolist()]
            reps = out.pop("text_replacement_offsets")[0]
            out.pop("attention_mask", None)
            regions = [tuple(r["new_span"]) for r in reps]
            spans = [(_expanded(a, reps), _expanded(b, reps)) for a, b in spans]
        n_full = len(ids)
        in_image = np.array([any(a < hi and b > lo for lo, hi in regions) for a, b in offsets], dtype=bool)
        in_target = np.ones(len(ids), dtype=bool) if mode == "all" else counted_from_offsets(offsets, spans)
        in_target &= ~in_image
        if in_image.any() and len(ids) > max_length and int(np.nonzero(in_image)[0][-1]) >= max_length:
            raise ValuegateError(f"{where}: images: max_length={max_length} would cut through an image "
                                 f"({len(ids)} tokens, the last image ends at token "
                                 f"{int(np.nonzero(in_image)[0][-1]) + 1}); raise --max-length")
        truncated = len(ids) > max_length
        if truncated and truncation == "refuse":
            raise too_long(sample, len(ids), max_length)
        ids, in_target, in_image = ids[:max_length], in_target[:max_length], in_image[:max_length]
        counted = in_target[1:].copy()
        if not counted.any():
            why = BEYOND if truncated and in_target.size else NO_TOKEN
            raise Refusal(f"{where}: {sample.counted_field}: {why}{' (too short)' if why == NO_TOKEN else ''} "
                          f"(loss_on={mode}, max_length={max_length})", why)
        if bool((counted & in_image[1:]).any()):  # pragma: no cover - guarded by construction above
            raise ValuegateError(f"{where}: internal: an image token would be counted")
        token_inputs, image_inputs = {}, {}
        for k, v in out.items():
            if not isinstance(v, torch.Tensor):
                continue
            if v.dim() == 2 and tuple(v.shape) == (1, n_full):  # one value per token (mm_token_type_ids)
                token_inputs[k] = v[0, :max_length].numpy().astype(np.int64)
            else:
                image_inputs[k] = v
        return EncodedSample(input_ids=ids, counted=counted, truncated=truncated,
                             image_tokens=in_image if sample.images else None,
                             token_inputs=token_inputs or None, image_inputs=image_inputs or None)


def _expanded(x: int, reps: list[dict]) -> int:
    """A character position of the rendered text in the processor's expanded text."""
    shift = 0
    for r in reps:
        (a, b), (na, nb) = r["span"], r["new_span"]
        if b <= x:
            shift += (nb - na) - (b - a)
        elif a < x:
            raise ValuegateError("internal: a counted span starts inside an image placeholder")
    return x + shift


def batch_model_inputs(items: list[Any], length: int, device: torch.device,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The extra model inputs of a right-padded batch (empty for text samples).

    Per-token inputs (``mm_token_type_ids``) are right-padded with 0 to ``length``; image tensors are
    concatenated along their first axis (images, patches, or samples for processors that batch images
    per sample: Idefics3's ``(1, n_images, 3, H, W)`` is padded with zero images, which the model drops).
    Floating tensors are cast to ``dtype`` (the model's).
    """
    out: dict[str, torch.Tensor] = {}
    tok_keys = sorted({k for e in items for k in (e.token_inputs or {})})
    for k in tok_keys:
        t = torch.zeros((len(items), length), dtype=torch.long)
        for b, e in enumerate(items):
            v = (e.token_inputs or {}).get(k)
            if v is not None:
                t[b, :len(v)] = torch.from_numpy(v)
        out[k] = t.to(device)
    img_keys = sorted({k for e in items for k in (e.image_inputs or {})})
    for k in img_keys:
        parts = [e.image_inputs[k] for e in items if e.image_inputs and k in e.image_inputs]
        if len({p.dim() for p in parts}) != 1:
            raise ValuegateError(f"internal: image input {k!r} has tensors of different ranks in one batch")
        shape = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
        padded = []
        for p in parts:
            if list(p.shape[1:]) != shape[1:]:
                q = p.new_zeros([p.shape[0], *shape[1:]])
                q[tuple(slice(0, s) for s in p.shape)] = p
                p = q
            padded.append(p)
        t = torch.cat(padded, 0)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.to(device)
    return out
