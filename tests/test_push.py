"""push_to_hub / `gmim push` against an in-test HTTP server that speaks the Hub's upload API.

No real Hub is reachable here and no installable server accepts uploads, so this one test double sits at the HTTP
level: huggingface_hub's real client code (create_repo, README validation, preupload, NDJSON commit) talks to it,
and nothing of this project is replaced.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load
from typer.testing import CliRunner

from gmim_hub import GMIMError, GMIMForSegmentation, WeightsError
from gmim_hub.cli.main import app

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    """Records requests; stores committed files per repo. `fail_commit` makes the commit endpoint answer 401."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []  # method, path, headers
        self.repos: dict[str, dict] = {}  # repo id -> create payload
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.fail_commit = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                status, payload = hub.route(path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, data = hub.serve(unquote(self.path.split("?")[0]))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

            do_HEAD = do_GET

        return Handler

    def serve(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """The Hub's download API for the committed files (every revision is `main` = COMMIT): repo info, the file
        tree, and /resolve/ with the headers huggingface_hub reads (commit, ETag); errors carry X-Error-Code."""
        routes = (r"/api/models/(\w+/[\w-]+)/(revision|tree)/([^/]+)", r"/(\w+/[\w-]+)/(resolve)/([^/]+)/(.+)")
        m = next((m for m in (re.fullmatch(r, path) for r in routes) if m), None)
        if m is None:
            return 404, {}, b""
        repo, kind, revision = m.group(1), m.group(2), m.group(3)
        error = ("RepoNotFound" if repo not in self.files else
                 "RevisionNotFound" if revision not in ("main", COMMIT) else
                 "EntryNotFound" if kind == "resolve" and m.group(4) not in self.files[repo] else None)
        if error:
            return 404, {"X-Error-Code": error, "Content-Type": "application/json"}, b'{"error": "not found"}'
        files = self.files[repo]
        if kind == "resolve":
            data = files[m.group(4)]
            return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data
        listing = ({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]} if kind == "revision"
                   else [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                         for n, d in files.items()])
        return 200, {"Content-Type": "application/json"}, json.dumps(listing).encode()

    def route(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = req
            return 200, {"url": f"{self.url}/{repo}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        m = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
        if m and m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        if m and m.group(2) == "commit":
            if self.fail_commit:
                return 401, {"error": "Invalid credentials in Authorization header"}
            return 200, self._commit(m.group(1), body)
        return 404, {"error": f"no route {path}"}

    def _commit(self, repo: str, body: bytes) -> dict:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        self.commits.append(lines[0]["value"])
        store = self.files.setdefault(repo, {})
        for item in lines[1:]:
            assert item["key"] == "file" and item["value"]["encoding"] == "base64", item
            store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return {"commitUrl": f"{self.url}/{repo}/commit/{COMMIT}", "commitOid": COMMIT, "pullRequestUrl": None}


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(30)
    return GMIMForSegmentation(tiny_config).eval()


def _metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len])["__metadata__"]


def _posted_paths(hub: FakeHub) -> list[str]:
    return [p.split("?")[0] for m, p, _ in hub.requests if m == "POST"]


def test_push_to_hub_uploads_the_saved_files(hub, model, tmp_path):
    url = model.push_to_hub("org/tiny-seg", token="hf_test_token", endpoint=hub.url, commit_message="first")
    assert url == f"{hub.url}/org/tiny-seg/commit/{COMMIT}"
    assert _posted_paths(hub) == ["/api/repos/create", "/api/validate-yaml", "/api/models/org/tiny-seg/preupload/main",
                                  "/api/models/org/tiny-seg/commit/main"]
    assert all(h.get("authorization") == "Bearer hf_test_token" for _, _, h in hub.requests)
    assert hub.repos["org/tiny-seg"]["visibility"] == "public" and hub.commits[0]["summary"] == "first"
    local = model.save_pretrained(tmp_path / "local", repo_id="org/tiny-seg")  # the same files, written here
    uploaded = hub.files["org/tiny-seg"]
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "README.md"):
        assert uploaded[name] == (local / name).read_bytes(), name
    # safetensors' header order is not stable between writes: compare the tensors and the header metadata
    sent, kept = load(uploaded["model.safetensors"]), load((local / "model.safetensors").read_bytes())
    assert sent.keys() == kept.keys() and all(torch.equal(sent[k], kept[k]) for k in sent)
    assert _metadata(uploaded["model.safetensors"]) == _metadata((local / "model.safetensors").read_bytes())
    # what arrived is a loadable model
    received = tmp_path / "received"
    received.mkdir()
    for name, data in uploaded.items():
        (received / name).write_bytes(data)
    loaded = GMIMForSegmentation.from_pretrained(received)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_push_to_an_existing_repo_and_save_pretrained_push(hub, model, tmp_path):
    model.push_to_hub("org/again", endpoint=hub.url, private=True)
    assert hub.repos["org/again"]["visibility"] == "private"
    model.save_pretrained(tmp_path / "m", push_to_hub=True, repo_id="org/again", endpoint=hub.url)
    assert len(hub.commits) == 2  # the second create_repo got 409 and went on (exist_ok)


def test_failed_upload_is_one_line_gmim_error(hub, model):
    hub.fail_commit = True
    with pytest.raises(GMIMError) as err:
        model.push_to_hub("org/denied", endpoint=hub.url)
    msg = str(err.value)
    assert "upload of" in msg and "to org/denied failed" in msg and "check the repo id, the token" in msg
    assert "\n" not in msg


def test_push_refuses_bad_repo_ids_before_any_request(hub, model):
    with pytest.raises(WeightsError, match="not a valid Hub repo id"):
        model.push_to_hub("../escape", endpoint=hub.url)
    assert hub.requests == []


def test_cli_push_checks_the_folder_then_uploads(hub, model, tmp_path):
    folder = model.save_pretrained(tmp_path / "m")
    (folder / "notes.txt").write_text("not uploaded")
    result = CliRunner().invoke(app, ["push", str(folder), "org/cli", "--endpoint", hub.url, "--token", "hf_x"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps long lines
    assert "loads as GMIMForSegmentation" in out and f"pushed to org/cli: {hub.url}/org/cli/commit/{COMMIT}" in out
    assert sorted(hub.files["org/cli"]) == ["README.md", "config.json", "model.safetensors"]
    assert all(data == (folder / name).read_bytes() for name, data in hub.files["org/cli"].items())


def test_cli_push_of_a_broken_folder_fails_before_uploading(hub, model, tmp_path):
    folder: Path = model.save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = CliRunner().invoke(app, ["push", str(folder), "org/cli", "--endpoint", hub.url])
    assert result.exit_code == 2
    assert "truncated or corrupt" in result.stderr and result.stderr.strip().count("\n") == 0
    assert hub.requests == []


@pytest.fixture
def pull_from(hub, monkeypatch):
    """from_pretrained without an endpoint argument reads HF_ENDPOINT, which huggingface_hub turns into these two
    constants when it is imported: point them at the test server."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    return hub


def _fetched(hub: FakeHub) -> list[str]:
    return sorted({p.split("/resolve/")[1].split("/", 1)[1] for m, p, _ in hub.requests if "/resolve/" in p})


def test_pushed_model_loads_back_from_the_hub_at_one_commit(pull_from, model, tmp_path):
    model.push_to_hub("org/round-trip", endpoint=pull_from.url)
    loaded = GMIMForSegmentation.from_pretrained("org/round-trip", cache_dir=tmp_path / "cache")
    assert loaded.hub_source == "org/round-trip" and loaded.hub_revision == COMMIT
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert _fetched(pull_from) == ["config.json", "model.safetensors"]  # never the card, never anything else
    # the cache it filled now serves the same model offline
    again = GMIMForSegmentation.from_pretrained("org/round-trip", cache_dir=tmp_path / "cache", local_files_only=True)
    assert again.hub_revision == COMMIT
    # an interrupted download: the cached file list says model.safetensors belongs there, and the error names it
    (tmp_path / "cache" / "models--org--round-trip" / "snapshots" / COMMIT / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"^model\.safetensors of org/round-trip@main is not in the local cache at "
                                           r".* and local_files_only=True; run once online"):
        GMIMForSegmentation.from_pretrained("org/round-trip", cache_dir=tmp_path / "cache", local_files_only=True)


def test_hub_repos_that_are_not_gmim_models_are_refused_without_downloading_pickles(pull_from, model, tmp_path):
    config = model.save_pretrained(tmp_path / "m") / "config.json"
    pull_from.files["org/old"] = {"config.json": config.read_bytes(), "pytorch_model.bin": b"a pickle"}
    pull_from.files["org/other"] = {"model.safetensors": b"weights", "README.md": b"a card"}
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as err:
        GMIMForSegmentation.from_pretrained("org/old", cache_dir=cache)
    assert "Hub repo org/old@main has no model.safetensors, only pickle-based weights (pytorch_model.bin)" in str(
        err.value) and "gmim convert" in str(err.value)
    assert "pytorch_model.bin" not in _fetched(pull_from)
    with pytest.raises(WeightsError, match="Hub repo org/other@main has no config.json: it is not a gmim-hub model"):
        GMIMForSegmentation.from_pretrained("org/other", cache_dir=cache)
    with pytest.raises(WeightsError, match="Hub repo 'org/missing' not found or not accessible; check the name"):
        GMIMForSegmentation.from_pretrained("org/missing", cache_dir=cache)
    with pytest.raises(WeightsError, match="revision 'v9' not found in Hub repo 'org/old'; check the branch"):
        GMIMForSegmentation.from_pretrained("org/old", revision="v9", cache_dir=cache)
