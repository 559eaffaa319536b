"""Quotas and admission (API.md §8, §3 admission dry run).

Native provider: creates are fast, so the parallel test measures the
admission itself.
"""

from __future__ import annotations

import threading
import time

import httpx
import stacyvm
from stacyvm.models import QuotaSummary, SpawnAdmissionDecision

from conftest import IMAGE, assert_error, only_providers

pytestmark = only_providers("native")

BOOT = "boot-admin-key"
ADMISSION_KEYS = {"allowed", "queueable", "reason", "active_sandboxes", "max_sandboxes",
                  "active_owner_sandboxes", "max_owner_sandboxes", "max_ttl"}


def _req(srv, method, path, key=BOOT, **kw):
    headers = dict(kw.pop("headers", {}) or {})
    if key:
        headers["X-API-Key"] = key
    return httpx.request(method, srv.api_url + path, headers=headers, timeout=90, **kw)


def test_fifty_parallel_creates_against_a_limit_of_seven(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    r = _req(srv, "PUT", "/quotas/alice", json={"max_sandboxes": 7})
    assert r.status_code == 200, r.text
    assert r.json()["max_sandboxes"] == 7
    n = 50
    barrier = threading.Barrier(n)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def create():
        barrier.wait()
        resp = _req(srv, "POST", "/sandboxes", json={"image": IMAGE, "ttl": "10m"},
                    headers={"X-User-ID": "alice"})
        with lock:
            results.append(resp)
            if resp.status_code == 201:
                sandboxes.add(srv, resp.json()["id"])

    threads = [threading.Thread(target=create) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    took = time.monotonic() - t0
    codes = [r.status_code for r in results]
    print(f"\n50 parallel creates vs limit 7: {codes.count(201)} x 201, "
          f"{codes.count(429)} x 429 in {took:.2f}s")
    assert len(results) == n
    assert codes.count(201) == 7, sorted(codes)
    assert codes.count(429) == 43, sorted(codes)
    for r in results:
        if r.status_code == 429:
            body = assert_error(r, 429, "quota_exceeded")
            assert "max_sandboxes" in body["message"] and "alice" in body["message"], body
    # usage and the dry run report the numbers admission used
    u = _req(srv, "GET", "/quotas/alice/usage").json()
    assert u["usage"]["sandboxes"] == 7, u
    assert u["remaining"]["sandboxes"] == 0, u
    assert u["limits"]["max_sandboxes"] == 7, u
    d = _req(srv, "POST", "/sandboxes/admission", json={"image": IMAGE}, headers={"X-User-ID": "alice"}).json()
    assert set(d) <= ADMISSION_KEYS, d
    assert d["allowed"] is False and "max_sandboxes" in d["reason"], d
    assert d["active_owner_sandboxes"] == 7 and d["max_owner_sandboxes"] == 7, d
    assert d["active_sandboxes"] == 7, d
    d = _req(srv, "POST", "/sandboxes/admission", json={"image": IMAGE}, headers={"X-User-ID": "bob"}).json()
    assert d["allowed"] is True and d["active_owner_sandboxes"] == 0, d
    assert len(_req(srv, "GET", "/sandboxes", params={"owner_id": "alice"}).json()) == 7


def test_memory_vcpu_ttl_and_exec_limits(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    r = _req(srv, "PUT", "/quotas/carol", json={
        "max_memory_mb": 600, "max_vcpus": 2, "max_ttl": "10m", "max_exec_timeout": "2s"})
    assert r.status_code == 200, r.text
    q = r.json()
    assert q["max_ttl"] == "10m0s" and q["max_exec_timeout"] == "2s", q
    carol = {"X-User-ID": "carol"}
    sid = sandboxes.create(srv, {"image": IMAGE, "memory_mb": 512, "ttl": "5m"}, headers=carol)["id"]
    for body, limit in (
        ({"image": IMAGE, "memory_mb": 128}, "max_memory_mb"),
        ({"image": IMAGE, "ttl": "1h", "memory_mb": 64}, "max_ttl"),
    ):
        r = _req(srv, "POST", "/sandboxes", json=body, headers=carol)
        if r.status_code == 201:
            sandboxes.add(srv, r.json()["id"])
        assert limit in assert_error(r, 429, "quota_exceeded")["message"]
    # the dry run sees the same
    d = _req(srv, "POST", "/sandboxes/admission", json={"image": IMAGE, "memory_mb": 128}, headers=carol).json()
    assert d["allowed"] is False and "max_memory_mb" in d["reason"], d
    assert d["max_ttl"] == "10m0s", d
    # exec: an explicit timeout over the quota is refused, the default is capped
    r = _req(srv, "POST", f"/sandboxes/{sid}/exec", json={"command": "true", "timeout": "5s"})
    assert "max_exec_timeout" in assert_error(r, 429, "quota_exceeded")["message"]
    t0 = time.monotonic()
    r = _req(srv, "POST", f"/sandboxes/{sid}/exec", json={"command": "sleep 30"})
    assert_error(r, 408, "timeout")
    assert time.monotonic() - t0 < 10
    assert _req(srv, "POST", f"/sandboxes/{sid}/exec", json={"command": "true", "timeout": "1s"}).status_code == 200
    # extend is capped by the quota's max ttl
    r = _req(srv, "POST", f"/sandboxes/{sid}/extend", json={"ttl": "5h"})
    assert r.status_code == 200, r.text
    # removing the quota lifts the limits
    assert _req(srv, "DELETE", "/quotas/carol").status_code == 200
    assert_error(_req(srv, "GET", "/quotas/carol"), 404, "not_found")
    assert_error(_req(srv, "DELETE", "/quotas/carol"), 404, "not_found")
    sandboxes.create(srv, {"image": IMAGE, "memory_mb": 128}, headers=carol)


def test_key_identity_quota_counts_what_the_key_creates(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    key = _req(srv, "POST", "/keys", json={"name": "ci", "scope": "api"}).json()["key"]
    assert _req(srv, "PUT", "/quotas/ci", json={"max_sandboxes": 2}).status_code == 200
    for user in ("u1", "u2"):
        r = _req(srv, "POST", "/sandboxes", key, json={"image": IMAGE}, headers={"X-User-ID": user})
        assert r.status_code == 201, r.text
        assert r.json()["owner_id"] == user
        sandboxes.add(srv, r.json()["id"])
    r = _req(srv, "POST", "/sandboxes", key, json={"image": IMAGE}, headers={"X-User-ID": "u3"})
    if r.status_code == 201:
        sandboxes.add(srv, r.json()["id"])
    assert "key ci" in assert_error(r, 429, "quota_exceeded")["message"]
    u = _req(srv, "GET", "/quotas/ci/usage", key).json()  # its own usage: allowed
    assert u["key_usage"]["sandboxes"] == 2 and u["usage"]["sandboxes"] == 0, u
    # the admin key is not limited by it
    sandboxes.create(srv, headers={"X-User-ID": "u3"})


def test_quota_listing_summary_and_the_official_client(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    with stacyvm.Client(srv.url, api_key=BOOT) as c:
        s = c.quota_summary()
        assert isinstance(s, QuotaSummary) and s.total == 0
    for owner, body in (("a1", {"max_sandboxes": 3}), ("a2", {"max_ttl": "1h"}),
                        ("a3", {"max_sandboxes": 1, "max_exec_timeout": "1m"})):
        assert _req(srv, "PUT", f"/quotas/{owner}", json=body).status_code == 200
    assert_error(_req(srv, "PUT", "/quotas/bad owner", json={}), 400, "invalid_request")
    assert_error(_req(srv, "PUT", "/quotas/a4", json={"max_ttl": "soon"}), 400, "invalid_request")
    listed = _req(srv, "GET", "/quotas").json()
    assert [q["owner"] for q in listed] == ["a1", "a2", "a3"], listed
    summary = _req(srv, "GET", "/quotas/summary").json()
    assert summary == {"total": 3, "with_max_sandboxes": 2, "with_max_ttl": 1, "with_max_exec_timeout": 1}
    # upsert replaces
    assert _req(srv, "PUT", "/quotas/a2", json={"max_sandboxes": 9}).json().get("max_ttl") is None
    with stacyvm.Client(srv.url, api_key=BOOT, user_id="a3") as c:
        s = c.quota_summary()
        assert (s.total, s.with_max_sandboxes, s.with_max_ttl, s.with_max_exec_timeout) == (3, 3, 0, 1)
        d = c.admission(image=IMAGE)
        assert isinstance(d, SpawnAdmissionDecision)
        assert d.allowed is True and d.max_owner_sandboxes == 1 and d.active_owner_sandboxes == 0
        sb = c.spawn(image=IMAGE, ttl="5m")
        sandboxes.add(srv, sb.id)
        d = c.admission(image=IMAGE)
        assert d.allowed is False and d.active_owner_sandboxes == 1 and "max_sandboxes" in d.reason
