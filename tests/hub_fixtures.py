"""A stand-in for the Hugging Face Hub on 127.0.0.1, for `HF_ENDPOINT`: the endpoints huggingface_hub reads.

- `GET /api/models/{repo}/revision/{rev}`: the repo's commit and files (`model_info`, `repo_info`);
- `GET /api/models/{repo}/tree/{rev}`: the file listing (`list_repo_tree`, used by `snapshot_download`);
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: a file, with `X-Repo-Commit`, `ETag` (sha256 for LFS files,
  the git blob id otherwise, as the Hub) and `Range` support (`hf_hub_download`).
Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, GatedRepo, EntryNotFound).

Knobs for the download tests, keyed by "repo/path": `drop_after[key] = n` sends n bytes of a file's first
GET and closes the connection; `stall_after[key] = n` sends n bytes then waits for `release` (so a test
can interrupt the client mid-file); `claimed_size[key]` is the size the listing reports instead of the
real one.
Every request is recorded in `requests` as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}       # repo id -> {"refs": {name: commit}, "commits": {commit: files}}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.claimed_size: dict[str, int] = {}
        self.stalled = threading.Event()       # set when a stalled response has sent its bytes
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # ---- repos ----
    def add_commit(self, repo_id: str, files: dict[str, bytes], refs=("main",)) -> str:
        """Add a commit holding `files` ({path: bytes}); point the named branches/tags at it; its hash."""
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items()))
                              .encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][digest] = dict(files)
        for ref in refs:
            repo["refs"][ref] = digest
        return digest

    def gets(self, repo_id: str, filename: str) -> list[str | None]:
        """The Range headers of every GET of a file's contents (None for a whole-file GET)."""
        return [r for m, p, r in self.requests if m == "GET" and p.startswith(f"/{repo_id}/resolve/")
                and p.split("/resolve/", 1)[1].split("/", 1)[1] == filename]

    def fetched(self, repo_id: str) -> set[str]:
        """Paths of the repo's files whose contents were requested (GET on /resolve/)."""
        return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in self.requests
                if m == "GET" and p.startswith(f"/{repo_id}/resolve/")}

    # ---- serving ----
    def _entry(self, repo_id: str, path: str, data: bytes) -> dict:
        size = self.claimed_size.get(f"{repo_id}/{path}", len(data))
        entry = {"rfilename": path, "size": size, "blobId": git_blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
        return entry

    def _serve(self, h: BaseHTTPRequestHandler, head: bool):
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if re.match(r"^/api/models/[^/]+/[^/]+$", path):  # model_info without a revision: main
            path += "/revision/main"
        m = (re.match(r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", path)
             or re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?$", path)
             or re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path))
        if m is None:
            return self._error(h, 404, "EntryNotFound", head)
        repo_id, revision = m.group(1), m.group(2)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", head)
        if repo_id in self.gated:
            return self._error(h, 403, "GatedRepo", head)
        commit = revision if revision in repo["commits"] else repo["refs"].get(revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        files = repo["commits"][commit]
        if "/revision/" in path:
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "siblings": [self._entry(repo_id, p, b) for p, b in sorted(files.items())]}
            return self._json(h, body, head)
        if "/tree/" in path:
            tree = []
            for p, b in sorted(files.items()):
                e = self._entry(repo_id, p, b)
                item = {"type": "file", "oid": e["blobId"], "size": e["size"], "path": p}
                if "lfs" in e:
                    item["lfs"] = {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134}
                tree.append(item)
            return self._json(h, tree, head)
        name = m.group(3)
        if name not in files:
            return self._error(h, 404, "EntryNotFound", head)
        self._file(h, repo_id, name, files[name], commit, head)

    def _file(self, h, repo_id: str, name: str, data: bytes, commit: str, head: bool):
        e = self._entry(repo_id, name, data)
        etag = e["lfs"]["sha256"] if "lfs" in e else e["blobId"]
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        body = data[start:]
        key = f"{repo_id}/{name}"
        cut = self.drop_after.pop(key, None) if not start else None
        stall = self.stall_after.pop(key, None)
        if cut is not None:
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if stall is not None:
            h.wfile.write(body[:stall])
            h.wfile.flush()
            self.stalled.set()
            self.release.wait(60)
            h.close_connection = True
            return
        h.wfile.write(body)

    def _json(self, h, body, head: bool):
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def _error(self, h, status: int, code: str, head: bool):
        data = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)


def repo_files(directory) -> dict[str, bytes]:
    """{relative path: bytes} of every file under a directory (a checkpoint to publish on the fake Hub)."""
    from pathlib import Path

    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
