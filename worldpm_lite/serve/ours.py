"""POST /v1/score: `score`'s request objects (one, or a list) -> its result objects (data.py's formats)."""

from __future__ import annotations

from ..chat import ConversationError
from ..data import parse_request
from ..scorer import ConversationTooLong
from .http import HTTPError, parse_json, too_many


def prepare(scorer, body: bytes, max_items: int):
    """/v1/score: (groups, finish) where finish(scores per group) is the response's JSON."""
    data = parse_json(body)
    single = isinstance(data, dict)
    objs = [data] if single else data
    if not isinstance(objs, list) or not objs:
        raise HTTPError(422, "body: expected a request object ({\"messages\": ...}, {\"prompt\", \"chosen\", "
                        "\"rejected\"} or {\"prompt\", \"responses\"}) or a non-empty list of them")
    requests = []
    for i, obj in enumerate(objs):
        where = "request" if single else f"request[{i}]"
        try:
            requests.append(parse_request(obj, where))
        except ConversationError as e:
            raise HTTPError(422, str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    n = sum(len(r.conversations) for r in requests)
    if n > max_items:
        raise too_many(n, "conversations", max_items)
    groups = []
    for i, r in enumerate(requests):
        where = "request" if single else f"request[{i}]"
        try:
            groups.append(scorer.group(r.conversations, r.prompt, f"{where} conversation"))
        except (ConversationError, ConversationTooLong) as e:
            raise HTTPError(422, str(e)) from None

    def finish(scores):
        results = [r.result(s) for r, s in zip(requests, scores)]
        return results[0] if single else results

    return groups, finish
