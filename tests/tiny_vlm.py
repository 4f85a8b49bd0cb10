"""Tiny vision-language models, tokenizers and processors built offline, in-process (no downloads).

Each family the engine claims is built from its config with random weights and a tiny vision tower, and
saved with its processor files exactly as a hub checkpoint would be (tokenizer, image processor config,
processor config, chat template), so the tests load them through the same code path as a real model:

- ``qwen2-vl``: Qwen2-VL (its processor needs torchvision here; the engine composes the PIL image processor
  and the tokenizer, see ``valuegate/engine/vlm.py``);
- ``idefics3``: Idefics3 / SmolVLM (image splitting on: several tiles and a global image per picture);
- ``llava``: LLaVA with a CLIP vision tower.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from tiny import SPECIALS, WORDS, phrase_maker
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VLM_FAMILIES = ["qwen2-vl", "idefics3", "llava"]

# the image placeholder each family's chat template writes for a {"type": "image"} part
PLACEHOLDER = {
    "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "llava": "<image>",
}
EXTRA_TOKENS = {
    "qwen2-vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                 *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]],
    "llava": ["<image>"],
}


def vlm_chat_template(family: str) -> str:
    """A ChatML-like template that renders string or ``[{"type": "image"|"text"}]`` contents."""
    img = PLACEHOLDER[family]
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}" + img + "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )


def tiny_vlm_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tiny word tokenizer of ``tests/tiny.py`` plus the family's image special tokens."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(WORDS)] * 3,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>", *EXTRA_TOKENS[family]])
    tok.chat_template = vlm_chat_template(family)
    return tok


def _text_config(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                tie_word_embeddings=False)


def build_tiny_vlm(family: str, directory: Path, seed: int = 0) -> Path:
    """Build, save (model + processor files) and return the directory of a tiny random VLM."""
    from transformers import AutoModelForImageTextToText

    tok = tiny_vlm_tokenizer(family)
    ids = tok.convert_tokens_to_ids
    vocab = len(tok)
    directory.mkdir(parents=True, exist_ok=True)
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig, Qwen2VLImageProcessorPil

        text = _text_config(vocab)
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 1, 1]}
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            pad_token_id=0, eos_token_id=1, bos_token_id=1)
        # 28×28 px per merged token; 4 to 8 merged tokens per image keeps the tests fast
        Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8, patch_size=14, merge_size=2,
                                 temporal_patch_size=2).save_pretrained(directory)
        tok.save_pretrained(directory)
        (directory / "chat_template.jinja").write_text(vlm_chat_template(family))
        # what Qwen2VLProcessor.save_pretrained writes (it cannot be constructed here without torchvision)
        (directory / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

        config = Idefics3Config(
            text_config={**_text_config(vocab), "model_type": "llama"},
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=56, patch_size=14),
            scale_factor=2, image_token_id=ids("<image>"), pad_token_id=0)
        # tiles of 56 px, images resized to at most 112 px: 1-4 tiles + the global image, 4 tokens each
        ip = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56},
                                       do_image_splitting=True)
        Idefics3Processor(ip, tok, image_seq_len=4, chat_template=vlm_chat_template(family)).save_pretrained(directory)
    elif family == "llava":
        from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

        config = LlavaConfig(
            text_config={**_text_config(vocab), "model_type": "llama"},
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                               projection_dim=16),
            image_token_id=ids("<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default",
            pad_token_id=0)
        ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=vlm_chat_template(family)
                       ).save_pretrained(directory)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # random weights with some spread so probabilities are not uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.eval()
    model.save_pretrained(directory)
    return directory


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random picture (smooth colour gradient plus noise) encoded in ``fmt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
    arr = np.clip(base + grad + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` random PNG files of varied sizes in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        p.write_bytes(image_bytes(seed + i, size=(24 + 13 * (i % 4), 20 + 11 * (i % 3))))
        out.append(p)
    return out


def image_rows(n: int, seed: int, images: list[Path], kind: str = "messages") -> list[dict]:
    """Random image-text samples over the tiny vocabulary, each with one or two of ``images``."""
    phrase = phrase_maker(np.random.default_rng(seed))
    rows = []
    for i in range(n):
        two = i % 3 == 2
        pics = [str(images[(i + k) % len(images)]) for k in range(2 if two else 1)]
        if kind == "prompt_response":
            rows.append({"prompt": "<image>" * len(pics) + " " + phrase(1, 5) + " ", "response": phrase(1, 6),
                         "images": pics, "tag": f"r{i}"})
        else:
            first = [{"type": "image"}, {"type": "text", "text": " " + phrase(1, 4)}]
            turns = [{"role": "user", "content": first},
                     {"role": "assistant", "content": phrase(1, 5)}]
            if two:  # a second image in a later user turn
                turns += [{"role": "user", "content": [{"type": "text", "text": phrase(1, 3) + " "},
                                                       {"type": "image"}]},
                          {"role": "assistant", "content": phrase(1, 5)}]
            rows.append({"messages": turns, "images": pics, "tag": f"r{i}"})
    return rows
