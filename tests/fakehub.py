"""A small imitation of the Hugging Face Hub on 127.0.0.1, for tests: the endpoints huggingface_hub
(2.4) calls to download a model repository, its error codes, gated repos and one fault, a download
cut midway. Every request is logged. Plain HTTP only: no Xet headers, no redirects.

Routes (a repo id is "owner/name"; a revision arrives URL-quoted):
  GET       /api/models/{repo}[/revision/{rev}][?blobs=true]   the repo's info: commit, files, sizes
  GET       /api/models/{repo}/tree/{rev}?recursive=true       every file of a commit
  HEAD, GET /{repo}/resolve/{rev}/{path}                        one file (GET with Range: 206)
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo, EntryNotFound): without it the
client takes a 404 for "the hub is down" and looks in its cache instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """Every file under `folder` by its repo path ("a/b.txt"): what a repo holds."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob(path: str, data: bytes) -> dict:
    """A file's entry as the Hub lists it: weights (and anything over 1 MB) in LFS, named by sha256;
    the others by their git blob id."""
    if path.endswith((".safetensors", ".bin", ".gguf")) or len(data) > 1_000_000:
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
        return {"oid": git_sha1(pointer.encode()), "etag": sha,
                "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)}}
    return {"oid": git_sha1(data), "etag": git_sha1(data), "lfs": None}


class Repo:
    """A model repository: commits (each a dict of files) and branches naming them. `token`: a gated
    repo's files need `Authorization: Bearer <token>` (its info and file list stay public)."""

    def __init__(self, files: dict[str, bytes], *, gated_token: str | None = None):
        self.gated_token = gated_token
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.main = self.add_commit(files, "main")

    def add_commit(self, files: dict[str, bytes], branch: str) -> str:
        """A new commit holding `files`, the tip of `branch`; its 40-hex id."""
        sha = hashlib.sha1(repr((branch, len(self.commits), sorted(files))).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def commit(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


@dataclass
class Request:
    method: str
    path: str  # as sent, quoted
    status: int
    range: str | None
    authorization: str | None


class FakeHub(ThreadingHTTPServer):
    """`with FakeHub() as hub:` serves hub.repos (repo id -> Repo) at hub.url from a thread; hub.log lists
    the requests; hub.cuts[path] = n makes the next full GET of that file send n bytes, then hang up;
    hub.stalls[path] = n: send n bytes, then wait (up to a minute) for hub.release to be set."""

    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.cuts: dict[str, int] = {}
        self.stalls: dict[str, int] = {}
        self.release = threading.Event()
        self._blobs: dict[tuple[str, int], tuple[bytes, dict]] = {}  # repos share large files: hashed once
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, name="fakehub", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self._thread.join()

    def blob(self, path: str, data: bytes) -> dict:
        key = (path, id(data))
        if key not in self._blobs:
            self._blobs[key] = (data, blob(path, data))  # `data` kept: its id stays its own
        return self._blobs[key][1]

    def downloads(self) -> list[str]:
        """The repo paths of the files fetched (GET of /resolve) so far, in order."""
        out = []
        for r in self.log:
            m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", urlsplit(r.path).path)
            if m and r.method == "GET":
                out.append(unquote(m[1]))
        return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub
    timeout = 60  # an idle kept-alive connection frees its thread at the latest then

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.route()

    def do_GET(self):
        self.route()

    def route(self):
        u = urlsplit(self.path)
        path, query = unquote(u.path), parse_qs(u.query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", u.path):
            return self.tree(unquote(m[1]), unquote(m[2]))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", u.path):
            return self.info(unquote(m[1]), unquote(m[2] or "main"), query.get("blobs") == ["true"])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", u.path):
            return self.resolve(unquote(m[1]), unquote(m[2]), unquote(m[3]))
        self.error(404, None, f"no route for {path}")

    # the endpoints

    def info(self, repo_id: str, rev: str, blobs: bool):
        found = self.find(repo_id, rev, files=False)
        if found is None:
            return
        repo, sha = found
        siblings = []
        for path, data in sorted(repo.commits[sha].items()):
            s = {"rfilename": path}
            if blobs:
                e = self.server.blob(path, data)
                s.update(size=len(data), blobId=e["oid"])
                if e["lfs"]:
                    s["lfs"] = {"size": len(data), "sha256": e["lfs"]["oid"], "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(s)
        self.send(200, {"_id": sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                        "sha": sha, "private": False, "gated": "manual" if repo.gated_token else False,
                        "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                        "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z"})

    def tree(self, repo_id: str, rev: str):
        found = self.find(repo_id, rev, files=False)
        if found is None:
            return
        repo, sha = found
        out, folders = [], set()
        for path, data in sorted(repo.commits[sha].items()):
            parts = path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder, "oid": git_sha1(folder.encode()), "size": 0})
            e = self.server.blob(path, data)
            entry = {"type": "file", "path": path, "oid": e["oid"], "size": len(data)}
            if e["lfs"]:
                entry["lfs"] = dict(e["lfs"])  # no "xetHash": the client then downloads over plain HTTP
            out.append(entry)
        self.send(200, out)

    def resolve(self, repo_id: str, rev: str, path: str):
        found = self.find(repo_id, rev, files=True)
        if found is None:
            return
        repo, sha = found
        data = repo.commits[sha].get(path)
        if data is None:
            return self.error(404, "EntryNotFound", f"{path} does not exist at {rev}", {"X-Repo-Commit": sha})
        e = self.server.blob(path, data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{e["etag"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if e["lfs"]:
            headers.update({"X-Linked-Etag": f'"{e["etag"]}"', "X-Linked-Size": str(len(data))})
        start = 0
        if rng := self.headers.get("Range"):
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if not m or int(m[1]) >= len(data):
                return self.error(416, None, f"unsupported range {rng}", {"Content-Range": f"bytes */{len(data)}"})
            start = int(m[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        full_get = self.command == "GET" and not rng
        cut = self.server.cuts.pop(path, None) if full_get else None
        stall = self.server.stalls.pop(path, None) if full_get else None
        cut = stall if stall is not None else cut
        self.send(206 if rng else 200, body if cut is None else body[:cut], headers, length=len(body))
        if stall is not None:
            self.wfile.flush()
            self.server.release.wait(60)
        if cut is not None:
            self.close_connection = True  # Content-Length promised more: the client sees a broken transfer

    # helpers

    def find(self, repo_id: str, rev: str, files: bool):
        """(repo, commit), or None once an error answer is sent, the way the Hub answers."""
        repo = self.server.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is None:  # the Hub: 401 without a token (the repo could be private), else 404
            return self.error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
        if files and repo.gated_token and auth != f"Bearer {repo.gated_token}":
            return self.error(401 if auth is None else 403, "GatedRepo", f"Access to model {repo_id} is restricted. "
                              "You must have access to it and be authenticated to access it. Please log in.")
        sha = repo.commit(rev)
        if sha is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, sha

    def error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        headers = {"X-Error-Message": message, **(headers or {})}
        if code:
            headers["X-Error-Code"] = code
        self.send(status, {"error": message}, headers)

    def send(self, status: int, body, headers: dict | None = None, length: int | None = None):
        """Answer `body` (bytes, or JSON); `length`: the Content-Length to promise, when not len(body)."""
        headers = dict(headers or {})
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.server.log.append(Request(self.command, self.path, status, self.headers.get("Range"),
                                       self.headers.get("Authorization")))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client is gone (a killed download)
                self.close_connection = True
