"""Shared fixtures of the StacyVM end-to-end suite.

Every server the suite starts is a real `stacyvm serve` process on a free
loopback port with its own short data dir under /tmp.  Sandboxes are real:
Docker containers of the local test image (provider `docker`, never pulled
from a registry) or namespaces + overlayfs made by the `native` provider from
the same image, imported once per session into a shared image store from the
test image's rootfs tarball (never pulled either).

The suite is provider-aware: `PROVIDERS` lists the providers under test and
the `provider` fixture is parametrized over them (test ids `[docker]`,
`[native]`).  Every server is started with `STACYVM_DEFAULT_PROVIDER=<provider>`,
so a test that spawns without naming a provider exercises that provider.
A test or module narrows the providers explicitly with

    @pytest.mark.parametrize("provider", ["native"], indirect=True)

(see `only_providers`); nothing is ever skipped.

Fixtures:
  provider        session-scoped, parametrized: "docker" / "native"
  server          session-scoped server of that provider (default config)
  make_server     factory for fresh, function-scoped servers with extra env
                  (default provider: the `provider` fixture)
  sandboxes       tracker: creates sandboxes, destroys them at teardown and
                  asserts that their provider left nothing behind
  api             httpx client for the session server's /api/v1
"""

from __future__ import annotations

import fcntl
import itertools
import json
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

PROVIDERS = ["docker", "native"]
DEFAULT_PROVIDER = "native"  # the server's own default

IMAGE = os.environ.get("STACYVM_TEST_IMAGE", "stacyvm-test/python:bookworm")
# An image reference that can never be pulled: a closed port on loopback.
MISSING_IMAGE = "127.0.0.1:9/stacyvm-missing/none:latest"

CACHE_DIR = Path(os.environ.get("STACYVM_CACHE_DIR") or REPO / ".ci" / "cache")
# The test image's root filesystem (scripts/build-test-image.sh builds it).
IMAGE_TAR = os.environ.get("STACYVM_TEST_IMAGE_TAR") or str(
    CACHE_DIR / "images" / "python-bookworm.tar"
)
# The native provider's image store shared by every server of the suite (and
# reused across runs: the import is skipped when the tarball did not change).
NATIVE_IMAGE_DIR = os.environ.get("STACYVM_E2E_IMAGE_DIR") or str(
    CACHE_DIR / "native-images"
)


def _default_bin() -> str:
    """The newer of target/release and target/debug (a stale release build
    must not be tested by accident)."""
    candidates = [
        REPO / "target" / "release" / "stacyvm",
        REPO / "target" / "debug" / "stacyvm",
    ]
    existing = [p for p in candidates if p.exists()]
    if not existing:
        return str(candidates[1])
    return str(max(existing, key=lambda p: p.stat().st_mtime))


BIN = os.environ.get("STACYVM_BIN") or _default_bin()
AGENT = os.environ.get("STACYVM_AGENT_PATH") or str(
    REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "stacyvm-agent"
)

SANDBOX_ID_RE = re.compile(r"^sb_[a-z0-9]{12,}$")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

READY_TIMEOUT = 30.0
# How long a destroyed sandbox's runtime may take to disappear completely
# (the native provider deletes the overlay's upper layer in the background).
LEAK_TIMEOUT = 10.0

# Servers currently running, so a failing test can show their log tails.
_LIVE_SERVERS: list["ServerProcess"] = []
_LOG_SEQ = itertools.count(1)


def only_providers(*names: str):
    """Run a test (or, as `pytestmark`, a module) on these providers only."""
    for n in names:
        assert n in PROVIDERS, n
    return pytest.mark.parametrize("provider", list(names), indirect=True)


# --------------------------------------------------------------------------
# prerequisites (fail loudly, never skip)
# --------------------------------------------------------------------------

_prereq_errors: dict[str, str | None] = {}


def _check_common() -> list[str]:
    problems = []
    if not os.access(BIN, os.X_OK):
        problems.append(
            f"stacyvm binary not found/executable at {BIN} "
            "(build it: cargo build -p stacyvm, or set STACYVM_BIN)"
        )
    if not os.path.isfile(AGENT):
        problems.append(f"stacyvm-agent not found at {AGENT} (set STACYVM_AGENT_PATH)")
    return problems


def _check_docker() -> list[str]:
    if shutil.which("docker") is None:
        return ["docker CLI not found on PATH"]
    r = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        return [f"docker daemon not reachable: {r.stderr.strip()}"]
    r = subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True, text=True, timeout=30
    )
    if r.returncode != 0:
        return [
            f"test image {IMAGE} is not present in dockerd "
            "(build it with scripts/build-test-image.sh; the suite never pulls)"
        ]
    return []


def _image_listed(store: str) -> bool:
    r = subprocess.run(
        [BIN, "image", "ls", "--json"],
        env=_tool_env(STACYVM_IMAGE_DIR=store),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        return False
    try:
        refs = {i.get("reference") for i in json.loads(r.stdout or "[]")}
    except (ValueError, AttributeError):
        return False
    return bool(refs & {IMAGE, f"docker.io/{IMAGE}", f"docker.io/library/{IMAGE}"})


def _prepare_native_image() -> list[str]:
    """Import the test image's rootfs tarball into the shared store (once;
    skipped when the same tarball was imported by the same binary before)."""
    if not os.path.isfile(IMAGE_TAR):
        return [
            f"test image rootfs tarball not found at {IMAGE_TAR} (build it with "
            "STACYVM_TEST_IMAGE_DOCKER=0 scripts/build-test-image.sh, or set "
            "STACYVM_TEST_IMAGE_TAR)"
        ]
    store = NATIVE_IMAGE_DIR
    os.makedirs(os.path.dirname(store) or ".", exist_ok=True)
    st = os.stat(IMAGE_TAR)
    ident = {
        "tar": os.path.realpath(IMAGE_TAR),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "name": IMAGE,
    }
    marker = Path(store) / ".e2e-import.json"
    with open(store.rstrip("/") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if json.loads(marker.read_text()) == ident and _image_listed(store):
                return []
        except (OSError, ValueError):
            pass
        r = subprocess.run(
            [BIN, "image", "import", IMAGE_TAR, IMAGE],
            env=_tool_env(STACYVM_IMAGE_DIR=store),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            return [
                f"`stacyvm image import {IMAGE_TAR} {IMAGE}` into {store} failed "
                f"(rc {r.returncode}): {r.stderr.strip()[-800:]}"
            ]
        if not _image_listed(store):
            return [f"{IMAGE} not listed by `stacyvm image ls` after importing it into {store}"]
        marker.write_text(json.dumps(ident))
    return []


def check_prerequisites(provider: str | None = None) -> None:
    """Fail (never skip) when what `provider`'s tests need is missing.  Every
    server gets the native image store, so it is prepared in any case."""
    keys = ["common", "native"] + ([provider] if provider == "docker" else [])
    for key in keys:
        if key not in _prereq_errors:
            if key == "common":
                problems = _check_common()
            elif key == "native":
                problems = _prepare_native_image() if not _prereq_errors.get("common") else []
            else:
                problems = _check_docker()
            _prereq_errors[key] = "; ".join(problems) or None
    errors = [e for k in keys if (e := _prereq_errors.get(k))]
    if errors:
        pytest.fail("E2E prerequisites missing: " + "; ".join(errors), pytrace=False)


def _tool_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env.update(extra)
    return env


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
    out = docker("inspect", "--format", "{{json .Config.Labels}}", container)
    return json.loads(out) or {}


def force_remove(containers: list[str]) -> None:
    if containers:
        docker("rm", "-f", *containers, check=False)


# --------------------------------------------------------------------------
# native provider helpers (host-side view of its sandboxes)
# --------------------------------------------------------------------------

# state.json of every native sandbox seen alive, by (data dir, sandbox id):
# its cgroups may be named after a pre-started slot (`pool-<token>`) rather
# than the sandbox id, and its PID 1 is only known while the file exists.
_NATIVE_SNAPSHOTS: dict[tuple[str, str], dict] = {}


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mount_points() -> list[str]:
    """Mount points of every cgroup (v1) and cgroup2 filesystem."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fstype = right.split(" ", 1)[0]
            if fstype in ("cgroup", "cgroup2"):
                mp = _unescape_mountinfo(left.split(" ")[4])
                if mp not in out:
                    out.append(mp)
    return out


def native_state_dir(server: "ServerProcess", sandbox_id: str) -> Path:
    return Path(server.data_dir) / "native" / sandbox_id


def native_state(server: "ServerProcess", sandbox_id: str) -> dict | None:
    """The sandbox's state.json (and remember it for the leak checks)."""
    try:
        st = json.loads((native_state_dir(server, sandbox_id) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(st, dict):
        _NATIVE_SNAPSHOTS[(server.data_dir, sandbox_id)] = st
        return st
    return None


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    state = fields[0]
    if state in ("Z", "X"):
        return None
    return int(fields[19])


def native_pid1(server: "ServerProcess", sandbox_id: str) -> int:
    """Host pid of a live native sandbox's PID 1 (its agent)."""
    st = native_state(server, sandbox_id)
    assert st, f"{sandbox_id}: no readable {native_state_dir(server, sandbox_id)}/state.json"
    pid, start = st.get("pid"), st.get("start_time")
    assert isinstance(pid, int) and pid > 1, f"{sandbox_id}: state.json has no pid: {st}"
    assert proc_start_time(pid) == start, (
        f"{sandbox_id}: PID 1 {pid} from state.json is not alive (start_time {start})"
    )
    return pid


def _stacyvm_cgroup_dirs(names: set[str]) -> list[str]:
    """Directories named one of `names` anywhere below `<mount>/stacyvm` of
    every cgroup hierarchy."""
    found = []
    for mp in cgroup_mount_points():
        top = os.path.join(mp, "stacyvm")
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, _ in os.walk(top):
            for d in dirnames:
                if d in names:
                    found.append(os.path.join(dirpath, d))
    return found


def _procs_in_cgroups(names: set[str]) -> list[str]:
    """Processes whose /proc/<pid>/cgroup has a path component in `names`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if set(path.split("/")) & names:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = "?"
                out.append(f"pid {pid} ({cmd[:80]}) in cgroup {path}")
                break
    return out


def native_leftovers(server: "ServerProcess", sandbox_id: str) -> list[str]:
    problems = []
    state_root = Path(server.data_dir) / "native"
    sd = state_root / sandbox_id
    if sd.exists():
        problems.append(f"state dir {sd} exists")
    try:
        trash = [n for n in os.listdir(state_root) if n.startswith(f".trash-{sandbox_id}-")]
    except OSError:
        trash = []
    if trash:
        problems.append(f"state dir(s) {trash} not deleted in {state_root}")
    snap = _NATIVE_SNAPSHOTS.get((server.data_dir, sandbox_id)) or {}
    names = {sandbox_id}
    leaf = snap.get("cgroup_leaf")
    if isinstance(leaf, str) and leaf:
        names.add(leaf)
    cgdirs = set(_stacyvm_cgroup_dirs(names))
    cgdirs |= {str(p) for p in snap.get("cgroups") or [] if os.path.exists(str(p))}
    if cgdirs:
        problems.append(f"cgroup dir(s) {sorted(cgdirs)}")
    procs = _procs_in_cgroups(names)
    if procs:
        problems.append(f"process(es) {procs}")
    pid, start = snap.get("pid"), snap.get("start_time")
    if isinstance(pid, int) and start is not None and proc_start_time(pid) == start:
        problems.append(f"PID 1 ({pid}) still alive")
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.strip() for ln in f if sandbox_id in ln]
    if mounts:
        problems.append(f"mount(s) {mounts}")
    return problems


def native_instance_leaves(instance_id: str) -> dict[str, bool]:
    """Cgroups below `stacyvm/<instance>/` → whether any process is in them."""
    leaves: dict[str, bool] = {}
    for mp in cgroup_mount_points():
        base = os.path.join(mp, "stacyvm", instance_id)
        try:
            names = [n for n in os.listdir(base) if os.path.isdir(os.path.join(base, n))]
        except OSError:
            continue
        for n in names:
            try:
                populated = bool(Path(base, n, "cgroup.procs").read_text().split())
            except OSError:
                populated = False
            leaves[n] = leaves.get(n, False) or populated
    return leaves


def native_parked_slots(server: "ServerProcess", instance_id: str) -> set[str]:
    """Cgroup leaves of the provider's pre-started sandboxes (warm pool)."""
    prefix = f".pool-{instance_id}-"
    try:
        names = os.listdir(Path(server.data_dir) / "native")
    except OSError:
        return set()
    return {"pool-" + n[len(prefix):] for n in names if n.startswith(prefix)}


def clean_native_instance(instance_id: str) -> list[str]:
    """Remove the cgroups an instance of ours left on the host; kill (by pid)
    processes still in them. Returns what had to be killed."""
    killed = []
    deadline = time.monotonic() + 5
    for mp in cgroup_mount_points():
        base = os.path.join(mp, "stacyvm", instance_id)
        if not os.path.isdir(base):
            continue
        for dirpath, _, _ in sorted(os.walk(base), key=lambda w: -w[0].count("/")):
            while True:
                try:
                    pids = Path(dirpath, "cgroup.procs").read_text().split()
                except OSError:
                    pids = []
                if not pids or time.monotonic() > deadline:
                    break
                for p in pids:
                    try:
                        os.kill(int(p), signal.SIGKILL)
                        killed.append(f"pid {p} in {dirpath}")
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.05)
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
    return killed


# --------------------------------------------------------------------------
# provider-aware runtime checks
# --------------------------------------------------------------------------


def runtime_leftovers(server: "ServerProcess", sandbox_id: str, provider: str) -> list[str]:
    """What `provider` still has on the host for a sandbox (should be [] once
    it is destroyed): containers with its label (docker); its state dir,
    cgroups, processes and mounts (native); its agent socket dir (both)."""
    problems = []
    if provider == "docker":
        left = sandbox_containers(sandbox_id)
        if left:
            problems.append(f"container(s) {left}")
    elif provider == "native":
        problems += native_leftovers(server, sandbox_id)
    else:
        raise AssertionError(f"unknown provider {provider!r}")
    run_dir = Path(server.data_dir) / "s" / sandbox_id
    if run_dir.exists():
        problems.append(f"agent socket dir {run_dir} exists")
    return problems


def wait_no_leftovers(
    server: "ServerProcess", sandbox_id: str, provider: str, timeout: float = LEAK_TIMEOUT
) -> list[str]:
    """runtime_leftovers after they had `timeout` seconds to disappear."""
    deadline = time.monotonic() + timeout
    while True:
        left = runtime_leftovers(server, sandbox_id, provider)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def runtime_alive(server: "ServerProcess", sandbox_id: str, provider: str) -> bool:
    """Whether the sandbox's runtime exists (container / live PID 1)."""
    if provider == "docker":
        return bool(sandbox_containers(sandbox_id))
    st = native_state(server, sandbox_id)
    if not st or not isinstance(st.get("pid"), int):
        return False
    return proc_start_time(st["pid"]) == st.get("start_time")


def runtime_identity(server: "ServerProcess", sandbox_id: str, provider: str) -> tuple:
    """What identifies the sandbox's runtime object: its container ids
    (docker), its PID 1 and that process's start time (native).  Equal
    before and after a server restart iff the sandbox was re-attached."""
    if provider == "docker":
        return tuple(sorted(sandbox_containers(sandbox_id)))
    st = native_state(server, sandbox_id) or {}
    return (st.get("pid"), st.get("start_time"))


def runtime_instance(server: "ServerProcess", sandbox_id: str, provider: str) -> str:
    """The server instance id the sandbox's runtime is marked with."""
    if provider == "docker":
        containers = sandbox_containers(sandbox_id)
        assert len(containers) == 1, f"{sandbox_id}: containers {containers}"
        labels = container_labels(containers[0])
        assert labels.get("org.stacyvm.sandbox") == sandbox_id, labels
        inst = labels.get("org.stacyvm.instance")
        assert inst, f"container of {sandbox_id} has no instance label: {labels}"
        return inst
    st = native_state(server, sandbox_id)
    assert st, f"{sandbox_id}: no state.json in {native_state_dir(server, sandbox_id)}"
    assert st.get("sandbox_id") == sandbox_id, st
    inst = st.get("instance_id")
    assert inst, f"state.json of {sandbox_id} has no instance_id: {st}"
    return inst


def instance_runtimes(
    server: "ServerProcess", instance_id: str, provider: str
) -> list[tuple[str, str | None]]:
    """Every runtime object of a server instance, as (description, sandbox id
    or None when it maps to no sandbox).  The native provider's live parked
    pre-started sandboxes are not sandboxes and are left out (a slot whose
    process is gone is reported)."""
    out: list[tuple[str, str | None]] = []
    if provider == "docker":
        for c in instance_containers(instance_id):
            out.append((f"container {c[:12]}", container_labels(c).get("org.stacyvm.sandbox")))
        return out
    root = Path(server.data_dir) / "native"
    leaf_owner: dict[str, str] = {}
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    for n in names:
        if n.startswith("."):
            # in-flight creates/deletes of this instance; a stale one is a leak
            if n.startswith((f".new-{instance_id}-", ".trash-")):
                out.append((f"state dir {root / n}", None))
            continue
        st = native_state(server, n)
        if st and st.get("instance_id") not in (None, instance_id):
            continue
        out.append((f"state dir {root / n}", n))
        if st and st.get("cgroup_leaf"):
            leaf_owner[st["cgroup_leaf"]] = n
    parked = native_parked_slots(server, instance_id)
    for leaf, populated in native_instance_leaves(instance_id).items():
        if leaf in parked and populated:
            continue  # a live pre-started sandbox
        if leaf in parked:
            # (for a moment while the slot starts; for good if it died)
            out.append((f"pre-started slot {leaf} without a process", None))
            continue
        owner = leaf_owner.get(leaf) or (leaf if SANDBOX_ID_RE.match(leaf) else None)
        out.append((f"cgroup {leaf} ({'populated' if populated else 'empty'})", owner))
    return out


def wait_instance_clean(
    server: "ServerProcess", instance_id: str, provider: str, timeout: float = LEAK_TIMEOUT
) -> list[tuple[str, str | None]]:
    deadline = time.monotonic() + timeout
    while True:
        left = instance_runtimes(server, instance_id, provider)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


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
        provider: str = DEFAULT_PROVIDER,
    ):
        assert provider in PROVIDERS, provider
        self.provider = provider
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
        env = _tool_env()
        env.update(
            {
                "STACYVM_LISTEN": f"127.0.0.1:{self.port}",
                "STACYVM_DATA_DIR": self.data_dir,
                "STACYVM_AGENT_PATH": AGENT,
                "STACYVM_DEFAULT_PROVIDER": self.provider,
                # The native provider's images come from the suite's store.
                "STACYVM_IMAGE_DIR": NATIVE_IMAGE_DIR,
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
                # Warm pools hold sandboxes no list shows: deleting their
                # template destroys them.
                r = c.get("/templates")
                if r.status_code == 200:
                    for t in r.json():
                        if t.get("pool_size"):
                            c.delete(f"/templates/{t['name']}")
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

    def shutdown(self) -> list[str]:
        """Destroy sandboxes, stop the process, remove anything left behind.
        Returns the leaks found: runtime objects of the instance left once
        every sandbox was destroyed, processes still running in the cgroups
        of a native instance after the server was gone."""
        problems = []
        inst = self.instance_id()
        if self.running:
            self.destroy_all()
            if inst:
                left = wait_instance_clean(self, inst, self.provider)
                if left:
                    problems.append(
                        f"server {self.url} (instance {inst}): left after destroying "
                        f"every sandbox: {left}"
                    )
        self.stop()
        if inst:
            self.known_instance_ids.add(inst)
        for inst in self.known_instance_ids:
            if shutil.which("docker") is not None:
                try:
                    force_remove(instance_containers(inst))
                except AssertionError:
                    if self.provider == "docker":
                        raise
            # Parked pre-started sandboxes end by themselves once their
            # server is gone: give them a moment before calling it a leak.
            deadline = time.monotonic() + 3
            while any(native_instance_leaves(inst).values()) and time.monotonic() < deadline:
                time.sleep(0.1)
            killed = clean_native_instance(inst)
            if killed:
                problems.append(
                    f"server {self.url} (instance {inst}): processes left in its "
                    f"cgroups after shutdown, killed: {killed}"
                )
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
        return problems

    def __repr__(self) -> str:
        return (
            f"<stacyvm server {self.url} provider={self.provider} pid={self.pid} "
            f"data_dir={self.data_dir}>"
        )


# --------------------------------------------------------------------------
# sandbox tracking
# --------------------------------------------------------------------------


class SandboxTracker:
    """Creates sandboxes and guarantees their destruction (and no leaks)."""

    def __init__(self) -> None:
        self.items: list[tuple[ServerProcess, str, str]] = []

    def add(self, server: ServerProcess, sandbox_id: str, provider: str | None = None) -> str:
        provider = provider or server.provider
        if not any(s is server and i == sandbox_id for s, i, _ in self.items):
            self.items.append((server, sandbox_id, provider))
        if provider == "native":
            native_state(server, sandbox_id)  # remember its cgroups and PID 1
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
                self.add(server, r.json()["id"], r.json().get("provider"))
            except Exception:
                pass
        assert r.status_code == expect, (
            f"create {body} -> {r.status_code} {r.text[:500]}"
        )
        data = r.json()
        if expect == 201:
            assert SANDBOX_ID_RE.match(data["id"]), data
            assert data["state"] == "running", data
            assert data["provider"] == body.get("provider", server.provider), data
        return data

    def cleanup(self) -> list[str]:
        """Destroy everything; return a list of problems (leaks, errors)."""
        problems = []
        # 1. destroy through every server that is still up
        for server, sid, _ in self.items:
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
        # 2. its provider may have left nothing behind for any of them
        seen = set()
        for server, sid, provider in self.items:
            if sid in seen:
                continue
            seen.add(sid)
            left = wait_no_leftovers(server, sid, provider)
            if left:
                problems.append(
                    f"sandbox {sid} ({provider}): left behind after destroy: {'; '.join(left)}"
                )
                if provider == "docker":
                    force_remove(sandbox_containers(sid))
        self.items.clear()
        return problems


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session", params=PROVIDERS)
def provider(request) -> str:
    """The provider under test (the servers' default provider)."""
    return request.param


@pytest.fixture(scope="session")
def server(provider) -> ServerProcess:
    check_prerequisites(provider)
    srv = ServerProcess(provider=provider)
    try:
        srv.start()
    except BaseException:
        srv.shutdown()
        raise
    yield srv
    problems = srv.shutdown()
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def make_server(provider):
    """Factory: make_server(env={...}, data_dir=..., port=..., start=True,
    provider=<the provider fixture>)."""
    check_prerequisites(provider)
    started: list[ServerProcess] = []

    def factory(
        env: dict[str, str] | None = None,
        data_dir: str | None = None,
        port: int | None = None,
        start: bool = True,
        provider: str = provider,
    ) -> ServerProcess:
        srv = ServerProcess(env=env, data_dir=data_dir, port=port, provider=provider)
        started.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    problems = []
    for srv in reversed(started):
        problems += srv.shutdown()
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


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
                    (f"stacyvm server log tail ({srv.provider}, {srv.url}, pid {srv.pid}, {srv.log_path})",
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
