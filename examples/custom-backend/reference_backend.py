#!/usr/bin/env python3
"""Reference backend of the StacyVM `custom` provider (docs/CUSTOM_PROVIDER.md).

Python 3 standard library only; runs as root on Linux.  Each sandbox is the
StacyVM agent as PID 1 of fresh mount, PID, UTS and IPC namespaces
(`unshare`), on an overlayfs whose lower layers are the image's root
filesystem, with a minimal /dev, its own /proc (with /proc/sys read-only),
`pivot_root` into the overlay and a reduced capability bounding set.  The
agent listens on TCP with a random per-sandbox token.

There is NO network namespace: sandboxes share the host's network (the
server reaches each agent on the loopback), and there are no cgroup limits.
This is a reference for the contract and a test fixture, not an isolation
boundary for untrusted code.

    reference_backend.py --listen 127.0.0.1:7500 --state-dir /var/lib/svm-ref \\
        --agent /usr/local/lib/stacyvm/stacyvm-agent \\
        --image python:3.12=/srv/rootfs/python312 \\
        --image-store /var/lib/stacyvm/images --token-file /etc/svm-ref.token

State lives in --state-dir (one directory per sandbox), so the backend can be
restarted (or killed) without losing its sandboxes.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

VERSION = "1"
ISOLATION = "namespaces"
# What these sandboxes really offer (no cgroup limits, no network namespace).
CAPABILITIES = [
    "exec",
    "files",
    "streaming",
    "preview",
    "isolated_pids",
    "isolated_filesystem",
    "isolated_hostname",
]
AGENT_IN_SANDBOX = "/.stacyvm/stacyvm-agent"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# How long a create waits for the agent to answer before giving up.
AGENT_READY_TIMEOUT = 20.0
MAX_BODY = 1024 * 1024

# Capabilities the agent (and so every command) keeps; everything else is
# dropped from the bounding set.  Notably gone: SYS_ADMIN (mounts),
# MKNOD (device nodes), DAC_READ_SEARCH (open_by_handle_at), NET_ADMIN and
# NET_RAW (the host network is shared), SYS_MODULE, SYS_RAWIO, SYS_PTRACE,
# SYS_TIME, SYS_BOOT, BPF, PERFMON.
KEEP_CAPS = {
    0,  # CHOWN
    1,  # DAC_OVERRIDE
    3,  # FOWNER
    4,  # FSETID
    5,  # KILL
    6,  # SETGID
    7,  # SETUID
    8,  # SETPCAP
    10,  # NET_BIND_SERVICE
    18,  # SYS_CHROOT
    29,  # AUDIT_WRITE
    31,  # SETFCAP
}

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
SYS_PIVOT_ROOT = 155  # x86_64


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} reference-backend: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks) of a live, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, start_time: int | None) -> bool:
    return bool(pid) and start_time is not None and proc_start_time(pid) == start_time


def wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, start_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


class Images:
    """Image name -> (lower directories, top first; image environment)."""

    def __init__(self, dirs: dict[str, str], store: str | None):
        self.dirs = dirs
        self.store = Path(store).resolve() if store else None

    @staticmethod
    def _candidates(name: str) -> list[str]:
        names = [name]
        last = name.rsplit("/", 1)[-1]
        if ":" not in last and "@" not in last:
            names.append(name + ":latest")
        out = []
        for n in names:
            out += [n, f"docker.io/{n}", f"docker.io/library/{n}"]
        return out

    def resolve(self, name: str) -> tuple[list[str], list[str]] | None:
        if name in self.dirs:
            return [self.dirs[name]], []
        if self.store is None:
            return None
        wanted = self._candidates(name)
        try:
            entries = sorted((self.store / "images").glob("*.json"))
        except OSError:
            return None
        for path in entries:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("reference") not in wanted:
                continue
            lowers = []
            for layer in doc.get("layers") or []:
                digest = str(layer.get("diff_id", ""))
                hexpart = digest.split(":", 1)[-1]
                d = self.store / "layers" / hexpart
                if not re.fullmatch(r"[0-9a-f]{64}", hexpart) or not d.is_dir():
                    return None
                lowers.append(str(d))
            if not lowers:
                return None
            env = [e for e in (doc.get("config") or {}).get("env") or [] if isinstance(e, str)]
            return list(reversed(lowers)), env
        return None


# --------------------------------------------------------------------------
# sandbox state
# --------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Backend:
    def __init__(self, args: argparse.Namespace):
        self.state_dir = Path(args.state_dir).resolve()
        self.root = self.state_dir / "sandboxes"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.agent = str(Path(args.agent).resolve())
        self.agent_host = args.agent_host
        self.max_memory_mb = args.max_memory_mb
        images = {}
        for spec in args.image or []:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"--image {spec!r}: expected NAME=ROOTFS_DIR")
            if not os.path.isdir(path):
                raise SystemExit(f"--image {spec!r}: {path} is not a directory")
            images[name] = str(Path(path).resolve())
        self.images = Images(images, args.image_store)
        self.lock = threading.Lock()
        # One create or delete at a time per sandbox id.
        self.id_locks: dict[str, threading.Lock] = {}
        # unshare processes started by this process, reaped in the background
        self.children: dict[str, subprocess.Popen] = {}
        self.sweep_partial()

    # -- files --------------------------------------------------------------

    def sdir(self, sid: str) -> Path:
        return self.root / sid

    def read_state(self, sid: str) -> dict | None:
        try:
            st = json.loads((self.sdir(sid) / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return st if isinstance(st, dict) else None

    def read_pid(self, sid: str) -> tuple[int | None, int | None]:
        try:
            p = json.loads((self.sdir(sid) / "pid.json").read_text())
            return int(p["pid"]), int(p["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None

    @staticmethod
    def write_json(path: Path, value: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def sweep_partial(self) -> None:
        """Remove directories of creates that never wrote their state."""
        for d in self.root.iterdir():
            if d.is_dir() and not (d / "state.json").exists():
                log(f"removing partial sandbox directory {d}")
                self.kill(d.name)
                shutil.rmtree(d, ignore_errors=True)

    def describe(self, sid: str, st: dict) -> dict:
        pid, start = self.read_pid(sid)
        return {
            "id": sid,
            "instance_id": st.get("instance_id"),
            "runtime_id": f"ref-{sid}" + (f"-{pid}" if pid else ""),
            "running": alive(pid, start),
            "image": st.get("image"),
            "agent": {"tcp": f"{st['agent_host']}:{st['port']}", "token": st["token"]},
        }

    def ids(self) -> list[str]:
        try:
            return sorted(d.name for d in self.root.iterdir() if d.is_dir())
        except OSError:
            return []

    # -- create ---------------------------------------------------------------

    def create(self, req: dict) -> dict:
        def field(name, kind, required=True, default=None):
            v = req.get(name, default)
            if v is None and not required:
                return default
            if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
                raise ApiError(400, "invalid_request", f"{name} must be a {kind.__name__}")
            return v

        sid = field("id", str)
        if not ID_RE.match(sid):
            raise ApiError(400, "invalid_request", f"invalid sandbox id {sid!r}")
        instance = field("instance_id", str)
        image = field("image", str)
        memory_mb = field("memory_mb", int, False, 0)
        env = field("env", dict, False, {})
        hostname = field("hostname", str, False, "") or re.sub(r"[^a-z0-9-]", "-", sid.lower())[:63].strip("-") or "sandbox"
        for k, v in env.items():
            if not ENV_NAME_RE.match(k) or not isinstance(v, str) or "\0" in v:
                raise ApiError(400, "invalid_request", f"invalid environment variable {k!r}")
        if self.max_memory_mb and memory_mb > self.max_memory_mb:
            raise ApiError(
                400,
                "invalid_request",
                f"memory_mb {memory_mb} is more than this backend allows ({self.max_memory_mb})",
            )
        resolved = self.images.resolve(image)
        if resolved is None:
            raise ApiError(404, "image_not_found", f"image {image} is not known to this backend")
        lowers, image_env = resolved

        with self.id_lock(sid):
            if self.sdir(sid).exists():
                raise ApiError(409, "conflict", f"sandbox {sid} already exists")
            return self._create(sid, instance, image, hostname, lowers, image_env, env)

    def id_lock(self, sid: str) -> threading.Lock:
        with self.lock:
            return self.id_locks.setdefault(sid, threading.Lock())

    def _create(self, sid, instance, image, hostname, lowers, image_env, env) -> dict:
        d = self.sdir(sid)
        d.mkdir(mode=0o700)
        for sub in ("upper", "work", "root"):
            (d / sub).mkdir()
        port = free_port(self.agent_host)
        token = secrets.token_hex(24)
        agent_env = build_env(image_env, env, hostname)
        agent_env["STACYVM_AGENT_TOKEN"] = token
        self.write_json(
            d / "init.json",
            {
                "lowers": lowers,
                "upper": str(d / "upper"),
                "work": str(d / "work"),
                "root": str(d / "root"),
                "agent": self.agent,
                "hostname": hostname,
                "listen": f"tcp:{self.agent_host}:{port}"
                if ":" not in self.agent_host
                else f"tcp:[{self.agent_host}]:{port}",
                "env": agent_env,
                "pid_file": str(d / "pid.json"),
            },
        )
        state = {
            "id": sid,
            "instance_id": instance,
            "image": image,
            "agent_host": self.agent_host if ":" not in self.agent_host else f"[{self.agent_host}]",
            "port": port,
            "token": token,
            "created_at": time.time(),
        }
        self.write_json(d / "state.json", state)
        logf = open(d / "agent.log", "ab")
        try:
            proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--pid",
                    "--fork",
                    "--uts",
                    "--ipc",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    os.path.abspath(__file__),
                    "__sandbox-init",
                    str(d / "init.json"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            logf.close()
            self.remove(sid)
            raise ApiError(500, "internal", f"cannot start unshare: {e}")
        logf.close()
        with self.lock:
            self.children[sid] = proc
        problem = self.wait_agent(sid, proc, state)
        if problem:
            tail = self.log_tail(sid, 15)
            self.remove(sid)
            raise ApiError(500, "internal", f"sandbox {sid} did not start: {problem}; log: {' | '.join(tail)}")
        log(f"created {sid} (image {image}, agent on {state['agent_host']}:{port})")
        return self.describe(sid, state)

    def wait_agent(self, sid: str, proc: subprocess.Popen, state: dict) -> str | None:
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"the sandbox exited with status {proc.returncode}"
            host = state["agent_host"].strip("[]")
            try:
                c = http.client.HTTPConnection(host, state["port"], timeout=2)
                c.request("GET", "/v1/health", headers={"Authorization": f"Bearer {state['token']}"})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return None
                # Someone else answers on that port.
                return f"port {state['port']} answers {r.status}, not our agent"
            except OSError as e:
                last = str(e)
            time.sleep(0.02)
        return f"the agent did not answer within {AGENT_READY_TIMEOUT:.0f}s ({last})"

    def log_tail(self, sid: str, n: int) -> list[str]:
        try:
            data = (self.sdir(sid) / "agent.log").read_bytes()[-65536:]
        except OSError:
            return []
        lines = data.decode(errors="replace").splitlines()
        return lines[-n:] if n else []

    # -- delete -------------------------------------------------------------

    def kill(self, sid: str) -> bool:
        """SIGKILL the sandbox's PID 1 (which ends its whole PID namespace)."""
        pid, start = self.read_pid(sid)
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not wait_gone(pid, start, 10):
                return False
        with self.lock:
            proc = self.children.pop(sid, None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return True

    def remove(self, sid: str) -> None:
        if not self.kill(sid):
            raise ApiError(500, "internal", f"sandbox {sid}: its processes did not exit")
        shutil.rmtree(self.sdir(sid), ignore_errors=True)
        if self.sdir(sid).exists():
            raise ApiError(500, "internal", f"cannot remove {self.sdir(sid)}")

    def delete(self, sid: str) -> bool:
        if not ID_RE.match(sid):
            return False
        with self.id_lock(sid):
            if not self.sdir(sid).exists():
                return False
            self.remove(sid)
        log(f"deleted {sid}")
        return True

    def reap(self) -> None:
        with self.lock:
            for sid, p in list(self.children.items()):
                if p.poll() is not None:
                    del self.children[sid]


def free_port(host: str) -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_env(image_env: list[str], env: dict, hostname: str) -> dict:
    out: dict[str, str] = {}
    for e in image_env:
        k, sep, v = e.partition("=")
        if sep and k:
            out[k] = v
    out.setdefault("PATH", DEFAULT_PATH)
    out["HOSTNAME"] = hostname
    out.setdefault("HOME", "/root")
    out.update(env)
    return out


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "stacyvm-reference-backend/" + VERSION
    protocol_version = "HTTP/1.1"
    backend: Backend
    token: str | None

    def log_message(self, fmt, *args):  # quieter than the default
        if os.environ.get("REFERENCE_BACKEND_DEBUG"):
            log(fmt % args)

    def send_json(self, status: int, value) -> None:
        body = json.dumps(value).encode() if value is not None else b""
        self.send_response(status)
        if value is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def send_error_json(self, e: ApiError) -> None:
        self.send_json(e.status, {"error": {"code": e.code, "message": e.message}})

    def authorized(self) -> bool:
        if not self.token:
            return True
        got = self.headers.get("Authorization", "")
        if not got[:7].lower() == "bearer ":
            return False
        return hmac.compare_digest(got[7:].strip().encode(), self.token.encode())

    def dispatch(self, method: str) -> None:
        try:
            # Read the whole body first, so that an early error answer
            # leaves the keep-alive connection in step.
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if n < 0 or n > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "payload_too_large", "missing or too large Content-Length")
            self.raw_body = self.rfile.read(n) if n else b""
            if not self.authorized():
                raise ApiError(401, "unauthorized", "missing or wrong bearer token")
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            parts = [unquote(p) for p in url.path.split("/") if p]
            self.route(method, parts, query)
        except ApiError as e:
            self.send_error_json(e)
        except Exception as e:  # noqa: BLE001 - answer, never drop the connection
            log(f"{method} {self.path} failed: {e!r}")
            self.send_error_json(ApiError(500, "internal", str(e)))

    def body(self) -> dict:
        try:
            v = json.loads(self.raw_body or b"null")
        except ValueError:
            raise ApiError(400, "invalid_request", "body is not JSON")
        if not isinstance(v, dict):
            raise ApiError(400, "invalid_request", "body must be a JSON object")
        return v

    def route(self, method: str, parts: list[str], query: dict) -> None:
        b = self.backend
        if parts == ["v1", "health"] and method == "GET":
            return self.send_json(
                200,
                {"status": "ok", "isolation": ISOLATION, "capabilities": CAPABILITIES, "version": VERSION},
            )
        if parts == ["v1", "sandboxes"]:
            if method == "POST":
                return self.send_json(201, b.create(self.body()))
            if method == "GET":
                inst = (query.get("instance_id") or [None])[0]
                out = []
                for sid in b.ids():
                    st = b.read_state(sid)
                    if st and (inst is None or st.get("instance_id") == inst):
                        out.append(b.describe(sid, st))
                return self.send_json(200, {"sandboxes": out})
        if len(parts) >= 3 and parts[:2] == ["v1", "sandboxes"]:
            sid = parts[2]
            st = b.read_state(sid) if ID_RE.match(sid) else None
            if len(parts) == 3 and method == "GET":
                if st is None:
                    raise ApiError(404, "not_found", f"no sandbox {sid}")
                return self.send_json(200, b.describe(sid, st))
            if len(parts) == 3 and method == "DELETE":
                if not b.delete(sid):
                    raise ApiError(404, "not_found", f"no sandbox {sid}")
                return self.send_json(204, None)
            if parts[3:] == ["logs"] and method == "GET":
                if st is None:
                    raise ApiError(404, "not_found", f"no sandbox {sid}")
                try:
                    n = max(0, min(int((query.get("lines") or ["100"])[0]), 10000))
                except ValueError:
                    raise ApiError(400, "invalid_request", "lines must be a number")
                return self.send_json(200, {"lines": b.log_tail(sid, n)})
        raise ApiError(404, "not_found", f"no route {method} {self.path}")

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PUT(self):
        self.dispatch("PUT")


# --------------------------------------------------------------------------
# inside the namespaces: build the root and exec the agent
# --------------------------------------------------------------------------


def sandbox_init(init_path: str) -> None:
    """PID 1 of the new PID namespace, still on the host's root: mount the
    sandbox's filesystem, switch to it and become the agent."""
    cfg = json.loads(Path(init_path).read_text())
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def mount(src, target, fstype, flags=0, data=None):
        check(
            libc.mount(
                src.encode() if src else None,
                str(target).encode(),
                fstype.encode() if fstype else None,
                ctypes.c_ulong(flags),
                data.encode() if data else None,
            ),
            f"mount {fstype or src} on {target}",
        )

    def bind(src, target, ro=False, flags=0):
        mount(src, target, None, MS_BIND | flags)
        if ro:
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)

    # Our host pid: /proc is still the host's.
    host_pid = int(os.readlink("/proc/self"))
    Backend.write_json(
        Path(cfg["pid_file"]), {"pid": host_pid, "start_time": proc_start_time(host_pid)}
    )
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = Path(cfg["root"])
    mount(
        "overlay",
        root,
        "overlay",
        0,
        f"lowerdir={':'.join(cfg['lowers'])},upperdir={cfg['upper']},workdir={cfg['work']}",
    )
    for sub in ("proc", "dev", "tmp", ".stacyvm"):
        (root / sub).mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)

    # /proc of the new PID namespace; the host-wide knobs read-only.
    mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for p in ("sys", "sysrq-trigger", "irq", "bus", "fs"):
        target = root / "proc" / p
        if target.exists():
            bind(str(target), target, ro=True, flags=MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for p in ("kcore", "keys", "timer_list", "kallsyms"):
        target = root / "proc" / p
        if target.exists():
            bind("/dev/null", target)

    # A minimal /dev.
    dev = root / "dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        (dev / node).touch()
        bind(f"/dev/{node}", dev / node, flags=MS_NOSUID | MS_NOEXEC)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, dev / name)
    (dev / "pts").mkdir()
    try:
        mount("devpts", dev / "pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    except OSError as e:
        print(f"no /dev/pts: {e}", file=sys.stderr)
    (dev / "shm").mkdir()
    mount("tmpfs", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")

    # The agent, read-only.
    agent = root / AGENT_IN_SANDBOX.lstrip("/")
    if not agent.exists():
        agent.touch()
    bind(cfg["agent"], agent, ro=True, flags=MS_NOSUID | MS_NODEV)

    socket.sethostname(cfg["hostname"])

    # Switch root: pivot_root(".", ".") stacks the old root under the new
    # one; detaching it leaves only the sandbox's tree.
    os.chdir(root)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")

    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        if cap not in KEEP_CAPS:
            check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")

    os.execve(AGENT_IN_SANDBOX, ["stacyvm-agent", "--listen", cfg["listen"]], cfg["env"])


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "__sandbox-init":
        try:
            sandbox_init(sys.argv[2])
        except Exception as e:  # noqa: BLE001
            print(f"sandbox init failed: {e}", file=sys.stderr, flush=True)
            os._exit(1)
        return

    ap = argparse.ArgumentParser(description="StacyVM custom-provider reference backend")
    ap.add_argument("--listen", required=True, help="IP:PORT to serve the contract on")
    ap.add_argument("--state-dir", required=True, help="where sandboxes and their state live")
    ap.add_argument("--agent", required=True, help="the static stacyvm-agent binary to run in sandboxes")
    ap.add_argument("--token", help="bearer token the server must send (or STACYVM_BACKEND_TOKEN)")
    ap.add_argument("--token-file", help="read the bearer token from this file")
    ap.add_argument(
        "--image", action="append", metavar="NAME=ROOTFS_DIR", help="an image: a root filesystem directory (repeatable)"
    )
    ap.add_argument("--image-store", help="also resolve images from a StacyVM native image store directory")
    ap.add_argument("--agent-host", default="127.0.0.1", help="IP address the agents listen on and are reached at")
    ap.add_argument("--max-memory-mb", type=int, default=0, help="refuse sandboxes asking for more (0: no limit)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        raise SystemExit("the reference backend must run as root (namespaces, mounts)")
    token = args.token or os.environ.get("STACYVM_BACKEND_TOKEN")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not os.access(args.agent, os.X_OK):
        raise SystemExit(f"--agent {args.agent} is not an executable")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit("--listen must be IP:PORT")
    backend = Backend(args)

    class H(Handler):
        pass

    H.backend = backend
    H.token = token
    ThreadingHTTPServer.daemon_threads = True
    if ":" in host.strip("[]"):
        ThreadingHTTPServer.address_family = socket.AF_INET6
    srv = ThreadingHTTPServer((host.strip("[]"), int(port)), H)

    def stop(signum, _frame):
        log(f"signal {signum}: stopping (sandboxes keep running)")
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def reaper():
        while True:
            time.sleep(1)
            backend.reap()

    threading.Thread(target=reaper, daemon=True).start()
    log(f"listening on {args.listen} (state {backend.state_dir}, {len(backend.ids())} sandboxes)")
    srv.serve_forever()


if __name__ == "__main__":
    main()
