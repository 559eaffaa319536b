"""A full scenario driven by the official Python client (stacyvm==0.1.1),
unmodified, plus raw-HTTP checks of the same features (API.md §3-§5, §11).

Runs once per provider (`[docker]`, `[native]`): the module's sandbox is
spawned without naming a provider, so it gets the server's default, which the
`server` fixture sets to the provider under test."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import stacyvm
from stacyvm.exceptions import SandboxNotFound, StacyVMError
from stacyvm.models import SandboxInfo, SpawnAdmissionDecision

from conftest import (
    GO_DURATION_RE,
    IMAGE,
    SANDBOX_ID_RE,
    SandboxTracker,
    assert_error,
    parse_time,
    native_state,
    run_in,
    runtime_alive,
    runtime_instance,
    runtime_leftovers,
    wait_no_leftovers,
)

META = {"suite": "e2e", "case": "client-scenario", "who": "tester"}

# Python run inside the sandbox that lists processes whose argv mentions
# "sleep" (the literal is split so the scanner never matches itself).
PROC_SCAN = r"""
import os, json
me = os.getpid()
word = 'sle' + 'ep'
found = []
for p in os.listdir('/proc'):
    if not p.isdigit() or int(p) == me:
        continue
    try:
        argv = open('/proc/%s/cmdline' % p, 'rb').read().decode(errors='replace').split('\0')
    except OSError:
        continue
    if any(a.rsplit('/', 1)[-1] == word or a.startswith(word + ' ') or (' ' + word + ' ') in a for a in argv):
        found.append([p] + argv)
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def client(server):
    with stacyvm.Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def sb(server, client):
    tracker = SandboxTracker()
    sandbox = client.spawn(image=IMAGE, ttl="10m", metadata=META)
    tracker.add(server, sandbox.id)
    yield sandbox
    problems = tracker.cleanup()
    assert not problems, problems


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def unique_dir(prefix: str) -> str:
    return f"/workspace/{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------
# spawn / exec
# --------------------------------------------------------------------------


ISOLATION = {"docker": "container", "native": "namespaces"}


def test_spawn_returns_running_sandbox_of_the_default_provider(server, sb, http):
    assert SANDBOX_ID_RE.match(sb.id), sb.id
    assert sb.state == "running"
    assert sb.provider == server.provider
    assert sb.image == IMAGE
    info = http.get(f"/sandboxes/{sb.id}").json()
    assert info["provider"] == server.provider, info
    assert info["isolation"] == ISOLATION[server.provider], info
    assert info["network"] == "none", info
    assert info["metadata"] == META
    created = parse_time(info["created_at"])
    expires = parse_time(info["expires_at"])
    # ttl "10m" → expires_at = created_at + 10 min (a few seconds of slack)
    assert abs((expires - created).total_seconds() - 600) < 5, info
    assert isinstance(info["memory_mb"], int) and info["memory_mb"] > 0
    assert isinstance(info["vcpus"], int) and info["vcpus"] > 0
    assert info.get("preview_domain"), info
    # the runtime really exists and is marked with this server's instance
    assert runtime_alive(server, sb.id, server.provider), f"no live runtime for {sb.id}"
    assert runtime_instance(server, sb.id, server.provider) == server.instance_id()
    if server.provider == "native":
        st = native_state(server, sb.id)
        assert st["image"] == IMAGE, st


# Python run inside the sandbox: what it can see of the machine.
ISOLATION_PROBE = r"""
import json, os, socket, sys
pids = [p for p in os.listdir('/proc') if p.isdigit()]
cmds = []
for p in pids:
    try:
        cmds.append(open('/proc/%s/cmdline' % p, 'rb').read().split(b'\0'))
    except OSError:
        pass
print(json.dumps({
    'pid1': open('/proc/1/cmdline', 'rb').read().split(b'\0')[0].decode(),
    'npids': len(pids),
    'serve': any(len(c) > 1 and c[0].endswith(b'stacyvm') and c[1] == b'serve' for c in cmds),
    'net': sorted(os.listdir('/sys/class/net')),
    'marker': os.path.exists(sys.argv[1]),
    'host': socket.gethostname(),
}))
"""


def test_sandbox_is_isolated_from_the_host(server, sb, http):
    """PID 1 is the agent, host processes and files are invisible, and the
    network is `none` (loopback only) — for every provider."""
    marker = f"/tmp/stacyvm-e2e-host-only-{uuid.uuid4().hex}"
    with open(marker, "w") as f:
        f.write("host")
    try:
        out = run_in(http, sb.id, "python3", mode="argv", args=["-c", ISOLATION_PROBE, marker])
        assert out["exit_code"] == 0, out
        seen = json.loads(out["stdout"])
    finally:
        os.unlink(marker)
    assert seen["pid1"].endswith("stacyvm-agent"), seen
    assert seen["npids"] < 20, f"sandbox sees {seen['npids']} processes: not in its own PID namespace?"
    assert seen["serve"] is False, "the host's `stacyvm serve` is visible inside the sandbox"
    assert seen["net"] == ["lo"], f"network none should leave only loopback: {seen['net']}"
    assert seen["marker"] is False, "a host /tmp file is visible inside the sandbox"
    assert seen["host"] != socket.gethostname(), seen


def test_exec_prints_42(sb):
    res = sb.exec("python3 -c 'print(40 + 2)'")
    assert res.stdout == "42\n"
    assert res.exit_code == 0
    assert res.stderr == ""
    assert GO_DURATION_RE.match(res.duration), res.duration


def test_exec_nonzero_exit_is_a_normal_result(sb):
    res = sb.exec("exit 7")
    assert res.exit_code == 7
    res = sb.exec("echo before; false")
    assert res.exit_code == 1
    assert res.stdout == "before\n"
    res = sb.exec("python3 -c 'import sys; sys.exit(42)'")
    assert res.exit_code == 42


def test_exec_captures_stderr_separately(sb):
    res = sb.exec("echo to-out; echo to-err >&2; exit 3")
    assert res.stdout == "to-out\n"
    assert res.stderr == "to-err\n"
    assert res.exit_code == 3


def test_exec_args_are_quoted_literally(sb):
    res = sb.exec("printf '%s|' ", args=["a b", "it's", "$HOME", "*"])
    assert res.exit_code == 0, res
    assert res.stdout == "a b|it's|$HOME|*|"
    # shell metacharacters inside args are data, not syntax
    res = sb.exec("printf '%s\\n'", args=["; echo INJECTED", "$(id -u)", "`id`", "a\nb"])
    assert res.stdout == "; echo INJECTED\n$(id -u)\n`id`\na\nb\n"


def test_exec_argv_mode_runs_without_shell(sb):
    res = sb.exec(
        "python3",
        args=["-c", "import sys; print(sys.argv[1:])", "x y"],
        mode="argv",
    )
    assert res.exit_code == 0, res
    assert res.stdout == "['x y']\n"
    # no shell: "$HOME" and ";" reach the program verbatim
    res = sb.exec("echo", args=["$HOME", ";", "ls", "*"], mode="argv")
    assert res.stdout == "$HOME ; ls *\n"


def test_exec_env(sb):
    res = sb.exec(
        "printf '%s/%s' \"$GREETING\" \"$OTHER\"",
        env={"GREETING": "hello world", "OTHER": "x=y;z"},
    )
    assert res.stdout == "hello world/x=y;z"
    # argv mode gets the env too
    res = sb.exec(
        "python3",
        args=["-c", "import os; print(os.environ['ONLY_HERE'])"],
        mode="argv",
        env={"ONLY_HERE": "yes"},
    )
    assert res.stdout == "yes\n"
    # env is per exec, not sticky
    res = sb.exec("printf '%s' \"${ONLY_HERE-unset}\"")
    assert res.stdout == "unset"


def test_exec_workdir(sb):
    assert sb.exec("pwd").stdout == "/workspace\n"
    d = unique_dir("wd")
    res = sb.exec(f"mkdir -p {d}/sub && touch {d}/sub/marker")
    assert res.exit_code == 0, res
    res = sb.exec("pwd; ls", workdir=f"{d}/sub")
    assert res.stdout == f"{d}/sub\nmarker\n"
    # a directory created through the file API works as workdir too
    d2 = unique_dir("wd2")
    sb.write_file(f"{d2}/inner/file.txt", "x")
    res = sb.exec("ls", workdir=f"{d2}/inner", mode="argv")
    assert res.stdout == "file.txt\n"


def _sleep_processes(http: httpx.Client, sid: str) -> list:
    out = run_in(http, sid, "python3", mode="argv", args=["-c", PROC_SCAN])
    assert out["exit_code"] == 0, out
    return json.loads(out["stdout"])


def test_exec_timeout_via_client_kills_process_tree(sb, http):
    assert _sleep_processes(http, sb.id) == [], "stray sleep before the test"
    t0 = time.monotonic()
    with pytest.raises(StacyVMError) as ei:
        sb.exec("sleep 30", timeout="1s")
    elapsed = time.monotonic() - t0
    assert type(ei.value) is StacyVMError, f"wrong exception type {type(ei.value)}"
    assert ei.value.code == "timeout"
    assert elapsed < 2.0, f"408 came after {elapsed:.2f}s, not at the 1s deadline"
    assert elapsed >= 0.9, f"answered after {elapsed:.2f}s, before the deadline"
    left = _sleep_processes(http, sb.id)
    assert left == [], f"processes of the timed-out exec survived: {left}"


def test_exec_timeout_http_408_kills_tree(sb, http):
    t0 = time.monotonic()
    # a process tree: background sleeps, a subshell, and a foreground wait
    cmd = "sleep 30 & (sleep 31; echo never) & sh -c 'sleep 32'; wait"
    r = http.post(f"/sandboxes/{sb.id}/exec", json={"command": cmd, "timeout": "1s"})
    elapsed = time.monotonic() - t0
    assert_error(r, 408, "timeout")
    assert elapsed < 2.0, f"408 after {elapsed:.2f}s"
    assert _sleep_processes(http, sb.id) == []
    # the sandbox still works afterwards
    assert sb.exec("echo alive").stdout == "alive\n"


def test_exec_stream_timeout_reports_in_last_line(sb, http):
    body = {"command": "echo started; sleep 30", "stream": True, "timeout": "1s"}
    t0 = time.monotonic()
    with http.stream("POST", f"/sandboxes/{sb.id}/exec", json=body) as r:
        assert r.status_code == 200
        objs = [json.loads(ln) for ln in r.iter_lines() if ln.strip()]
    elapsed = time.monotonic() - t0
    assert elapsed < 2.5, f"stream ended {elapsed:.2f}s after start"
    assert objs[0] == {"stream": "stdout", "data": "started\n"} or (
        objs[0]["stream"] == "stdout" and objs[0]["data"] == "started\n"
    ), objs
    last = objs[-1]
    assert last["stream"] == "exit", objs
    assert last.get("timeout") is True, last
    assert _sleep_processes(http, sb.id) == []


def test_exec_stdin(sb, http):
    out = run_in(http, sb.id, "tr a-z A-Z", stdin="hello\nworld\n")
    assert out["stdout"] == "HELLO\nWORLD\n"
    # without stdin a reading command gets EOF instead of hanging
    t0 = time.monotonic()
    out = run_in(http, sb.id, "cat; echo done", timeout="10s")
    assert out["stdout"] == "done\n" and time.monotonic() - t0 < 5


def test_exec_large_output(sb):
    res = sb.exec("python3 -c \"import sys; sys.stdout.write('x' * 5000000); sys.stderr.write('y' * 100000)\"")
    assert res.exit_code == 0
    assert len(res.stdout) == 5_000_000 and set(res.stdout) == {"x"}
    assert len(res.stderr) == 100_000


def test_parallel_execs_run_concurrently(sb, server):
    import concurrent.futures

    def one(i):
        with httpx.Client(base_url=server.api_url, timeout=30) as c:
            return run_in(c, sb.id, f"sleep 1; echo {i}")["stdout"]

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    elapsed = time.monotonic() - t0
    assert outs == [f"{i}\n" for i in range(8)]
    assert elapsed < 4, f"8 parallel 1 s execs took {elapsed:.1f}s: serialized?"


def test_exec_stream_via_client(sb):
    chunks = list(
        sb.exec_stream(
            "for i in 1 2 3; do echo line$i; sleep 0.05; done; echo oops >&2; echo tail"
        )
    )
    out = "".join(c.data for c in chunks if c.stream == "stdout")
    err = "".join(c.data for c in chunks if c.stream == "stderr")
    assert out == "line1\nline2\nline3\ntail\n"
    assert err == "oops\n"
    assert chunks, "no chunks"
    assert chunks[-1].stream == "exit", chunks[-1]
    assert {c.stream for c in chunks} <= {"stdout", "stderr", "exit"}


def test_exec_stream_ndjson_over_http(sb, http):
    body = {
        "command": "echo one; echo two >&2; sleep 1.2; echo three; exit 3",
        "stream": True,
    }
    lines = []
    first_data_at = None
    t0 = time.monotonic()
    with http.stream("POST", f"/sandboxes/{sb.id}/exec", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].split(";")[0].strip() == "application/x-ndjson"
        for line in r.iter_lines():
            if first_data_at is None and line.strip():
                first_data_at = time.monotonic() - t0
            lines.append(line)
    total = time.monotonic() - t0
    nonempty = [ln for ln in lines if ln.strip()]
    objs = []
    for ln in nonempty:
        obj = json.loads(ln)
        assert isinstance(obj, dict), ln
        assert isinstance(obj.get("stream"), str), ln
        assert isinstance(obj.get("data"), str), ln
        objs.append(obj)
    assert objs[-1]["stream"] == "exit", objs
    assert objs[-1]["exit_code"] == 3, objs[-1]
    assert all(o["stream"] != "exit" for o in objs[:-1]), objs
    assert "".join(o["data"] for o in objs if o["stream"] == "stdout") == "one\nthree\n"
    assert "".join(o["data"] for o in objs if o["stream"] == "stderr") == "two\n"
    # output is flushed as it arrives, not buffered until the end
    assert total >= 1.1
    assert first_data_at is not None and first_data_at < total - 0.8, (
        f"first line after {first_data_at:.2f}s of {total:.2f}s: not streamed"
    )


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


def _raw_get(http: httpx.Client, sid: str, path: str) -> httpx.Response:
    r = http.get(f"/sandboxes/{sid}/files", params={"path": path})
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:200]}"
    assert r.headers.get("content-type") == "application/octet-stream", r.headers
    return r


def _sha256_in_sandbox(http, sid, path) -> str:
    out = run_in(
        http,
        sid,
        "python3",
        mode="argv",
        args=["-c", "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())", path],
    )
    assert out["exit_code"] == 0, out
    return out["stdout"].strip()


def test_write_read_utf8(sb, http):
    d = unique_dir("utf8")
    text = "héllo wörld ✓ 日本語 🚀\nsecond line\n"
    sb.write_file(f"{d}/hello.txt", text)
    assert sb.read_file(f"{d}/hello.txt") == text
    assert _raw_get(http, sb.id, f"{d}/hello.txt").content == text.encode("utf-8")
    # really those bytes on disk inside the sandbox
    assert _sha256_in_sandbox(http, sb.id, f"{d}/hello.txt") == hashlib.sha256(
        text.encode()
    ).hexdigest()
    # overwrite replaces (no append, no leftovers)
    sb.write_file(f"{d}/hello.txt", "short")
    assert sb.read_file(f"{d}/hello.txt") == "short"
    # empty file
    sb.write_file(f"{d}/empty", "")
    assert _raw_get(http, sb.id, f"{d}/empty").content == b""


def test_binary_roundtrip_base64_json(sb, http):
    d = unique_dir("b64")
    data = bytes(range(256))
    r = http.post(
        f"/sandboxes/{sb.id}/files",
        json={"path": f"{d}/all.bin", "content": base64.b64encode(data).decode(), "encoding": "base64"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "written", r.text
    assert r.json().get("size", len(data)) == len(data), r.text
    got = _raw_get(http, sb.id, f"{d}/all.bin").content
    assert got == data
    assert _sha256_in_sandbox(http, sb.id, f"{d}/all.bin") == hashlib.sha256(data).hexdigest()


def test_binary_roundtrip_raw_put(sb, http):
    d = unique_dir("raw")
    data = bytes(range(256)) * 3
    r = http.put(
        f"/sandboxes/{sb.id}/files/raw",
        params={"path": f"{d}/nested/all.bin"},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "written", "size": len(data)}
    assert _raw_get(http, sb.id, f"{d}/nested/all.bin").content == data


def test_large_random_binary_roundtrip(sb, http):
    d = unique_dir("big")
    data = os.urandom(6 * 1024 * 1024 + 123)
    r = http.put(
        f"/sandboxes/{sb.id}/files/raw", params={"path": f"{d}/big.bin"}, content=data
    )
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(data)
    got = _raw_get(http, sb.id, f"{d}/big.bin").content
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert _sha256_in_sandbox(http, sb.id, f"{d}/big.bin") == hashlib.sha256(data).hexdigest()
    # the same through the JSON base64 route (2 MiB)
    data2 = os.urandom(2 * 1024 * 1024)
    r = http.post(
        f"/sandboxes/{sb.id}/files",
        json={"path": f"{d}/big2.bin", "content": base64.b64encode(data2).decode(), "encoding": "base64"},
    )
    assert r.status_code == 200, r.text
    assert _raw_get(http, sb.id, f"{d}/big2.bin").content == data2


def _check_entry(e: dict) -> None:
    for key, typ in (("path", str), ("name", str), ("size", int), ("mode", str), ("is_dir", bool), ("mod_time", str)):
        assert key in e, f"entry lacks {key}: {e}"
        assert isinstance(e[key], typ), f"{key} has wrong type: {e}"
    assert e["path"].startswith("/") and e["path"].endswith("/" + e["name"]), e
    assert e["mode"].isdigit() and not e["mode"].startswith("0") and all(c in "01234567" for c in e["mode"]), e
    t = parse_time(e["mod_time"])
    assert abs(t - datetime.now(timezone.utc)) < timedelta(minutes=10), e


def test_list_files(sb):
    d = unique_dir("lst")
    sb.write_file(f"{d}/b.txt", "bb")
    sb.write_file(f"{d}/a.txt", "hello", mode="0640")
    sb.write_file(f"{d}/sub/deep.txt", "deep")
    sb.write_file(f"{d}/Z-upper.txt", "z")
    entries = sb.list_files(d)
    assert [e["name"] for e in entries] == sorted(["a.txt", "b.txt", "sub", "Z-upper.txt"])
    for e in entries:
        _check_entry(e)
    by = {e["name"]: e for e in entries}
    assert by["a.txt"]["path"] == f"{d}/a.txt"
    assert by["a.txt"]["size"] == 5
    assert by["a.txt"]["mode"] == "640"
    assert by["a.txt"]["is_dir"] is False
    assert by["b.txt"]["size"] == 2
    assert by["sub"]["is_dir"] is True
    # one level only
    assert all("deep" not in e["name"] for e in entries)
    # empty directory lists as []
    sb.exec(f"mkdir -p {d}/emptydir")
    assert sb.list_files(f"{d}/emptydir") == []
    # default path "/" lists the root
    root_names = [e["name"] for e in sb.list_files()]
    assert "workspace" in root_names and "etc" in root_names
    assert root_names == sorted(root_names)


def test_stat_file(sb, http):
    d = unique_dir("stat")
    sb.write_file(f"{d}/s.txt", "0123456789", mode="0600")
    e = sb.stat_file(f"{d}/s.txt")
    _check_entry(e)
    assert e["path"] == f"{d}/s.txt"
    assert e["name"] == "s.txt"
    assert e["size"] == 10
    assert e["mode"] == "600"
    assert e["is_dir"] is False
    e = sb.stat_file(d)
    assert e["is_dir"] is True and e["name"] == d.rsplit("/", 1)[1]
    with pytest.raises(SandboxNotFound):
        sb.stat_file(f"{d}/missing")
    assert_error(
        http.get(f"/sandboxes/{sb.id}/files/stat", params={"path": f"{d}/missing"}),
        404,
        "file_not_found",
    )


def test_glob_files(sb):
    d = unique_dir("glob")
    for p in ("a.py", "x/b.py", "x/y/c.py", "x/d.txt", "x/y/z/e.py"):
        sb.write_file(f"{d}/{p}", "#")
    got = sb.glob_files(f"{d}/**/*.py")
    assert got == sorted(got), got
    expected = [f"{d}/a.py", f"{d}/x/b.py", f"{d}/x/y/c.py", f"{d}/x/y/z/e.py"]
    assert got == expected, got
    assert sb.glob_files(f"{d}/*.py") == [f"{d}/a.py"]
    assert sb.glob_files(f"{d}/x/*") == [f"{d}/x/b.py", f"{d}/x/d.txt", f"{d}/x/y"]
    assert sb.glob_files(f"{d}/**/*.nothing") == []


def test_move_file_creates_parent(sb, http):
    d = unique_dir("mv")
    sb.write_file(f"{d}/src.txt", "moving")
    sb.move_file(f"{d}/src.txt", f"{d}/new/deeper/dst.txt")
    assert sb.read_file(f"{d}/new/deeper/dst.txt") == "moving"
    with pytest.raises(SandboxNotFound):
        sb.stat_file(f"{d}/src.txt")
    # a directory moves with its content
    sb.write_file(f"{d}/tree/leaf.txt", "leaf")
    r = http.post(
        f"/sandboxes/{sb.id}/files/move",
        json={"old_path": f"{d}/tree", "new_path": f"{d}/moved/tree2"},
    )
    assert r.status_code == 200 and r.json() == {"status": "moved"}, r.text
    assert sb.read_file(f"{d}/moved/tree2/leaf.txt") == "leaf"
    # moving something missing is 404 file_not_found
    assert_error(
        http.post(
            f"/sandboxes/{sb.id}/files/move",
            json={"old_path": f"{d}/nope", "new_path": f"{d}/nope2"},
        ),
        404,
        "file_not_found",
    )


def test_chmod_file(sb, http):
    d = unique_dir("chmod")
    sb.write_file(f"{d}/run.sh", "#!/bin/sh\necho ran\n")
    sb.chmod_file(f"{d}/run.sh", "755")
    assert sb.stat_file(f"{d}/run.sh")["mode"] == "755"
    assert sb.exec(f"{d}/run.sh").stdout == "ran\n"
    assert sb.exec(f"stat -c %a {d}/run.sh").stdout == "755\n"
    r = http.post(f"/sandboxes/{sb.id}/files/chmod", json={"path": f"{d}/run.sh", "mode": "0600"})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "chmod applied"}
    assert sb.stat_file(f"{d}/run.sh")["mode"] == "600"
    assert sb.exec(f"stat -c %a {d}/run.sh").stdout == "600\n"
    assert_error(
        http.post(f"/sandboxes/{sb.id}/files/chmod", json={"path": f"{d}/missing", "mode": "644"}),
        404,
        "file_not_found",
    )


def test_delete_file(sb, http):
    d = unique_dir("del")
    sb.write_file(f"{d}/f.txt", "x")
    sb.write_file(f"{d}/full/one.txt", "1")
    sb.write_file(f"{d}/full/sub/two.txt", "2")
    sb.exec(f"mkdir -p {d}/emptydir")

    sb.delete_file(f"{d}/f.txt")
    with pytest.raises(SandboxNotFound):
        sb.stat_file(f"{d}/f.txt")

    r = http.delete(f"/sandboxes/{sb.id}/files", params={"path": f"{d}/full"})
    assert_error(r, 409, "conflict")
    with pytest.raises(StacyVMError) as ei:
        sb.delete_file(f"{d}/full")
    assert ei.value.code == "conflict"
    assert sb.read_file(f"{d}/full/sub/two.txt") == "2", "409 must not delete anything"

    r = http.delete(f"/sandboxes/{sb.id}/files", params={"path": f"{d}/full", "recursive": "true"})
    assert r.status_code == 200 and r.json() == {"status": "deleted"}, r.text
    assert sb.exec(f"test -e {d}/full").exit_code == 1

    sb.delete_file(f"{d}/emptydir")  # an empty dir needs no recursive
    assert sb.exec(f"test -e {d}/emptydir").exit_code == 1

    assert_error(
        http.delete(f"/sandboxes/{sb.id}/files", params={"path": f"{d}/gone"}),
        404,
        "file_not_found",
    )


# --------------------------------------------------------------------------
# sandbox management
# --------------------------------------------------------------------------


def test_extend_ttl(sb, http):
    before = parse_time(http.get(f"/sandboxes/{sb.id}").json()["expires_at"])
    sb.extend_ttl("20m")  # POST extend, then GET (client.refresh)
    after = parse_time(sb._info["expires_at"])
    assert after > before + timedelta(minutes=9), (before, after)
    now = datetime.now(timezone.utc)
    assert abs((after - now).total_seconds() - 1200) < 30, (now, after)
    assert sb.state == "running"
    # the extend answer itself is the sandbox JSON
    r = http.post(f"/sandboxes/{sb.id}/extend", json={"ttl": "15m"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == sb.id and body["state"] == "running"
    assert abs((parse_time(body["expires_at"]) - datetime.now(timezone.utc)).total_seconds() - 900) < 30


def test_client_list_contains_sandbox(server, client, sb):
    items = client.list()
    assert all(isinstance(i, SandboxInfo) for i in items)
    mine = [i for i in items if i.id == sb.id]
    assert len(mine) == 1, [i.id for i in items]
    info = mine[0]
    assert info.state == "running"
    assert info.provider == server.provider
    assert info.image == IMAGE
    assert info.metadata == META
    parse_time(info.created_at)
    parse_time(info.expires_at)


def test_system_endpoints_via_client(server, client, sb):
    h = client.health()
    assert h["status"] == "ok"
    assert isinstance(h["version"], str) and h["version"]
    assert isinstance(h["uptime"], str) and GO_DURATION_RE.match(h["uptime"]), h

    provs = client.providers()
    assert isinstance(provs, list)
    by_name = {p["name"]: p for p in provs}
    assert len(by_name) == len(provs), provs
    assert {"docker", "native"} <= set(by_name), provs
    for name in ("docker", "native"):
        p = by_name[name]
        assert p["healthy"] is True, p
        assert p["isolation"] == ISOLATION[name], p
        assert isinstance(p["capabilities"], list) and "exec" in p["capabilities"], p
    assert [p["name"] for p in provs if p["default"] is True] == [server.provider], provs

    pool = client.pool_status()
    assert pool.get("enabled") is False, pool

    dec = client.admission(image=IMAGE)
    assert isinstance(dec, SpawnAdmissionDecision)
    assert dec.allowed is True
    assert dec.active_sandboxes >= 1  # at least this module's sandbox
    assert dec.max_sandboxes >= dec.active_sandboxes


def test_destroy_then_get_raises_and_runtime_is_gone(server, client, sandboxes):
    sandbox = client.spawn(image=IMAGE, ttl="5m")
    sandboxes.add(server, sandbox.id)
    assert sandbox.provider == server.provider
    assert sandbox.exec("echo hi").stdout == "hi\n"
    assert runtime_alive(server, sandbox.id, server.provider), "a running sandbox has a runtime"
    # the leak check sees every part of a live sandbox (so its [] below means something)
    live = " | ".join(runtime_leftovers(server, sandbox.id, server.provider))
    expected_parts = {
        "docker": ["container(s)", "agent socket dir"],
        "native": ["state dir", "cgroup dir(s)", "process(es)", "PID 1", "agent socket dir"],
    }[server.provider]
    for part in expected_parts:
        assert part in live, f"leak check misses the live sandbox's {part!r}: {live}"

    sandbox.destroy()
    with pytest.raises(SandboxNotFound):
        client.get(sandbox.id)
    # destroying again is fine (idempotent, 200)
    sandbox.destroy()
    r = httpx.delete(f"{server.api_url}/sandboxes/{sandbox.id}", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "destroyed"}
    assert sandbox.id not in [i.id for i in client.list()]
    with pytest.raises(SandboxNotFound):
        sandbox.exec("echo hi")
    assert wait_no_leftovers(server, sandbox.id, server.provider) == []
