"""The `mock` provider end to end: a real `stacyvm serve` with
`STACYVM_PROVIDERS=mock STACYVM_DEFAULT_PROVIDER=mock`, driven by the official
Python client (stacyvm==0.1.1) and raw HTTP.

The mock runs no program and isolates nothing: a sandbox is a directory
`<data_dir>/mock/<id>/` (its files under `root/`) served in-process on the
usual agent socket, and exec interprets a few shell-like commands.  These
tests need no Docker, no image and no privileges; the server binary and the
agent binary (`STACYVM_BIN`, `STACYVM_AGENT_PATH`, as for the whole suite)
must exist."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
import stacyvm
from stacyvm.exceptions import SandboxNotFound

from conftest import SANDBOX_ID_RE, ServerProcess, _check_common, assert_error

MOCK_ENV = {"STACYVM_PROVIDERS": "mock", "STACYVM_DEFAULT_PROVIDER": "mock"}
NOT_FOUND_MSG = "command not found (the mock provider runs no programs)"


class MockServer(ServerProcess):
    """A server whose only provider is the mock.  The base class knows only
    the docker and native providers; its leak checks look for those and
    find nothing here."""

    def __init__(self) -> None:
        super().__init__(env=dict(MOCK_ENV), provider="native")
        self.provider = "mock"

    def mock_dir(self, sandbox_id: str) -> Path:
        return Path(self.data_dir) / "mock" / sandbox_id

    def run_dir(self, sandbox_id: str) -> Path:
        return Path(self.data_dir) / "s" / sandbox_id


@pytest.fixture
def mock_server():
    problems = _check_common()
    if problems:
        pytest.fail("E2E prerequisites missing: " + "; ".join(problems), pytrace=False)
    srv = MockServer()
    try:
        srv.start()
        yield srv
    finally:
        left = srv.shutdown()
        assert not left, left


@pytest.fixture
def client(mock_server):
    with stacyvm.Client(mock_server.url) as c:
        yield c


@pytest.fixture
def http(mock_server):
    with mock_server.client() as c:
        yield c


def wait_gone(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def test_providers_show_mock_without_isolation(mock_server, client):
    provs = client.providers()
    names = [p["name"] for p in provs]
    assert names == ["mock"], provs
    mock = provs[0]
    assert mock["isolation"] == "none", mock
    assert mock["healthy"] is True, mock
    assert mock["default"] is True, mock
    # It runs no program, so it does not claim `exec`.
    assert sorted(mock["capabilities"]) == ["files", "simulated_exec", "streaming"], mock
    log = mock_server.log_text()
    assert "ISOLATE NOTHING and RUN NO CODE" in log, log[-2000:]


def test_client_flow(mock_server, client, http):
    sb = client.spawn(image="anything:latest", ttl="10m")
    sid = sb.id
    try:
        assert SANDBOX_ID_RE.match(sid), sid
        assert sb.state == "running"
        assert sb.provider == "mock"
        info = http.get(f"/sandboxes/{sid}").json()
        assert info["isolation"] == "none", info
        assert mock_server.mock_dir(sid).joinpath("root", "workspace").is_dir()
        state = json.loads(mock_server.mock_dir(sid).joinpath("state.json").read_text())
        assert state["sandbox_id"] == sid
        assert state["instance_id"] == mock_server.instance_id()

        # exec: exit codes, output, unknown commands
        res = sb.exec("echo hi")
        assert (res.exit_code, res.stdout, res.stderr) == (0, "hi\n", "")
        assert sb.exec("exit 3").exit_code == 3
        res = sb.exec("echo out; echo err >&2; false")
        assert (res.exit_code, res.stdout, res.stderr) == (1, "out\n", "err\n")
        res = sb.exec("python3 -c 'print(1)'")
        assert res.exit_code == 127
        assert res.stderr == f"mock: python3: {NOT_FOUND_MSG}\n"
        res = sb.exec("echo", args=["$HOME", ";", "*"], mode="argv")
        assert res.stdout == "$HOME ; *\n"
        assert sb.exec("pwd").stdout == "/workspace\n"
        res = sb.exec("echo $GREETING", env={"GREETING": "hello"})
        assert res.stdout == "hello\n"
        r = http.post(f"/sandboxes/{sid}/exec", json={"command": "cat", "stdin": "piped"})
        assert r.status_code == 200 and r.json()["stdout"] == "piped", r.text

        # a timeout ends at the deadline with 408 `timeout`
        t0 = time.monotonic()
        r = http.post(f"/sandboxes/{sid}/exec", json={"command": "sleep 30", "timeout": "1s"})
        took = time.monotonic() - t0
        assert took < 10, took
        body = assert_error(r, 408, "timeout")
        assert body.get("exit_code") == 137, body

        # streaming
        chunks = list(sb.exec_stream("echo a; sleep 0.2; echo b >&2; exit 4"))
        shown = [(c.stream, c.data) for c in chunks]
        assert shown[:2] == [("stdout", "a\n"), ("stderr", "b\n")], shown
        assert shown[-1][0] == "exit", shown

        # files
        sb.write_file("/workspace/dir/hello.txt", "hello mock\n")
        assert sb.read_file("/workspace/dir/hello.txt") == "hello mock\n"
        assert sb.exec("cat dir/hello.txt").stdout == "hello mock\n"
        entries = sb.list_files("/workspace/dir")
        assert [e["name"] for e in entries] == ["hello.txt"], entries
        assert entries[0]["size"] == len("hello mock\n")
        data = bytes(range(256)) * 64
        r = http.put(f"/sandboxes/{sid}/files/raw", params={"path": "/workspace/all.bin"}, content=data)
        assert r.status_code in (200, 201), r.text
        r = http.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/all.bin"})
        assert r.status_code == 200 and r.content == data
        assert mock_server.mock_dir(sid).joinpath("root/workspace/all.bin").read_bytes() == data
        sb.delete_file("/workspace/dir", recursive=True)
        assert [e["name"] for e in sb.list_files("/workspace")] == ["all.bin"]
        r = http.get(f"/sandboxes/{sid}/files", params={"path": "/../etc/passwd"})
        assert_error(r, 400, "invalid_request")
        res = sb.exec("cat ../../../../etc/passwd")
        assert res.exit_code == 1 and res.stdout == "", res

        # a live preview answers 502 `port_closed` at once: nothing listens
        # inside a mock sandbox
        r = http.get(f"/sandboxes/{sid}/preview/3000")
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        r = httpx.get(
            mock_server.url + "/",
            headers={
                "Host": f"3000-{sid}.localhost",
                "X-Preview-Token": token,
                "Accept": "application/json",
            },
            timeout=10,
        )
        assert_error(r, 502, "port_closed")
    finally:
        sb.destroy()
    assert wait_gone(mock_server.mock_dir(sid)), f"{mock_server.mock_dir(sid)} left behind"
    assert wait_gone(mock_server.run_dir(sid)), f"{mock_server.run_dir(sid)} left behind"
    with pytest.raises(SandboxNotFound):
        client.get(sid)


def test_sandbox_survives_a_restart(mock_server, client, http):
    sb = client.spawn(image="anything:latest", ttl="10m")
    sid = sb.id
    sb.write_file("/workspace/kept.txt", "kept")
    assert mock_server.stop() == 0
    mock_server.start()
    with stacyvm.Client(mock_server.url) as c2:
        again = c2.get(sid)
        assert again.state == "running"
        assert again.read_file("/workspace/kept.txt") == "kept"
        assert again.exec("cat kept.txt").stdout == "kept"
        again.destroy()
    assert wait_gone(mock_server.mock_dir(sid))
    assert not os.listdir(Path(mock_server.data_dir) / "mock")
