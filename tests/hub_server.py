"""A stand-in Hugging Face hub on 127.0.0.1, for tests (its proxy: proxy_server.py).

`FakeHub` answers what huggingface_hub's `hf_hub_download` and transformers'
`from_pretrained` ask of huggingface.co (see huggingface_hub/file_download.py):

- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (``/datasets/{repo}/...`` for
  datasets): a small file answers 200 with ``ETag`` (its git blob sha1),
  ``X-Repo-Commit`` and ``Content-Length``; a large ("LFS") file answers 302
  to a CDN on another origin (``localhost`` instead of ``127.0.0.1``), with
  ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, as
  the real hub does; a renamed repo (an alias) answers 307 to its new name.
- missing file, revision or repo: 404 with the ``X-Error-Code`` the client
  turns into ``EntryNotFoundError``, ``RevisionNotFoundError`` or
  ``RepositoryNotFoundError``.
- ``GET /api/{models,datasets}/{repo}[/revision/{rev}]`` and
  ``.../tree/{rev}[/{path}]``: repo info and file listings.

Every request is recorded in ``requests`` as ``(method, path)``. A ``GET``
of a file honours ``Range: bytes=N-`` (206), as the hub and its CDN do, so the
client can resume.

Faults, as a hub on a bad day has them: ``faults[file name]`` set to a status
(``500``, ``429``, ...) answers every request for that file (metadata and
bytes) with it, and ``Retry-After: 0`` so the client's own retries take
seconds rather than minutes; set to ``"stall"`` the file's bytes stop half-way
(and a resumed request gets none) while the connection stays open.
`SilentHub` takes connections and never answers at all.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 10_000  # bytes; larger files are served like LFS files (redirect to a CDN)


def make_zip(path, split, dialogues, acts=None, emotions=None, folder=None, omit=None):
    """Build {split}.zip in DailyDialog's layout: {folder}/dialogues{,_act,_emotion}_{split}.txt."""
    def labels(dialogue, label):
        return " ".join([label] * dialogue.count("__eou__")) + " "

    files = {
        f"dialogues_{split}.txt": dialogues,
        f"dialogues_act_{split}.txt": acts or [labels(d, "2") for d in dialogues],
        f"dialogues_emotion_{split}.txt": emotions or [labels(d, "0") for d in dialogues],
    }
    folder = split if folder is None else folder
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, lines in files.items():
            if name != omit:
                zf.writestr(f"{folder}/{name}" if folder else name, "\n".join(lines) + "\n")
    return path


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """One repo at one commit: file name -> bytes."""

    def __init__(self, files: dict[str, bytes], commit: str | None = None):
        self.files = dict(files)
        self.commit = commit or hashlib.sha1(repr(sorted(self.files)).encode()).hexdigest()

    @classmethod
    def from_folder(cls, folder: Path) -> Repo:
        return cls({p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()})


class _Stopping:
    """Shared start/stop of a threaded server on 127.0.0.1, port 0."""

    server: ThreadingHTTPServer

    def _serve(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeHub(_Stopping):
    """The stand-in hub. ``repos`` maps (kind, repo_id) -> Repo, kind "models" or "datasets";
    ``aliases`` maps (kind, old_id) -> new_id (a renamed repo, redirected as the real hub does)."""

    def __init__(self, repos: dict[tuple[str, str], Repo], aliases: dict[tuple[str, str], str] | None = None):
        self.repos = repos
        self.aliases = aliases or {}
        self.requests: list[tuple[str, str]] = []
        self.faults: dict[str, int | str] = {}  # file name -> an HTTP status to answer, or "stall"
        self.closing = threading.Event()  # ends the stalls, so that close() does not wait for them
        self._lock = threading.Lock()
        self._serve(_HubHandler)

    def close(self):
        self.closing.set()
        super().close()

    def env(self, cache_dir, endpoint: str | None = None) -> dict[str, str]:
        """Variables for a subprocess that must use this hub (and nothing else) with its own cache."""
        cache_dir = Path(cache_dir)
        return {
            "HF_ENDPOINT": endpoint or self.url,
            "HF_HOME": str(cache_dir),
            "HF_HUB_CACHE": str(cache_dir / "hub"),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_TOKEN": "",  # never send a real token to a test server
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",  # a busy test machine is slow, not offline
            **no_proxy_env(),
        }

    def record(self, method: str, path: str):
        with self._lock:
            self.requests.append((method, path))

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p in self.requests if method in (None, m)]


def no_proxy_env() -> dict[str, str]:
    """Empty proxy variables: urllib and httpx treat an empty value as unset."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    return {n: "" for name in names for n in (name, name.lower())}


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects of the hub

    def log_message(self, *args):  # quiet: tests read .requests instead
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.owner

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    # --- routing

    def _route(self, body: bool):
        path = urlsplit(self.path).path
        self.hub.record(self.command, path)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] == ["cdn"]:
            return self._cdn(parts[1:], body)
        if parts[:1] == ["api"] and len(parts) > 2:
            return self._api(parts[1], parts[2:], body)
        kind = "models"
        if parts[:1] == ["datasets"]:
            kind, parts = "datasets", parts[1:]
        if "resolve" in parts:
            i = parts.index("resolve")
            if len(parts) > i + 2:
                return self._resolve(kind, "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :]), body)
        self._error(404, "", "Not Found")

    def _find(self, kind, repo_id, rest: str):
        """(repo, None) or (None, redirect path) for a renamed repo, or (None, None)."""
        if (kind, repo_id) in self.hub.repos:
            return self.hub.repos[(kind, repo_id)], None
        new = self.hub.aliases.get((kind, repo_id))
        if new:
            return None, ("/datasets/" if kind == "datasets" else "/") + new + rest
        return None, None

    def _resolve(self, kind, repo_id, revision, filename, body):
        repo, moved = self._find(kind, repo_id, f"/resolve/{revision}/{filename}")
        if moved:
            return self._send(307, b"", {"Location": moved}, body)  # relative, same host: the client follows
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on main", {"X-Repo-Commit": repo.commit})
        if self._failed(filename):
            return
        headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if len(data) > LFS_THRESHOLD:
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'"{git_blob_sha1(data)}"', "Location": f"http://localhost:{self.hub.port}/cdn/{sha256}"})
            return self._send(302, b"", headers, body)
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        self._file(filename, data, headers, body)

    def _cdn(self, parts, body):
        for repo in self.hub.repos.values():
            for filename, data in repo.files.items():
                if parts and hashlib.sha256(data).hexdigest() == parts[0]:
                    if self._failed(filename):
                        return
                    return self._file(filename, data, {"ETag": f'"{parts[0]}"', "Content-Type": "application/octet-stream"},
                                      body)
        self._send(404, b"NoSuchKey", {}, body)

    # --- faults and file bytes

    def _failed(self, filename) -> bool:
        """Answer with the file's fault status, if it has one."""
        status = self.hub.faults.get(filename)
        if not isinstance(status, int):
            return False
        self._error(status, "", http.client.responses.get(status, "Error"), {"Retry-After": "0"})
        return True

    def _file(self, filename, data: bytes, headers: dict, body: bool):
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if body else None
        if wanted and 0 < int(wanted[1]) < len(data):
            start = int(wanted[1])
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        if self.hub.faults.get(filename) != "stall" or not body:
            return self._send(206 if start else 200, data[start:], headers, body)
        # Promise the whole rest, send what comes before the half-way mark, then nothing: a stall, not a close.
        self._send(206 if start else 200, data[start : max(start, len(data) // 2)], {**headers, "Content-Length":
                   str(len(data) - start)}, body)
        self.wfile.flush()
        self.hub.closing.wait()
        self.close_connection = True

    def _api(self, kinds, parts, body):
        kind = {"models": "models", "datasets": "datasets"}.get(kinds)
        if kind is None:
            return self._error(404, "", "Not Found")
        for size in (2, 1):  # repo ids are "name" or "owner/name"
            repo_id, rest = "/".join(parts[:size]), parts[size:]
            repo, moved = self._find(kind, repo_id, "")
            if moved:
                return self._send(307, b"", {"Location": f"/api/{kind}/{moved.removeprefix('/datasets/').lstrip('/')}"
                                             + "".join(f"/{p}" for p in rest)}, body)
            if repo is not None:
                break
        else:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not rest or rest[0] == "revision":
            return self._json(self._info(kind, repo_id, repo), body)
        if rest[0] == "tree" and len(rest) > 1:
            return self._tree(repo, "/".join(rest[2:]), body)
        self._error(404, "", "Not Found")

    def _info(self, kind, repo_id, repo):
        info = {"id": repo_id, "_id": repo.commit[:24], "sha": repo.commit, "private": False, "gated": False,
                "disabled": False, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
        if kind == "models":
            info.update(modelId=repo_id, pipeline_tag="text2text-generation", library_name="transformers")
        return info

    def _tree(self, repo, folder, body):
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, dirs = [], set()
        for name, data in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest:
                dirs.add(prefix + rest.split("/")[0])
            else:
                entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)})
        if prefix and not entries and not dirs:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on main")
        entries += [{"type": "directory", "path": d, "size": 0, "oid": git_blob_sha1(d.encode())} for d in sorted(dirs)]
        self._json(entries, body)

    # --- answers

    def _json(self, obj, body):
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, status, code, message, extra=None):
        headers = {"X-Error-Message": message, "Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, self.command != "HEAD")

    def _send(self, status, data: bytes, headers: dict, body: bool):
        self.send_response(status)
        headers = {"Content-Length": str(len(data)), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


class SilentHub:
    """A hub that hangs: the kernel completes every connection (a listening socket's backlog) and nothing
    is ever read or answered. ``.url``; closing it resets the connections waiting on it."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
