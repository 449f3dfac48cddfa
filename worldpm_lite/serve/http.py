"""What every route shares: the one body reader, the JSON body parser and the two error shapes.

  ours   {"error": {"code", "type", "message"}}
  vLLM   {"error": {"message", "type", "param", "code"}} on vLLM's routes (routes.VLLM_PATHS), as vLLM
         answers (its "code" is the HTTP status; a 422, our "understood but invalid", is vLLM's 400)

A route raises HTTPError; the app turns it into the route's shape. Imports no torch.
"""

from __future__ import annotations

import json

from .routes import VLLM_PATHS

VLLM_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
              413: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class HTTPError(Exception):
    def __init__(self, code: int, message: str, kind: str = "invalid_request", headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.code, self.kind, self.headers, self.param = code, kind, headers, param


def error_body(code: int, kind: str, message: str, param: str | None = None, path: str = "") -> tuple[int, dict]:
    """(status, JSON body) of an error answered on `path`: vLLM's shape on vLLM's routes, else ours."""
    if path in VLLM_PATHS:
        code = 400 if code == 422 else code
        return code, {"error": {"message": message, "type": VLLM_TYPES.get(code, "BadRequestError"), "param": param,
                                "code": code}}
    return code, {"error": {"code": code, "type": kind, "message": message}}


def parse_json(body: bytes):
    """The request body as JSON; HTTPError 400 saying why not."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"body: not UTF-8 text ({e.reason} at byte {e.start})", "malformed_json") from None
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"body: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                        "malformed_json") from None


def too_many(n: int, what: str, max_items: int) -> HTTPError:
    return HTTPError(413, f"body: {n} {what}; this server takes at most {max_items} per request (--max-items); "
                     "split them over several requests", "too_many_items")


async def read_body(receive, content_length: bytes | str | None, limit: int) -> bytes:
    """The request body from the ASGI receive channel, at most `limit` bytes: HTTPError 413 when the
    declared length or the bytes that come are more (the rest is never read)."""
    size = content_length.decode() if isinstance(content_length, bytes) else content_length or ""
    if size.isdigit() and int(size) > limit:
        raise HTTPError(413, f"body: {int(size)} bytes; this server takes at most {limit}", "body_too_large")
    chunks, n, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: nothing more comes
            break
        chunks.append(message.get("body", b""))
        n += len(chunks[-1])
        if n > limit:
            raise HTTPError(413, f"body: more than {limit} bytes; this server takes at most {limit}",
                            "body_too_large")
        more = message.get("more_body", False)
    return b"".join(chunks)
