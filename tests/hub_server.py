"""A loopback Hugging Face Hub for the push tests: the HTTP routes `huggingface_hub` 2.x uses to create a
repo, pre-upload, commit (NDJSON, files inline as base64) and to download (model info, resolve with
HEAD/GET and the X-Repo-Commit / ETag / Content-Length headers). Repos live in memory.

    with LoopbackHub(token="hf_x") as hub:   # hub.url -> http://127.0.0.1:PORT
        ...
    hub.commits        # every commit received: {"repo_id", "revision", "summary", "files": {path: bytes}}
    hub.requests       # (method, path, authorized) of every request, for the assertions
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

DEFAULT_USER = "loopback-user"


class _Handler(BaseHTTPRequestHandler):
    hub: "LoopbackHub"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # the test asserts on hub.requests; stderr stays quiet
        pass

    # -- helpers -----------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False):
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _record(self):
        with self.hub.lock:
            self.hub.requests.append((self.command, urlparse(self.path).path, self._authorized()))

    # -- routes ----------------------------------------------------------------------------------
    def do_POST(self):
        self._record()
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        if path == "/api/repos/create":
            if self.hub.fail == "create":
                return self._error(500, "InternalError", "loopback hub: internal error while creating the repo")
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
            with self.hub.lock:
                self.hub.repos.setdefault(
                    repo_id, {"private": payload.get("visibility") == "private", "branches": {"main": []}}
                )
            return self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        parts = path.split("/")
        # /api/models/{owner}/{name}/{action}/{revision}
        if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
            repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
            repo = self.hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            if action == "branch":
                with self.hub.lock:
                    repo["branches"].setdefault(revision, list(repo["branches"]["main"]))
                return self._json(200, {})
            if action == "commit":
                if self.hub.fail == "commit":
                    return self._error(500, "InternalError", "loopback hub: internal error while committing")
                return self._commit(repo_id, repo, revision, body)
        return self._error(404, "NotFound", f"no route for POST {path}")

    def _commit(self, repo_id, repo, revision, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {}
        for item in lines:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return self._error(400, "BadRequest", f"loopback hub supports inline files only, got {item['key']}")
        if revision not in repo["branches"]:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        oid = hashlib.sha1(body).hexdigest()
        with self.hub.lock:
            tree = dict(repo["branches"][revision][-1]["files"]) if repo["branches"][revision] else {}
            tree.update(files)
            repo["branches"][revision].append({"oid": oid, "files": tree})
            self.hub.commits.append(
                {"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": files}
            )
        return self._json(
            200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    def _head_commit(self, repo_id: str, revision: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return None, "RepoNotFound"
        history = repo["branches"].get(revision)
        if history is None:  # a commit id
            history = [c for branch in repo["branches"].values() for c in branch if c["oid"] == revision][-1:]
        if not history:
            return None, "RevisionNotFound"
        return history[-1], None

    def do_GET(self, head: bool = False):
        self._record()
        path = unquote(urlparse(self.path).path)
        parts = path.split("/")
        if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models" and parts[5] == "tree":
            return self._tree(f"{parts[3]}/{parts[4]}", parts[6], "/".join(parts[7:]), head)
        if len(parts) >= 5 and parts[1] == "api" and parts[2] == "models":
            repo_id = f"{parts[3]}/{parts[4]}"
            revision = "/".join(parts[6:]) if len(parts) > 6 and parts[5] == "revision" else "main"
            commit, error = self._head_commit(repo_id, revision)
            if commit is None:
                return self._error(404, error, f"{repo_id}@{revision}: {error}", head=head)
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(commit["files"].items())]
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit["oid"],
                    "private": False,
                    "siblings": siblings,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                },
            )
        # /{owner}/{name}/resolve/{revision}/{path}
        if len(parts) >= 6 and parts[3] == "resolve":
            repo_id, revision, filename = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
            commit, error = self._head_commit(repo_id, revision)
            if commit is None:
                return self._error(404, error, f"{repo_id}@{revision}: {error}", head=head)
            data = commit["files"].get(filename)
            if data is None:
                self.send_response(404)
                for key, value in {
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": "Entry not found",
                    "X-Repo-Commit": commit["oid"],
                    "Content-Length": "0",
                }.items():
                    self.send_header(key, value)
                return self.end_headers()
            with self.hub.lock:
                self.hub.downloads.append(filename) if not head else None
            etag = hashlib.sha256(data).hexdigest()
            return self._send(
                200,
                data,
                {
                    "X-Repo-Commit": commit["oid"],
                    "ETag": f'"{etag}"',
                    "Content-Type": "application/octet-stream",
                    "Accept-Ranges": "bytes",
                },
                head=head,
            )
        return self._error(404, "NotFound", f"no route for GET {path}", head=head)

    def _tree(self, repo_id: str, revision: str, folder: str, head: bool):
        commit, error = self._head_commit(repo_id, revision)
        if commit is None:
            return self._error(404, error, f"{repo_id}@{revision}: {error}", head=head)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        recursive = "recursive=true" in (urlparse(self.path).query or "").lower()
        entries, folders = [], set()
        for name, data in sorted(commit["files"].items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        entries += [{"type": "directory", "path": path, "oid": "0" * 40} for path in sorted(folders)]
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}", head=head)
        return self._json(200, entries)

    def do_HEAD(self):
        self.do_GET(head=True)


class LoopbackHub:
    """A threaded HTTP server on 127.0.0.1 (a free port) speaking the Hub routes above.

    `fail` = "create" or "commit" makes that route answer HTTP 500, for the error-path test."""

    def __init__(self, token: str, fail: str | None = None):
        self.token, self.fail = token, fail
        self.repos: dict = {}
        self.commits: list = []
        self.requests: list = []
        self.downloads: list = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
