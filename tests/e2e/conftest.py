"""Shared fixtures of the StacyVM end-to-end suite.

Every server the suite starts is a real `stacyvm serve` process on a free
loopback port with its own short data dir under /tmp.  Sandboxes are real
Docker containers of the local test image (never pulled from a registry).

Fixtures:
  server          session-scoped server (default config)
  make_server     factory for fresh, function-scoped servers with extra env
  sandboxes       tracker: creates sandboxes, destroys them at teardown and
                  asserts that no container was leaked
  api             httpx client for the session server's /api/v1
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

IMAGE = os.environ.get("STACYVM_TEST_IMAGE", "stacyvm-test/python:bookworm")
# An image reference that can never be pulled: a closed port on loopback.
MISSING_IMAGE = "127.0.0.1:9/stacyvm-missing/none:latest"


def _default_bin() -> str:
    release = REPO / "target" / "release" / "stacyvm"
    if release.exists():
        return str(release)
    return str(REPO / "target" / "debug" / "stacyvm")


BIN = os.environ.get("STACYVM_BIN") or _default_bin()
AGENT = os.environ.get("STACYVM_AGENT_PATH") or str(
    REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "stacyvm-agent"
)

SANDBOX_ID_RE = re.compile(r"^sb_[a-z0-9]{12,}$")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

READY_TIMEOUT = 30.0

# Servers currently running, so a failing test can show their log tails.
_LIVE_SERVERS: list["ServerProcess"] = []
_LOG_SEQ = itertools.count(1)


# --------------------------------------------------------------------------
# prerequisites (fail loudly, never skip)
# --------------------------------------------------------------------------

_prereq_error: str | None = None
_prereq_checked = False


def check_prerequisites() -> None:
    global _prereq_error, _prereq_checked
    if not _prereq_checked:
        _prereq_checked = True
        problems = []
        if not os.access(BIN, os.X_OK):
            problems.append(
                f"stacyvm binary not found/executable at {BIN} "
                "(build it: cargo build -p stacyvm, or set STACYVM_BIN)"
            )
        if not os.path.isfile(AGENT):
            problems.append(
                f"stacyvm-agent not found at {AGENT} (set STACYVM_AGENT_PATH)"
            )
        if shutil.which("docker") is None:
            problems.append("docker CLI not found on PATH")
        else:
            r = subprocess.run(
                ["docker", "info", "--format", "{{.ServerVersion}}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode != 0:
                problems.append(f"docker daemon not reachable: {r.stderr.strip()}")
            else:
                r = subprocess.run(
                    ["docker", "image", "inspect", IMAGE],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if r.returncode != 0:
                    problems.append(
                        f"test image {IMAGE} is not present locally "
                        "(build it with scripts/build-test-image.sh; the suite never pulls)"
                    )
        _prereq_error = "; ".join(problems) or None
    if _prereq_error:
        pytest.fail("E2E prerequisites missing: " + _prereq_error, pytrace=False)


# --------------------------------------------------------------------------
# docker helpers
# --------------------------------------------------------------------------


def docker(*args: str, check: bool = True, timeout: float = 60) -> str:
    r = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def containers_with_label(label: str) -> list[str]:
    """IDs of all containers (any state) carrying `label` (k or k=v)."""
    out = docker("ps", "-a", "--no-trunc", "--filter", f"label={label}", "-q")
    return [line for line in out.split() if line]


def sandbox_containers(sandbox_id: str) -> list[str]:
    return containers_with_label(f"org.stacyvm.sandbox={sandbox_id}")


def instance_containers(instance_id: str) -> list[str]:
    return containers_with_label(f"org.stacyvm.instance={instance_id}")


def container_labels(container: str) -> dict[str, str]:
    import json

    out = docker("inspect", "--format", "{{json .Config.Labels}}", container)
    return json.loads(out) or {}


def wait_no_containers(sandbox_id: str, timeout: float = 3.0) -> list[str]:
    """Return the containers of a sandbox still present after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = sandbox_containers(sandbox_id)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def force_remove(containers: list[str]) -> None:
    if containers:
        docker("rm", "-f", *containers, check=False)


# --------------------------------------------------------------------------
# server processes
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `stacyvm serve` child process."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        data_dir: str | None = None,
        port: int | None = None,
        api_key: str | None = None,
    ):
        self.extra_env = dict(env or {})
        if api_key:
            self.extra_env["STACYVM_API_KEY"] = api_key
        self.api_key = self.extra_env.get("STACYVM_API_KEY") or None
        self.owns_data_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="svm-", dir="/tmp")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = self.url + "/api/v1"
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self._log_file = None
        self.generation = 0
        self.known_instance_ids: set[str] = set()
        self.log_paths: list[str] = []

    # -- process control ---------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
        env.update(
            {
                "STACYVM_LISTEN": f"127.0.0.1:{self.port}",
                "STACYVM_DATA_DIR": self.data_dir,
                "STACYVM_AGENT_PATH": AGENT,
                # Never let a default image be pulled from a registry.
                "STACYVM_DEFAULT_IMAGE": IMAGE,
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True) -> "ServerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.generation += 1
        self.log_path = f"{self.data_dir}.server{next(_LOG_SEQ)}.log"
        self.log_paths.append(self.log_path)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [BIN, "serve"],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self not in _LIVE_SERVERS:
            _LIVE_SERVERS.append(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"stacyvm serve exited with {self.proc.returncode} before ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(self.api_url + "/ready", timeout=2)
                if r.status_code == 200:
                    inst = self.instance_id()
                    if inst:
                        self.known_instance_ids.add(inst)
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError(
            f"server at {self.url} not ready after {timeout}s (last: {last}); "
            f"log tail:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the server (simulated crash)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s.  Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- introspection -----------------------------------------------------

    def log_text(self) -> str:
        try:
            return ANSI_RE.sub("", Path(self.log_path).read_text(errors="replace"))
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_text().splitlines()
        return "\n".join(lines[-n:])

    def instance_id(self) -> str | None:
        m = re.search(r"\binstance=([A-Za-z0-9_.-]+)", self.log_text())
        return m.group(1) if m else None

    # -- HTTP --------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def client(self, **kw: Any) -> httpx.Client:
        headers = self.headers()
        headers.update(kw.pop("headers", {}) or {})
        return httpx.Client(
            base_url=self.api_url, headers=headers, timeout=kw.pop("timeout", 60), **kw
        )

    def destroy_all(self) -> None:
        """Destroy every sandbox the server lists (best effort)."""
        if not self.running:
            return
        try:
            with self.client(timeout=30) as c:
                r = c.get("/sandboxes")
                if r.status_code != 200:
                    return
                for sb in r.json():
                    try:
                        c.delete(f"/sandboxes/{sb['id']}")
                    except httpx.HTTPError:
                        pass
        except httpx.HTTPError:
            pass

    def shutdown(self) -> None:
        """Destroy sandboxes, stop the process, remove anything left behind."""
        self.destroy_all()
        self.stop()
        inst = self.instance_id()
        if inst:
            self.known_instance_ids.add(inst)
        for inst in self.known_instance_ids:
            force_remove(instance_containers(inst))
        if self in _LIVE_SERVERS:
            _LIVE_SERVERS.remove(self)
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if not os.environ.get("STACYVM_E2E_KEEP_LOGS"):
            for path in self.log_paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"<stacyvm server {self.url} pid={self.pid} data_dir={self.data_dir}>"


# --------------------------------------------------------------------------
# sandbox tracking
# --------------------------------------------------------------------------


class SandboxTracker:
    """Creates sandboxes and guarantees their destruction (and no leaks)."""

    def __init__(self) -> None:
        self.items: list[tuple[ServerProcess, str]] = []

    def add(self, server: ServerProcess, sandbox_id: str) -> str:
        if (server, sandbox_id) not in self.items:
            self.items.append((server, sandbox_id))
        return sandbox_id

    def create(
        self,
        server: ServerProcess,
        body: dict | None = None,
        headers: dict | None = None,
        expect: int = 201,
    ) -> dict:
        if body is None:
            body = {"image": IMAGE}
        with server.client(headers=headers or {}) as c:
            r = c.post("/sandboxes", json=body)
        if r.status_code in (200, 201):
            try:
                self.add(server, r.json()["id"])
            except Exception:
                pass
        assert r.status_code == expect, (
            f"create {body} -> {r.status_code} {r.text[:500]}"
        )
        data = r.json()
        if expect == 201:
            assert SANDBOX_ID_RE.match(data["id"]), data
            assert data["state"] == "running", data
        return data

    def cleanup(self) -> list[str]:
        """Destroy everything; return a list of problems (leaks, errors)."""
        problems = []
        # 1. destroy through every server that is still up
        for server, sid in self.items:
            if server.running:
                try:
                    with server.client(timeout=60) as c:
                        r = c.delete(f"/sandboxes/{sid}")
                    if r.status_code not in (200, 404):
                        problems.append(
                            f"DELETE {sid} -> {r.status_code} {r.text[:200]}"
                        )
                except httpx.HTTPError as e:
                    problems.append(f"DELETE {sid} failed: {e!r}")
        # 2. no container may be left for any of them
        for sid in dict.fromkeys(sid for _, sid in self.items):
            left = wait_no_containers(sid)
            if left:
                problems.append(
                    f"sandbox {sid}: container(s) {left} still present after destroy"
                )
                force_remove(left)
        self.items.clear()
        return problems


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server() -> ServerProcess:
    check_prerequisites()
    srv = ServerProcess()
    try:
        srv.start()
    except BaseException:
        srv.shutdown()
        raise
    yield srv
    srv.shutdown()


@pytest.fixture
def make_server():
    """Factory: make_server(env={...}, data_dir=..., port=..., start=True)."""
    check_prerequisites()
    started: list[ServerProcess] = []

    def factory(
        env: dict[str, str] | None = None,
        data_dir: str | None = None,
        port: int | None = None,
        start: bool = True,
    ) -> ServerProcess:
        srv = ServerProcess(env=env, data_dir=data_dir, port=port)
        started.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    for srv in reversed(started):
        srv.shutdown()


@pytest.fixture
def sandboxes(make_server):
    """Per-test sandbox tracker (set up after make_server, torn down before)."""
    tracker = SandboxTracker()
    yield tracker
    problems = tracker.cleanup()
    if problems:
        pytest.fail("sandbox cleanup: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def api(server):
    with server.client() as c:
        yield c


# --------------------------------------------------------------------------
# show server log tails on failure
# --------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for srv in list(_LIVE_SERVERS):
            if srv.log_path:
                report.sections.append(
                    (f"stacyvm server log tail ({srv.url}, pid {srv.pid}, {srv.log_path})",
                     srv.log_tail(60))
                )


# --------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------


def assert_error(resp: httpx.Response, status: int, code: str | None) -> dict:
    """Assert an error answer: exact status, JSON {code, message} envelope."""
    desc = f"{resp.request.method} {resp.request.url} -> {resp.status_code} {resp.text[:400]!r}"
    assert resp.status_code == status, f"expected {status}: {desc}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"error not JSON ({ctype}): {desc}"
    body = resp.json()
    assert isinstance(body, dict), desc
    assert isinstance(body.get("code"), str) and re.fullmatch(
        r"[a-z][a-z0-9_]*", body["code"]
    ), f"code not lower snake case: {desc}"
    assert isinstance(body.get("message"), str) and body["message"].strip(), (
        f"message missing/empty: {desc}"
    )
    if code is not None:
        assert body["code"] == code, f"expected code {code!r}: {desc}"
    return body


def parse_time(s: str):
    """Parse an RFC 3339 timestamp (fractional seconds, Z or offset)."""
    from datetime import datetime

    assert isinstance(s, str) and s, s
    m = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})", s
    )
    assert m, f"not an RFC 3339 timestamp: {s!r}"
    frac = (m.group(2) or ".0")[1:7].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}")


GO_DURATION_RE = re.compile(r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$")


def run_in(sandbox_api: httpx.Client, sid: str, command: str, **kw) -> dict:
    r = sandbox_api.post(f"/sandboxes/{sid}/exec", json={"command": command, **kw})
    assert r.status_code == 200, f"exec {command!r} -> {r.status_code} {r.text[:300]}"
    return r.json()


class Background(threading.Thread):
    """A daemon thread that records its exception."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self._target_fn = target
        self._args = args
        self.error: BaseException | None = None
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self._target_fn(*self._args)
        except BaseException as e:  # noqa: BLE001
            self.error = e
