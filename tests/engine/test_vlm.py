"""Vision-language models: the For-Value math against autograd per family, the response-only mask, and
the Qwen2-VL composed processor against the real one (tiny models built in-process, generated images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_forvalue import RTOL, phi_from_block
from tiny_vlm import VLM_FAMILIES, build_tiny_vlm, image_rows, write_images

from valuegate.engine.extraction import extract_sparse, extract_token_blocks
from valuegate.engine.forvalue import exact_cross, exact_self, sparse_cross
from valuegate.engine.model import encode_samples, load_model
from valuegate.engine.vlm import VisionProcessor, batch_model_inputs
from valuegate.errors import ValuegateError
from valuegate.inputs.rows import check_row
from valuegate.settings import tiny_settings


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vlms")
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_vlm(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pictures"), 4)


def _samples(pictures, n=6, seed=1, kind="messages"):
    rows = image_rows(n, seed, pictures, kind)
    src = str(pictures[0].parent / "data.jsonl")
    out = []
    for i, r in enumerate(rows):
        s, why = check_row(r, kind, i, src)
        assert s is not None, why
        out.append(s)
    return out


_LOADED: dict = {}


def _lm(vlm_dir, family):
    if family not in _LOADED:
        settings = tiny_settings(vlm_dir(family))
        _LOADED[family] = (settings, load_model(settings.model, progress=False))
    return _LOADED[family]


def vlm_head_gradient(model, enc) -> torch.Tensor:
    """The autograd oracle for a VLM: gradient of the counted log-likelihood w.r.t. the LM head's use
    (its input detached), through the model's own full forward with the sample's image inputs."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda mod, args: (args[0].detach(),))
    try:
        model.zero_grad(set_to_none=True)
        ids = torch.from_numpy(enc.input_ids)[None]
        extra = batch_model_inputs([enc], ids.shape[1], torch.device("cpu"), model.dtype)
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, :-1]
            logp = torch.log_softmax(logits.double(), -1)
            pos = torch.from_numpy(np.nonzero(enc.counted)[0])
            logp[pos, ids[0, 1:][pos]].sum().backward()
        return head.weight.grad.double().clone()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_phi_equals_autograd_and_sparse_equals_exact(vlm_dir, pictures, family):
    settings, lm = _lm(vlm_dir, family)
    assert isinstance(lm.tokenizer, VisionProcessor) and lm.is_vision
    samples = _samples(pictures, 6, 1, "messages") + _samples(pictures, 3, 2, "prompt_response")
    enc = encode_samples(lm.tokenizer, samples, "response", 512)
    ex = settings.extract.model_copy(update={"batch_size": 4, "support_k": 10_000, "hidden_dim": 0})
    block = extract_token_blocks(lm, enc, ex, progress=False)  # batched: images padded across samples
    grads = [vlm_head_gradient(lm.model, e) for e in enc]  # one sample at a time, full model forward
    for phi, grad in zip(phi_from_block(block), grads, strict=True):
        assert torch.allclose(phi, grad, rtol=0, atol=RTOL * grad.abs().max())
    ref = torch.stack([g.reshape(-1) for g in grads])
    want = ref @ ref.T
    assert torch.allclose(exact_cross(block, block), want, rtol=0, atol=RTOL * want.abs().max())
    assert torch.allclose(exact_self(block), torch.diagonal(want), rtol=0, atol=RTOL * want.abs().max())
    feats = extract_sparse(lm, enc, ex, progress=False)
    sparse = sparse_cross(feats, feats, lm.vocab_size)
    np.testing.assert_allclose(sparse, want.numpy(), rtol=0, atol=RTOL * float(want.abs().max()))


def _reference_counted(tok, ids: np.ndarray) -> np.ndarray:
    """Independent of the engine: targets inside ``<|im_start|>assistant ... <|im_end|>`` (end included)."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assistant = tok.convert_tokens_to_ids("assistant")
    out = np.zeros(len(ids), dtype=bool)
    inside = False
    for j in range(len(ids)):
        if inside:
            out[j] = True
            inside = ids[j] != end
        elif ids[j] == assistant and j and ids[j - 1] == start:
            inside = True
    return out[1:]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_mask_counts_response_text_only(vlm_dir, pictures, family):
    _, lm = _lm(vlm_dir, family)
    tok = lm.tokenizer
    image_ids = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens
                 if t not in ("<|im_start|>", "<|im_end|>", "<pad>", "<eos>", "<unk>")}
    chats = _samples(pictures, 6, 3, "messages")
    for s, e in zip(chats, encode_samples(tok, chats, "response", 512), strict=True):
        assert e.image_tokens is not None and e.image_tokens.sum() >= len(s.images)
        np.testing.assert_array_equal(e.counted, _reference_counted(tok, e.input_ids))
        targets = e.input_ids[1:][e.counted]
        assert not set(targets.tolist()) & image_ids and not e.image_tokens[1:][e.counted].any()
        said = " ".join(m["content"] for m in s.messages if m["role"] == "assistant")
        assert tok.decode(targets).replace("<|im_end|>", " ").split() == said.split()
    # prompt/response: exactly the response's tokens (and EOS when the tokenizer adds one) count
    for s, e in zip(pr := _samples(pictures, 4, 4, "prompt_response"), encode_samples(tok, pr, "response", 512),
                    strict=True):
        targets = e.input_ids[1:][e.counted]
        assert tok.decode(targets).split() == s.response.split()
        assert not e.image_tokens[1:][e.counted].any()
    # loss_on all: every text token counts, image tokens still never
    e = encode_samples(tok, chats[:1], "all", 512)[0]
    np.testing.assert_array_equal(e.counted, ~e.image_tokens[1:])
    # max_length may cut text after the images, never an image
    full = encode_samples(tok, chats[:1], "response", 512)[0]
    first_text = int(np.nonzero(full.image_tokens)[0][-1]) + 1
    with pytest.raises(ValuegateError, match=r"row 0: images: max_length=\d+ would cut through an image"):
        encode_samples(tok, chats[:1], "response", first_text - 1)


def test_text_model_refuses_image_samples(tiny_model_dir, pictures):
    lm = load_model(tiny_settings(tiny_model_dir("llama")).model, progress=False)
    with pytest.raises(ValuegateError, match="row 0: images: the model is a text-only model"):
        encode_samples(lm.tokenizer, _samples(pictures, 1, 5), "response", 128)


def test_qwen2vl_composed_processor_matches_the_real_one(vlm_dir, pictures):
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLProcessor
    except Exception as exc:  # the registry's torchvision is a CUDA build that does not load beside CPU torch
        pytest.skip(f"Qwen2VLProcessor needs torchvision, which does not load here ({type(exc).__name__}: {exc})")
    from transformers import AutoImageProcessor, AutoTokenizer

    from valuegate.engine.images import decode_image
    from valuegate.engine.vlm import Qwen2VLComposedProcessor

    d = vlm_dir("qwen2-vl")
    tok, ip = AutoTokenizer.from_pretrained(d), AutoImageProcessor.from_pretrained(d)
    real = Qwen2VLProcessor(image_processor=ip, tokenizer=tok)
    ours = Qwen2VLComposedProcessor(ip, tok)
    text = "<|vision_start|><|image_pad|><|vision_end|> w1 w2<|vision_start|><|image_pad|><|vision_end|> w3"
    imgs = [decode_image(p.read_bytes()) for p in pictures[:2]]
    a = real(text=[text], images=imgs, return_tensors="pt", return_text_replacement_offsets=True)
    b = ours(text=[text], images=imgs, return_tensors="pt", return_text_replacement_offsets=True)
    for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(a[k], b[k]), k
    assert a["text_replacement_offsets"] == b["text_replacement_offsets"]
