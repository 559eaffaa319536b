"""API keys, scopes, tenants and rate limits (API.md §2).

Runs on the native provider (fast creates); the checks are the API's, not
the runtime's.
"""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import IMAGE, assert_error, only_providers

pytestmark = only_providers("native")

BOOT = "boot-admin-key"
RANK = {"viewer": 0, "api": 1, "operator": 2, "admin": 3}


def _req(srv, method, path, key=None, **kw):
    headers = dict(kw.pop("headers", {}) or {})
    if key:
        headers["X-API-Key"] = key
    return httpx.request(method, srv.api_url + path, headers=headers, timeout=60, **kw)


def _make_key(srv, name, scope, tenant=None, rate_limit=None) -> dict:
    body = {"name": name, "scope": scope}
    if tenant:
        body["tenant"] = tenant
    if rate_limit:
        body["rate_limit"] = rate_limit
    r = _req(srv, "POST", "/keys", BOOT, json=body)
    assert r.status_code == 201, r.text
    k = r.json()
    assert k["key"].startswith("sk_") and len(k["key"]) >= 35, k
    assert k["scope"] == scope and k["name"] == name, k
    return k


def test_keys_are_created_listed_and_revoked(make_server):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    k = _make_key(srv, "ci-bot", "api", tenant="acme", rate_limit=50)
    # the secret is shown once; the list never has it
    listed = _req(srv, "GET", "/keys", BOOT).json()
    mine = [x for x in listed if x["id"] == k["id"]]
    assert len(mine) == 1, listed
    assert "key" not in mine[0] and "hash" not in mine[0], mine[0]
    assert k["key"] not in str(listed)
    assert mine[0]["prefix"] == k["key"][:7]
    assert mine[0]["tenant"] == "acme" and mine[0]["rate_limit"] == 50
    # both header styles work
    assert _req(srv, "GET", "/sandboxes", k["key"]).status_code == 200
    r = _req(srv, "GET", "/sandboxes", headers={"Authorization": f"Bearer {k['key']}"})
    assert r.status_code == 200
    # bad input
    assert_error(_req(srv, "POST", "/keys", BOOT, json={"name": "x", "scope": "root"}), 400, "invalid_request")
    assert_error(_req(srv, "POST", "/keys", BOOT, json={"scope": "api"}), 400, "invalid_request")
    assert_error(_req(srv, "POST", "/keys", BOOT, json={"name": "system", "scope": "api"}), 400, "invalid_request")
    # revoking takes effect at once
    r = _req(srv, "DELETE", f"/keys/{k['id']}", BOOT)
    assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
    assert_error(_req(srv, "GET", "/sandboxes", k["key"]), 401, "unauthorized")
    assert_error(_req(srv, "DELETE", f"/keys/{k['id']}", BOOT), 404, "not_found")
    assert k["id"] not in [x["id"] for x in _req(srv, "GET", "/keys", BOOT).json()]


def test_auth_turns_on_with_the_first_created_key(make_server):
    srv = make_server()  # no bootstrap key: open
    assert _req(srv, "GET", "/sandboxes").status_code == 200
    r = _req(srv, "POST", "/keys", json={"name": "root", "scope": "admin"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    assert_error(_req(srv, "GET", "/sandboxes"), 401, "unauthorized")
    assert_error(_req(srv, "POST", "/keys", json={"name": "sneaky", "scope": "admin"}), 401, "unauthorized")
    assert _req(srv, "GET", "/sandboxes", key).status_code == 200
    assert _req(srv, "GET", "/live").status_code == 200
    assert _req(srv, "GET", "/ready").status_code == 200
    # revoking the last key opens the server again
    kid = _req(srv, "GET", "/keys", key).json()[0]["id"]
    assert _req(srv, "DELETE", f"/keys/{kid}", key).status_code == 200
    assert _req(srv, "GET", "/sandboxes").status_code == 200


# (method, path, json body or None, scope needed). Bodies and targets are
# chosen so that an allowed call has no lasting effect (400/404 or a no-op).
ROUTES = [
    ("GET", "/keys", None, "admin"),
    ("POST", "/keys", {"name": "x", "scope": "nope"}, "admin"),
    ("DELETE", "/keys/key_doesnotexist", None, "admin"),
    ("GET", "/quotas", None, "admin"),
    ("GET", "/quotas/scope-probe", None, "admin"),
    ("PUT", "/quotas/scope-probe", {"max_ttl": "bad"}, "admin"),
    ("DELETE", "/quotas/scope-probe", None, "admin"),
    ("GET", "/quotas/scope-probe/usage", None, "admin"),
    ("GET", "/audit", None, "admin"),
    ("GET", "/audit?format=csv&limit=1", None, "admin"),
    ("GET", "/audit/verify", None, "admin"),
    ("POST", "/templates", {"name": ""}, "operator"),
    ("PUT", "/templates/nope", {"image": "bad image!"}, "operator"),
    ("DELETE", "/templates/nope", None, "operator"),
    ("DELETE", "/sandboxes", None, "operator"),
    ("POST", "/providers/test", None, "operator"),
    ("POST", "/sandboxes", {"image": "bad image!"}, "api"),
    ("POST", "/sandboxes/admission", {"image": IMAGE}, "api"),
    ("POST", "/templates/nope/spawn", None, "api"),
    ("GET", "/sandboxes", None, "viewer"),
    ("GET", "/templates", None, "viewer"),
    ("GET", "/templates/nope", None, "viewer"),
    ("GET", "/quotas/summary", None, "viewer"),
    ("GET", "/pool/status", None, "viewer"),
    ("GET", "/providers", None, "viewer"),
    ("GET", "/health", None, "viewer"),
]


def test_every_route_checks_its_scope(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    keys = {s: _make_key(srv, f"{s}-key", s)["key"] for s in ("viewer", "api", "operator", "admin")}
    sid = sandboxes.create(srv)["id"]
    routes = ROUTES + [
        ("POST", f"/sandboxes/{sid}/exec", {"command": ""}, "api"),
        ("POST", f"/sandboxes/{sid}/files", {"path": "relative"}, "api"),
        ("POST", f"/sandboxes/{sid}/files/move", {}, "api"),
        ("POST", f"/sandboxes/{sid}/files/chmod", {}, "api"),
        ("DELETE", f"/sandboxes/{sid}/files?path=relative", None, "api"),
        ("POST", f"/sandboxes/{sid}/extend", {"ttl": "bad"}, "api"),
    ]
    problems = []
    for method, path, body, needed in routes:
        kw = {"json": body} if body is not None else {}
        r = _req(srv, method, path, **kw)
        if r.status_code != 401:
            problems.append(f"{method} {path} without a key -> {r.status_code}")
        for scope, key in keys.items():
            r = _req(srv, method, path, key, **kw)
            if RANK[scope] < RANK[needed]:
                if r.status_code != 403 or r.json().get("code") != "forbidden":
                    problems.append(f"{method} {path} as {scope} -> {r.status_code} {r.text[:120]} (needs {needed})")
            elif r.status_code in (401, 403):
                problems.append(f"{method} {path} as {scope} -> {r.status_code} {r.text[:120]} (allowed)")
    assert not problems, "\n".join(problems)
    # the 403 names the scope
    r = _req(srv, "GET", "/audit", keys["operator"])
    assert "admin" in assert_error(r, 403, "forbidden")["message"]
    # a key may read its own identity's usage, not someone else's
    assert _req(srv, "GET", "/quotas/viewer-key/usage", keys["viewer"]).status_code == 200
    assert_error(_req(srv, "GET", "/quotas/api-key/usage", keys["viewer"]), 403, "forbidden")


def test_tenants_see_only_their_own_sandboxes(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    a = _make_key(srv, "alice-bot", "api", tenant="t-alice")["key"]
    b = _make_key(srv, "bob-bot", "operator", tenant="t-bob")["key"]
    c = _make_key(srv, "carol-bot", "api")["key"]  # no tenant: sees what it created

    def create(key, **headers):
        r = _req(srv, "POST", "/sandboxes", key, json={"image": IMAGE}, headers=headers)
        assert r.status_code == 201, r.text
        return sandboxes.add(srv, r.json()["id"]), r.json()

    sa, sa_json = create(a)
    sb, _ = create(b, **{"X-User-ID": "bob-end-user"})
    sc, _ = create(c)
    # owner attribution: key identity, unless X-User-ID says otherwise
    assert sa_json["owner_id"] == "alice-bot"
    assert _req(srv, "GET", f"/sandboxes/{sb}", BOOT).json()["owner_id"] == "bob-end-user"

    def ids(key):
        r = _req(srv, "GET", "/sandboxes", key)
        assert r.status_code == 200, r.text
        return {s["id"] for s in r.json()}

    assert ids(a) == {sa}
    assert ids(b) == {sb}
    assert ids(c) == {sc}
    assert {sa, sb, sc} <= ids(BOOT)

    routes = [
        ("GET", "/sandboxes/{id}", None),
        ("POST", "/sandboxes/{id}/exec", {"command": "echo hi"}),
        ("POST", "/sandboxes/{id}/extend", {"ttl": "10m"}),
        ("GET", "/sandboxes/{id}/logs", None),
        ("GET", "/sandboxes/{id}/stats", None),
        ("POST", "/sandboxes/{id}/files", {"path": "/tmp/x", "content": "x"}),
        ("GET", "/sandboxes/{id}/files?path=/etc/hostname", None),
        ("PUT", "/sandboxes/{id}/files/raw?path=/tmp/raw", b"raw"),
        ("GET", "/sandboxes/{id}/files/list?path=/", None),
        ("GET", "/sandboxes/{id}/files/stat?path=/etc", None),
        ("GET", "/sandboxes/{id}/files/glob?pattern=/etc/*", None),
        ("POST", "/sandboxes/{id}/files/move", {"old_path": "/tmp/x", "new_path": "/tmp/y"}),
        ("POST", "/sandboxes/{id}/files/chmod", {"path": "/etc/hostname", "mode": "600"}),
        ("DELETE", "/sandboxes/{id}/files?path=/etc/hostname", None),
        ("DELETE", "/sandboxes/{id}", None),
    ]
    problems = []
    for key, other in ((b, sa), (a, sb), (c, sa), (a, sc)):
        for method, path, body in routes:
            kw = {}
            if isinstance(body, bytes):
                kw["content"] = body
            elif body is not None:
                kw["json"] = body
            r = _req(srv, method, path.format(id=other), key, **kw)
            if r.status_code != 404 or r.json().get("code") != "not_found":
                problems.append(f"{method} {path.format(id=other)} -> {r.status_code} {r.text[:120]}")
    assert not problems, "\n".join(problems)
    # …and nothing happened to them
    for sid in (sa, sb, sc):
        assert _req(srv, "GET", f"/sandboxes/{sid}", BOOT).json()["state"] == "running"
    r = _req(srv, "POST", f"/sandboxes/{sa}/exec", BOOT, json={"command": "ls /tmp"})
    assert not set(r.json()["stdout"].split()) & {"x", "y", "raw"}, r.text
    # each key works on its own sandbox
    r = _req(srv, "POST", f"/sandboxes/{sa}/exec", a, json={"command": "echo mine"})
    assert r.status_code == 200 and r.json()["stdout"] == "mine\n", r.text
    # a destroyed sandbox of another tenant stays a 404 (never a 200)
    assert _req(srv, "DELETE", f"/sandboxes/{sa}", a).status_code == 200
    assert_error(_req(srv, "DELETE", f"/sandboxes/{sa}", b), 404, "not_found")
    assert _req(srv, "DELETE", f"/sandboxes/{sa}", a).status_code == 200  # idempotent for its owner
    # prune by a tenant-scoped operator only touches its tenant
    assert _req(srv, "DELETE", "/sandboxes", b).status_code == 200


def test_rate_limit_answers_429_with_retry_after(make_server):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    k = _make_key(srv, "slow", "viewer", rate_limit=1)["key"]
    codes = []
    last = None
    for _ in range(4):
        last = _req(srv, "GET", "/health", k)
        codes.append(last.status_code)
        if last.status_code == 429:
            break
    assert 429 in codes, codes
    assert_error(last, 429, "rate_limited")
    assert int(last.headers["retry-after"]) >= 1
    # other keys are not affected; the bucket refills
    assert _req(srv, "GET", "/health", BOOT).status_code == 200
    time.sleep(1.1)
    assert _req(srv, "GET", "/health", k).status_code == 200


def test_reserved_owner_names_are_refused(make_server):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    r = _req(srv, "POST", "/sandboxes", BOOT, json={"image": IMAGE}, headers={"X-User-ID": "system:pool:x"})
    assert_error(r, 400, "invalid_request")
    r = _req(srv, "POST", "/sandboxes", BOOT, json={"image": IMAGE, "owner_id": "system"})
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
def test_unknown_keys_are_401(make_server, header):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    _make_key(srv, "real", "admin")
    value = "sk_" + "x" * 32 if header == "X-API-Key" else "Bearer sk_" + "x" * 32
    assert_error(_req(srv, "GET", "/sandboxes", headers={header: value}), 401, "unauthorized")
