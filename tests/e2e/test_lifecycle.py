"""Sandbox lifecycle: TTL reaper, prune, list filters, logs, metrics, stats,
capacity (API.md §3, §8, §10).

These run on the server's default provider, `native`; the TTL reaper also
on `docker`."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import httpx

from conftest import (
    IMAGE,
    PROVIDERS,
    assert_error,
    native_state,
    only_providers,
    parse_time,
    run_in,
    runtime_alive,
    wait_no_leftovers,
)

NATIVE = only_providers("native")


@only_providers(*PROVIDERS)
def test_ttl_reaper_destroys_expired_sandbox(make_server, sandboxes, provider):
    srv = make_server(env={"STACYVM_REAPER_INTERVAL": "500ms"})
    sb = sandboxes.create(srv, {"image": IMAGE, "ttl": "2s"})
    sid = sb["id"]
    created, expires = parse_time(sb["created_at"]), parse_time(sb["expires_at"])
    assert 1.5 <= (expires - created).total_seconds() <= 3, sb
    assert sb["provider"] == provider, sb
    assert runtime_alive(srv, sid, provider), "running sandbox without a runtime"
    with srv.client() as c:
        # still alive right after creation
        assert run_in(c, sid, "echo up")["stdout"] == "up\n"
        gone_at = None
        deadline = expires.timestamp() + 5
        while time.time() < deadline + 1:
            r = c.get(f"/sandboxes/{sid}")
            if r.status_code == 404:
                gone_at = time.time()
                break
            assert r.status_code == 200, r.text
            assert r.json()["state"] in ("running", "expired", "destroying"), r.json()
            time.sleep(0.2)
        assert gone_at is not None, "sandbox still present 5 s after its expires_at"
        assert gone_at <= deadline, f"reaped {gone_at - expires.timestamp():.1f}s after expiry"
        assert_error(r, 404, "not_found")
        left = wait_no_leftovers(srv, sid, provider)
        assert left == [], f"reaped sandbox left its runtime behind: {left}"
        assert sid not in [s["id"] for s in c.get("/sandboxes").json()]
        assert_error(c.post(f"/sandboxes/{sid}/exec", json={"command": "echo"}), 404, "not_found")
        # destroying a TTL-reaped sandbox is still a 200 (idempotent)
        r = c.delete(f"/sandboxes/{sid}")
        assert r.status_code == 200 and r.json() == {"status": "destroyed"}, r.text


@NATIVE
def test_prune_destroys_only_expired(make_server, sandboxes):
    # A reaper that never runs during the test, so prune has work to do.
    srv = make_server(env={"STACYVM_REAPER_INTERVAL": "1h"})
    short = sandboxes.create(srv, {"image": IMAGE, "ttl": "1s"})["id"]
    long_ = sandboxes.create(srv, {"image": IMAGE, "ttl": "10m"})["id"]
    time.sleep(1.6)
    with srv.client() as c:
        r = c.delete("/sandboxes")
        assert r.status_code == 200, r.text
        assert r.json() == {"pruned": 1}
        assert_error(c.get(f"/sandboxes/{short}"), 404, "not_found")
        assert wait_no_leftovers(srv, short, srv.provider) == []
        assert c.get(f"/sandboxes/{long_}").json()["state"] == "running"
        assert run_in(c, long_, "echo still")["stdout"] == "still\n"
        r = c.delete("/sandboxes")
        assert r.status_code == 200 and r.json() == {"pruned": 0}, r.text


@NATIVE
def test_list_filters_owner_label_state(server, sandboxes):
    tag = uuid.uuid4().hex[:10]
    alice, bob = f"alice-{tag}", f"bob.{tag}@example.com"
    a = sandboxes.create(
        server,
        {"image": IMAGE, "owner_id": "mallory", "metadata": {"team": f"red-{tag}", "note": "hello world"}},
        headers={"X-User-ID": alice},
    )
    b = sandboxes.create(
        server,
        {"image": IMAGE, "owner_id": bob, "metadata": {"team": f"blue-{tag}"}},
    )
    # X-User-ID wins over the body's owner_id
    assert a["owner_id"] == alice, a
    assert b["owner_id"] == bob, b
    with server.client() as c:
        def ids(params=None, raw_query=None):
            url = "/sandboxes" + (("?" + raw_query) if raw_query else "")
            r = c.get(url, params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            assert isinstance(body, list)
            return [s["id"] for s in body]

        everything = ids()
        assert a["id"] in everything and b["id"] in everything
        # newest first
        assert everything.index(b["id"]) < everything.index(a["id"]), everything

        assert ids({"label": f"team:red-{tag}"}) == [a["id"]]
        assert ids({"label": f"team:blue-{tag}"}) == [b["id"]]
        assert ids({"label": f"team:green-{tag}"}) == []
        # form encoding: '+' is a space
        assert a["id"] in ids(raw_query=f"label=note:hello+world&owner_id={alice}")
        assert ids({"owner_id": alice}) == [a["id"]]
        assert ids({"owner_id": bob}) == [b["id"]]
        assert ids({"owner_id": "mallory"}) == []
        assert ids({"owner_id": alice, "label": f"team:blue-{tag}"}) == []
        running = ids({"state": "running"})
        assert a["id"] in running and b["id"] in running
        assert a["id"] not in ids({"state": "error"})
        full = c.get("/sandboxes", params={"owner_id": alice}).json()[0]
        for k in ("id", "state", "provider", "image", "memory_mb", "vcpus", "created_at",
                  "expires_at", "metadata"):
            assert k in full, f"list item lacks {k}: {full}"
        assert full["metadata"] == {"team": f"red-{tag}", "note": "hello world"}

        # a destroyed sandbox disappears from every listing
        assert c.delete(f"/sandboxes/{b['id']}").status_code == 200
        assert b["id"] not in ids()
        assert ids({"owner_id": bob}) == []


@NATIVE
def test_logs_lines(server, sandboxes):
    sid = sandboxes.create(server)["id"]
    with server.client() as c:
        for i in range(8):
            run_in(c, sid, f"echo {i}")
        r = c.get(f"/sandboxes/{sid}/logs", params={"lines": 5})
        assert r.status_code == 200, r.text
        lines = r.json()
        assert isinstance(lines, list)
        assert 1 <= len(lines) <= 5, lines
        assert all(isinstance(x, str) for x in lines), lines
        r = c.get(f"/sandboxes/{sid}/logs", params={"lines": 1})
        assert r.status_code == 200 and len(r.json()) == 1, r.text
        r = c.get(f"/sandboxes/{sid}/logs")
        assert r.status_code == 200
        assert len(r.json()) >= len(lines)
        assert_error(c.get(f"/sandboxes/{sid}/logs", params={"lines": "many"}), 400, "invalid_request")


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+([0-9.eE+-]+)\s*$", text, re.M)
    assert m, f"{name} not in metrics:\n{text[:2000]}"
    return float(m.group(1))


@NATIVE
def test_metrics_prometheus_text(server, sandboxes):
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    before = _metric(r.text, "stacyvm_sandboxes_created_total")
    assert "# TYPE stacyvm_sandboxes_created_total counter" in r.text
    sandboxes.create(server)
    after = _metric(httpx.get(server.url + "/metrics", timeout=10).text, "stacyvm_sandboxes_created_total")
    assert after == before + 1, (before, after)
    # every non-comment line is "name{labels} value"
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            assert re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?\s+\S+", line), line


@NATIVE
def test_stats(server, sandboxes):
    sb = sandboxes.create(server, {"image": IMAGE, "memory_mb": 256})
    assert sb["memory_mb"] == 256
    with server.client() as c:
        r = c.get(f"/sandboxes/{sb['id']}/stats")
        assert r.status_code == 200, r.text
        st = r.json()
        assert set(st) == {"cpu_pct", "mem_bytes", "mem_limit_bytes", "pids"}, st
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in st.values()), st
        assert st["mem_limit_bytes"] == 256 * 1024 * 1024, st
        assert 0 < st["mem_bytes"] <= st["mem_limit_bytes"], st
        assert st["pids"] >= 1
        assert st["cpu_pct"] >= 0
        # the memory limit is really enforced inside
        out = run_in(c, sb["id"], "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
        assert out["stdout"].strip() == str(256 * 1024 * 1024), out
    # ... and on the host: the sandbox's own cgroups carry the limits
    # (memory as requested, vcpus=1 → one CFS period, the default pids limit)
    expected = {
        "memory.limit_in_bytes": str(256 * 1024 * 1024),
        "memory.max": str(256 * 1024 * 1024),
        "cpu.cfs_quota_us": "100000",
        "cpu.max": "100000 100000",
        "pids.max": "512",
    }
    cgroups = (native_state(server, sb["id"]) or {}).get("cgroups") or []
    assert cgroups, f"no cgroups in the state of {sb['id']}"
    seen = {}
    for d in cgroups:
        for name, want in expected.items():
            path = os.path.join(d, name)
            if os.path.exists(path):
                with open(path) as f:
                    seen[path] = f.read().strip()
                assert seen[path] == want, f"{path} = {seen[path]!r}, expected {want!r}"
    kinds = {os.path.basename(p).split(".")[0] for p in seen}
    assert kinds == {"memory", "cpu", "pids"}, f"limits found on the host: {seen}"


@NATIVE
def test_capacity_limit(make_server, sandboxes):
    srv = make_server(env={"STACYVM_MAX_SANDBOXES": "2"})
    first = sandboxes.create(srv)["id"]
    sandboxes.create(srv)
    with srv.client() as c:
        r = c.post("/sandboxes", json={"image": IMAGE})
        if r.status_code == 201:
            sandboxes.add(srv, r.json()["id"])
        assert_error(r, 429, "quota_exceeded")
        adm = c.post("/sandboxes/admission", json={"image": IMAGE})
        assert adm.status_code == 200, adm.text
        body = adm.json()
        allowed_keys = {"allowed", "queueable", "reason", "active_sandboxes", "max_sandboxes",
                        "active_owner_sandboxes", "max_owner_sandboxes", "max_ttl"}
        assert set(body) <= allowed_keys, f"extra admission keys: {set(body) - allowed_keys}"
        assert body["allowed"] is False
        assert body["active_sandboxes"] == 2 and body["max_sandboxes"] == 2, body
        # freeing a slot admits again
        assert c.delete(f"/sandboxes/{first}").status_code == 200
        sandboxes.create(srv)
        assert_error(c.post("/sandboxes", json={"image": IMAGE}), 429, "quota_exceeded")


@NATIVE
def test_capacity_is_atomic_under_parallel_creates(make_server, sandboxes):
    srv = make_server(env={"STACYVM_MAX_SANDBOXES": "2"})
    results: list[httpx.Response] = []
    lock = threading.Lock()
    barrier = threading.Barrier(5)

    def create():
        barrier.wait()
        r = httpx.post(srv.api_url + "/sandboxes", json={"image": IMAGE}, timeout=60)
        with lock:
            results.append(r)
            if r.status_code == 201:
                sandboxes.add(srv, r.json()["id"])

    threads = [threading.Thread(target=create) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 201, 429, 429, 429], [(r.status_code, r.text[:100]) for r in results]
    for r in results:
        if r.status_code == 429:
            assert_error(r, 429, "quota_exceeded")
    with srv.client() as c:
        assert len(c.get("/sandboxes").json()) == 2


@NATIVE
def test_extend_is_capped_by_max_ttl(make_server, sandboxes):
    """API.md §3: extend sets expires_at = now + ttl, capped by the max TTL."""
    srv = make_server(env={"STACYVM_MAX_TTL": "1h"})
    sid = sandboxes.create(srv, {"image": IMAGE, "ttl": "5m"})["id"]
    with srv.client() as c:
        before = time.time()
        r = c.post(f"/sandboxes/{sid}/extend", json={"ttl": "48h"})
        assert r.status_code == 200, r.text
        left = parse_time(r.json()["expires_at"]).timestamp() - before
        assert 3590 <= left <= 3601, left
        # a ttl over the maximum on create is still refused
        assert_error(c.post("/sandboxes", json={"image": IMAGE, "ttl": "2h"}), 429, "quota_exceeded")
