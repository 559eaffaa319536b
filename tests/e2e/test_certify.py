"""`stacyvm certify`: the provider conformance suite run by the real binary
against its own private server (native provider), its reports (JSON, text,
Markdown), the certification record it stores in the data dir, and its exit
codes (0 certified, 1 a check failed, 2 usage/configuration error)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import AGENT, BIN, IMAGE, NATIVE_IMAGE_DIR, check_prerequisites, parse_time

GROUPS = {
    "provider",
    "lifecycle",
    "exec",
    "streaming",
    "files",
    "limits",
    "isolation",
    "preview",
    "restart",
    "cleanup",
}
# Checks every provider must pass whatever it claims.
ALWAYS = {
    "provider.info",
    "lifecycle.create",
    "lifecycle.get",
    "lifecycle.list",
    "lifecycle.destroy",
    "lifecycle.ttl_expiry",
    "restart.reattach",
    "cleanup.destroyed",
    "cleanup.final",
}
CERTIFY_TIMEOUT = 240


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, pid: int, data_dir: str):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.pid = pid
        self.data_dir = data_dir

    def show(self) -> str:
        return f"rc={self.rc}\nstdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"


def certify(data_dir: str, *args: str, env: dict[str, str] | None = None) -> Run:
    e = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    e.update(
        {
            "STACYVM_DATA_DIR": data_dir,
            "STACYVM_IMAGE_DIR": NATIVE_IMAGE_DIR,
            "STACYVM_AGENT_PATH": AGENT,
            "STACYVM_DEFAULT_IMAGE": IMAGE,
        }
    )
    e.update(env or {})
    p = subprocess.Popen(
        [BIN, "certify", *args],
        env=e,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = p.communicate(timeout=CERTIFY_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"certify did not finish in {CERTIFY_TIMEOUT}s:\n{err[-4000:]}")
    return Run(subprocess.CompletedProcess(p.args, p.returncode, out, err), p.pid, data_dir)


@pytest.fixture(scope="module")
def data_dir():
    check_prerequisites("native")
    d = tempfile.mkdtemp(prefix="svm-cert-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def json_run(data_dir):
    out = os.path.join(data_dir, "report.json")
    run = certify(
        data_dir, "--provider", "native", "--format", "json", "--out", out, "--image", IMAGE
    )
    run.report_path = out
    return run


def test_json_report_structure_and_pass(json_run):
    run = json_run
    assert run.rc == 0, run.show()
    report = json.loads(Path(run.report_path).read_text())
    assert report["provider"] == "native"
    assert report["passed"] is True, run.show()
    assert report["image"] == IMAGE
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", report["stacyvm_version"]), report
    parse_time(report["ran_at"])
    assert isinstance(report["duration_ms"], int) and report["duration_ms"] > 0
    host = report["host"]
    assert set(host) >= {"kernel_release", "distro", "cgroup_version", "cpu_model", "cpu_count", "arch"}
    assert host["kernel_release"] == os.uname().release
    assert host["arch"] == os.uname().machine
    assert host["cgroup_version"] in {"v1", "v2", "hybrid"}
    assert isinstance(host["cpu_count"], int) and host["cpu_count"] >= 1
    assert report["isolation"] == "namespaces"
    assert {"exec", "files", "streaming", "preview"} <= set(report["capabilities"])
    assert isinstance(report["host_checks"], list)
    for h in report["host_checks"]:
        assert set(h) >= {"id", "status", "detail"}, h
        assert h["status"] in {"pass", "warn", "fail", "skip"}, h

    checks = report["checks"]
    ids = [c["id"] for c in checks]
    assert len(ids) == len(set(ids)), ids
    assert ALWAYS <= set(ids), sorted(ALWAYS - set(ids))
    assert {c["group"] for c in checks} == GROUPS
    for c in checks:
        assert set(c) >= {"id", "group", "status", "detail", "duration_ms"}, c
        assert c["id"].startswith(c["group"] + "."), c
        assert c["status"] in {"pass", "fail", "skip"}, c
        assert isinstance(c["duration_ms"], int) and c["duration_ms"] >= 0, c
        assert c["detail"].strip(), c
    failed = [c for c in checks if c["status"] == "fail"]
    assert not failed, failed
    # native claims every capability the suite knows: nothing is skipped
    assert not [c for c in checks if c["status"] == "skip"], checks
    t = report["totals"]
    assert t["passed"] == len(checks) and t["failed"] == 0 and t["skipped"] == 0, t
    # the whole suite stays well inside its budget
    assert report["duration_ms"] < 120_000, report["duration_ms"]


def test_record_lands_in_the_data_dir(json_run):
    run = json_run
    assert run.rc == 0, run.show()
    report = json.loads(Path(run.report_path).read_text())
    path = Path(run.data_dir) / "certifications" / "native.json"
    assert report["record"] == str(path)
    rec = json.loads(path.read_text())
    assert rec["provider"] == "native" and rec["passed"] is True
    assert rec["host"] == report["host"]
    assert rec["stacyvm_version"] == report["stacyvm_version"]
    assert rec["checks_passed"] == report["totals"]["passed"]
    assert rec["checks_failed"] == 0 and rec["checks_skipped"] == 0
    parse_time(rec["ran_at"])
    # no temporary file next to it
    assert sorted(os.listdir(path.parent)) == ["native.json"]


def test_private_server_data_dir_is_removed(json_run):
    run = json_run
    assert run.rc == 0, run.show()
    assert not os.path.exists(f"/tmp/svc-{run.pid}"), "the private server's data dir was left behind"
    with open("/proc/self/mountinfo") as f:
        assert not [ln for ln in f if f"/tmp/svc-{run.pid}/" in ln]


def test_text_and_markdown_reports(data_dir):
    run = certify(data_dir, "--provider", "native")  # image: the configured default
    assert run.rc == 0, run.show()
    text = run.stdout
    assert text.startswith("StacyVM provider certification: native — CERTIFIED"), text[:300]
    assert f"image {IMAGE}" in text
    section = text.split("\nchecks\n", 1)[1].split("\n\n", 1)[0]
    rows = section.splitlines()
    assert all(re.match(r"^  (PASS|FAIL|SKIP)  [a-z_]+\.[a-z0-9_]+ ", ln) for ln in rows), section
    assert len(rows) >= len(ALWAYS), text
    # aligned: every check row has its duration in the same column
    cols = {re.search(r"\d+\.\d\ds", ln).end() for ln in rows}
    assert len(cols) == 1, rows
    assert re.search(r"native: \d+ passed, 0 failed, 0 skipped", text), text
    assert "record: " + str(Path(data_dir) / "certifications" / "native.json") in text

    md_path = os.path.join(data_dir, "report.md")
    run = certify(data_dir, "--provider", "native", "--format", "md", "--out", md_path)
    assert run.rc == 0, run.show()
    assert run.stdout == "", "with --out the report goes to the file only"
    md = Path(md_path).read_text()
    assert md.startswith("### StacyVM certification: `native` — certified"), md[:300]
    assert "| Check | Group | Result | Time | Detail |" in md
    assert "|---|---|---|---:|---|" in md
    check_rows = [ln for ln in md.splitlines() if re.match(r"^\| `([a-z_]+)\.[a-z0-9_]+` \| \1 \| ", ln)]
    assert len(check_rows) >= len(ALWAYS), md
    for ln in check_rows:
        # five cells each: pipes inside details are escaped
        assert len(re.findall(r"(?<!\\)\|", ln)) == 6, ln


def test_unknown_provider_is_a_usage_error(data_dir):
    before = sorted(os.listdir(data_dir))
    run = certify(data_dir, "--provider", "lxc")
    assert run.rc == 2, run.show()
    assert "unknown provider" in run.stderr and '"lxc"' in run.stderr, run.stderr
    assert "native" in run.stderr, "the message lists the known providers"
    assert run.stdout == ""
    assert sorted(os.listdir(data_dir)) == before, "no record for a usage error"


def test_config_and_argument_errors_exit_2(data_dir):
    run = certify(data_dir, "--provider", "native", "--config", "/nonexistent/stacyvm.toml")
    assert run.rc == 2, run.show()
    assert "/nonexistent/stacyvm.toml" in run.stderr, run.stderr
    # the custom provider without a backend URL is not configured
    run = certify(data_dir, "--provider", "custom")
    assert run.rc == 2, run.show()
    assert "custom" in run.stderr, run.stderr
    run = certify(data_dir)  # --provider missing
    assert run.rc == 2, run.show()
    run = certify(data_dir, "--provider", "native", "--format", "yaml")
    assert run.rc == 2, run.show()


def test_providers_endpoint_shows_certification(json_run):
    """A server on the data dir of a certify run reports the provider as
    certified, with the run's time; a record of another host class, or a
    failed one, certifies nothing."""
    from conftest import ServerProcess

    run = json_run
    assert run.rc == 0, run.show()
    path = Path(run.data_dir) / "certifications" / "native.json"
    rec = json.loads(path.read_text())

    def providers(srv: ServerProcess) -> tuple[dict[str, dict], dict]:
        with srv.client() as c:
            listed = {p["name"]: p for p in c.get("/providers").json()}
            one = c.get("/providers/native").json()
        return listed, one

    srv = ServerProcess(data_dir=run.data_dir, provider="native").start()
    try:
        listed, one = providers(srv)
        assert listed["native"]["certified"] is True, listed["native"]
        assert listed["native"]["certified_at"] == rec["ran_at"]
        assert listed["native"]["unenforced"] == []
        # no record for the others on this data dir
        for name, p in listed.items():
            if name != "native":
                assert p["certified"] is False and p["certified_at"] is None, p
        assert one["certification"]["passed"] is True
        assert one["certification"]["valid_for_this_host"] is True
        assert one["certification"]["checks_passed"] == rec["checks_passed"]

        # The same record from a host of another class does not count here.
        other = dict(rec, host=dict(rec["host"], kernel_release="0.0.1-elsewhere"))
        path.write_text(json.dumps(other))
        listed, one = providers(srv)
        assert listed["native"]["certified"] is False, listed["native"]
        assert listed["native"]["certified_at"] is None
        assert one["certification"]["valid_for_this_host"] is False

        # Nor does a failed run on this host.
        path.write_text(json.dumps(dict(rec, passed=False, checks_failed=1)))
        listed, _ = providers(srv)
        assert listed["native"]["certified"] is False
    finally:
        path.write_text(json.dumps(rec))
        srv.stop()
