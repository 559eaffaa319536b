"""The `stacyvm` binary's client commands against a running server (of the
default provider, `native`: the CLI is provider-agnostic)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid

import pytest

from conftest import (
    BIN,
    IMAGE,
    SANDBOX_ID_RE,
    SandboxTracker,
    only_providers,
    runtime_alive,
    wait_no_leftovers,
)

pytestmark = only_providers("native")


def cli(server, *args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    return subprocess.run(
        [BIN, *args[:1], "--server", server.url, *args[1:]],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
    )


def show(p: subprocess.CompletedProcess) -> str:
    return f"rc={p.returncode} stdout={p.stdout[:500]!r} stderr={p.stderr[:500]!r}"


@pytest.fixture(scope="module")
def cli_sandbox(server):
    tracker = SandboxTracker()
    p = cli(server, "spawn", "--image", IMAGE, "--ttl", "10m", "--meta", "via=cli")
    out = p.stdout.decode().strip()
    if p.returncode == 0 and SANDBOX_ID_RE.match(out):
        tracker.add(server, out)
    yield p
    problems = tracker.cleanup()
    assert not problems, problems


@pytest.fixture
def sid(cli_sandbox):
    p = cli_sandbox
    out = p.stdout.decode()
    assert p.returncode == 0, show(p)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and SANDBOX_ID_RE.match(lines[0]), f"spawn should print just an id: {show(p)}"
    return lines[0]


def test_spawn_prints_id(server, sid):
    with server.client() as c:
        body = c.get(f"/sandboxes/{sid}").json()
    assert body["state"] == "running"
    assert body["image"] == IMAGE
    assert body["metadata"] == {"via": "cli"}
    assert body["provider"] == server.provider
    assert runtime_alive(server, sid, server.provider)


def test_exec_shell_string(server, sid):
    p = cli(server, "exec", sid, "--", "python3 -c 'print(40 + 2)'")
    assert p.returncode == 0, show(p)
    assert p.stdout == b"42\n", show(p)


def test_exec_exit_code_is_propagated(server, sid):
    p = cli(server, "exec", sid, "--", "sh", "-c", "exit 5")
    assert p.returncode == 5, show(p)
    p = cli(server, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert p.returncode == 3, show(p)
    assert p.stdout == b"out\n", show(p)
    assert b"err\n" in p.stderr, show(p)
    # argv form: no shell, arguments verbatim
    p = cli(server, "exec", sid, "--", "echo", "$HOME", "a b")
    assert p.returncode == 0 and p.stdout == b"$HOME a b\n", show(p)


def test_exec_env_workdir_and_stream(server, sid):
    p = cli(server, "exec", "-e", "FOO=bar baz", "-w", "/tmp", sid, "--", "echo \"$FOO\"; pwd")
    assert p.returncode == 0, show(p)
    assert p.stdout == b"bar baz\n/tmp\n", show(p)
    p = cli(server, "exec", "--stream", sid, "--", "echo one; echo two >&2; exit 4")
    assert p.returncode == 4, show(p)
    assert p.stdout == b"one\n", show(p)
    assert b"two\n" in p.stderr, show(p)


def test_exec_timeout(server, sid):
    p = cli(server, "exec", "--timeout", "1s", sid, "--", "sleep 20")
    assert p.returncode != 0, show(p)
    assert b"panicked" not in p.stderr, show(p)


def test_ls_shows_id(server, sid):
    p = cli(server, "ls")
    assert p.returncode == 0, show(p)
    assert sid in p.stdout.decode(), show(p)


def test_cp_in_and_out_byte_identical(server, sid, tmp_path):
    data = os.urandom(300_000) + bytes(range(256))
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    remote = f"/workspace/cli-{uuid.uuid4().hex[:8]}/in.bin"
    p = cli(server, "cp", str(src), f"{sid}:{remote}")
    assert p.returncode == 0, show(p)
    with server.client() as c:
        r = c.get(f"/sandboxes/{sid}/files", params={"path": remote})
        assert r.status_code == 200 and r.content == data, "uploaded bytes differ"
    dst = tmp_path / "out.bin"
    p = cli(server, "cp", f"{sid}:{remote}", str(dst))
    assert p.returncode == 0, show(p)
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    # stdin / stdout with "-"
    p = cli(server, "cp", "-", f"{sid}:/workspace/from-stdin.txt", stdin=b"piped\x00bytes")
    assert p.returncode == 0, show(p)
    p = cli(server, "cp", f"{sid}:/workspace/from-stdin.txt", "-")
    assert p.returncode == 0 and p.stdout == b"piped\x00bytes", show(p)
    # a missing remote file is an error, not an empty local file
    p = cli(server, "cp", f"{sid}:/workspace/does-not-exist", str(tmp_path / "nope"))
    assert p.returncode != 0, show(p)


def test_errors_are_reported_not_panics(server):
    p = cli(server, "exec", "sb_" + "z" * 16, "--", "true")
    assert p.returncode != 0, show(p)
    assert b"panicked" not in p.stderr and p.stderr.strip(), show(p)
    p = cli(server, "rm", "sb_" + "z" * 16)  # may be 404 or 200 per API.md
    assert p.returncode in (0, 1), show(p)
    assert b"panicked" not in p.stderr, show(p)
    p = cli(server, "cp", "nowhere", "also-nowhere")
    assert p.returncode != 0 and b"panicked" not in p.stderr, show(p)


def test_rm_then_ls_does_not_show(server, sid):
    # runs last in this module: destroys the module's sandbox
    p = cli(server, "rm", sid)
    assert p.returncode == 0, show(p)
    p = cli(server, "ls")
    assert p.returncode == 0, show(p)
    assert sid not in p.stdout.decode(), show(p)
    assert wait_no_leftovers(server, sid, server.provider) == []
