"""`stacyvm doctor` and `stacyvm config lint` as a user runs them: the real
binary, real host probes (namespaces, overlayfs, seccomp, the Docker socket,
proot, a KVM guest), real config files and data dirs."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import BIN, only_providers

pytestmark = only_providers("native")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    base.update(env or {})
    return subprocess.run([BIN, *args], capture_output=True, text=True, env=base, timeout=timeout)


@pytest.fixture
def data_dir():
    with tempfile.TemporaryDirectory(prefix="svd-") as d:
        yield Path(d)


def checks_by_id(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["checks"]}


def test_doctor_probes_this_host(provider, data_dir):
    p = run("doctor", "--format", "json", env={"STACYVM_DATA_DIR": str(data_dir)})
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    checks = checks_by_id(report)
    # This host (and CI) is set up for every provider: each probe passes.
    for cid in (
        "host.kernel",
        "host.cgroups",
        "host.namespaces",
        "host.overlayfs",
        "host.seccomp",
        "docker.socket",
        "proot.binary",
        "host.disk",
        "host.data_dir",
    ):
        assert checks[cid]["status"] == "pass", checks[cid]
    assert "Docker" in checks["docker.socket"]["detail"]
    assert "proot" in checks["proot.binary"]["detail"]
    # KVM is probed by running a guest, never by the device's mere presence.
    kvm = checks["host.kvm"]
    assert kvm["status"] in ("pass", "fail", "skip")
    if os.path.exists("/dev/kvm"):
        assert kvm["status"] != "skip"
        if kvm["status"] == "pass":
            assert "hlt" in kvm["detail"]
    assert checks["custom.backend"]["status"] == "skip"  # no custom.url configured
    assert report["ready"] is True
    assert {p["name"]: p["ready"] for p in report["providers"]} == {
        "native": True,
        "docker": True,
        "proot": True,
    }


def test_doctor_text_and_failures(provider, data_dir):
    p = run("doctor", env={"STACYVM_DATA_DIR": str(data_dir)})
    assert p.returncode == 0, p.stderr
    assert "PASS  host.namespaces" in p.stdout
    assert "provider native: ready" in p.stdout

    # A world-writable data dir, a proot that does not exist and a Docker
    # socket nobody listens on are each reported, and the host is not ready.
    bad = data_dir / "shared"
    bad.mkdir()
    os.chmod(bad, 0o777)
    env = {
        "STACYVM_DATA_DIR": str(bad),
        "STACYVM_PROOT_BINARY": str(data_dir / "no-proot"),
        "STACYVM_DOCKER_SOCKET": f"unix://{data_dir}/no-docker.sock",
    }
    p = run("doctor", "--format", "json", env=env)
    assert p.returncode == 1, p.stdout
    report = json.loads(p.stdout)
    checks = checks_by_id(report)
    assert checks["host.data_dir"]["status"] == "fail"
    assert "world-writable" in checks["host.data_dir"]["detail"]
    assert checks["proot.binary"]["status"] == "fail"
    assert checks["docker.socket"]["status"] == "fail"
    assert "no-docker.sock" in checks["docker.socket"]["detail"]
    blocked = {p["name"]: p["blocked_by"] for p in report["providers"]}
    assert blocked["proot"] == ["proot.binary", "host.data_dir"] or set(blocked["proot"]) == {
        "proot.binary",
        "host.data_dir",
    }
    assert "docker.socket" in blocked["docker"]


def test_doctor_probes_custom_backend(provider, data_dir):
    # Nothing listens on this loopback port: the backend check fails clearly.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {
        "STACYVM_DATA_DIR": str(data_dir),
        "STACYVM_PROVIDERS": "native,custom",
        "STACYVM_CUSTOM_URL": f"http://127.0.0.1:{port}",
    }
    p = run("doctor", "--format", "json", env=env)
    assert p.returncode == 1
    c = checks_by_id(json.loads(p.stdout))["custom.backend"]
    assert c["status"] == "fail" and f"127.0.0.1:{port}" in c["detail"], c


def lint(*extra: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    p = run("config", "lint", "--format", "json", *extra, env=env)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def ids(report: dict, severity: str) -> set[str]:
    return {f["id"] for f in report["findings"] if f["severity"] == severity}


def test_lint_embedded_defaults_flag_open_listener(provider, data_dir):
    rc, r = lint(env={"STACYVM_DATA_DIR": str(data_dir)})
    assert rc == 1
    assert "auth.no_api_key" in ids(r, "error")


def test_lint_production_rejects_mock_and_open_previews(provider, data_dir):
    conf = data_dir / "dev.toml"
    conf.write_text(
        'listen = "127.0.0.1:7423"\n'
        f'data_dir = "{data_dir}"\n'
        'default_provider = "mock"\n'
        'preview_domain = "preview.example.com"\n'
        'preview_access = "public"\n'
        "audit_log = false\n"
    )
    rc, r = lint("--config", str(conf))
    assert rc == 1
    assert "preview.public_default" in ids(r, "error")
    assert "providers.mock" in ids(r, "warning")
    rc, r = lint("--config", str(conf), "--production")
    assert rc == 1
    errors = ids(r, "error")
    for fid in ("providers.mock", "audit.off", "quotas.none", "auth.no_api_key", "preview.public_default"):
        assert fid in errors, (fid, errors)
    for f in r["findings"]:
        assert f["message"] and f["fix"]

    # Text output names each finding and its fix.
    p = run("config", "lint", "--config", str(conf), "--production")
    assert p.returncode == 1
    assert "providers.mock" in p.stdout and "fix:" in p.stdout


def test_lint_hardened_config_passes_production(provider, data_dir):
    conf = data_dir / "prod.toml"
    conf.write_text(
        'listen = "0.0.0.0:7423"\n'
        f'data_dir = "{data_dir}"\n'
        'api_key = "sk_0123456789abcdef0123456789abcdef"\n'
        'preview_domain = "preview.example.com"\n'
    )
    # Without any quota row the production lint still objects...
    rc, r = lint("--config", str(conf), "--production")
    assert rc == 1 and ids(r, "error") == {"quotas.none"}, r
    # ...and is satisfied once the store holds one (set through a real server).
    rc, r = run_put_quota(conf)
    assert rc == 0, r
    assert not ids(r, "error"), r


def run_put_quota(conf: Path) -> tuple[int, dict]:
    """Set a quota through a real server's API, then lint again."""
    import httpx

    from conftest import free_port

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")},
        "STACYVM_CONFIG": str(conf),
        "STACYVM_LISTEN": f"127.0.0.1:{port}",
        "STACYVM_PROVIDERS": "native",
    }
    srv = subprocess.Popen([BIN, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        key = "sk_0123456789abcdef0123456789abcdef"
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.put(
                    f"http://127.0.0.1:{port}/api/v1/quotas/team-a",
                    json={"max_sandboxes": 5},
                    headers={"X-API-Key": key},
                    timeout=5,
                )
                assert r.status_code == 200, r.text
                break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    return lint("--config", str(conf), "--production")
