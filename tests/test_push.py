"""push_to_hub / `gmim push` against an in-test HTTP server that speaks the Hub's upload API.

No real Hub is reachable here and no installable server accepts uploads, so this one test double sits at the HTTP
level: huggingface_hub's real client code (create_repo, README validation, preupload, NDJSON commit) talks to it,
and nothing of this project is replaced.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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
                hub.requests.append(("GET", self.path, dict(self.headers)))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

        return Handler

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
