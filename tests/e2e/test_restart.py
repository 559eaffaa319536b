"""Crash and restart: sandboxes survive a SIGKILL of the server and are
re-attached; nothing is orphaned; a vanished container is not `running`."""

from __future__ import annotations

import threading
import time

import httpx

from conftest import (
    IMAGE,
    Background,
    assert_error,
    container_labels,
    docker,
    instance_containers,
    run_in,
    sandbox_containers,
    wait_no_containers,
)


def _instance_of(sandbox_id: str) -> str:
    containers = sandbox_containers(sandbox_id)
    assert len(containers) == 1, f"{sandbox_id}: containers {containers}"
    labels = container_labels(containers[0])
    assert labels.get("org.stacyvm.sandbox") == sandbox_id, labels
    inst = labels.get("org.stacyvm.instance")
    assert inst, f"container of {sandbox_id} has no instance label: {labels}"
    return inst


def _restart(make_server, old) -> object:
    """A new server process on the same data dir and port."""
    new = make_server(data_dir=old.data_dir, port=old.port, start=False)
    new.known_instance_ids |= old.known_instance_ids
    new.start()
    return new


def test_sigkill_mid_traffic_then_restart_reattaches(make_server, sandboxes):
    srv = make_server()
    ids = [sandboxes.create(srv, {"image": IMAGE, "ttl": "15m"})["id"] for _ in range(3)]
    inst = _instance_of(ids[0])
    assert all(_instance_of(i) == inst for i in ids)
    with srv.client() as c:
        for i in ids:
            r = c.post(f"/sandboxes/{i}/files", json={"path": "/workspace/before.txt", "content": f"before {i}"})
            assert r.status_code == 200, r.text

    stop = threading.Event()
    stats = {"ok": 0, "errors": 0, "bad": []}

    def traffic(worker):
        n = 0
        with httpx.Client(base_url=srv.api_url, timeout=10) as c:
            while not stop.is_set():
                sid = ids[n % 3]
                n += 1
                try:
                    if n % 2:
                        f = f"/workspace/n-{worker}.txt"
                        r = c.post(f"/sandboxes/{sid}/exec", json={"command": f"echo {n} > {f}; cat {f}"})
                        if r.status_code == 200 and r.json()["stdout"] != f"{n}\n":
                            stats["bad"].append(r.text)
                    else:
                        r = c.post(f"/sandboxes/{sid}/files", json={"path": f"/workspace/t/{worker}-{n}.txt", "content": str(n)})
                    if r.status_code >= 500:
                        stats["bad"].append(f"{r.status_code} {r.text[:200]}")
                    stats["ok"] += 1
                except httpx.HTTPError:
                    stats["errors"] += 1
                    time.sleep(0.05)

    workers = [Background(traffic, w) for w in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    assert stats["ok"] > 5, f"traffic did not get going: {stats}"
    srv.kill()  # SIGKILL mid-traffic
    time.sleep(0.3)
    new = _restart(make_server, srv)
    time.sleep(0.5)
    stop.set()
    for w in workers:
        w.join(20)
        assert w.error is None, repr(w.error)
    assert not stats["bad"], stats["bad"][:5]

    for sid in ids:
        sandboxes.add(new, sid)
    with new.client() as c:
        for sid in ids:
            r = c.get(f"/sandboxes/{sid}")
            assert r.status_code == 200, f"{sid} lost after restart: {r.status_code} {r.text}"
            assert r.json()["state"] == "running", r.json()
            out = run_in(c, sid, "python3 -c 'print(40 + 2)'")
            assert out["stdout"] == "42\n" and out["exit_code"] == 0, out
            assert c.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/before.txt"}).content == f"before {sid}".encode()
            # file API works too after re-attach
            r = c.post(f"/sandboxes/{sid}/files", json={"path": "/workspace/after.txt", "content": "after"})
            assert r.status_code == 200, r.text
            assert c.get(f"/sandboxes/{sid}/files", params={"path": "/workspace/after.txt"}).content == b"after"
        listed = {s["id"]: s["state"] for s in c.get("/sandboxes").json()}
        assert all(listed.get(sid) == "running" for sid in ids), listed

        for sid in ids:
            r = c.delete(f"/sandboxes/{sid}")
            assert r.status_code == 200, r.text
    for sid in ids:
        assert wait_no_containers(sid) == [], f"{sid} leaked a container"
    assert instance_containers(inst) == [], f"containers left for instance {inst}"


def test_kill_during_create_leaves_no_orphans(make_server, sandboxes):
    srv = make_server()
    # one sandbox that exists for sure, so the instance id is known
    known = sandboxes.create(srv)["id"]
    inst = _instance_of(known)

    results = []

    def create(delay):
        time.sleep(delay)
        try:
            r = httpx.post(srv.api_url + "/sandboxes", json={"image": IMAGE}, timeout=30)
            results.append((r.status_code, r.text))
        except httpx.HTTPError as e:
            results.append(("error", repr(e)))

    threads = [Background(create, d) for d in (0.0, 0.05, 0.1, 0.15)]
    for t in threads:
        t.start()
    time.sleep(0.25)
    srv.kill()
    for t in threads:
        t.join(40)
    for code, text in results:
        if code == 201:
            import json

            sandboxes.add(srv, json.loads(text)["id"])

    new = _restart(make_server, srv)
    with new.client() as c:
        # creates interrupted by the crash must not stay "creating" forever
        deadline = time.monotonic() + 15
        while True:
            listed = c.get("/sandboxes").json()
            states = {s["id"]: s["state"] for s in listed}
            if all(st != "creating" for st in states.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(st != "creating" for st in states.values()), states
        for sid in states:
            sandboxes.add(new, sid)
        running = {sid for sid, st in states.items() if st == "running"}
        assert known in running, states

        # every container of this instance belongs to a sandbox the API lists as running
        for cont in instance_containers(inst):
            sid = container_labels(cont).get("org.stacyvm.sandbox")
            assert sid in running, (
                f"orphan container {cont[:12]} (sandbox {sid}, state {states.get(sid)}) "
                f"after restart; running={sorted(running)}"
            )
        # and every running one really works
        for sid in running:
            assert run_in(c, sid, "echo ok")["stdout"] == "ok\n"
        for sid in states:
            r = c.delete(f"/sandboxes/{sid}")
            assert r.status_code in (200, 404), r.text
    assert instance_containers(inst) == [], "containers left after destroying everything"


def test_container_removed_while_server_down(make_server, sandboxes):
    srv = make_server()
    victim = sandboxes.create(srv)["id"]
    survivor = sandboxes.create(srv)["id"]
    inst = _instance_of(victim)
    assert srv.stop() is not None  # graceful SIGTERM; sandboxes keep running
    assert sandbox_containers(survivor), "SIGTERM must not destroy sandboxes"
    docker("rm", "-f", *sandbox_containers(victim))
    assert sandbox_containers(victim) == []

    new = _restart(make_server, srv)
    with new.client() as c:
        r = c.get(f"/sandboxes/{victim}")
        if r.status_code == 200:
            body = r.json()
            assert body["state"] != "running", f"sandbox without a container reported running: {body}"
            assert body["state"] == "error", body
            # an exec on it is a state problem: never a 500, never a 200
            r = c.post(f"/sandboxes/{victim}/exec", json={"command": "echo"})
            assert r.status_code in (404, 409, 502), r.text
            assert_error(r, r.status_code, None)
            listed = {s["id"]: s["state"] for s in c.get("/sandboxes").json()}
            assert listed.get(victim) != "running", listed
        else:
            assert_error(r, 404, "not_found")
            assert victim not in [s["id"] for s in c.get("/sandboxes").json()]
        # the other one is re-attached and works
        r = c.get(f"/sandboxes/{survivor}")
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        assert run_in(c, survivor, "echo fine")["stdout"] == "fine\n"
        # destroying both works (idempotent for the broken one)
        assert c.delete(f"/sandboxes/{victim}").status_code in (200, 404)
        assert c.delete(f"/sandboxes/{survivor}").status_code == 200
    assert instance_containers(inst) == []
