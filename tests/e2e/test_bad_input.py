"""Bad input is answered with the exact status and `{code, message}` envelope
of API.md §1 — never a 500 — and no file call escapes the sandbox.

Runs once per provider (`[docker]`, `[native]`): the servers' default
provider is the one under test."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import httpx
import pytest
import stacyvm
from stacyvm.exceptions import StacyVMError

from conftest import (
    IMAGE,
    MISSING_IMAGE,
    SandboxTracker,
    assert_error,
    instance_runtimes,
    run_in,
    runtime_leftovers,
)

# Every answer of this module is recorded; none may be a 500.
_RESPONSES: list[tuple[str, str, int]] = []


def _record(resp: httpx.Response) -> None:
    _RESPONSES.append((resp.request.method, str(resp.request.url), resp.status_code))


def recording_client(srv, **kw) -> httpx.Client:
    hooks = kw.pop("event_hooks", {"response": [_record]})
    return srv.client(event_hooks=hooks, **kw)


@pytest.fixture(scope="module")
def http(server):
    with recording_client(server) as c:
        yield c


@pytest.fixture(scope="module")
def sid(server, http):
    tracker = SandboxTracker()
    r = http.post("/sandboxes", json={"image": IMAGE, "ttl": "10m"})
    assert r.status_code == 201, r.text
    tracker.add(server, r.json()["id"])
    yield r.json()["id"]
    problems = tracker.cleanup()
    assert not problems, problems


@pytest.fixture(scope="module", autouse=True)
def no_500_anywhere():
    yield
    bad = [x for x in _RESPONSES if x[2] == 500]
    assert not bad, f"500 answers: {bad}"


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------

# Raw uploads rejected before their body is read make the server drop the
# connection; those requests ask for a fresh connection so the bug is only
# reported once, by test_rejected_raw_upload_keeps_connection_usable.
CLOSE = {"Connection": "close"}

BAD_PATHS = [
    ("relative", "etc/passwd"),
    ("relative-dot", "./workspace/x"),
    ("dotdot-root", "/../etc/passwd"),
    ("dotdot-climb", "/a/../../x"),
    ("dotdot-deep", "/workspace/../../../../etc/shadow"),
    ("nul", "/etc/pa\x00sswd"),
    ("nul-end", "/workspace/x\x00"),
]


def _path_calls(sid: str, path: str):
    """(description, request kwargs) for every file route taking a path."""
    return [
        ("read", dict(method="GET", url=f"/sandboxes/{sid}/files", params={"path": path})),
        ("stat", dict(method="GET", url=f"/sandboxes/{sid}/files/stat", params={"path": path})),
        ("list", dict(method="GET", url=f"/sandboxes/{sid}/files/list", params={"path": path})),
        ("delete", dict(method="DELETE", url=f"/sandboxes/{sid}/files", params={"path": path, "recursive": "true"})),
        ("write", dict(method="POST", url=f"/sandboxes/{sid}/files", json={"path": path, "content": "x"})),
        # (Connection: close: see test_rejected_raw_upload_keeps_connection_usable)
        ("raw-put", dict(method="PUT", url=f"/sandboxes/{sid}/files/raw", params={"path": path}, content=b"x", headers=CLOSE)),
        ("chmod", dict(method="POST", url=f"/sandboxes/{sid}/files/chmod", json={"path": path, "mode": "777"})),
        ("move-src", dict(method="POST", url=f"/sandboxes/{sid}/files/move", json={"old_path": path, "new_path": "/workspace/mv-dst"})),
        ("move-dst", dict(method="POST", url=f"/sandboxes/{sid}/files/move", json={"old_path": "/etc/hostname", "new_path": path})),
        ("glob", dict(method="GET", url=f"/sandboxes/{sid}/files/glob", params={"pattern": path})),
    ]


@pytest.mark.parametrize("label,path", BAD_PATHS, ids=[b[0] for b in BAD_PATHS])
def test_bad_paths_are_400_on_every_file_route(http, sid, label, path):
    failures = []
    for what, kw in _path_calls(sid, path):
        r = http.request(**kw)
        try:
            assert_error(r, 400, "invalid_request")
        except AssertionError as e:
            failures.append(f"{what}: {e}")
    assert not failures, "\n".join(failures)
    # nothing was moved away or changed by the attempts
    assert http.get(f"/sandboxes/{sid}/files/stat", params={"path": "/etc/hostname"}).status_code == 200


def test_nul_byte_percent_encoded_in_query(http, sid):
    r = http.get(f"/sandboxes/{sid}/files?path=/etc/pa%00sswd")
    assert_error(r, 400, "invalid_request")
    r = http.get(f"/sandboxes/{sid}/files/list?path=/%00")
    assert_error(r, 400, "invalid_request")


def test_dotdot_that_stays_inside_is_allowed(http, sid):
    direct = http.get(f"/sandboxes/{sid}/files", params={"path": "/etc/hostname"})
    assert direct.status_code == 200
    r = http.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/../etc/hostname"})
    assert r.status_code == 200, r.text
    assert r.content == direct.content


def test_missing_path_is_400(http, sid):
    for method, url, kw in [
        ("GET", f"/sandboxes/{sid}/files", {}),
        ("GET", f"/sandboxes/{sid}/files/stat", {}),
        ("DELETE", f"/sandboxes/{sid}/files", {}),
        ("GET", f"/sandboxes/{sid}/files", {"params": {"path": ""}}),
        ("POST", f"/sandboxes/{sid}/files", {"json": {"content": "x"}}),
        ("POST", f"/sandboxes/{sid}/files", {"json": {"path": "", "content": "x"}}),
        ("PUT", f"/sandboxes/{sid}/files/raw", {"content": b"x", "headers": CLOSE}),
        ("POST", f"/sandboxes/{sid}/files/chmod", {"json": {"mode": "644"}}),
        ("POST", f"/sandboxes/{sid}/files/move", {"json": {"old_path": "/etc/hostname"}}),
        ("POST", f"/sandboxes/{sid}/files/move", {"json": {"new_path": "/workspace/x"}}),
        ("GET", f"/sandboxes/{sid}/files/glob", {}),
    ]:
        assert_error(http.request(method, url, **kw), 400, "invalid_request")


def test_missing_files_are_file_not_found(server, http, sid):
    missing = f"/workspace/missing-{uuid.uuid4().hex}"
    assert_error(http.get(f"/sandboxes/{sid}/files", params={"path": missing}), 404, "file_not_found")
    assert_error(http.get(f"/sandboxes/{sid}/files/stat", params={"path": missing}), 404, "file_not_found")
    assert_error(http.get(f"/sandboxes/{sid}/files/list", params={"path": missing}), 404, "file_not_found")
    assert_error(http.delete(f"/sandboxes/{sid}/files", params={"path": missing}), 404, "file_not_found")
    assert_error(
        http.post(f"/sandboxes/{sid}/files/chmod", json={"path": missing, "mode": "644"}),
        404,
        "file_not_found",
    )
    # the official client maps it to SandboxNotFound (404)
    from stacyvm.exceptions import SandboxNotFound

    with stacyvm.Client(server.url) as c:
        with pytest.raises(SandboxNotFound):
            c.get(sid).read_file(missing)


# --------------------------------------------------------------------------
# symlinks to host paths
# --------------------------------------------------------------------------


@pytest.fixture
def host_secret():
    name = f"stacyvm-e2e-host-{uuid.uuid4().hex}"
    path = f"/tmp/{name}"
    content = f"HOST SECRET {uuid.uuid4().hex}\n"
    with open(path, "w") as f:
        f.write(content)
    os.chmod(path, 0o600)
    yield name, path, content
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def test_symlink_to_host_file_is_not_followed_to_the_host(http, sid, host_secret):
    name, host_path, content = host_secret
    link = f"/workspace/hostlink-{name}"
    out = run_in(http, sid, f"ln -s {host_path} {link} && ls -l {link}")
    assert out["exit_code"] == 0, out

    r = http.get(f"/sandboxes/{sid}/files", params={"path": link})
    assert content.encode() not in r.content, "HOST FILE CONTENT LEAKED through a symlink"
    assert_error(r, 404, "file_not_found")

    # writing through the link must not touch the host file
    r = http.post(f"/sandboxes/{sid}/files", json={"path": link, "content": "pwned"})
    assert r.status_code != 500, r.text
    r = http.put(f"/sandboxes/{sid}/files/raw", params={"path": link}, content=b"pwned", headers=CLOSE)
    assert r.status_code != 500, r.text
    # chmod through the link must not touch the host file's mode
    r = http.post(f"/sandboxes/{sid}/files/chmod", json={"path": link, "mode": "777"})
    assert r.status_code != 500, r.text
    with open(host_path) as f:
        assert f.read() == content, "host file modified through a sandbox symlink"
    assert os.stat(host_path).st_mode & 0o777 == 0o600, "host file mode changed"


def test_symlinked_dir_to_host_tmp_does_not_expose_host(http, sid, host_secret):
    name, host_path, content = host_secret
    link = f"/workspace/hosttmp-{uuid.uuid4().hex[:8]}"
    out = run_in(http, sid, f"ln -s /tmp {link}")
    assert out["exit_code"] == 0, out
    up = f"/workspace/up-{uuid.uuid4().hex[:8]}"
    out = run_in(http, sid, f"ln -s ../../../../../../../../tmp {up}")
    assert out["exit_code"] == 0, out

    for d in (link, up):
        r = http.get(f"/sandboxes/{sid}/files/list", params={"path": d})
        assert r.status_code in (200, 404), r.text
        if r.status_code == 200:
            names = [e["name"] for e in r.json()]
            assert name not in names, f"host /tmp listed through {d}: {names}"
        else:
            assert_error(r, 404, "file_not_found")
        r = http.get(f"/sandboxes/{sid}/files", params={"path": f"{d}/{name}"})
        assert content.encode() not in r.content, "HOST FILE CONTENT LEAKED"
        assert_error(r, 404, "file_not_found")
        r = http.get(f"/sandboxes/{sid}/files/glob", params={"pattern": f"{d}/*"})
        assert r.status_code == 200, r.text
        assert all(name not in p for p in r.json()), r.json()
        r = http.delete(f"/sandboxes/{sid}/files", params={"path": f"{d}/{name}"})
        assert_error(r, 404, "file_not_found")
        assert os.path.exists(host_path), "host file deleted through a sandbox symlink"
        r = http.post(
            f"/sandboxes/{sid}/files/move",
            json={"old_path": f"{d}/{name}", "new_path": "/workspace/stolen"},
        )
        assert_error(r, 404, "file_not_found")
        assert os.path.exists(host_path)

    # a file written through the symlinked dir lands inside the sandbox only
    marker = f"stacyvm-e2e-written-{uuid.uuid4().hex}"
    r = http.post(f"/sandboxes/{sid}/files", json={"path": f"{link}/{marker}", "content": "in"})
    assert r.status_code in (200, 400, 404), r.text
    assert not os.path.exists(f"/tmp/{marker}"), "file written onto the HOST through a symlink"
    if r.status_code == 200:
        out = run_in(http, sid, f"cat /tmp/{marker}")
        assert out["stdout"] == "in"


# --------------------------------------------------------------------------
# create / exec validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"image": IMAGE, "ttl": "forever"}, 400, "invalid_request"),
        ({"image": IMAGE, "ttl": "10x"}, 400, "invalid_request"),
        ({"image": IMAGE, "ttl": "-5m"}, 400, "invalid_request"),
        ({"image": IMAGE, "ttl": 600}, 400, "invalid_request"),
        ({"image": IMAGE, "ttl": "48h"}, 429, "quota_exceeded"),
        ({"image": IMAGE, "provider": "nonesuch"}, 400, "invalid_request"),
        ({"image": IMAGE, "memory_mb": "lots"}, 400, "invalid_request"),
        ({"image": IMAGE, "memory_mb": 0}, 400, "invalid_request"),
        ({"image": IMAGE, "memory_mb": -1}, 400, "invalid_request"),
        ({"image": IMAGE, "memory_mb": 1.5}, 400, "invalid_request"),
        ({"image": IMAGE, "vcpus": 0}, 400, "invalid_request"),
        ({"image": IMAGE, "vcpus": "two"}, 400, "invalid_request"),
        ({"image": IMAGE, "metadata": {"a": 1}}, 400, "invalid_request"),
        ({"image": IMAGE, "metadata": ["a"]}, 400, "invalid_request"),
        ({"image": "bad image with spaces"}, 400, "invalid_request"),
        ({"image": 42}, 400, "invalid_request"),
        ({"image": IMAGE, "owner_id": "has space"}, 400, "invalid_request"),
        ({"image": IMAGE, "owner_id": "x" * 129}, 400, "invalid_request"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v),
)
def test_create_validation(server, http, body, status, code):
    before = {s["id"] for s in http.get("/sandboxes").json()}
    r = http.post("/sandboxes", json=body)
    if r.status_code == 201:  # never leave a sandbox behind, even on failure
        http.delete(f"/sandboxes/{r.json()['id']}")
    assert_error(r, status, code)
    after = {s["id"] for s in http.get("/sandboxes").json()}
    assert after <= before, f"rejected create left sandboxes: {after - before}"


def test_create_bad_owner_header_is_400(http):
    r = http.post("/sandboxes", json={"image": IMAGE}, headers={"X-User-ID": "bad owner!"})
    if r.status_code == 201:
        http.delete(f"/sandboxes/{r.json()['id']}")
    assert_error(r, 400, "invalid_request")


def test_invalid_json_bodies(http, sid):
    hdr = {"Content-Type": "application/json"}
    for url in ("/sandboxes", f"/sandboxes/{sid}/exec", f"/sandboxes/{sid}/files",
                f"/sandboxes/{sid}/files/move", f"/sandboxes/{sid}/files/chmod",
                f"/sandboxes/{sid}/extend", "/sandboxes/admission"):
        for raw in (b"{bad", b'{"image": ', b"[1,2]", b'"str"', b"\xff\xfe"):
            r = http.post(url, content=raw, headers=hdr)
            if r.status_code == 201:
                http.delete(f"/sandboxes/{r.json()['id']}")
            assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"args": ["x"]},
        {"command": 5},
        {"command": ["ls"]},
        {"command": "echo", "args": "x"},
        {"command": "echo", "args": [1, 2]},
        {"command": "echo", "env": {"A": 1}},
        {"command": "echo", "env": ["A=1"]},
        {"command": "echo", "mode": "zsh"},
        {"command": "echo", "mode": "SHELL "},
        {"command": "echo", "timeout": "10x"},
        {"command": "echo", "timeout": "soon"},
        {"command": "echo", "timeout": 5},
        {"command": "echo", "workdir": "relative/dir"},
        {"command": "echo", "workdir": "/a/../../etc"},
        {"command": "echo", "stream": "yes"},
        {"command": "echo\x00hi"},
        {"command": "echo", "args": ["a\x00b"]},
        {"command": "echo", "mode": "argv", "args": ["\x00"]},
        {"command": "echo", "workdir": "/work\x00space"},
    ],
    ids=lambda b: json.dumps(b)[:50],
)
def test_exec_validation_400(http, sid, body):
    assert_error(http.post(f"/sandboxes/{sid}/exec", json=body), 400, "invalid_request")


def test_unknown_fields_are_ignored(http, sid):
    r = http.post(f"/sandboxes/{sid}/exec", json={"command": "echo hi", "no_such_field": {"a": 1}})
    assert r.status_code == 200 and r.json()["stdout"] == "hi\n", r.text
    r = http.post(
        f"/sandboxes/{sid}/files",
        json={"path": "/workspace/unk.txt", "content": "u", "frobnicate": True},
    )
    assert r.status_code == 200, r.text


def test_query_plus_decodes_to_space(http, sid):
    r = http.post(f"/sandboxes/{sid}/files", json={"path": "/workspace/a b.txt", "content": "spaced"})
    assert r.status_code == 200, r.text
    r = http.get(f"/sandboxes/{sid}/files?path=/workspace/a+b.txt")
    assert r.status_code == 200 and r.content == b"spaced", r.text
    r = http.get(f"/sandboxes/{sid}/files?path=/workspace/a%20b.txt")
    assert r.status_code == 200 and r.content == b"spaced", r.text


def test_exec_timeout_over_max_is_429(http, sid):
    assert_error(
        http.post(f"/sandboxes/{sid}/exec", json={"command": "echo", "timeout": "2h"}),
        429,
        "quota_exceeded",
    )
    # streaming is validated the same way, before any 200
    assert_error(
        http.post(f"/sandboxes/{sid}/exec", json={"command": "echo", "timeout": "2h", "stream": True}),
        429,
        "quota_exceeded",
    )


def test_exec_validation_official_client_error_codes(server, sid):
    with stacyvm.Client(server.url) as c:
        sb = c.get(sid)
        with pytest.raises(StacyVMError) as ei:
            sb.exec("echo", mode="bogus")
        assert ei.value.code == "invalid_request"
        with pytest.raises(StacyVMError) as ei:
            sb.exec("echo", timeout="2h")
        assert ei.value.code == "quota_exceeded"


def test_extend_validation(http, sid):
    assert_error(http.post(f"/sandboxes/{sid}/extend", json={"ttl": "forever"}), 400, "invalid_request")
    assert_error(http.post(f"/sandboxes/{sid}/extend", json={"ttl": 5}), 400, "invalid_request")


def test_files_body_validation(http, sid):
    url = f"/sandboxes/{sid}/files"
    p = f"/workspace/v-{uuid.uuid4().hex[:8]}"
    cases = [
        {"path": p, "content": "x", "encoding": "rot13"},
        {"path": p, "content": "!!! not base64 !!!", "encoding": "base64"},
        {"path": p, "content": "QUJD=", "encoding": "base64"},  # bad padding
        {"path": p, "content": 123},
        {"path": p, "content": "x", "mode": "abc"},
        {"path": p, "content": "x", "mode": "999"},
        {"path": p, "content": "x", "mode": "77777"},
        {"path": 5, "content": "x"},
    ]
    for body in cases:
        assert_error(http.post(url, json=body), 400, "invalid_request")
    # nothing was written by any rejected call
    assert_error(http.get(url, params={"path": p}), 404, "file_not_found")


def test_chmod_mode_validation(http, sid):
    p = f"/workspace/cm-{uuid.uuid4().hex[:8]}"
    r = http.post(f"/sandboxes/{sid}/files", json={"path": p, "content": "x", "mode": "0640"})
    assert r.status_code == 200, r.text
    for mode in ("abc", "999", "8", "", "-1", "1777777", 755):
        assert_error(
            http.post(f"/sandboxes/{sid}/files/chmod", json={"path": p, "mode": mode}),
            400,
            "invalid_request",
        )
    assert_error(http.post(f"/sandboxes/{sid}/files/chmod", json={"path": p}), 400, "invalid_request")
    st = http.get(f"/sandboxes/{sid}/files/stat", params={"path": p}).json()
    assert st["mode"] == "640", "a rejected chmod changed the mode"


def test_raw_put_bad_mode(http, sid):
    r = http.put(
        f"/sandboxes/{sid}/files/raw",
        params={"path": "/workspace/rawmode", "mode": "zzz"},
        content=b"x",
        headers=CLOSE,
    )
    assert_error(r, 400, "invalid_request")


# --------------------------------------------------------------------------
# unknown sandboxes and routes
# --------------------------------------------------------------------------

UNKNOWN_IDS = [
    "sb_" + "a" * 16,
    "sb_" + uuid.uuid4().hex[:20],
    "nope",
    "sb_UPPER_case",
    "sb_%21%21",
    "x" * 300,
]


@pytest.mark.parametrize("bad_id", UNKNOWN_IDS, ids=lambda s: s[:20])
def test_unknown_sandbox_is_404_not_found(http, bad_id):
    calls = [
        ("GET", f"/sandboxes/{bad_id}", {}),
        ("POST", f"/sandboxes/{bad_id}/exec", {"json": {"command": "echo"}}),
        ("POST", f"/sandboxes/{bad_id}/exec", {"json": {"command": "echo", "stream": True}}),
        ("GET", f"/sandboxes/{bad_id}/files", {"params": {"path": "/etc/hostname"}}),
        ("POST", f"/sandboxes/{bad_id}/files", {"json": {"path": "/workspace/x", "content": "x"}}),
        ("PUT", f"/sandboxes/{bad_id}/files/raw", {"params": {"path": "/workspace/x"}, "content": b"x", "headers": CLOSE}),
        ("GET", f"/sandboxes/{bad_id}/files/list", {"params": {"path": "/"}}),
        ("GET", f"/sandboxes/{bad_id}/files/stat", {"params": {"path": "/"}}),
        ("GET", f"/sandboxes/{bad_id}/files/glob", {"params": {"pattern": "/*"}}),
        ("POST", f"/sandboxes/{bad_id}/extend", {"json": {"ttl": "5m"}}),
        ("GET", f"/sandboxes/{bad_id}/logs", {}),
        ("GET", f"/sandboxes/{bad_id}/stats", {}),
    ]
    failures = []
    for method, url, kw in calls:
        r = http.request(method, url, **kw)
        try:
            assert_error(r, 404, "not_found")
        except AssertionError as e:
            failures.append(str(e))
    # destroying an id that never existed: 404, or 200 (idempotent) — API.md §3
    r = http.delete(f"/sandboxes/{bad_id}")
    if r.status_code == 200:
        assert r.json() == {"status": "destroyed"}, r.text
    else:
        try:
            assert_error(r, 404, "not_found")
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_unknown_routes_are_json_404(http, server, sid):
    for url in ("/nope", f"/sandboxes/{sid}/nope", "/sandboxes/x/y/z/w"):
        assert_error(http.get(url), 404, "not_found")
    r = httpx.get(server.url + "/definitely/not/here", timeout=10)
    _record(r)
    assert_error(r, 404, None)


def test_destroyed_sandbox_answers_404(server, http):
    tracker = SandboxTracker()
    try:
        sb = tracker.create(server)
        r = http.delete(f"/sandboxes/{sb['id']}")
        assert r.status_code == 200, r.text
        sid = sb["id"]
        assert_error(http.post(f"/sandboxes/{sid}/exec", json={"command": "echo"}), 404, "not_found")
        assert_error(http.get(f"/sandboxes/{sid}/files", params={"path": "/etc/hostname"}), 404, "not_found")
        assert_error(
            http.post(f"/sandboxes/{sid}/files", json={"path": "/workspace/x", "content": "x"}),
            404,
            "not_found",
        )
        assert_error(http.post(f"/sandboxes/{sid}/extend", json={"ttl": "5m"}), 404, "not_found")
        assert_error(http.get(f"/sandboxes/{sid}"), 404, "not_found")
        r = http.delete(f"/sandboxes/{sid}")
        assert r.status_code == 200 and r.json() == {"status": "destroyed"}, r.text
    finally:
        problems = tracker.cleanup()
    assert not problems, problems


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


def test_missing_image_is_502_fast_and_leaves_nothing(server, http):
    inst = server.instance_id()
    assert inst, "could not read the server instance id from its log"

    def runtimes():
        # (the native provider's warm pool may be starting a slot meanwhile)
        return {
            x for x in instance_runtimes(server, inst, server.provider)
            if not x[0].startswith("pre-started slot")
        }

    before_runtimes = runtimes()
    before_ids = {s["id"] for s in http.get("/sandboxes").json()}
    t0 = time.monotonic()
    r = http.post("/sandboxes", json={"image": MISSING_IMAGE})
    elapsed = time.monotonic() - t0
    if r.status_code == 201:
        http.delete(f"/sandboxes/{r.json()['id']}")
    assert_error(r, 502, "provider_error")
    assert elapsed < 15, f"missing image took {elapsed:.1f}s to fail"
    assert runtimes() <= before_runtimes, f"failed create left runtime objects: {runtimes() - before_runtimes}"
    listed = http.get("/sandboxes").json()
    new_running = [s for s in listed if s["id"] not in before_ids and s["state"] == "running"]
    assert not new_running, new_running
    # the official client maps 502 to ProviderError
    from stacyvm.exceptions import ProviderError

    with stacyvm.Client(server.url) as c:
        with pytest.raises(ProviderError):
            c.spawn(image=MISSING_IMAGE)
    assert runtimes() <= before_runtimes, f"failed create left runtime objects: {runtimes() - before_runtimes}"
    # and leaves no sandbox in the running list
    listed = http.get("/sandboxes").json()
    assert not [s for s in listed if s["id"] not in before_ids and s["state"] == "running"]
    # a stale failed record must not be "running"; destroying whatever is left works
    for s in listed:
        if s["id"] not in before_ids:
            assert s["state"] in ("error", "destroyed"), s
            assert runtime_leftovers(server, s["id"], server.provider) == [], s
            assert http.delete(f"/sandboxes/{s['id']}").status_code == 200


def test_empty_create_body_uses_default_image(server, http):
    """The session server runs with STACYVM_DEFAULT_IMAGE = the test image."""
    assert server.env()["STACYVM_DEFAULT_IMAGE"] == IMAGE
    tracker = SandboxTracker()
    try:
        for kw in ({"content": b""}, {"content": b"", "headers": {"Content-Type": "application/json"}},
                   {"json": {}}, {"json": {"unknown_field": [1, 2], "another": {"x": None}}}):
            r = http.post("/sandboxes", **kw)
            if r.status_code in (200, 201):
                tracker.add(server, r.json()["id"])
            assert r.status_code == 201, f"{kw}: {r.status_code} {r.text}"
            body = r.json()
            assert body["image"] == IMAGE, body
            assert body["state"] == "running"
        out = run_in(http, body["id"], "python3 -c 'print(40 + 2)'")
        assert out["stdout"] == "42\n"
    finally:
        problems = tracker.cleanup()
    assert not problems, problems


# --------------------------------------------------------------------------
# body size limit (fresh server)
# --------------------------------------------------------------------------


def test_oversized_json_body_is_413(make_server, sandboxes):
    srv = make_server(env={"STACYVM_MAX_BODY_BYTES": "1048576"})
    sb = sandboxes.create(srv)
    sid = sb["id"]
    big = "A" * (2 * 1024 * 1024)
    with recording_client(srv) as c:
        r = c.post(f"/sandboxes/{sid}/files", json={"path": "/workspace/big.txt", "content": big}, headers=CLOSE)
        assert_error(r, 413, "payload_too_large")
        assert_error(c.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/big.txt"}), 404, "file_not_found")
        r = c.post(f"/sandboxes/{sid}/exec", json={"command": "echo " + big}, headers=CLOSE)
        assert_error(r, 413, "payload_too_large")
        r = c.post("/sandboxes", json={"image": IMAGE, "metadata": {"k": big}}, headers=CLOSE)
        if r.status_code == 201:
            sandboxes.add(srv, r.json()["id"])
        assert_error(r, 413, "payload_too_large")
        # under the limit is fine
        r = c.post(f"/sandboxes/{sid}/files", json={"path": "/workspace/ok.txt", "content": "B" * 500_000})
        assert r.status_code == 200, r.text
        # the raw upload route is streamed and not capped by the JSON limit
        data = os.urandom(3 * 1024 * 1024)
        r = c.put(f"/sandboxes/{sid}/files/raw", params={"path": "/workspace/raw.bin"}, content=data)
        assert r.status_code == 200, r.text
        assert c.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/raw.bin"}).content == data


def _split_request(port: int, head: bytes, body: bytes, delay: float = 0.1):
    """Send headers, wait, send the body (as a slow client would); return
    (status line, {header: value}, closed_by_server)."""
    so = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        so.sendall(head)
        time.sleep(delay)
        try:
            so.sendall(body)
        except OSError:
            pass  # the server may already have answered and closed
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = so.recv(65536)
            assert chunk, f"connection closed without a response (got {data!r})"
            data += chunk
        head_part, _, rest = data.partition(b"\r\n\r\n")
        lines = head_part.decode("latin-1").split("\r\n")
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        # read the rest of the response body
        need = int(headers.get("content-length", "0")) - len(rest)
        while need > 0:
            chunk = so.recv(65536)
            if not chunk:
                break
            need -= len(chunk)
        time.sleep(0.3)
        so.settimeout(0.3)
        try:
            closed = so.recv(65536) == b""
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        return lines[0], headers, closed
    finally:
        so.close()


def test_rejected_raw_upload_keeps_connection_usable(server, sid):
    """A keep-alive client (httpx, the official client) reuses connections.
    If the server answers a request before reading its body and then drops
    the connection, it must say `Connection: close`; otherwise the client's
    next request on that connection fails with "Server disconnected"."""
    cases = [
        ("PUT", f"/api/v1/sandboxes/{sid}/files/raw?path=relative/x", b"x"),
        ("PUT", "/api/v1/sandboxes/sb_aaaaaaaaaaaaaaaa/files/raw?path=/workspace/x", b"x"),
        ("PUT", f"/api/v1/sandboxes/{sid}/files/raw?path=/workspace/x&mode=zzz", b"xyz"),
    ]
    problems = []
    for method, url, body in cases:
        head = (
            f"{method} {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        status, headers, closed = _split_request(server.port, head, body)
        assert status.split()[1] in ("400", "404"), status
        if closed and headers.get("connection", "").lower() != "close":
            problems.append(f"{method} {url} -> {status}: connection dropped without 'Connection: close'")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# auth (fresh server)
# --------------------------------------------------------------------------


def test_api_key_auth(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": "k_test"})
    base = srv.api_url

    def req(method, path, headers=None, **kw):
        r = httpx.request(method, base + path, headers=headers or {}, timeout=30, **kw)
        _record(r)
        return r

    # probes are open
    assert req("GET", "/live").status_code == 200
    r = req("GET", "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"

    for path in ("/sandboxes", "/health", "/providers", "/pool/status"):
        assert_error(req("GET", path), 401, "unauthorized")
        assert_error(req("GET", path, {"X-API-Key": "wrong"}), 401, "unauthorized")
        assert_error(req("GET", path, {"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert_error(req("GET", path, {"X-API-Key": ""}), 401, "unauthorized")
        assert_error(req("GET", path, {"X-API-Key": "k_test2"}), 401, "unauthorized")
        assert_error(req("GET", path, {"X-API-Key": "k_tes"}), 401, "unauthorized")
    assert_error(req("POST", "/sandboxes", json={"image": IMAGE}), 401, "unauthorized")
    assert_error(req("DELETE", "/sandboxes"), 401, "unauthorized")
    assert req("GET", "/sandboxes", {"X-API-Key": "k_test"}).status_code == 200
    assert req("GET", "/sandboxes", {"Authorization": "Bearer k_test"}).status_code == 200
    assert req("GET", "/health", {"X-API-Key": "k_test"}).json()["status"] == "ok"

    # unauthenticated create must not have created anything
    assert req("GET", "/sandboxes", {"X-API-Key": "k_test"}).json() == []

    # a full round trip with each header style
    r = req("POST", "/sandboxes", {"Authorization": "Bearer k_test"}, json={"image": IMAGE})
    assert r.status_code == 201, r.text
    sid = sandboxes.add(srv, r.json()["id"])
    r = req("POST", f"/sandboxes/{sid}/exec", {"X-API-Key": "k_test"}, json={"command": "echo ok"})
    assert r.status_code == 200 and r.json()["stdout"] == "ok\n"
    assert_error(req("POST", f"/sandboxes/{sid}/exec", json={"command": "echo ok"}), 401, "unauthorized")
    assert_error(req("GET", f"/sandboxes/{sid}/files", params={"path": "/etc/hostname"}), 401, "unauthorized")
    assert_error(req("DELETE", f"/sandboxes/{sid}"), 401, "unauthorized")
    assert req("GET", f"/sandboxes/{sid}", {"X-API-Key": "k_test"}).json()["state"] == "running"

    # the official client: 401 → StacyVMError(code="UNAUTHORIZED")
    with stacyvm.Client(srv.url, api_key="wrong") as c:
        with pytest.raises(StacyVMError) as ei:
            c.list()
        assert ei.value.code == "UNAUTHORIZED"
    with stacyvm.Client(srv.url, api_key="k_test") as c:
        assert sid in [s.id for s in c.list()]
        c.get(sid).destroy()
    assert_error(req("GET", f"/sandboxes/{sid}", {"X-API-Key": "k_test"}), 404, "not_found")


def test_no_500_in_recorded_answers():
    # runs last in file order; the autouse fixture re-checks at module end
    bad = [x for x in _RESPONSES if x[2] >= 500 and x[2] != 502]
    assert not bad, f"5xx answers: {bad}"
    assert len(_RESPONSES) > 50, "the module should have exercised many answers"
