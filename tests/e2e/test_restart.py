"""Crash and restart: sandboxes survive a SIGKILL of the server and are
re-attached; nothing is orphaned; a sandbox whose runtime vanished while the
server was down (container removed / PID 1 killed) is not `running`.

Runs on both providers, except the Docker-only container removal, whose
native counterpart kills the sandbox's PID 1 from the host."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from conftest import (
    IMAGE,
    Background,
    assert_error,
    docker,
    instance_runtimes,
    native_instance_leaves,
    native_parked_slots,
    native_pid1,
    native_state,
    only_providers,
    proc_start_time,
    run_in,
    runtime_alive,
    runtime_identity,
    runtime_instance,
    sandbox_containers,
    wait_instance_clean,
    wait_no_leftovers,
)


def _restart(make_server, old) -> object:
    """A new server process on the same data dir and port."""
    new = make_server(data_dir=old.data_dir, port=old.port, start=False, provider=old.provider)
    new.known_instance_ids |= old.known_instance_ids
    new.start()
    return new


def test_sigkill_mid_traffic_then_restart_reattaches(make_server, sandboxes, provider):
    srv = make_server()
    ids = [sandboxes.create(srv, {"image": IMAGE, "ttl": "15m"})["id"] for _ in range(3)]
    inst = runtime_instance(srv, ids[0], provider)
    assert inst == srv.instance_id()
    assert all(runtime_instance(srv, i, provider) == inst for i in ids)
    identity = {i: runtime_identity(srv, i, provider) for i in ids}
    assert all(identity[i] and all(identity[i]) for i in ids), identity
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
        # re-attached, not re-created: the same container / the same PID 1
        after = {i: runtime_identity(new, i, provider) for i in ids}
        assert after == identity, f"runtimes replaced across the restart: {identity} -> {after}"

        for sid in ids:
            r = c.delete(f"/sandboxes/{sid}")
            assert r.status_code == 200, r.text
    for sid in ids:
        left = wait_no_leftovers(new, sid, provider)
        assert left == [], f"{sid} leaked: {left}"
    left = wait_instance_clean(new, inst, provider)
    assert left == [], f"runtime objects left for instance {inst}: {left}"


def test_kill_during_creates_and_destroys_leaves_no_orphans(make_server, sandboxes, provider):
    """SIGKILL the server while clients keep creating and destroying
    sandboxes, so creates (and destroys) are cut off half-way, whatever the
    provider's speed (a native create takes milliseconds, a Docker one about
    a second)."""
    srv = make_server()
    # one sandbox that exists for sure, so the instance id is known
    known = sandboxes.create(srv)["id"]
    inst = runtime_instance(srv, known, provider)

    stop = threading.Event()
    results: list[tuple[str, object]] = []

    def churn(worker):
        with httpx.Client(base_url=srv.api_url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/sandboxes", json={"image": IMAGE, "metadata": {"churn": str(worker)}})
                except httpx.HTTPError as e:
                    results.append(("create cut off", repr(e)))
                    return
                results.append(("create", r.status_code))
                if r.status_code != 201:
                    time.sleep(0.05)
                    continue
                sandboxes.add(srv, r.json()["id"])
                try:
                    r = c.delete(f"/sandboxes/{r.json()['id']}")
                except httpx.HTTPError as e:
                    results.append(("destroy cut off", repr(e)))
                    return
                results.append(("destroy", r.status_code))

    threads = [Background(churn, w) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(40)
        assert t.error is None, repr(t.error)
    assert [x for x in results if x[0] in ("create", "destroy") and x[1] not in (200, 201)] == [], results
    assert any(what.endswith("cut off") for what, _ in results), (
        f"no request was in flight when the server was killed: {results}"
    )

    new = _restart(make_server, srv)
    with new.client() as c:
        # creates/destroys interrupted by the crash must not stay
        # "creating"/"destroying" forever
        deadline = time.monotonic() + 15
        while True:
            listed = c.get("/sandboxes").json()
            states = {s["id"]: s["state"] for s in listed}
            settled = all(st in ("running", "error") for st in states.values())
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert settled, states
        for sid in states:
            sandboxes.add(new, sid)
        running = {sid for sid, st in states.items() if st == "running"}
        assert known in running, states

        # every runtime object of this instance belongs to a sandbox the API
        # lists as running (cleanups may still be finishing: a few seconds)
        deadline = time.monotonic() + 5
        while True:
            orphans = [(what, sid) for what, sid in instance_runtimes(new, inst, provider)
                       if sid not in running]
            if not orphans or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not orphans, (
            f"orphan runtime objects after restart: {orphans}; "
            f"states={states}; running={sorted(running)}"
        )
        # and every running one really works
        for sid in running:
            assert run_in(c, sid, "echo ok")["stdout"] == "ok\n"
        for sid in states:
            r = c.delete(f"/sandboxes/{sid}")
            assert r.status_code in (200, 404), r.text
    left = wait_instance_clean(new, inst, provider)
    assert left == [], f"runtime objects left after destroying everything: {left}"


def _check_vanished_and_survivor(new, provider, victim, survivor, inst) -> None:
    """After a restart: the sandbox whose runtime vanished is `error` (or
    gone), never `running`; the other one is re-attached; both can be
    destroyed and nothing is left."""
    with new.client() as c:
        r = c.get(f"/sandboxes/{victim}")
        if r.status_code == 200:
            body = r.json()
            assert body["state"] != "running", f"sandbox without a runtime reported running: {body}"
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
    for sid in (victim, survivor):
        left = wait_no_leftovers(new, sid, provider)
        assert left == [], f"{sid} leaked: {left}"
    left = wait_instance_clean(new, inst, provider)
    assert left == [], f"runtime objects left for instance {inst}: {left}"


@only_providers("docker")
def test_container_removed_while_server_down(make_server, sandboxes, provider):
    srv = make_server()
    victim = sandboxes.create(srv)["id"]
    survivor = sandboxes.create(srv)["id"]
    inst = runtime_instance(srv, victim, provider)
    assert srv.stop() is not None  # graceful SIGTERM; sandboxes keep running
    assert sandbox_containers(survivor), "SIGTERM must not destroy sandboxes"
    docker("rm", "-f", *sandbox_containers(victim))
    assert sandbox_containers(victim) == []

    new = _restart(make_server, srv)
    _check_vanished_and_survivor(new, provider, victim, survivor, inst)


@only_providers("native")
def test_pid1_killed_while_server_down(make_server, sandboxes, provider):
    """Native counterpart of the container removal: SIGKILL the sandbox's
    PID 1 (its agent; the whole PID namespace dies with it) from the host
    while the server is down."""
    srv = make_server()
    victim = sandboxes.create(srv)["id"]
    survivor = sandboxes.create(srv)["id"]
    inst = runtime_instance(srv, victim, provider)
    pid = native_pid1(srv, victim)
    start = native_state(srv, victim)["start_time"]
    assert srv.stop() is not None  # graceful SIGTERM; sandboxes keep running
    assert runtime_alive(srv, survivor, provider), "SIGTERM must not stop sandboxes"
    assert proc_start_time(pid) == start, "SIGTERM must not stop sandboxes"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc_start_time(pid) == start and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc_start_time(pid) != start, f"PID 1 {pid} of {victim} survived SIGKILL"

    new = _restart(make_server, srv)
    _check_vanished_and_survivor(new, provider, victim, survivor, inst)


@only_providers("native")
def test_graceful_shutdown_leaves_no_prestarted_sandboxes(make_server, provider):
    """The native provider keeps a few sandboxes pre-started (parked in
    cgroups `stacyvm/<instance>/pool-<token>`, state dirs
    `<data_dir>/native/.pool-<instance>-<token>`).  They are not sandboxes
    of anyone: a graceful stop (SIGTERM) must not leave them, or their
    cgroups, behind on the host (they would stay forever if this data dir
    is never served again)."""
    srv = make_server()
    inst = srv.instance_id()
    assert inst, "could not read the server instance id from its log"
    deadline = time.monotonic() + 10
    while not native_parked_slots(srv, inst) and time.monotonic() < deadline:
        time.sleep(0.1)
    parked = native_parked_slots(srv, inst)
    assert parked, "the server pre-started no sandbox within 10 s (warm pool)"
    assert srv.stop() == 0, f"server exit code {srv.proc.returncode}"

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        procs = {leaf for leaf, populated in native_instance_leaves(inst).items() if populated}
        if not procs:
            break
        time.sleep(0.1)
    assert not procs, f"processes still running in cgroups {sorted(procs)} after the server stopped"
    leaves = sorted(native_instance_leaves(inst))
    state_dirs = sorted(
        n for n in os.listdir(os.path.join(srv.data_dir, "native")) if n.startswith(".pool-")
    )
    assert not leaves, (
        f"after a graceful stop the host still has the cgroups {leaves} under "
        f"stacyvm/{inst}/ in every hierarchy (state dirs left: {state_dirs})"
    )
