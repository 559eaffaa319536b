"""The `custom` provider (docs/CUSTOM_PROVIDER.md) against the reference
backend (examples/custom-backend/reference_backend.py).

Every test starts its own backend (a real process that makes namespaces +
overlayfs sandboxes whose agents listen on loopback TCP with a token) and
real `stacyvm serve` processes with `STACYVM_PROVIDERS=custom`.  The
backend's image is the suite's test image, read from the shared native
image store (no digest is hard-coded: the backend resolves the name in the
store).  Covered: the official client on `custom`; previews through a TCP
agent; the backend down / silent / refusing the token → 502
`provider_error`; an unknown image → 502, a request the backend refuses →
400; a SIGKILLed server re-attaches (endpoints fetched again from the
backend) and removes orphans; destroy ends every process of the sandbox."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import stacyvm

from conftest import (
    AGENT,
    IMAGE,
    NATIVE_IMAGE_DIR,
    REPO,
    ServerProcess,
    assert_error,
    check_prerequisites,
    free_port,
    proc_start_time,
    run_in,
)

BACKEND = REPO / "examples" / "custom-backend" / "reference_backend.py"
BACKEND_TOKEN = "e2e-backend-token-" + secrets.token_hex(8)
BACKEND_MAX_MEMORY_MB = 1024


def _backend_module():
    """The reference backend's own module (for the capabilities it declares)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_backend", BACKEND)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# What the backend declares on /v1/health; the server must report exactly that.
BACKEND_CAPABILITIES = _backend_module().CAPABILITIES


# --------------------------------------------------------------------------
# the reference backend as a test fixture
# --------------------------------------------------------------------------


class Backend:
    """A reference backend process with its own state directory."""

    def __init__(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="svmcb-", dir="/tmp")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir + ".log"

    def start(self) -> "Backend":
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(BACKEND),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--state-dir",
                self.state_dir,
                "--agent",
                AGENT,
                "--image-store",
                NATIVE_IMAGE_DIR,
                "--max-memory-mb",
                str(BACKEND_MAX_MEMORY_MB),
            ],
            env={**os.environ, "STACYVM_BACKEND_TOKEN": BACKEND_TOKEN},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, f"backend exited: {self.log_tail()}"
            try:
                if self.get("/v1/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"backend not ready: {self.log_tail()}"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {BACKEND_TOKEN}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def get(self, path: str) -> httpx.Response:
        return self._call("GET", path)

    def sandboxes(self, instance_id: str | None = None) -> dict[str, dict]:
        q = f"?instance_id={instance_id}" if instance_id else ""
        r = self.get("/v1/sandboxes" + q)
        assert r.status_code == 200, r.text
        return {s["id"]: s for s in r.json()["sandboxes"]}

    def create(self, sid: str, instance_id: str) -> dict:
        r = self._call(
            "POST",
            "/v1/sandboxes",
            json={"id": sid, "instance_id": instance_id, "image": IMAGE, "memory_mb": 128,
                  "vcpus": 1, "pids_limit": 256, "network": "none", "env": {}, "run_dir": "/nonexistent"},
        )
        assert r.status_code == 201, r.text
        return r.json()

    def delete(self, sid: str) -> int:
        return self._call("DELETE", f"/v1/sandboxes/{sid}").status_code

    def init_pid(self, sid: str) -> tuple[int, int]:
        """Host pid and start time of the sandbox's PID 1 (its agent)."""
        p = json.loads((Path(self.state_dir) / "sandboxes" / sid / "pid.json").read_text())
        return p["pid"], p["start_time"]

    def processes(self, sid: str) -> list[tuple[int, int]]:
        """(pid, start time) of the sandbox's PID 1 and all its descendants."""
        root, _ = self.init_pid(sid)
        parent: dict[int, int] = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            parent[int(p)] = int(stat.rsplit(")", 1)[1].split()[1])
        out = []
        for pid in parent:
            cur, seen = pid, 0
            while cur > 1 and seen < 64:
                if cur == root:
                    st = proc_start_time(pid)
                    if st is not None:
                        out.append((pid, st))
                    break
                cur, seen = parent.get(cur, 0), seen + 1
        return out

    def cleanup(self) -> list[str]:
        """Delete whatever sandboxes are left (a leak), stop, remove state."""
        problems = []
        if self.proc and self.proc.poll() is None:
            try:
                left = self.sandboxes()
            except (httpx.HTTPError, AssertionError):
                left = {}
            for sid in left:
                problems.append(f"backend sandbox {sid} left behind")
                self.delete(sid)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        # Sandboxes made while no backend process was around.
        sroot = Path(self.state_dir) / "sandboxes"
        for d in sroot.glob("*") if sroot.exists() else []:
            try:
                pid, start = self.init_pid(d.name)
                if proc_start_time(pid) == start:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        shutil.rmtree(self.state_dir, ignore_errors=True)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass
        return problems


def custom_env(backend: Backend | str, token: str = BACKEND_TOKEN, **extra: str) -> dict[str, str]:
    url = backend if isinstance(backend, str) else backend.url
    env = {
        "STACYVM_PROVIDERS": "custom",
        "STACYVM_DEFAULT_PROVIDER": "custom",
        "STACYVM_CUSTOM_URL": url,
        "STACYVM_CUSTOM_TOKEN": token,
    }
    env.update(extra)
    return env


@pytest.fixture
def env():
    """Factory of backends and `custom` servers, all torn down afterwards
    (servers first, then a check that the backend holds nothing more)."""
    check_prerequisites(None)
    backends: list[Backend] = []
    servers: list[ServerProcess] = []

    class Env:
        def backend(self) -> Backend:
            b = Backend()
            backends.append(b)
            return b.start()

        def server(self, backend: Backend | str, start: bool = True, **kw) -> ServerProcess:
            token = kw.pop("token", BACKEND_TOKEN)
            data_dir = kw.pop("data_dir", None)
            port = kw.pop("port", None)
            srv = ServerProcess(env=custom_env(backend, token, **kw), data_dir=data_dir, port=port)
            servers.append(srv)
            if start:
                srv.start()
            return srv

    yield Env()
    problems = []
    for srv in reversed(servers):
        problems += srv.shutdown()
    for b in backends:
        problems += b.cleanup()
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def start_unready(srv: ServerProcess, limit: float = 40) -> httpx.Response:
    """Start a server whose default provider cannot be healthy; return its
    first `/ready` answer (it must come, within `limit` seconds)."""
    t0 = time.monotonic()
    srv.start(wait=False)
    while True:
        try:
            return httpx.get(srv.api_url + "/ready", timeout=2)
        except httpx.HTTPError:
            assert srv.running, srv.log_tail()
            assert time.monotonic() - t0 < limit, f"server start hangs: {srv.log_tail()}"
            time.sleep(0.2)


def wait_dead(procs: list[tuple[int, int]], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p, st in procs if proc_start_time(p) == st]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_provider_reports_the_backends_isolation_and_capabilities(env):
    b = env.backend()
    srv = env.server(b)
    with srv.client() as c:
        r = c.get("/providers")
        assert r.status_code == 200, r.text
        (p,) = [p for p in r.json() if p["name"] == "custom"]
        assert p["default"] is True
        assert p["isolation"] == "namespaces", p
        assert p["capabilities"] == BACKEND_CAPABILITIES, p
        assert c.post("/providers/test").json() == {"custom": True}


def test_official_client_lifecycle_and_destroy_ends_every_process(env):
    b = env.backend()
    srv = env.server(b)
    inst = srv.instance_id()
    with stacyvm.Client(srv.url) as client:
        sb = client.spawn(image=IMAGE, ttl="10m")
        try:
            assert sb.provider == "custom"
            assert sb.state == "running"
            listed = b.sandboxes(inst)
            assert list(listed) == [sb.id], listed
            # The agent is reached over TCP with a token the sandbox never sees.
            assert "tcp" in listed[sb.id]["agent"], listed
            agent_token = listed[sb.id]["agent"]["token"]

            res = sb.exec("python3 -c 'print(6 * 7)'")
            assert (res.exit_code, res.stdout) == (0, "42\n")
            res = sb.exec("hostname; echo $GREETING", env={"GREETING": "hello"})
            assert res.stdout.splitlines() == [sb.id.replace("_", "-"), "hello"], res.stdout
            res = sb.exec("env")
            assert res.exit_code == 0 and "PATH=" in res.stdout, res
            assert "STACYVM_AGENT_TOKEN" not in res.stdout and agent_token not in res.stdout
            assert agent_token not in sb.exec("cat /proc/1/environ").stdout
            # Its own PID namespace: the agent is PID 1.
            assert sb.exec("cat /proc/1/comm").stdout.strip() == "stacyvm-agent"
            res = sb.exec("exit 7")
            assert res.exit_code == 7

            sb.write_file("/workspace/dir/a.txt", "contents of a")
            assert sb.read_file("/workspace/dir/a.txt") == "contents of a"
            names = [e["name"] for e in sb.list_files("/workspace/dir")]
            assert names == ["a.txt"], names
            sb.move_file("/workspace/dir/a.txt", "/workspace/dir/b.txt")
            assert sb.glob_files("/workspace/**/*.txt") == ["/workspace/dir/b.txt"]
            chunks = list(sb.exec_stream("for i in 1 2 3; do echo line$i; done"))
            assert "line1" in repr(chunks) and "line3" in repr(chunks), chunks

            # A few background processes to be ended by the destroy.
            sb.exec("nohup sleep 600 >/dev/null 2>&1 & nohup sh -c 'sleep 700' >/dev/null 2>&1 &")
            procs = b.processes(sb.id)
            assert len(procs) >= 3, procs
        except BaseException:
            sb.destroy()
            raise
        sb.destroy()
    assert wait_dead(procs) == [], f"processes of {sb.id} survived the destroy"
    assert sb.id not in b.sandboxes()
    assert not (Path(b.state_dir) / "sandboxes" / sb.id).exists()
    assert b.get(f"/v1/sandboxes/{sb.id}").status_code == 404
    assert not (Path(srv.data_dir) / "s" / sb.id).exists()
    with srv.client() as c:
        assert_error(c.post(f"/sandboxes/{sb.id}/exec", json={"command": "true"}), 404, "not_found")


def test_preview_reaches_a_port_through_the_tcp_agent(env):
    b = env.backend()
    srv = env.server(b)
    with srv.client() as c:
        r = c.post("/sandboxes", json={"image": IMAGE, "preview": "public"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        # The reference backend shares the host network: take a free port.
        port = free_port()
        run_in(c, sid, "mkdir -p /workspace/site && echo preview-ok > /workspace/site/index.html")
        run_in(
            c,
            sid,
            f"cd /workspace/site && nohup python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 &",
        )
        host = f"{port}-{sid}.localhost"
        deadline = time.monotonic() + 15
        while True:
            resp = httpx.get(f"{srv.url}/index.html", headers={"Host": host}, timeout=10)
            if resp.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert resp.status_code == 200, resp.text[:300]
        assert resp.text == "preview-ok\n"
        assert c.delete(f"/sandboxes/{sid}").status_code == 200


def test_backend_down_is_a_provider_error_and_recovers(env):
    b = env.backend()
    srv = env.server(b)
    b.kill()
    with srv.client() as c:
        t0 = time.monotonic()
        r = c.post("/sandboxes", json={"image": IMAGE})
        body = assert_error(r, 502, "provider_error")
        assert time.monotonic() - t0 < 10
        assert "custom" in body["message"] and b.url in body["message"], body
        assert "unreachable" in body["message"], body
        assert c.post("/providers/test").json() == {"custom": False}
        (p,) = c.get("/providers").json()
        assert p["healthy"] is False and b.url in (p.get("error") or ""), p
        # The failed create left an `error` record, nothing running.
        states = {s["id"]: s["state"] for s in c.get("/sandboxes").json()}
        assert all(s == "error" for s in states.values()), states

        b.start()
        assert c.post("/providers/test").json() == {"custom": True}
        r = c.post("/sandboxes", json={"image": IMAGE})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert run_in(c, sid, "echo back")["stdout"] == "back\n"
        assert c.delete(f"/sandboxes/{sid}").status_code == 200
    assert b.sandboxes() == {}


def test_a_silent_backend_does_not_hang_the_server(env):
    # Accepts connections and never answers.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
        srv = env.server(url, start=False, STACYVM_START_TIMEOUT="3s")
        # Start-up asks the backend (health, then the reconciliation list),
        # each call bounded: the server serves, reporting the provider
        # unhealthy, instead of hanging.
        body = assert_error(start_unready(srv), 503, "unavailable")
        assert "did not answer" in body["message"], body
        with srv.client(timeout=60) as c:
            t0 = time.monotonic()
            r = c.post("/sandboxes", json={"image": IMAGE})
            elapsed = time.monotonic() - t0
            body = assert_error(r, 502, "provider_error")
            assert "did not answer" in body["message"], body
            assert elapsed < 35, f"create took {elapsed:.1f}s against a silent backend"
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        lsock.close()


def test_wrong_backend_token_is_a_clear_provider_error(env):
    b = env.backend()
    srv = env.server(b, start=False, token="not-the-backend-token")
    body = assert_error(start_unready(srv), 503, "unavailable")
    assert "custom.token" in body["message"], body
    with srv.client() as c:
        body = assert_error(c.post("/sandboxes", json={"image": IMAGE}), 502, "provider_error")
        assert "custom.token" in body["message"], body
    assert b.sandboxes() == {}


def test_unknown_image_and_refused_requests(env):
    b = env.backend()
    srv = env.server(b)
    with srv.client() as c:
        body = assert_error(
            c.post("/sandboxes", json={"image": "stacyvm-test/no-such-image:1"}), 502, "provider_error"
        )
        assert "stacyvm-test/no-such-image:1" in body["message"], body
        assert "not available" in body["message"], body
        # A limit of the backend: its 400 becomes the API's 400.
        body = assert_error(
            c.post("/sandboxes", json={"image": IMAGE, "memory_mb": BACKEND_MAX_MEMORY_MB + 512}),
            400,
            "invalid_request",
        )
        assert f"({BACKEND_MAX_MEMORY_MB})" in body["message"], body
        # A malformed reference never reaches the backend.
        assert_error(c.post("/sandboxes", json={"image": "Bad Image!"}), 400, "invalid_request")
        states = [s["state"] for s in c.get("/sandboxes").json()]
        assert states and all(s == "error" for s in states), states
    assert b.sandboxes() == {}


def test_server_sigkill_reattaches_and_removes_orphans(env):
    b = env.backend()
    srv = env.server(b)
    inst = srv.instance_id()
    with srv.client() as c:
        r = c.post("/sandboxes", json={"image": IMAGE, "ttl": "15m"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        r = c.post(f"/sandboxes/{sid}/files", json={"path": "/workspace/kept.txt", "content": "kept"})
        assert r.status_code == 200, r.text
    before = b.init_pid(sid)
    # Runtimes of this instance without a record (e.g. a create the server
    # crashed in), and one of another instance that must be left alone.
    orphan = "sb_orphan" + secrets.token_hex(6)
    foreign = "sb_foreign" + secrets.token_hex(6)
    b.create(orphan, inst)
    b.create(foreign, "another-instance")
    orphan_procs = b.processes(orphan)

    srv.kill()
    # The backend restarts too while the server is down: its state survives.
    b.kill()
    b.start()
    srv2 = env.server(b, start=False, data_dir=srv.data_dir, port=srv.port)
    srv2.start()
    assert srv2.instance_id() == inst
    with srv2.client() as c:
        got = c.get(f"/sandboxes/{sid}")
        assert got.status_code == 200 and got.json()["state"] == "running", got.text
        assert run_in(c, sid, "cat /workspace/kept.txt")["stdout"] == "kept"
        assert b.init_pid(sid) == before, "the sandbox was re-created, not re-attached"
        assert c.delete(f"/sandboxes/{sid}").status_code == 200
    assert wait_dead(orphan_procs) == [], "orphan's processes survived"
    left = b.sandboxes()
    assert orphan not in left and sid not in left, left
    assert foreign in left, left
    assert b.delete(foreign) == 204


def test_a_sandbox_whose_agent_died_is_marked_error(env):
    b = env.backend()
    srv = env.server(b)
    with srv.client() as c:
        r = c.post("/sandboxes", json={"image": IMAGE})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        pid, start = b.init_pid(sid)
        os.kill(pid, signal.SIGKILL)
        assert wait_dead([(pid, start)]) == []
        assert_error(c.post(f"/sandboxes/{sid}/exec", json={"command": "true"}), 502, "provider_error")
        assert c.get(f"/sandboxes/{sid}").json()["state"] == "error"
        assert c.delete(f"/sandboxes/{sid}").status_code == 200
    assert b.sandboxes() == {}
