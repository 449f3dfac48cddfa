import json

import pytest

from worldpm_lite.data import RequestError, parse_request, read_requests, sharegpt_conversations, sharegpt_records


def test_sharegpt_reader_stops_at_the_broken_tail():
    records = list(sharegpt_records())
    assert len(records) == 17671
    assert records[0]["id"] == "QWJhYvA_0"
    convs = list(sharegpt_conversations(limit=5))
    assert len(convs) == 5
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in convs)


def test_request_formats():
    r = parse_request({"id": 7, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert r.kind == "messages" and r.result([0.5]) == {"id": 7, "score": 0.5}
    assert r.conversations[0][0] == {"role": "system", "content": ""}
    r = parse_request({"prompt": "q", "chosen": "a", "rejected": "b"})
    assert [c[-1]["content"] for c in r.conversations] == ["a", "b"]
    assert r.result([0.1, 0.3]) == {"chosen_score": 0.1, "rejected_score": 0.3, "preferred": "rejected"}
    r = parse_request({"prompt": [{"role": "user", "content": "q"}], "responses": ["x", "y", "z"]})
    assert r.result([0.0, 2.0, 1.0]) == {"scores": [0.0, 2.0, 1.0], "preferred": 1}


@pytest.mark.parametrize("line, message", [
    ("{not json", "3: not valid JSON"),
    ("[1, 2]", "3: request: expected a JSON object"),
    ('{"prompt": "q", "chosen": "a"}', "3: request: has a pair without 'rejected'"),
    ('{"prompt": "q", "responses": []}', "3: responses: expected a non-empty list"),
    ('{"prompt": "q", "responses": ["a", 5]}', r"3: responses\[1\]: expected a string"),
    ('{"messages": [{"role": "user"}]}', r"3: messages\[0\].content: expected a string"),
    ('{"prompt": 12, "chosen": "a", "rejected": "b"}', "3: prompt: expected a string or a list of messages"),
    ('{"text": "hello"}', "3: request: expected 'messages', or 'prompt'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "3: messages: the last message must be the assistant's"),
])
def test_bad_lines_name_the_line(tmp_path, line, message):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path = tmp_path / "in.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the bad request is on line 3
    with pytest.raises(RequestError, match=f"in.jsonl:{message}"):
        read_requests(str(path))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(RequestError, match="no such file"):
        read_requests(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RequestError, match="empty"):
        read_requests(str(tmp_path / "empty.jsonl"))
