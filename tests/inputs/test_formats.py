"""The formats people have: Alpaca, ShareGPT, OpenAI messages, text and a column mapping, from JSON lines, a
JSON array, CSV, Parquet, a folder or glob of shards and a ``datasets`` ``save_to_disk`` folder
(``valuegate/inputs/``)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from valuegate.errors import ValuegateError
from valuegate.inputs.formats import guess_fields, recognise
from valuegate.inputs.readers import iter_source_records, source_files
from valuegate.inputs.rows import read_samples, samples_from_records

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]


def test_an_alpaca_json_array_reads_as_prompt_response_with_the_input_after_the_instruction(tmp_path):
    p = tmp_path / "alpaca_data.json"
    p.write_text(json.dumps(ALPACA, indent=2))  # as the Alpaca authors ship it: one indented JSON array
    df, samples = read_samples(p)
    assert df.height == 2
    assert [s.kind for s in samples] == ["prompt_response", "prompt_response"]
    assert samples[0].prompt == "Add the numbers.\n\n2 and 3" and samples[0].response == "5"
    assert samples[1].prompt == "Name a colour." and samples[1].response == "Blue."


def test_alpaca_system_and_history_make_a_chat_in_training_order():
    rows = [{"instruction": "And 4?", "input": "", "output": "9", "system": "Be brief.",
             "history": [["2 and 3?", "5"]]}]
    s = samples_from_records(rows, "a.json")[0]
    assert s.kind == "messages"
    assert [(m["role"], m["content"]) for m in s.messages] == [
        ("system", "Be brief."), ("user", "2 and 3?"), ("assistant", "5"), ("user", "And 4?"), ("assistant", "9")]


def test_sharegpt_conversations_map_their_role_names():
    rows = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}, {"from": "user", "value": "more"},
                               {"from": "model", "value": "ok"}], "id": "x1"}]
    s = samples_from_records(rows, "sg.json")[0]
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    with pytest.raises(ValuegateError, match=r"sg.json: row 0: conversations\[0\]: from must be one of .*\(got 'robot'\)"):
        samples_from_records([{"conversations": [{"from": "robot", "value": "x"}]}], "sg.json")
    with pytest.raises(ValuegateError, match=r"row 0: conversations\[0\]: content must be a non-empty string"):
        samples_from_records([{"conversations": [{"from": "human", "value": ""}]}], "sg.json")


def test_a_column_mapping_reads_any_columns_and_names_them_in_errors(tmp_path):
    p = tmp_path / "qa.csv"
    pl.DataFrame({"question": ["q1", "q2"], "answer": ["a1", ""], "topic": ["x", "y"]}).write_csv(p)
    with pytest.raises(ValuegateError, match=r"no sample fields.*found \['answer', 'question', 'topic'\].*"
                                             r"prompt = 'question', response = 'answer'"):
        read_samples(p)
    with pytest.raises(ValuegateError, match=r"qa.csv: row 1: answer: empty"):
        read_samples(p, {"prompt": "question", "response": "answer"})
    pl.DataFrame({"question": ["q1"], "answer": ["a1"]}).write_csv(p)
    _, [s] = read_samples(p, {"prompt": "question", "response": "answer"})
    assert (s.prompt, s.response) == ("q1", "a1")
    with pytest.raises(ValuegateError, match=r"data.fields names column\(s\) 'reply' the file lacks"):
        read_samples(p, {"prompt": "question", "response": "reply"})
    # a mapping none of whose columns a file has leaves it to its own format (a validation file in another shape)
    assert recognise(["prompt", "response"], "v", {"prompt": "question", "response": "answer"}).name == "prompt_response"


def test_guessed_mappings():
    assert guess_fields(["Question", "Answer", "id"]) == {"prompt": "Question", "response": "Answer"}
    assert guess_fields(["problem", "solution"]) == {"prompt": "problem", "response": "solution"}
    assert guess_fields(["foo", "bar"]) is None


def test_a_json_array_refuses_non_objects_by_element_and_bad_json_by_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([ALPACA[0], 3]))
    rows = [r for chunk in iter_source_records(p) for r in chunk]
    assert rows[0][1] == ALPACA[0] and rows[1][1] is None and str(rows[1][3]) == "element 1: expected a JSON object (got int)"
    p.write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(ValuegateError, match=r"a.json: malformed JSON at line 2 column"):
        read_samples(p)


def test_a_folder_or_glob_of_shards_and_a_save_to_disk_folder(tmp_path):
    import datasets

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"part-{i}.jsonl").write_text(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n")
    (shards / ".hidden.jsonl").write_text("not json\n")
    assert [p.name for p in source_files(shards)] == ["part-0.jsonl", "part-1.jsonl"]
    assert [p.name for p in source_files(str(shards / "part-*.jsonl"))] == ["part-0.jsonl", "part-1.jsonl"]
    _, samples = read_samples(str(shards / "*.jsonl"))
    assert [s.prompt for s in samples] == ["p0", "p1"]
    with pytest.raises(ValuegateError, match="no file matches"):
        source_files(str(tmp_path / "nothing-*.jsonl"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    assert source_files(saved) == [saved]
    _, samples = read_samples(saved)
    assert samples[0].prompt == "Add the numbers.\n\n2 and 3"
