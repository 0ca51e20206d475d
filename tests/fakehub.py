"""A small stand-in for the Hugging Face Hub on 127.0.0.1, answering the way the Hub's HTTP API does for what
huggingface_hub asks when it downloads a model: repository info, the recursive file tree, and each file (HEAD
and GET on ``resolve``), with the Hub's error headers. It counts every request, so a test can show that an
offline start made none.

    hub = FakeHub(); hub.start()
    hub.add("org/model", folder, revision="main")       # returns the commit id
    hub.add("org/gated", folder, gated=True)             # files need Authorization: Bearer <hub.token>
    ... HF_ENDPOINT=hub.url ...
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_fake_token_with_access"


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> content
    gated: bool = False


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    token = TOKEN

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        # Cleared, file downloads wait (up to 120 s) until it is set again: a model that is slow to arrive.
        self.hold = threading.Event()
        self.hold.set()
        self.held = 0  # downloads that waited on it
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def add(self, repo_id: str, files: Path | dict[str, bytes], *, revision: str = "main", gated: bool = False) -> str:
        """Publish ``files`` (a folder, or path -> bytes) as ``revision`` of ``repo_id``; returns the commit id."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        commit = hashlib.sha1(json.dumps(sorted((k, _blob_id(v)) for k, v in files.items())).encode()
                              + revision.encode()).hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[revision] = commit
        return commit

    # -- the API -------------------------------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append(f"{h.command} {path}")
        auth = h.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is not None and token != self.token:
            return self._error(h, 401, None, "Invalid credentials in Authorization header", body)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for marker, kind in (("/revision/", "info"), ("/tree/", "tree")):
                if marker in rest:
                    repo_id, _, rev = rest.partition(marker)
                    break
            else:
                repo_id, rev, kind = rest, "main", "info"
            repo, commit = self._find(h, repo_id, rev, body)
            if repo is None:
                return
            files = repo.commits[commit]
            if kind == "info":
                return self._json(h, {
                    "_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "library_name": "sentence-transformers",
                    "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                }, body)
            folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
            entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                       for d in folders]
            entries += [{"type": "file", "oid": _blob_id(data), "size": len(data), "path": name}
                        for name, data in sorted(files.items())]
            return self._json(h, entries, body)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo, commit = self._find(h, repo_id, rev, body)
            if repo is None:
                return
            if repo.gated and token != self.token:
                return self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted.", body)
            data = repo.commits[commit].get(name)
            if data is None:
                return self._error(h, 404, "EntryNotFound", f"{name} does not exist", body)
            if body and not self.hold.is_set():
                with self._lock:
                    self.held += 1
                self.hold.wait(120)
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("ETag", f'"{_blob_id(data)}"')
            h.send_header("X-Repo-Commit", commit)
            h.end_headers()
            if body:
                h.wfile.write(data)
            return
        self._error(h, 404, None, "Not Found", body)

    def _find(self, h, repo_id: str, rev: str, body: bool):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found", body)
            return None, None
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
            return None, None
        return repo, commit

    @staticmethod
    def _json(h, obj, body: bool) -> None:
        data = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def _error(h, status: int, code: str | None, message: str, body: bool) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
