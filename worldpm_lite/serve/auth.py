"""The API key: `Authorization: Bearer KEY`, or for clients that cannot send headers (OpenRLHF's
--remote_rm_url) the key as the first path segment, `/k/KEY/<route>`.

PathKey takes the key segment out of the request's path before anything reads it, so routing,
/metrics' labels, error messages and uvicorn's access log (which prints the same scope's path) never
see it; whether it matched is kept in the scope. Both forms are compared in constant time.
"""

from __future__ import annotations

import hmac

PREFIX = "/k/"
SCOPE_KEY = "worldpm.path_key"  # True: the path carried the right key; False: a wrong one


class PathKey:
    """ASGI middleware: /k/KEY/rest -> /rest, with scope[SCOPE_KEY] saying whether KEY was the key."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            given, _, rest = scope["path"][len(PREFIX):].partition("/")
            scope[SCOPE_KEY] = hmac.compare_digest(given.encode(), self.key)
            scope["path"] = "/" + rest  # in place: the server's access log reads this same scope
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


def authorized(scope, headers, key: str | None) -> bool:
    """Whether a request may use a guarded route: no key set, the path's key, or the bearer header."""
    if key is None or scope.get(SCOPE_KEY) is True:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
