"""Inputs: readers for every format, row checks, and which tokens count (loss masks)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from tiny import random_rows, tiny_tokenizer, write_jsonl

from valuegate.engine.encoding import length_batches
from valuegate.engine.model import encode_sample
from valuegate.errors import ValuegateError
from valuegate.inputs.rows import read_samples, samples_from_frame


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _one(kind="prompt_response", **fields):
    return samples_from_frame(pl.DataFrame([fields]), "f.jsonl")[0]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_every_format_reads_the_same_samples_and_keeps_other_columns(tmp_path, fmt):
    rows = random_rows(5, seed=3)
    df = pl.DataFrame(rows)
    path = tmp_path / f"train.{fmt}"
    {"jsonl": lambda: write_jsonl(path, rows), "parquet": lambda: df.write_parquet(path),
     "csv": lambda: df.write_csv(path)}[fmt]()
    got_df, samples = read_samples(path)
    assert got_df.columns == ["prompt", "response", "tag"]
    assert [s.prompt for s in samples] == [r["prompt"] for r in rows]
    assert [s.response for s in samples] == [r["response"] for r in rows]
    assert [s.row for s in samples] == list(range(5))


def test_response_mask_counts_exactly_the_response_tokens(tok):
    s = _one(prompt="w1 w2 w3 ", response="w4 w5")
    enc = encode_sample(tok, s, "response", 64, template="none")
    ids = enc.input_ids.tolist()
    assert tok.convert_ids_to_tokens(ids) == ["w1", "w2", "w3", "w4", "w5"]
    # counted[t] is the prediction of ids[t+1]: w4 and w5 only
    assert enc.counted.tolist() == [False, False, True, True]
    enc_all = encode_sample(tok, s, "all", 64, template="none")
    assert enc_all.counted.tolist() == [True, True, True, True]


def test_a_pair_is_rendered_with_the_chat_template_as_trained(tok):
    """template auto/chat: the prompt is the user turn, the response the assistant turn, which alone counts
    (its end-of-turn token too), exactly as the chat sample of the same two turns."""
    s = _one(prompt="w1 w2 w3", response="w4 w5")
    enc = encode_sample(tok, s, "response", 64)  # auto: this tokenizer has a template
    chat = samples_from_frame(pl.DataFrame([{"messages": [{"role": "user", "content": "w1 w2 w3"},
                                                          {"role": "assistant", "content": "w4 w5"}]}]), "c")[0]
    as_chat = encode_sample(tok, chat, "response", 64)
    assert enc.input_ids.tolist() == as_chat.input_ids.tolist()
    assert enc.counted.tolist() == as_chat.counted.tolist()
    tokens = tok.convert_ids_to_tokens(enc.input_ids.tolist())
    assert "<|im_start|>" in tokens
    assert [tokens[t + 1] for t in np.nonzero(enc.counted)[0]] == ["w4", "w5", "<|im_end|>"]
    assert encode_sample(tok, s, "response", 64, template="chat").input_ids.tolist() == enc.input_ids.tolist()


def test_template_chat_without_a_chat_template_is_an_error_and_auto_falls_back(tok):
    import copy

    base = copy.deepcopy(tok)
    base.chat_template = None
    s = _one(prompt="w1 w2 ", response="w3")
    with pytest.raises(ValuegateError, match=r"extract.template = chat: this model's tokenizer has no chat template"):
        encode_sample(base, s, "response", 64, template="chat")
    assert (encode_sample(base, s, "response", 64).input_ids.tolist()
            == encode_sample(tok, s, "response", 64, template="none").input_ids.tolist())


def test_auto_loss_on_is_response_for_pairs_and_all_for_text(tok):
    pair = _one(prompt="w1 w2 ", response="w3")
    assert encode_sample(tok, pair, "auto", 64, template="none").n_counted == 1
    assert encode_sample(tok, pair, "auto", 64).n_counted == 2  # the chat template's end-of-turn token too
    text = samples_from_frame(pl.DataFrame([{"text": "w1 w2 w3 w4"}]), "t.jsonl")[0]
    assert encode_sample(tok, text, "auto", 64).n_counted == 3
    with pytest.raises(ValuegateError, match=r"row 0.*text samples have no response"):
        encode_sample(tok, text, "response", 64)


def test_chat_mask_counts_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"},
            {"role": "assistant", "content": "w4 w5"}, {"role": "user", "content": "w6"},
            {"role": "assistant", "content": "w7"}]
    s = samples_from_frame(pl.DataFrame([{"messages": msgs}]), "chat.jsonl")[0]
    enc = encode_sample(tok, s, "response", 64)
    tokens = tok.convert_ids_to_tokens(enc.input_ids.tolist())
    counted_tokens = [tokens[t + 1] for t in np.nonzero(enc.counted)[0]]
    # each assistant turn's content and its end-of-turn token; never the role header or user text
    assert counted_tokens == ["w4", "w5", "<|im_end|>", "w7", "<|im_end|>"]
    assert encode_sample(tok, s, "all", 64).n_counted == len(tokens) - 1


def test_truncation_that_removes_every_counted_token_is_an_error(tok):
    s = _one(prompt="w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 ", response="w11")
    with pytest.raises(ValuegateError, match=r"f.jsonl: row 0: response: every counted token lies beyond max_length"):
        encode_sample(tok, s, "response", 8, template="none")
    assert encode_sample(tok, s, "response", 11, template="none").n_counted == 1


@pytest.mark.parametrize(("rows", "message"), [
    ([{"prompt": "w1 ", "response": ""}], r"row 0: response: empty"),
    ([{"prompt": "w1 ", "response": "w2"}, {"prompt": "w1 ", "response": 3}], r"row 1: response: expected a string"),
    ([{"prompt": "w1 ", "response": "w2"}, {"prompt": None, "response": "w2"}], r"row 1: prompt: expected a string \(got null\)"),
    ([{"text": "   "}], r"row 0: text: empty"),
    ([{"messages": [{"role": "user", "content": "w1"}, {"role": "robot", "content": "w2"}]}],
     r"row 0: messages\[1\]: role must be one of .* \(got 'robot'\)"),
    ([{"messages": []}], r"row 0: messages: must be a non-empty list"),
    ([{"foo": 1}], r"no sample fields: expected columns 'prompt' and 'response', 'messages' \(OpenAI chat\), "
     r"'conversations' \(ShareGPT\), 'instruction' and 'output' \(Alpaca\), or 'text'; found \['foo'\]\. "
     r"Name yours in the config's \[data.fields\]"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValuegateError, match=message) as err:
        read_samples(path)
    assert str(path) in str(err.value)


def test_malformed_and_non_utf8_lines_name_the_row(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    with pytest.raises(ValuegateError, match=r"broken.jsonl: row 1 \(line 2\): malformed JSON"):
        read_samples(p)
    p.write_bytes(b'{"prompt": "a", "response": "\xff\xfe"}\n')
    with pytest.raises(ValuegateError, match=r"row 0 \(line 1\): invalid UTF-8"):
        read_samples(p)
    with pytest.raises(ValuegateError, match="no such file"):
        read_samples(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValuegateError, match=r"unsupported file type \.txt"):
        read_samples(tmp_path / "x.txt")


def test_length_batches_sort_by_length_and_respect_budgets():
    lengths = [5, 1, 9, 3, 3, 7]
    batches = length_batches(lengths, batch_size=2, max_batch_tokens=100)
    assert batches == [[1, 3], [4, 0], [5, 2]]
    assert length_batches(lengths, batch_size=10, max_batch_tokens=10) == [[1, 3, 4], [0], [5], [2]]
    assert sorted(i for b in length_batches(lengths, 3, 12) for i in b) == list(range(6))


def test_the_rendering_is_in_the_fingerprint(tiny_model_dir):
    """extract.template changes the features of prompt/response samples, so it changes the fingerprint; "none"
    (the plain concatenation of earlier versions) adds nothing, so those features keep theirs."""
    from valuegate.engine.model import fingerprint_settings, load_tokenizer, model_fingerprint
    from valuegate.settings import ExtractSettings, ModelSettings

    cfg = ModelSettings(name=str(tiny_model_dir()), device="cpu")
    tok = load_tokenizer(cfg)
    fps = {t: fingerprint_settings(cfg, ExtractSettings(template=t), tok, 1.0) for t in ("auto", "chat", "none")}
    assert fps["auto"] == fps["chat"] and fps["chat"]["template"] == "chat" and "template" not in fps["none"]
    assert model_fingerprint(fps["chat"]) != model_fingerprint(fps["none"])
