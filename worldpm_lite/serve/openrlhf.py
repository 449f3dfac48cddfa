"""POST /get_reward: OpenRLHF's remote reward model protocol (openrlhf/utils/agent.py).

{"query": [text, ...], "prompts": [...], "labels": [...]} -> {"rewards": [...], "scores": [...],
"extra_logs": {}}. Each query is the whole conversation as the chat template renders it and is not
templated again; <|endoftext|> padding at either end is dropped and one <|endoftext|> ends it
(chat.encode_text). Queries with the same `prompts` entry share their common leading tokens'
computation; labels are ignored.
"""

from __future__ import annotations

from ..chat import ConversationError
from ..scorer import ConversationTooLong, in_text_order
from .http import HTTPError, parse_json, too_many


def prepare(scorer, body: bytes, max_items: int):
    """/get_reward (OpenRLHF): (groups, finish)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise HTTPError(422, f"body: expected an object {{\"query\": [text, ...]}}, found {type(data).__name__}")
    queries = data.get("query")
    if not isinstance(queries, list) or not queries:
        raise HTTPError(422, "query: expected a non-empty list of strings (each a whole conversation as the chat "
                        f"template renders it), found {'nothing' if queries is None else type(queries).__name__}")
    if len(queries) > max_items:
        raise too_many(len(queries), "queries", max_items)
    labels = data.get("labels")
    if labels is not None and not isinstance(labels, list):  # OpenRLHF sends them; a reward model ignores them
        raise HTTPError(422, f"labels: expected a list (any JSON values, ignored), found {type(labels).__name__}")
    try:
        groups, order = scorer.text_groups(queries, data.get("prompts"))
    except (ConversationError, ConversationTooLong) as e:
        raise HTTPError(422, str(e)) from None

    def finish(scores):
        # OpenRLHF's client reads "rewards", then "scores" (falling back to the rewards), then "extra_logs"
        rewards = in_text_order(order, scores)
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    return groups, finish
