"""Templates (API.md §6): CRUD, spawning (also through the official client),
env/files/setup, setup failures, and warm pools."""

from __future__ import annotations

import statistics
import time

import httpx
import pytest
import stacyvm
from stacyvm.exceptions import SandboxNotFound, StacyVMError
from stacyvm.models import Template

from conftest import IMAGE, assert_error, only_providers, wait_instance_clean

BOOT = "boot-admin-key"


def _req(srv, method, path, key=BOOT, **kw):
    headers = dict(kw.pop("headers", {}) or {})
    if key:
        headers["X-API-Key"] = key
    return httpx.request(method, srv.api_url + path, headers=headers, timeout=90, **kw)


def _wait_pool(srv, name, ready, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    st = {}
    while time.monotonic() < deadline:
        st = _req(srv, "GET", "/pool/status").json()
        t = st.get("templates", {}).get(name)
        if t and t["ready"] == ready and t["warming"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"pool of {name} not at {ready} ready after {timeout}s: {st}")


def test_official_client_template_flow(make_server, sandboxes):
    """templates.save/list/get, spawn_template, delete: unmodified client."""
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    with stacyvm.Client(srv.url, api_key=BOOT) as c:
        saved = c.templates.save(Template(name="py-small", image=IMAGE, memory_mb=256, vcpus=1,
                                          ttl="10m", provider="", metadata={"team": "ml"}))
        assert (saved.name, saved.image, saved.memory_mb, saved.ttl) == ("py-small", IMAGE, 256, "10m")
        assert saved.provider == "" and saved.metadata == {"team": "ml"}
        c.templates.save(Template(name="a-first", image=IMAGE))
        assert [t.name for t in c.templates.list()] == ["a-first", "py-small"]
        got = c.templates.get("py-small")
        assert got == saved
        with pytest.raises(StacyVMError) as ei:
            c.templates.save(Template(name="py-small", image=IMAGE))
        assert ei.value.code == "conflict"
        sb = c.spawn_template("py-small")
        sandboxes.add(srv, sb.id)
        assert sb.provider == srv.provider
        info = _req(srv, "GET", f"/sandboxes/{sb.id}").json()
        assert info["template"] == "py-small" and info["memory_mb"] == 256, info
        assert info["metadata"] == {"team": "ml"} and info["owner_id"] == "admin", info
        assert sb.exec("echo from-template").stdout == "from-template\n"
        sb.destroy()
        # spawn through POST /sandboxes {"template": …} (the client always sends an image)
        sb2 = c.spawn(image="alpine:latest", template="py-small", metadata={"x": "y"})
        sandboxes.add(srv, sb2.id)
        info = _req(srv, "GET", f"/sandboxes/{sb2.id}").json()
        assert info["template"] == "py-small" and info["image"] == IMAGE, info
        assert info["metadata"] == {"team": "ml", "x": "y"}, info
        sb2.destroy()
        c.templates.delete("py-small")
        with pytest.raises(SandboxNotFound):
            c.templates.get("py-small")
        with pytest.raises(SandboxNotFound):
            c.spawn_template("py-small")
        with pytest.raises(SandboxNotFound):
            c.templates.delete("py-small")
        c.templates.delete("a-first")
        assert c.templates.list() == []


@only_providers("native")
def test_template_crud_and_spawn_bodies(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT, "STACYVM_MAX_TTL": "2h"})
    r = _req(srv, "POST", "/templates", json={"name": "t1", "image": IMAGE, "cpu_cores": 1,
                                               "ttl_seconds": 600, "description": "first"})
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["vcpus"] == 1 and t["ttl"] == "10m0s" and t["description"] == "first", t
    assert t["created_at"] and t["updated_at"], t
    for body in ({"name": "", "image": IMAGE}, {"name": "a/b", "image": IMAGE},
                 {"name": "t2", "image": "bad image!"}, {"name": "t2", "ttl": "forever"},
                 {"name": "t2", "ttl": "3h"}, {"name": "t2", "provider": "nope"},
                 {"name": "t2", "files": [{"path": "relative", "content": "x"}]},
                 {"name": "t2", "setup": [""]}, {"name": "t2", "pool_size": 100000},
                 {"name": "t2", "memory_mb": 1}):
        assert_error(_req(srv, "POST", "/templates", json=body), 400, "invalid_request")
    # full replace
    r = _req(srv, "PUT", "/templates/t1", json={"image": IMAGE, "memory_mb": 128})
    assert r.status_code == 200, r.text
    assert r.json()["memory_mb"] == 128 and "description" not in r.json(), r.json()
    assert r.json()["created_at"] == t["created_at"]
    assert_error(_req(srv, "PUT", "/templates/nope", json={"image": IMAGE}), 404, "not_found")
    assert_error(_req(srv, "PUT", "/templates/t1", json={"name": "other", "image": IMAGE}), 400, "invalid_request")
    assert_error(_req(srv, "GET", "/templates/nope"), 404, "not_found")
    # spawn bodies: none, empty, {}, overrides
    for kw in ({}, {"content": b""}, {"json": {}}):
        r = _req(srv, "POST", "/templates/t1/spawn", **kw)
        assert r.status_code == 201, r.text
        sandboxes.add(srv, r.json()["id"])
        assert r.json()["template"] == "t1" and r.json()["memory_mb"] == 128
    r = _req(srv, "POST", "/templates/t1/spawn",
             json={"ttl": "1h", "metadata": {"run": "7"}, "provider": "native"},
             headers={"X-User-ID": "erin"})
    assert r.status_code == 201, r.text
    sb = r.json()
    sandboxes.add(srv, sb["id"])
    assert sb["metadata"] == {"run": "7"} and sb["owner_id"] == "erin", sb
    from conftest import parse_time
    left = parse_time(sb["expires_at"]).timestamp() - time.time()
    assert 3500 < left <= 3600, left
    assert_error(_req(srv, "POST", "/templates/t1/spawn", json={"ttl": "5h"}), 429, "quota_exceeded")
    assert_error(_req(srv, "POST", "/templates/t1/spawn", json={"provider": "nope"}), 400, "invalid_request")
    assert_error(_req(srv, "POST", "/templates/nope/spawn"), 404, "not_found")
    assert_error(_req(srv, "POST", "/sandboxes", json={"template": "nope"}), 404, "not_found")
    # the admission dry run understands templates too
    d = _req(srv, "POST", "/sandboxes/admission", json={"template": "t1"}).json()
    assert d["allowed"] is True, d


@only_providers("native")
def test_template_env_files_and_setup(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    body = {
        "name": "app", "image": IMAGE,
        "env": {"GREETING": "hello from env"},
        "files": [
            {"path": "/workspace/app/config.ini", "content": "[x]\na=1\n", "mode": "600"},
            {"path": "/workspace/app/blob.bin", "content": "AAEC", "encoding": "base64"},
        ],
        "setup": ["echo \"$GREETING\" > /workspace/setup.out", "cat /workspace/app/config.ini >> /workspace/setup.out"],
    }
    assert _req(srv, "POST", "/templates", json=body).status_code == 201
    r = _req(srv, "POST", "/templates/app/spawn")
    assert r.status_code == 201, r.text
    sid = sandboxes.add(srv, r.json()["id"])
    out = _req(srv, "POST", f"/sandboxes/{sid}/exec", json={
        "command": "cat /workspace/setup.out; stat -c %a /workspace/app/config.ini; od -An -tx1 /workspace/app/blob.bin; echo $GREETING"}).json()
    assert out["stdout"].split("\n") == ["hello from env", "[x]", "a=1", "600", " 00 01 02", "hello from env", ""], out


@only_providers("native")
def test_failing_setup_fails_the_spawn_and_destroys_the_sandbox(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    body = {"name": "broken", "image": IMAGE,
            "setup": ["echo step-one-ok", "echo about to fail; echo 'pip: no such package' >&2; exit 3", "echo never"]}
    assert _req(srv, "POST", "/templates", json=body).status_code == 201
    r = _req(srv, "POST", "/templates/broken/spawn")
    if r.status_code == 201:
        sandboxes.add(srv, r.json()["id"])
    err = assert_error(r, 502, "provider_error")
    msg = err["message"]
    assert "setup command 2" in msg and "exited with code 3" in msg, msg
    assert "pip: no such package" in msg and "about to fail" in msg, msg
    assert _req(srv, "GET", "/sandboxes").json() == []
    inst = srv.instance_id()
    assert wait_instance_clean(srv, inst, srv.provider) == [], "the failed sandbox left a runtime"
    # the failure is in the audit log
    recs = _req(srv, "GET", "/audit", params={"action": "sandbox.create", "outcome": "error"}).json()["records"]
    assert recs and recs[-1]["details"]["template"] == "broken", recs


@only_providers("native")
def test_warm_pool_spawns_fast_and_refills(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    assert _req(srv, "GET", "/pool/status").json() == {"enabled": False}
    key = _req(srv, "POST", "/keys", json={"name": "tenant-bot", "scope": "api", "tenant": "blue"}).json()["key"]
    body = {"name": "warm", "image": IMAGE, "pool_size": 2, "ttl": "10m",
            "files": {"/workspace/ready.txt": "prepared"}, "setup": ["touch /workspace/setup-done"]}
    assert _req(srv, "POST", "/templates", json=body).status_code == 201
    assert _req(srv, "POST", "/templates", json={"name": "cold", "image": IMAGE, "ttl": "10m",
                                                  "setup": ["touch /workspace/setup-done"]}).status_code == 201
    st = _wait_pool(srv, "warm", 2)
    assert st["enabled"] is True and st["templates"]["warm"]["size"] == 2, st
    with stacyvm.Client(srv.url, api_key=BOOT) as c:
        assert c.pool_status()["enabled"] is True
    # pooled sandboxes are in nobody's list until claimed
    assert _req(srv, "GET", "/sandboxes").json() == []
    assert _req(srv, "GET", "/sandboxes", key).json() == []

    warm, cold = [], []
    with httpx.Client(base_url=srv.api_url, headers={"X-API-Key": key}, timeout=60) as c:
        for i in range(8):
            _wait_pool(srv, "warm", 2)
            t = time.perf_counter()
            r = c.post("/templates/warm/spawn", json={"metadata": {"i": str(i)}})
            warm.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 201, r.text
            sb = r.json()
            sandboxes.add(srv, sb["id"])
            assert sb["template"] == "warm" and sb["owner_id"] == "tenant-bot" and sb["metadata"] == {"i": str(i)}, sb
            assert sb["state"] == "running"
            out = c.post(f"/sandboxes/{sb['id']}/exec",
                         json={"command": "cat /workspace/ready.txt; echo; ls /workspace/setup-done"}).json()
            assert out["stdout"] == "prepared\n/workspace/setup-done\n", out
            assert c.delete(f"/sandboxes/{sb['id']}").status_code == 200
            t = time.perf_counter()
            r = c.post("/templates/cold/spawn")
            cold.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 201, r.text
            sandboxes.add(srv, r.json()["id"])
            assert c.delete(f"/sandboxes/{r.json()['id']}").status_code == 200
        # the claimed sandbox is the tenant's now
        r = c.post("/templates/warm/spawn")
        sandboxes.add(srv, r.json()["id"])
        assert [s["id"] for s in c.get("/sandboxes").json()] == [r.json()["id"]]
    print(f"\nspawn from template p50: warm {statistics.median(warm):.2f} ms, cold {statistics.median(cold):.2f} ms "
          f"(warm samples {sorted(round(x, 2) for x in warm)})")
    assert statistics.median(warm) < statistics.median(cold), (warm, cold)
    # the pool refills in the background
    _wait_pool(srv, "warm", 2)
    # changing the template rebuilds the pool; deleting it drains the pool
    assert _req(srv, "PUT", "/templates/warm", json={**body, "pool_size": 1}).status_code == 200
    _wait_pool(srv, "warm", 1)
    assert _req(srv, "DELETE", "/templates/warm").status_code == 200
    st = _req(srv, "GET", "/pool/status").json()
    assert st == {"enabled": False}, st


@only_providers("native")
def test_pool_respects_quotas_and_capacity(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT, "STACYVM_MAX_SANDBOXES": "4"})
    # a quota on the pool's owner bounds it
    assert _req(srv, "PUT", "/quotas/system:pool:small", json={"max_sandboxes": 1}).status_code == 200
    assert _req(srv, "POST", "/templates", json={"name": "small", "image": IMAGE, "pool_size": 3}).status_code == 201
    _wait_pool(srv, "small", 1)
    time.sleep(1.0)
    assert _req(srv, "GET", "/pool/status").json()["templates"]["small"]["ready"] == 1
    # the global capacity counts pooled sandboxes and is never passed
    assert _req(srv, "DELETE", "/quotas/system:pool:small").status_code == 200
    _req(srv, "PUT", "/templates/small", json={"image": IMAGE, "pool_size": 3})
    _wait_pool(srv, "small", 3)
    sandboxes.create(srv)
    r = _req(srv, "POST", "/sandboxes", json={"image": IMAGE})
    if r.status_code == 201:
        sandboxes.add(srv, r.json()["id"])
    assert_error(r, 429, "quota_exceeded")
    # claiming keeps the count (the pool cannot refill past the cap)
    r = _req(srv, "POST", "/templates/small/spawn")
    assert r.status_code == 201, r.text
    sandboxes.add(srv, r.json()["id"])
    time.sleep(1.0)
    st = _req(srv, "GET", "/pool/status").json()["templates"]["small"]
    assert st["ready"] + st["warming"] == 2, st
    # a user quota still applies to a warm claim
    assert _req(srv, "PUT", "/quotas/frank", json={"max_sandboxes": 0}).status_code == 200
    r = _req(srv, "POST", "/templates/small/spawn", headers={"X-User-ID": "frank"})
    if r.status_code == 201:
        sandboxes.add(srv, r.json()["id"])
    assert "frank" in assert_error(r, 429, "quota_exceeded")["message"]
    assert _req(srv, "DELETE", "/templates/small").status_code == 200
