"""A small Hugging Face Hub for tests: the part of the HTTP API that huggingface_hub's uploads and downloads use.

    server = HubServer(tmp_path / "hub", users={"hf_secret": "alice"}).start()
    point_huggingface_hub_at(server.url, tmp_path / "hf_home", monkeypatch)
    ...                                   # create_repo, create_commit, snapshot_download, PeftModel.from_pretrained
    server.stop()

It is a real HTTP server (``ThreadingHTTPServer`` on 127.0.0.1, port 0) so the client code runs unchanged:
its request building, headers, error mapping and cache all take part. Routes: ``whoami-v2``, ``agent-harnesses``,
``repos/create``, ``validate-yaml``, ``preupload``, the NDJSON ``commit``, ``branch``, model info (with and without a
revision), ``tree`` and ``resolve`` (HEAD and GET).

Preupload answers ``"regular"`` for every file: huggingface_hub then sends each file base64-encoded inside the NDJSON
commit (``_prepare_commit_payload``), so no LFS or Xet transfer is needed. A file's id is its git blob sha1, which
is what the Hub uses as the ETag of a non-LFS file and what the client compares for unchanged files.

Storage lives under ``root``: ``blobs/<sha1>`` for every file version and ``state.json`` for repos, branches and
commits, so a test can read everything the server holds. ``fail(route, status, times)`` makes a route answer an
error on demand; ``requests`` lists (method, path, status) of every request, never a header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("GET", "whoami", r"/api/whoami-v2"),
    ("GET", "harnesses", r"/api/agent-harnesses"),
    ("POST", "create", r"/api/repos/create"),
    ("POST", "validate", r"/api/validate-yaml"),
    ("GET", "info", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"),
    ("GET", "tree", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"),
    ("POST", "preupload", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"),
    ("POST", "branch", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)"),
    ("GET", "resolve", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
]
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Failure:
    status: int
    times: int | None  # None: every time


@dataclass
class HubServer:
    root: Path
    users: dict[str, str]  # token -> user name
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    _failures: dict[str, Failure] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, dict] = {}  # repo id -> {"owner", "private", "branches": {name: commit}}
        self.commits: dict[str, dict] = {}  # sha -> {"parent", "files": {path: blob}, "summary", "description"}
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # --------------------------------------------------------------------------------------------------------------
    # lifecycle and test controls

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, route: str, status: int, times: int | None = None) -> None:
        """Answer ``status`` on ``route`` (a name of _ROUTES) the next ``times`` times (None: always)."""
        self._failures[route] = Failure(status, times)

    def calls(self, route: str) -> int:
        return sum(1 for _, name, _ in self.requests if name == route)

    # --------------------------------------------------------------------------------------------------------------
    # reading what the server holds (for assertions)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self._resolve(repo_id, revision)
        return {path: self._blob(sha) for path, sha in self.commits[commit]["files"].items()}

    def history(self, repo_id: str, revision: str = "main") -> list[dict]:
        """Commits from the head of ``revision`` back to the repo's creation."""
        out, sha = [], self._resolve(repo_id, revision)
        while sha:
            out.append({"oid": sha, **self.commits[sha]})
            sha = self.commits[sha]["parent"]
        return out

    # --------------------------------------------------------------------------------------------------------------
    # storage

    def _blob(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes()

    def _put_blob(self, content: bytes) -> str:
        sha = git_blob_sha1(content)
        (self.root / "blobs" / sha).write_bytes(content)
        return sha

    def _save_state(self) -> None:
        (self.root / "state.json").write_text(json.dumps({"repos": self.repos, "commits": self.commits}, indent=1))

    def _new_commit(self, parent: str | None, files: dict[str, str], summary: str, description: str = "") -> str:
        sha = hashlib.sha1(json.dumps([parent, files, summary, description, time.time_ns()]).encode()).hexdigest()
        self.commits[sha] = {"parent": parent, "files": files, "summary": summary, "description": description}
        return sha

    def _resolve(self, repo_id: str, revision: str) -> str:
        repo = self.repos[repo_id]
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in self.commits:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # --------------------------------------------------------------------------------------------------------------
    # access

    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.users:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.users[token]

    def _readable(self, repo_id: str, user: str | None) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and repo["owner"] != user):
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, user: str | None) -> dict:
        repo = self._readable(repo_id, user)
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to write to this repo")
        if repo["owner"] != user:
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # --------------------------------------------------------------------------------------------------------------
    # routes: each returns (status, json body) or (status, headers, bytes)

    def whoami(self, user, **_):
        if user is None:
            raise HubHTTPError(401, "Invalid username or password.")
        return 200, {
            "type": "user",
            "name": user,
            "fullname": user.title(),
            "orgs": [],
            "auth": {"type": "access_token"},
        }

    def harnesses(self, **_):
        return 200, {}

    def create(self, user, body, **_):
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        if body.get("type") not in (None, "model"):
            raise HubHTTPError(400, "This test Hub only has model repos")
        if repo_id in self.repos:
            raise HubHTTPError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        if namespace != user:
            raise HubHTTPError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        files = {".gitattributes": self._put_blob(_GITATTRIBUTES)}
        head = self._new_commit(None, files, "initial commit")
        self.repos[repo_id] = {
            "owner": user,
            "private": body.get("visibility") == "private",
            "branches": {"main": head},
        }
        self._save_state()
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": head[:24]}

    def validate(self, body, **_):
        errors = validate_card_metadata(body.get("content", ""))
        warnings = [] if body.get("content", "").startswith("---") else [{"message": "empty or missing yaml metadata"}]
        return (400 if errors else 200), {"errors": [{"message": e} for e in errors], "warnings": warnings}

    def info(self, user, repo, rev=None, **_):
        repo_state = self._readable(repo, user)
        sha = self._resolve(repo, unquote(rev or "main"))
        files = self.commits[sha]["files"]
        meta = {}
        if "README.md" in files:
            meta = parse_front_matter(self._blob(files["README.md"]).decode())[0] or {}
        return 200, {
            "_id": sha[:24],
            "id": repo,
            "modelId": repo,
            "author": repo_state["owner"],
            "sha": sha,
            "private": repo_state["private"],
            "disabled": False,
            "gated": False,
            "lastModified": "2026-11-25T18:00:00.000Z",
            "createdAt": "2026-11-25T18:00:00.000Z",
            "library_name": meta.get("library_name"),
            "pipeline_tag": meta.get("pipeline_tag"),
            "tags": meta.get("tags", []),
            "cardData": meta,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }

    def tree(self, user, repo, rev, query, path=None, **_):
        self._readable(repo, user)
        files = self.commits[self._resolve(repo, unquote(rev))]["files"]
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        out, folders = [], set()
        for p, sha in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            out.append({"type": "file", "oid": sha, "size": len(self._blob(sha)), "path": p})
        out += [{"type": "directory", "oid": git_blob_sha1(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        return 200, out

    def preupload(self, user, repo, rev, body, **_):
        self._writable(repo, user)
        head = self._resolve(repo, unquote(rev))
        existing = self.commits[head]["files"]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
            for f in body["files"]
        ]
        return 200, {"files": files, "commitOid": head}

    def commit(self, user, repo, rev, raw, query, **_):
        repo_state = self._writable(repo, user)
        branch = unquote(rev)
        if branch not in repo_state["branches"]:
            raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if query.get("create_pr"):
            raise HubHTTPError(400, "This test Hub has no pull requests")
        head = repo_state["branches"][branch]
        files = dict(self.commits[head]["files"])
        header = {}
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = self._put_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: s for p, s in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubHTTPError(400, f"This test Hub does not support '{key}' operations (LFS/Xet)")
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        sha = self._new_commit(head, files, header.get("summary", ""), header.get("description", ""))
        repo_state["branches"][branch] = sha
        self._save_state()
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo}/commit/{sha}"}

    def branch(self, user, repo, branch, body, **_):
        repo_state = self._writable(repo, user)
        branch = unquote(branch)
        if branch in repo_state["branches"]:
            raise HubHTTPError(409, "Reference already exists")
        repo_state["branches"][branch] = self._resolve(repo, body.get("startingPoint") or "main")
        self._save_state()
        return 200, {}

    def resolve(self, user, repo, rev, path, **_):
        self._readable(repo, user)
        commit = self._resolve(repo, unquote(rev))
        sha = self.commits[commit]["files"].get(unquote(path))
        if sha is None:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound")
        headers = {"ETag": f'"{sha}"', "X-Repo-Commit": commit, "Content-Type": "application/octet-stream"}
        return 200, headers, self._blob(sha)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: requests are recorded in hub.requests instead
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        raw = self._read_body() if method == "POST" else b""
        name, status = "unknown", 404
        try:
            for route_method, route, pattern in _ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    name = route
                    break
            else:
                raise HubHTTPError(404, f"no route for {method} {url.path}")
            failure = hub._failures.get(name)
            if failure and failure.times != 0:
                if failure.times is not None:
                    failure.times -= 1
                raise HubHTTPError(failure.status, f"injected failure on {name}")
            with hub.lock:
                user = hub._user(self.headers)
                body = (
                    json.loads(raw)
                    if raw and (self.headers.get("Content-Type") or "").startswith("application/json")
                    else {}
                )
                kwargs = {k: v for k, v in match.groupdict().items() if v is not None}
                result = getattr(hub, name)(
                    user=user, body=body, raw=raw.decode(errors="replace"), query=parse_qs(url.query), **kwargs
                )
            if len(result) == 2:
                status, payload = result
                self._send(status, {"Content-Type": "application/json"}, json.dumps(payload).encode(), method)
            else:
                status, headers, content = result
                self._send(status, headers, content, method)
        except HubHTTPError as e:
            status = e.status
            headers = {"Content-Type": "application/json", "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, headers, json.dumps({"error": e.message, **e.extra}).encode(), method)
        finally:
            hub.requests.append((method, name, status))

    def _send(self, status: int, headers: dict[str, str], content: bytes, method: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(content)


# ------------------------------------------------------------------------------------------------------------------
# card metadata validation (the checks of the Hub's /api/validate-yaml that matter here)


def parse_front_matter(content: str) -> tuple[dict | None, str]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
    if not match:
        return None, content
    return yaml.safe_load(match.group(1)), content[match.end() :]


def validate_card_metadata(content: str) -> list[str]:
    """Errors in a README's YAML front matter: a mapping, string tags, a Hub-id base_model, a sound model-index."""
    try:
        meta, _ = parse_front_matter(content)
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    if not all(isinstance(t, str) for t in meta.get("tags", [])):
        errors.append('"tags" must be a list of strings')
    bases = meta.get("base_model", [])
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base):
            errors.append(f'"base_model" must be a Hub model id, got {base!r}')
    for entry in meta.get("model-index", []) or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        for result in entry.get("results", []):
            task, dataset, metrics = result.get("task", {}), result.get("dataset", {}), result.get("metrics", [])
            if not isinstance(task.get("type"), str):
                errors.append('"model-index" results need "task.type"')
            if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                errors.append('"model-index" results need "dataset.type" and "dataset.name"')
            for metric in metrics:
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append('"model-index" metrics need a "type" and a numeric or string "value"')
    return errors


# ------------------------------------------------------------------------------------------------------------------
# pointing huggingface_hub at the server


def point_huggingface_hub_at(url: str, home: Path, monkeypatch) -> None:
    """Make huggingface_hub (already imported) talk to ``url`` and keep its cache and token file under ``home``.

    huggingface_hub reads HF_ENDPOINT and HF_HOME once, at import, into module constants; in a pytest session it is
    imported long before a fixture picks the server's port (conftest imports, other test modules). So the derived
    constants are patched here, for one test: the endpoint and the resolve-URL template built from it, the hosts
    the client trusts, the module-level ``HfApi`` behind ``huggingface_hub.create_repo`` etc. (it copied the
    endpoint when it was built), offline mode (conftest sets HF_HUB_OFFLINE=1; peft also reads the variable), and
    every path derived from HF_HOME, so no test reads or writes the real cache or a real saved token.
    """
    from urllib.parse import urlsplit as split

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    home = Path(home)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {split(url).hostname})
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", url)  # for subprocesses
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(home / "hub"), raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
