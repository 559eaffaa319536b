"""Live previews (API.md §7): web apps inside sandboxes reached through the
server's own reverse proxy, which carries every connection through the
sandbox agent's TCP tunnel.

Runs once per provider (`[docker]`, `[native]`).  One server per provider
for the module: API key on (so "API keys are never preview auth" is
tested), preview domain `preview.test` (so access defaults to `token`), a
dedicated preview listener, and a 2 s `preview_timeout`.  No DNS is needed:
clients connect to 127.0.0.1 and send `Host: {port}-{id}.preview.test`;
Chromium maps `*.preview.test` to 127.0.0.1 with `--host-resolver-rules`.

Inside the main sandbox (token access): `python3 -m http.server` on
STATIC_PORT (a static site and a 20 MiB file), a stdlib-only WebSocket echo
server on WS_PORT, and a small HTTP/1.1 app on APP_PORT (header echo, SSE,
uploads, downloads, a slow answer).  A second sandbox is `public` and runs
the same app."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import stacyvm

from conftest import (
    IMAGE,
    ServerProcess,
    SandboxTracker,
    check_prerequisites,
    free_port,
    parse_time,
    run_in,
)

DOMAIN = "preview.test"
API_KEY = "preview-e2e-admin-key"
STATIC_PORT = 8000
WS_PORT = 8765
APP_PORT = 3000
CLOSED_PORT = 4999
BIG = 20 * 1024 * 1024

# --------------------------------------------------------------------------
# what runs inside the sandboxes (python3 stdlib only)
# --------------------------------------------------------------------------

APP_PY = r'''
import hashlib, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BLOCK = bytes(range(256)) * 256


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        digest, n = hashlib.sha256(), 0
        def take(left):
            nonlocal n
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    raise EOFError
                digest.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(size)
                self.rfile.readline()
        else:
            take(int(self.headers.get("Content-Length") or 0))
        return n, digest.hexdigest()

    def do_GET(self):
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        if url.path == "/headers":
            self.send_json({"headers": [[k, v] for k, v in self.headers.items()],
                            "path": self.path, "peer": list(self.client_address)})
        elif url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                data = ("id: %d\ndata: tick %d\n\n" % (i, i)).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                time.sleep(0.4)
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/download":
            left = int(q["size"][0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(left))
            self.end_headers()
            while left:
                piece = BLOCK[:min(left, len(BLOCK))]
                self.wfile.write(piece)
                left -= len(piece)
        elif url.path == "/slow":
            time.sleep(float(q.get("s", ["5"])[0]))
            self.send_json({"slept": True})
        else:
            self.send_json({"path": self.path, "method": "GET", "peer": list(self.client_address)})

    def do_POST(self):
        n, digest = self.read_body()
        self.send_json({"size": n, "sha256": digest, "path": self.path})

    do_PUT = do_POST


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), App).serve_forever()
'''

# A WebSocket (RFC 6455) echo server: handshake, masked frames in, frames
# out; ping → pong, close → close.
WS_ECHO_PY = r'''
import base64, hashlib, socketserver, struct, sys

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        headers = {}
        while True:
            line = self.rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("upgrade", "").lower() != "websocket":
            body = b"websocket echo: upgrade required\n"
            self.wfile.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))
            return
        accept = base64.b64encode(hashlib.sha1(
            (headers.get("sec-websocket-key", "") + GUID).encode()).digest()).decode()
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            op, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            raw = self.rfile.read(n)
            m = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(raw, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
            if op == 8:
                self.send(8, data[:2])
                return
            self.send(10 if op == 9 else op, data)

    def send(self, op, data):
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x80 | op, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | op, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | op, 127, n)
        self.wfile.write(head + data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


Server(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()
'''

# The page Chromium loads from STATIC_PORT: a same-origin fetch (with the
# preview cookie), then a WebSocket to WS_PORT's preview host; the result
# goes into the DOM.
PAGE_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>StacyVM preview e2e</title></head>
<body style="font: 20px sans-serif">
<h1>StacyVM live preview</h1>
<p id="out">pending</p>
<script>
const out = document.getElementById('out');
fetch('/hello.txt').then(r => r.text()).then(text => {
  const ws = new WebSocket(WS_URL);
  ws.onopen = () => ws.send('hello from chromium');
  ws.onmessage = (e) => { out.textContent = 'fetch=' + text.trim() + ' echo=' + e.data; ws.close(); };
  ws.onerror = () => { out.textContent = 'websocket error'; };
}).catch(e => { out.textContent = 'fetch error ' + e; });
</script>
</body></html>
"""

WAIT_PORTS_PY = r'''
import socket, sys, time
deadline = time.time() + 20
for port in map(int, sys.argv[1:]):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("port %d never opened" % port)
            time.sleep(0.05)
'''


def expected_download_sha(size: int) -> str:
    block = bytes(range(256)) * 256
    h = hashlib.sha256()
    left = size
    while left:
        piece = block[: min(left, len(block))]
        h.update(piece)
        left -= len(piece)
    return h.hexdigest()


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def psrv(provider):
    check_prerequisites(provider)
    preview_port = free_port()
    srv = ServerProcess(
        provider=provider,
        api_key=API_KEY,
        env={
            "STACYVM_PREVIEW_DOMAIN": DOMAIN,
            "STACYVM_PREVIEW_LISTEN": f"127.0.0.1:{preview_port}",
            "STACYVM_PREVIEW_TIMEOUT": "2s",
        },
    )
    srv.preview_port = preview_port
    try:
        srv.start()
    except BaseException:
        srv.shutdown()
        raise
    yield srv
    problems = srv.shutdown()
    assert not problems, problems


def write_file(api: httpx.Client, sid: str, path: str, content: str, mode: str = "0644") -> None:
    r = api.post(f"/sandboxes/{sid}/files", json={"path": path, "content": content, "mode": mode})
    assert r.status_code == 200, r.text


def start_in(api: httpx.Client, sid: str, command: str, log: str) -> None:
    out = run_in(api, sid, f"nohup {command} > {log} 2>&1 &", timeout="10s")
    assert out["exit_code"] == 0, out


def wait_ports(api: httpx.Client, sid: str, *ports: int) -> None:
    write_file(api, sid, "/tmp/wait_ports.py", WAIT_PORTS_PY)
    out = run_in(api, sid, "python3 /tmp/wait_ports.py " + " ".join(map(str, ports)), timeout="30s")
    assert out["exit_code"] == 0, out


def grant(srv: ServerProcess, sid: str, port: int, **params) -> dict:
    with srv.client() as c:
        r = c.get(f"/sandboxes/{sid}/preview/{port}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def apps(psrv):
    tracker = SandboxTracker()
    with psrv.client(timeout=120) as api:
        main = tracker.create(psrv, {"image": IMAGE, "ttl": "20m"})["id"]
        pub = tracker.create(psrv, {"image": IMAGE, "ttl": "20m", "preview": "public"})
        assert pub["metadata"].get("preview") == "public", pub
        pub = pub["id"]
        ws_token = grant(psrv, main, WS_PORT)["token"]
        ws_url = f"ws://{WS_PORT}-{main}.{DOMAIN}:{psrv.port}/echo?stacyvm_token={ws_token}"
        write_file(api, main, "/workspace/site/index.html",
                   PAGE_HTML.replace("WS_URL", json.dumps(ws_url)))
        write_file(api, main, "/workspace/site/hello.txt", "hi-from-file\n")
        write_file(api, main, "/workspace/app.py", APP_PY)
        write_file(api, main, "/workspace/ws_echo.py", WS_ECHO_PY)
        out = run_in(
            api, main,
            "python3 -c \"import os; open('/workspace/site/big.bin','wb').write(os.urandom(%d))\""
            " && sha256sum /workspace/site/big.bin" % BIG,
            timeout="60s",
        )
        assert out["exit_code"] == 0, out
        big_sha = out["stdout"].split()[0]
        start_in(api, main, f"python3 -m http.server {STATIC_PORT} --directory /workspace/site", "/tmp/static.log")
        start_in(api, main, f"python3 /workspace/ws_echo.py {WS_PORT}", "/tmp/ws.log")
        start_in(api, main, f"python3 /workspace/app.py {APP_PORT}", "/tmp/app.log")
        write_file(api, pub, "/workspace/app.py", APP_PY)
        start_in(api, pub, f"python3 /workspace/app.py {APP_PORT}", "/tmp/app.log")
        wait_ports(api, main, STATIC_PORT, WS_PORT, APP_PORT)
        wait_ports(api, pub, APP_PORT)
    yield SimpleNamespace(main=main, pub=pub, big_sha=big_sha, tracker=tracker)
    problems = tracker.cleanup()
    assert not problems, problems


def host_of(srv: ServerProcess, sid: str, port: int, dedicated: bool = False) -> tuple[str, str]:
    """(base URL to connect to, Host header) for a preview."""
    lport = srv.preview_port if dedicated else srv.port
    return f"http://127.0.0.1:{lport}", f"{port}-{sid}.{DOMAIN}:{lport}"


def preview(srv: ServerProcess, sid: str, port: int, *, token: str | None = None,
            dedicated: bool = False, headers: dict | None = None, timeout: float = 30) -> httpx.Client:
    base, host = host_of(srv, sid, port, dedicated)
    h = {"Host": host}
    if token:
        h["X-Preview-Token"] = token
    h.update(headers or {})
    return httpx.Client(base_url=base, headers=h, timeout=timeout, follow_redirects=False)


def assert_page(r: httpx.Response, status: int, code: str, *, json_body: bool = False) -> None:
    desc = f"{r.request.method} {r.request.url} Host={r.request.headers.get('host')} -> {r.status_code} {r.text[:300]!r}"
    assert r.status_code == status, desc
    if json_body:
        assert r.headers["content-type"].startswith("application/json"), desc
        assert r.json()["code"] == code, desc
        assert r.json()["message"], desc
    else:
        assert r.headers["content-type"].startswith("text/html"), desc
        assert "<html" in r.text and code in r.text, desc


# --------------------------------------------------------------------------
# raw HTTP and WebSocket over sockets
# --------------------------------------------------------------------------


def read_response(sock: socket.socket, buf: bytes = b"") -> tuple[int, dict, bytes, bytes]:
    """Read one HTTP/1.1 response (Content-Length or close-delimited):
    (status, headers, body, bytes read past it)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head: {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside a body")
            rest += chunk
        return status, headers, rest[:n], rest[n:]
    if status == 101 or status == 304 or status == 204:
        return status, headers, b"", rest
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return status, headers, rest, b""
        rest += chunk


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        status, headers, body, _ = read_response(s)
        return status, headers, body


def ws_connect(port: int, host: str, path: str = "/", headers: dict | None = None) -> socket.socket:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()
    )
    status, hdrs, body, rest = read_response(s)
    assert status == 101, (status, hdrs, body)
    want = base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    ).decode()
    assert hdrs.get("sec-websocket-accept") == want, hdrs
    assert hdrs.get("upgrade", "").lower() == "websocket", hdrs
    assert rest == b"", rest
    return s


def ws_send(s: socket.socket, op: int, payload: bytes) -> None:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | op, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | op, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | op, 0x80 | 127, n)
    m = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big") if n else b""
    s.sendall(head + mask + masked)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("websocket closed")
        buf += chunk
    return buf


def ws_recv(s: socket.socket) -> tuple[int, bytes]:
    b0, b1 = recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", recv_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", recv_exact(s, 8))[0]
    assert not b1 & 0x80, "server frames are not masked"
    return b0 & 0x0F, recv_exact(s, n)


# --------------------------------------------------------------------------
# headless Chromium over the DevTools protocol (pipe transport)
# --------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    # Previews resolve to loopback; every other name fails to resolve.
    f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1, MAP * ~NOTFOUND",
    "--window-size=1000,640",
]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium is required for the preview browser test and was not found "
        "(Debian package `chromium`; scripts/setup-host.sh installs it)",
        pytrace=False,
    )


class Chromium:
    """A headless Chromium driven through --remote-debugging-pipe (the
    DevTools protocol as NUL-separated JSON on fds 3 and 4)."""

    def __init__(self, profile: Path):
        binary = chromium_binary()
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        # Park the child's ends above any fd the shell could confuse with 3/4.
        hi_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 100)
        hi_w = fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(cmd_r)
        os.close(out_w)
        self.log_path = str(profile) + ".log"
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&-', "bash", *args],
                pass_fds=(hi_r, hi_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        os.close(hi_r)
        os.close(hi_w)
        self.buf = b""
        self.seq = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 20) -> dict:
        self.seq += 1
        msg = {"id": self.seq, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, _, self.buf = self.buf.partition(b"\0")
                m = json.loads(raw)
                if m.get("id") == self.seq:
                    assert "error" not in m, f"{method}: {m['error']}"
                    return m["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium: no answer to {method} in {timeout}s")
            ready, _, _ = select.select([self.out_r], [], [], left)
            if ready:
                chunk = os.read(self.out_r, 1 << 20)
                if not chunk:
                    raise AssertionError(f"chromium exited; log: {Path(self.log_path).read_text()[-2000:]}")
                self.buf += chunk

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        os.close(self.cmd_w)
        os.close(self.out_r)


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_grant_gives_url_token_and_expiry(psrv, apps):
    main = apps.main
    g = grant(psrv, main, STATIC_PORT)
    assert g["url"] == f"http://{STATIC_PORT}-{main}.{DOMAIN}:{psrv.preview_port}", g
    assert g["token"].startswith(f"v1.{main}.{STATIC_PORT}."), g
    assert g["access"] == "token" and g["port"] == STATIC_PORT, g
    assert g["browser_url"] == g["url"] + "/?stacyvm_token=" + g["token"], g
    left = (parse_time(g["expires_at"]) - datetime.now(timezone.utc)).total_seconds()
    assert 3500 < left <= 3601, g  # default 1h
    left = (parse_time(grant(psrv, main, STATIC_PORT, ttl="90s")["expires_at"])
            - datetime.now(timezone.utc)).total_seconds()
    assert 85 < left <= 91, left
    left = (parse_time(grant(psrv, main, STATIC_PORT, ttl="1000h")["expires_at"])
            - datetime.now(timezone.utc)).total_seconds()
    assert left <= 24 * 3600 + 1, left  # capped by max_ttl
    assert grant(psrv, apps.pub, APP_PORT)["access"] == "public"
    with psrv.client() as c:
        for bad in ["0", "65536", "99999", "abc", "+80", "-1", "80.5"]:
            r = c.get(f"/sandboxes/{main}/preview/{bad}")
            assert r.status_code == 400 and r.json()["code"] == "invalid_request", (bad, r.text)
        r = c.get(f"/sandboxes/{main}/preview/80", params={"ttl": "soon"})
        assert r.status_code == 400, r.text
        r = c.get(f"/sandboxes/sb_{'0' * 16}/preview/80")
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    # The token route is an API route: API auth applies.
    r = httpx.get(f"{psrv.api_url}/sandboxes/{main}/preview/80", timeout=10)
    assert r.status_code == 401, r.text


def test_static_site_and_20mib_download(psrv, apps):
    token = grant(psrv, apps.main, STATIC_PORT)["token"]
    for dedicated in (False, True):
        with preview(psrv, apps.main, STATIC_PORT, token=token, dedicated=dedicated) as c:
            r = c.get("/")
            assert r.status_code == 200, r.text
            assert "StacyVM live preview" in r.text
            assert c.get("/hello.txt").text == "hi-from-file\n"
            r = c.get("/big.bin")
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == BIG
            assert hashlib.sha256(r.content).hexdigest() == apps.big_sha


def test_keep_alive_several_requests_on_one_connection(psrv, apps):
    token = grant(psrv, apps.main, APP_PORT)["token"]
    host = f"{APP_PORT}-{apps.main}.{DOMAIN}:{psrv.port}"
    peers = set()
    with socket.create_connection(("127.0.0.1", psrv.port), timeout=10) as s:
        rest = b""
        for i in range(6):
            s.sendall(f"GET /n/{i} HTTP/1.1\r\nHost: {host}\r\nX-Preview-Token: {token}\r\n\r\n".encode())
            status, headers, body, rest = read_response(s, rest)
            assert status == 200, (status, body)
            assert headers.get("connection", "").lower() != "close", headers
            assert json.loads(body)["path"] == f"/n/{i}"
            peers.add(tuple(json.loads(body)["peer"]))
        # Pipelined: two requests in one write.
        two = b"".join(
            f"GET /p/{i} HTTP/1.1\r\nHost: {host}\r\nX-Preview-Token: {token}\r\n\r\n".encode()
            for i in range(2)
        )
        s.sendall(two)
        for i in range(2):
            status, _, body, rest = read_response(s, rest)
            assert status == 200 and json.loads(body)["path"] == f"/p/{i}"
    # Idle tunnels are pooled: sequential requests reuse the app connection.
    assert len(peers) <= 2, peers


def test_server_sent_events_arrive_incrementally(psrv, apps):
    token = grant(psrv, apps.main, APP_PORT)["token"]
    arrivals = []
    with preview(psrv, apps.main, APP_PORT, token=token) as c:
        t0 = time.monotonic()
        with c.stream("GET", "/sse") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic() - t0, line))
    assert [a[1] for a in arrivals] == [f"data: tick {i}" for i in range(5)], arrivals
    # The app sleeps 0.4 s between events: they must not arrive in one lump.
    assert arrivals[0][0] < 1.0, arrivals
    assert arrivals[-1][0] - arrivals[0][0] > 1.2, arrivals
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert all(g > 0.2 for g in gaps), arrivals


def test_large_upload_and_download_round_trip(psrv, apps):
    token = grant(psrv, apps.main, APP_PORT)["token"]
    data = os.urandom(BIG)
    with preview(psrv, apps.main, APP_PORT, token=token, timeout=120) as c:
        r = c.post("/upload", content=data)
        assert r.status_code == 200, r.text
        assert r.json() == {"size": BIG, "sha256": hashlib.sha256(data).hexdigest(), "path": "/upload"}

        def chunks():
            for i in range(0, 4 * 1024 * 1024, 65536):
                yield data[i : i + 65536]

        r = c.post("/upload-chunked", content=chunks())  # Transfer-Encoding: chunked
        assert r.status_code == 200, r.text
        assert r.json()["size"] == 4 * 1024 * 1024
        assert r.json()["sha256"] == hashlib.sha256(data[: 4 * 1024 * 1024]).hexdigest()

        r = c.get("/download", params={"size": BIG})
        assert r.status_code == 200
        assert len(r.content) == BIG
        assert hashlib.sha256(r.content).hexdigest() == expected_download_sha(BIG)


def test_websocket_echo_through_the_proxy(psrv, apps):
    token = grant(psrv, apps.main, WS_PORT)["token"]
    # Main listener with the token header; the dedicated listener with the
    # token in the query (an upgrade is never redirected).
    cases = [
        (psrv.port, "/chat", {"X-Preview-Token": token}),
        (psrv.preview_port, f"/chat?stacyvm_token={token}", {}),
    ]
    for port, path, headers in cases:
        s = ws_connect(port, f"{WS_PORT}-{apps.main}.{DOMAIN}:{port}", path, headers)
        with s:
            ws_send(s, 1, b"hello")
            assert ws_recv(s) == (1, b"hello")
            blob = os.urandom(300_000)
            ws_send(s, 2, blob)
            assert ws_recv(s) == (2, blob)
            ws_send(s, 9, b"ping!")
            assert ws_recv(s) == (10, b"ping!")
            ws_send(s, 8, struct.pack("!H", 1000))
            assert ws_recv(s) == (8, struct.pack("!H", 1000))
    # Without a token the upgrade is refused before it reaches the app.
    with socket.create_connection(("127.0.0.1", psrv.port), timeout=10) as s:
        s.sendall(
            (f"GET / HTTP/1.1\r\nHost: {WS_PORT}-{apps.main}.{DOMAIN}\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        status, _, _, _ = read_response(s)
        assert status == 401


def test_token_rules(psrv, apps):
    main = apps.main
    good = grant(psrv, main, APP_PORT)["token"]
    with preview(psrv, main, APP_PORT) as c:
        assert_page(c.get("/"), 401, "unauthorized")
        assert_page(c.get("/", headers={"Accept": "application/json"}), 401, "unauthorized", json_body=True)
        # API keys are never preview auth.
        assert_page(c.get("/", headers={"X-API-Key": API_KEY}), 401, "unauthorized")
        assert_page(c.get("/", headers={"Authorization": f"Bearer {API_KEY}"}), 401, "unauthorized")
        assert c.get("/", headers={"X-Preview-Token": good}).status_code == 200
        # Tampered: signature, expiry or port changed.
        sig_flipped = good[:-1] + ("A" if good[-1] != "A" else "B")
        parts = good.split(".")
        later = ".".join(parts[:3] + [str(int(parts[3]) + 3600), parts[4]])
        other_port = ".".join(parts[:2] + [str(STATIC_PORT)] + parts[3:])
        for bad in [sig_flipped, later, other_port, "garbage", "v1." + "x" * 5000]:
            assert_page(c.get("/", headers={"X-Preview-Token": bad, "Accept": "application/json"}),
                        403, "forbidden", json_body=True)
        # A genuine token for another port, or another sandbox.
        for other in [grant(psrv, main, STATIC_PORT)["token"], grant(psrv, apps.pub, APP_PORT)["token"]]:
            assert_page(c.get("/", headers={"X-Preview-Token": other}), 403, "forbidden")
        # Expired.
        short = grant(psrv, main, APP_PORT, ttl="1s")
        assert c.get("/", headers={"X-Preview-Token": short["token"]}).status_code == 200
        wait = (parse_time(short["expires_at"]) - datetime.now(timezone.utc)).total_seconds() + 0.3
        time.sleep(max(wait, 0))
        r = c.get("/", headers={"X-Preview-Token": short["token"], "Accept": "application/json"})
        assert_page(r, 401, "unauthorized", json_body=True)
        assert "expired" in r.json()["message"]


def test_cookie_flow(psrv, apps):
    main = apps.main
    g = grant(psrv, main, APP_PORT, ttl="10m")
    with preview(psrv, main, APP_PORT) as c:
        r = c.get(f"/headers?x=1&stacyvm_token={g['token']}&y=2")
        assert r.status_code == 302, r.text
        assert r.headers["location"] == "/headers?x=1&y=2"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"stacyvm_preview={g['token']};"), cookie
        for attr in ["HttpOnly", "SameSite=Lax", "Path=/"]:
            assert attr in cookie, cookie
        assert "Domain=" not in cookie, cookie  # host-only
        max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))
        assert 590 <= max_age <= 601, cookie
        # The cookie alone opens the preview, and never reaches the app.
        r = c.get("/headers?x=1&y=2", headers={"Cookie": f"a=1; stacyvm_preview={g['token']}; b=2"})
        assert r.status_code == 200, r.text
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen.get("cookie") == "a=1; b=2", seen
        assert r.json()["path"] == "/headers?x=1&y=2"
        assert_page(c.get("/", headers={"Cookie": "stacyvm_preview=v1.forged"}), 403, "forbidden")
        # A stale cookie does not hide a valid one.
        r = c.get("/", headers={"Cookie": f"stacyvm_preview=v1.old; stacyvm_preview={g['token']}"})
        assert r.status_code == 200
        # Anything but a page load is forwarded at once, without the token.
        r = c.post(f"/form?stacyvm_token={g['token']}&z=3", content=b"abc")
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/form?z=3" and r.json()["size"] == 3


def test_public_sandboxes_need_no_token(psrv, apps, sandboxes):
    with preview(psrv, apps.pub, APP_PORT) as c:
        r = c.get("/headers")
        assert r.status_code == 200, r.text
    # Chosen through metadata instead of the create field.
    sb = sandboxes.create(psrv, {"image": IMAGE, "ttl": "5m", "metadata": {"preview": "public"}})
    with preview(psrv, sb["id"], CLOSED_PORT, headers={"Accept": "application/json"}) as c:
        assert_page(c.get("/"), 502, "port_closed", json_body=True)  # not 401
    with psrv.client() as api:
        for body in ({"image": IMAGE, "preview": "open"}, {"image": IMAGE, "metadata": {"preview": "maybe"}}):
            r = api.post("/sandboxes", json=body)
            assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text


def test_destroyed_and_unknown_sandboxes_are_404(psrv, apps, sandboxes):
    sb = sandboxes.create(psrv, {"image": IMAGE, "ttl": "5m"})
    token = grant(psrv, sb["id"], APP_PORT)["token"]
    with psrv.client() as api:
        assert api.delete(f"/sandboxes/{sb['id']}").status_code == 200
    t0 = time.monotonic()
    with preview(psrv, sb["id"], APP_PORT, token=token) as c:
        assert_page(c.get("/"), 404, "not_found")
        assert_page(c.get("/", headers={"Accept": "application/json"}), 404, "not_found", json_body=True)
    assert time.monotonic() - t0 < 2
    with preview(psrv, "sb_" + "7" * 16, APP_PORT, token=token, dedicated=True) as c:
        assert_page(c.get("/x"), 404, "not_found")


def test_closed_port_is_502_within_a_second(psrv, apps):
    token = grant(psrv, apps.main, CLOSED_PORT)["token"]
    for dedicated in (False, True):
        with preview(psrv, apps.main, CLOSED_PORT, token=token, dedicated=dedicated) as c:
            t0 = time.monotonic()
            r = c.get("/")
            took = time.monotonic() - t0
            assert_page(r, 502, "port_closed")
            assert took < 1.0, took
            assert str(CLOSED_PORT) in r.text


def test_slow_app_is_504_after_preview_timeout(psrv, apps):
    token = grant(psrv, apps.main, APP_PORT)["token"]
    with preview(psrv, apps.main, APP_PORT, token=token) as c:
        t0 = time.monotonic()
        r = c.get("/slow", params={"s": "8"}, headers={"Accept": "application/json"})
        took = time.monotonic() - t0
    assert_page(r, 504, "gateway_timeout", json_body=True)
    assert 1.9 <= took < 4.5, took  # STACYVM_PREVIEW_TIMEOUT=2s


def test_forwarded_headers_and_what_never_reaches_the_app(psrv, apps):
    token = grant(psrv, apps.main, APP_PORT)["token"]
    with preview(psrv, apps.main, APP_PORT, token=token) as c:
        r = c.get("/headers", headers={"X-API-Key": API_KEY, "X-App": "kept", "Cookie": "theme=dark"})
        assert r.status_code == 200, r.text
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        host = f"{APP_PORT}-{apps.main}.{DOMAIN}:{psrv.port}"
        assert seen["host"] == host
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-host"] == host
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-port"] == str(psrv.port)
        assert seen["x-app"] == "kept" and seen["cookie"] == "theme=dark"
        for gone in ["x-api-key", "x-preview-token"]:
            assert gone not in seen, seen
        # The server's key never reaches sandboxed code; the app's own does.
        r = c.get("/headers", headers={"Authorization": f"Bearer {API_KEY}"})
        assert "authorization" not in {k.lower() for k, _ in r.json()["headers"]}
        r = c.get("/headers", headers={"Authorization": "Bearer app-token"})
        assert dict((k.lower(), v) for k, v in r.json()["headers"])["authorization"] == "Bearer app-token"
        # Preview hosts never reach API routes: this is the app's answer.
        r = c.get("/api/v1/sandboxes")
        assert r.status_code == 200 and r.json()["path"] == "/api/v1/sandboxes", r.text


def test_hostile_hosts_and_headers_get_clean_4xx(psrv, apps):
    main = apps.main
    token = grant(psrv, main, APP_PORT)["token"]
    cases = [
        ("no host", b"GET / HTTP/1.0\r\n\r\n", psrv.port, (401,)),
        ("not ours", f"GET / HTTP/1.1\r\nHost: 1-{main}.evil.com\r\n\r\n".encode(), psrv.port, (401, 404)),
        ("port 0", f"GET / HTTP/1.1\r\nHost: 0-{main}.{DOMAIN}\r\n\r\n".encode(), psrv.port, (400,)),
        ("port 99999", f"GET / HTTP/1.1\r\nHost: 99999-{main}.{DOMAIN}\r\n\r\n".encode(), psrv.port, (400,)),
        ("port +80", f"GET / HTTP/1.1\r\nHost: +80-{main}.{DOMAIN}\r\n\r\n".encode(), psrv.port, (400,)),
        ("port 080", f"GET / HTTP/1.1\r\nHost: 080-{main}.{DOMAIN}\r\n\r\n".encode(), psrv.port, (400,)),
        ("no port", f"GET / HTTP/1.1\r\nHost: -{main}.{DOMAIN}\r\n\r\n".encode(), psrv.port, (400,)),
        ("extra label", f"GET / HTTP/1.1\r\nHost: a.{APP_PORT}-{main}.{DOMAIN}\r\n\r\n".encode(), psrv.port, (400,)),
        ("bad id", f"GET / HTTP/1.1\r\nHost: {APP_PORT}-sb_nope.{DOMAIN}\r\n\r\n".encode(), psrv.port, (404,)),
        ("garbage", b"GET / HTTP/1.1\r\nHost: \x01\x02\xff\xfe\r\n\r\n", psrv.port, (400, 401)),
        ("huge host", b"GET / HTTP/1.1\r\nHost: " + b"a" * 100_000 + f".{DOMAIN}\r\n\r\n".encode(),
         psrv.port, (400, 431)),
        ("huge host, previews only", b"GET / HTTP/1.1\r\nHost: " + b"9" * 5000 + f"-{main}.{DOMAIN}\r\n\r\n".encode(),
         psrv.preview_port, (400, 431)),
        ("forged token", f"GET / HTTP/1.1\r\nHost: {APP_PORT}-{main}.{DOMAIN}\r\nX-Preview-Token: "
         f"v1.{main}.{APP_PORT}.99999999999.AAAA\r\n\r\n".encode(), psrv.port, (403,)),
        ("huge token", f"GET / HTTP/1.1\r\nHost: {APP_PORT}-{main}.{DOMAIN}\r\nX-Preview-Token: ".encode()
         + b"v" * 20_000 + b"\r\n\r\n", psrv.port, (403,)),
        ("huge header", f"GET / HTTP/1.1\r\nHost: {APP_PORT}-{main}.{DOMAIN}\r\nX-Preview-Token: {token}\r\n"
         "X-Big: ".encode() + b"b" * 1_000_000 + b"\r\n\r\n", psrv.port, (431, 400)),
        ("many headers", f"GET / HTTP/1.1\r\nHost: {APP_PORT}-{main}.{DOMAIN}\r\n".encode()
         + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n", psrv.port, (431, 400)),
        ("not a preview host, previews only", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", psrv.preview_port, (404,)),
        ("no host, previews only", b"GET / HTTP/1.0\r\n\r\n", psrv.preview_port, (404,)),
    ]
    for name, data, port, want in cases:
        try:
            status, _, body = raw_exchange(port, data)
        except (ConnectionError, OSError) as e:
            pytest.fail(f"{name}: no answer ({e!r})")
        assert status in want, f"{name}: {status} {body[:300]!r}"
    # `1-{id}.evil.com` is not a preview host: the API answered (404 JSON).
    status, _, body = raw_exchange(psrv.port, f"GET /x HTTP/1.1\r\nHost: {APP_PORT}-{main}.evil.com\r\n"
                                   f"X-API-Key: {API_KEY}\r\n\r\n".encode())
    assert status == 404 and json.loads(body)["code"] == "not_found", body
    # Everything still works.
    with psrv.client() as api:
        assert api.get("/health").status_code == 200
    with preview(psrv, main, APP_PORT, token=token) as c:
        assert c.get("/").status_code == 200


def test_official_client_preview_url_on_localhost(make_server, sandboxes):
    """With `preview_domain = "localhost:{port}"` the official client's
    get_preview_url() is the working address, and localhost previews are
    public by default."""
    port = free_port()
    srv = make_server(env={"STACYVM_PREVIEW_DOMAIN": f"localhost:{port}"}, port=port)
    with stacyvm.Client(srv.url) as client:
        sb = client.spawn(image=IMAGE, ttl="5m")
        sandboxes.add(srv, sb.id)
        assert sb.exec(f"nohup python3 -m http.server {STATIC_PORT} >/tmp/h.log 2>&1 &").exit_code == 0
        with srv.client() as api:
            wait_ports(api, sb.id, STATIC_PORT)
            assert grant(srv, sb.id, STATIC_PORT)["access"] == "public"
        url = sb.get_preview_url(STATIC_PORT)
        assert url == f"http://{STATIC_PORT}-{sb.id}.localhost:{port}", url
        netloc = url.removeprefix("http://")
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": netloc}, timeout=30)
        assert r.status_code == 200 and "Directory listing" in r.text, r.text[:300]


def test_chromium_loads_a_page_and_websocket_through_the_proxy(psrv, apps, tmp_path):
    g = grant(psrv, apps.main, STATIC_PORT)
    url = f"http://{STATIC_PORT}-{apps.main}.{DOMAIN}:{psrv.port}/?stacyvm_token={g['token']}"
    browser = Chromium(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Page.navigate", {"url": url}, session)
        text, deadline = "", time.monotonic() + 20
        while time.monotonic() < deadline:
            res = browser.call(
                "Runtime.evaluate",
                {"expression": "[location.href, (document.getElementById('out') || {}).textContent || '']",
                 "returnByValue": True},
                session,
            )["result"].get("value") or ["", ""]
            href, text = res
            if text not in ("", "pending"):
                break
            time.sleep(0.1)
        shot = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"}, session)["data"])
        (tmp_path / "preview.png").write_bytes(shot)
    finally:
        browser.close()
    # The token was traded for a cookie (the URL is clean), the same-origin
    # fetch carried it, and the page's WebSocket reached the echo server.
    assert text == "fetch=hi-from-file echo=hello from chromium", (text, href)
    assert "stacyvm_token" not in href, href
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 2000
