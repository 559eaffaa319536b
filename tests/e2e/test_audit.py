"""The audit log (API.md §9): what is recorded, filters and export, and
tamper detection of the hash chain (API and `stacyvm audit verify`)."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import time

import httpx

from conftest import BIN, IMAGE, assert_error, only_providers

pytestmark = only_providers("native")

BOOT = "boot-admin-key"


def _req(srv, method, path, key=BOOT, **kw):
    headers = dict(kw.pop("headers", {}) or {})
    if key:
        headers["X-API-Key"] = key
    return httpx.request(method, srv.api_url + path, headers=headers, timeout=60, **kw)


def _records(srv, **params) -> list[dict]:
    out, cursor = [], None
    while True:
        p = dict(params, limit=200)
        if cursor:
            p["cursor"] = cursor
        r = _req(srv, "GET", "/audit", params=p)
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["records"]
        cursor = body.get("next_cursor")
        if not cursor:
            return out


def _wait_for(srv, pred, timeout=10.0, **params):
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in _records(srv, **params) if pred(r)]
        if recs or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def test_actions_are_recorded_with_who_what_and_outcome(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT, "STACYVM_MAX_TTL": "1h"})
    key = _req(srv, "POST", "/keys", json={"name": "agent-7", "scope": "api", "tenant": "acme"}).json()
    r = _req(srv, "POST", "/sandboxes", key["key"], json={"image": IMAGE}, headers={"X-User-ID": "dora"})
    assert r.status_code == 201, r.text
    sid = sandboxes.add(srv, r.json()["id"])
    ak = key["key"]
    r = _req(srv, "POST", f"/sandboxes/{sid}/exec", ak,
             json={"command": "python3 -c \"print('ZQ' * 4)\""}, headers={"X-Request-ID": "req-exec-1"})
    assert r.status_code == 200 and r.json()["stdout"] == "ZQZQZQZQ\n", r.text
    assert_error(_req(srv, "POST", f"/sandboxes/{sid}/exec", ak, json={"command": "x", "mode": "bogus"}),
                 400, "invalid_request")
    assert _req(srv, "POST", f"/sandboxes/{sid}/files", ak, json={"path": "/tmp/a.txt", "content": "A"}).status_code == 200
    assert _req(srv, "PUT", f"/sandboxes/{sid}/files/raw", ak, params={"path": "/tmp/raw.bin"}, content=b"xyz").status_code == 200
    assert _req(srv, "POST", f"/sandboxes/{sid}/files/move", ak, json={"old_path": "/tmp/a.txt", "new_path": "/tmp/b.txt"}).status_code == 200
    assert _req(srv, "POST", f"/sandboxes/{sid}/files/chmod", ak, json={"path": "/tmp/b.txt", "mode": "600"}).status_code == 200
    assert _req(srv, "DELETE", f"/sandboxes/{sid}/files", ak, params={"path": "/tmp/b.txt"}).status_code == 200
    assert _req(srv, "POST", f"/sandboxes/{sid}/extend", ak, json={"ttl": "20m"}).status_code == 200
    assert _req(srv, "POST", "/templates", json={"name": "audited", "image": IMAGE}).status_code == 201
    assert _req(srv, "PUT", "/templates/audited", json={"image": IMAGE, "memory_mb": 256}).status_code == 200
    assert _req(srv, "DELETE", "/templates/audited").status_code == 200
    assert _req(srv, "PUT", "/quotas/dora", json={"max_sandboxes": 5}).status_code == 200
    assert _req(srv, "DELETE", "/quotas/dora").status_code == 200
    assert _req(srv, "DELETE", f"/sandboxes/{sid}", ak).status_code == 200
    assert _req(srv, "DELETE", f"/keys/{key['id']}").status_code == 200
    # a TTL destroy is recorded as done by `system`
    short = _req(srv, "POST", "/sandboxes", json={"image": IMAGE, "ttl": "1s"}).json()["id"]
    sandboxes.add(srv, short)

    reaped = _wait_for(srv, lambda r: r["target"] == short and r["action"] == "sandbox.destroy", timeout=15)
    assert reaped and reaped[0]["actor"] == "system", reaped
    assert reaped[0]["details"]["reason"] == "ttl expired", reaped

    recs = _records(srv)
    by_action: dict[str, list[dict]] = {}
    for r in recs:
        by_action.setdefault(r["action"], []).append(r)
    for action in ("key.create", "key.revoke", "sandbox.create", "sandbox.exec", "file.write",
                   "file.move", "file.chmod", "file.delete", "sandbox.extend", "sandbox.destroy",
                   "template.create", "template.update", "template.delete", "quota.set", "quota.delete"):
        assert action in by_action, f"{action} not recorded: {sorted(by_action)}"
    mine = [r for r in recs if r["target"] == sid]
    for r in mine:
        assert r["actor"] == "agent-7" and r["owner"] == "dora" and r["tenant"] == "acme", r
        assert r["client"] == "127.0.0.1" and r["request_id"], r
    execs = [r for r in mine if r["action"] == "sandbox.exec"]
    assert len(execs) == 2, execs
    ok = [r for r in execs if r["outcome"] == "ok"][0]
    assert ok["request_id"] == "req-exec-1", ok
    assert "print('ZQ' * 4)" in ok["details"]["command"], ok
    assert "ZQZQZQZQ" not in json.dumps(recs), "exec output must not be recorded"
    bad = [r for r in execs if r["outcome"] == "error"][0]
    assert bad["code"] == "invalid_request", bad
    writes = [r for r in mine if r["action"] == "file.write"]
    assert {w["details"]["path"] for w in writes} == {"/tmp/a.txt", "/tmp/raw.bin"}, writes
    assert [r["details"] for r in mine if r["action"] == "file.move"] == [
        {"old_path": "/tmp/a.txt", "new_path": "/tmp/b.txt"}]
    created = [r for r in recs if r["action"] == "key.create"][0]
    assert key["key"] not in json.dumps(recs), "a key's secret must never be recorded"
    assert created["actor"] == "admin" and created["details"]["scope"] == "api", created
    # records are chained and ordered
    ids = [r["id"] for r in recs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for prev, cur in zip(recs, recs[1:]):
        if cur["id"] == prev["id"] + 1:
            assert cur["prev_hash"] == prev["hash"]

    # filters
    assert {r["action"] for r in _records(srv, action="sandbox.exec")} == {"sandbox.exec"}
    assert {r["action"] for r in _records(srv, action="file.*")} == {"file.write", "file.move", "file.chmod", "file.delete"}
    assert {r["actor"] for r in _records(srv, actor="agent-7")} == {"agent-7"}
    assert {r["target"] for r in _records(srv, target=sid)} == {sid}
    assert {r["owner"] for r in _records(srv, owner="dora")} == {"dora"}
    errs = _records(srv, outcome="error")
    assert errs and {r["outcome"] for r in errs} == {"error"}
    first, last = recs[0]["time"], recs[-1]["time"]
    assert len(_records(srv, since=first, until=last)) < len(recs)
    assert _records(srv, since="2999-01-01T00:00:00Z") == []
    assert_error(_req(srv, "GET", "/audit", params={"since": "yesterday"}), 400, "invalid_request")
    assert_error(_req(srv, "GET", "/audit", params={"format": "xml"}), 400, "invalid_request")
    # paging: small pages add up to the whole
    paged, cursor = [], None
    while True:
        p = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = _req(srv, "GET", "/audit", params=p).json()
        assert len(body["records"]) <= 3
        paged += body["records"]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert [r["id"] for r in paged] == [r["id"] for r in _records(srv)][: len(paged)]
    # export
    r = _req(srv, "GET", "/audit", params={"format": "jsonl", "action": "sandbox.exec"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 2 and all(x["action"] == "sandbox.exec" for x in lines)
    r = _req(srv, "GET", "/audit", params={"format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) >= len(recs) and rows[0]["id"] == "1" and rows[0]["hash"], rows[:1]
    # non-admin keys may not read it
    viewer = _req(srv, "POST", "/keys", json={"name": "v", "scope": "viewer"}).json()["key"]
    assert_error(_req(srv, "GET", "/audit", viewer), 403, "forbidden")


def _verify_cli(db: str) -> tuple[int, dict]:
    r = subprocess.run([BIN, "audit", "verify", "--db", db, "--json"], capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout or "{}")


def test_tampering_is_detected(make_server, sandboxes):
    srv = make_server(env={"STACYVM_API_KEY": BOOT})
    sid = sandboxes.create(srv)["id"]
    for i in range(5):
        assert _req(srv, "POST", f"/sandboxes/{sid}/exec", json={"command": f"echo {i}"}).status_code == 200
    v = _req(srv, "GET", "/audit/verify").json()
    assert v["ok"] is True and v["records"] >= 6 and "first_bad" not in v, v
    db = os.path.join(srv.data_dir, "stacyvm.db")
    rc, out = _verify_cli(db)
    assert rc == 0 and out["ok"] is True, out

    conn = sqlite3.connect(db, timeout=10)
    target = conn.execute("SELECT seq, details FROM audit_log WHERE action='sandbox.exec' ORDER BY seq LIMIT 1 OFFSET 2").fetchone()
    seq, details = target
    # 1. change a record: the command line of an exec
    conn.execute("UPDATE audit_log SET details = ? WHERE seq = ?", (details.replace("echo 2", "echo 9"), seq))
    conn.commit()
    v = _req(srv, "GET", "/audit/verify").json()
    assert v["ok"] is False and v["first_bad"] == seq, v
    rc, out = _verify_cli(db)
    assert rc == 1 and out["first_bad"] == seq, out
    r = subprocess.run([BIN, "audit", "verify", "--db", db], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"first bad record {seq}" in r.stdout, r.stdout
    # put it back: the chain is whole again
    conn.execute("UPDATE audit_log SET details = ? WHERE seq = ?", (details, seq))
    conn.commit()
    assert _req(srv, "GET", "/audit/verify").json()["ok"] is True
    # 2. delete a record
    conn.execute("DELETE FROM audit_log WHERE seq = ?", (seq - 1,))
    conn.commit()
    v = _req(srv, "GET", "/audit/verify").json()
    assert v["ok"] is False and v["first_bad"] == seq - 1, v
    # new records do not hide it
    assert _req(srv, "POST", f"/sandboxes/{sid}/exec", json={"command": "true"}).status_code == 200
    assert _req(srv, "GET", "/audit/verify").json()["first_bad"] == seq - 1
    conn.close()

    # 3. deleting the newest records (the tail) is detected too
    srv2 = make_server(env={"STACYVM_API_KEY": BOOT})
    for _ in range(3):
        _req(srv2, "PUT", "/quotas/x", json={"max_sandboxes": 1})
    assert _req(srv2, "GET", "/audit/verify").json()["ok"] is True
    db2 = os.path.join(srv2.data_dir, "stacyvm.db")
    conn = sqlite3.connect(db2, timeout=10)
    last = conn.execute("SELECT MAX(seq) FROM audit_log").fetchone()[0]
    conn.execute("DELETE FROM audit_log WHERE seq = ?", (last,))
    conn.commit()
    conn.close()
    v = _req(srv2, "GET", "/audit/verify").json()
    assert v["ok"] is False and v["first_bad"] == last, v


def test_exec_latency_with_and_without_audit(make_server, sandboxes):
    """Informational: exec p50 with the audit log on and off."""
    results = {}
    for audit in ("true", "false"):
        srv = make_server(env={"STACYVM_AUDIT_LOG": audit})
        sid = sandboxes.create(srv)["id"]
        with srv.client() as c:
            body = {"command": "true", "mode": "argv"}
            for _ in range(20):
                c.post(f"/sandboxes/{sid}/exec", json=body)
            samples = []
            for _ in range(150):
                t = time.perf_counter()
                r = c.post(f"/sandboxes/{sid}/exec", json=body)
                samples.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
        samples.sort()
        results[audit] = (samples[len(samples) // 2], samples[int(len(samples) * 0.99)])
        if audit == "true":
            v = httpx.get(srv.api_url + "/audit/verify", timeout=30).json()
            assert v["ok"] and v["records"] >= 171, v
        else:
            assert httpx.get(srv.api_url + "/audit/verify", timeout=30).json()["records"] == 0
    print(f"\nexec p50/p99 ms: audit on {results['true'][0]:.2f}/{results['true'][1]:.2f}, "
          f"audit off {results['false'][0]:.2f}/{results['false'][1]:.2f}")
    # generous: the audit path must not add a database write to each exec
    assert results["true"][0] < results["false"][0] * 2 + 2, results
