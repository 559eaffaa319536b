"""The native provider pulls images from an OCI registry on first use, and
never again for the next sandbox of the same image (issue: native provider,
image store). The registry is Debian's `docker-registry` on 127.0.0.1, filled
with `skopeo` from the local Docker test image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import IMAGE, only_providers, run_in

pytestmark = only_providers("native")

REGISTRY_SH = os.path.join(
    os.path.dirname(__file__), "..", "..", "crates", "stacyvm-images", "tests", "registry.sh"
)


@pytest.fixture(scope="module")
def registry():
    work = tempfile.mkdtemp(prefix="svm-reg-")
    out = subprocess.run(
        ["bash", REGISTRY_SH, "start", work], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"registry.sh start failed: {out.stdout}\n{out.stderr}"
    fields = dict(re.findall(r"^(REGISTRY_\w+)=(\S+)$", out.stdout, re.M))
    addr = fields.get("REGISTRY_ADDR")
    assert addr and addr.startswith("127.0.0.1:"), out.stdout
    try:
        ref = f"{addr}/e2e/python:bookworm"
        push = subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
             f"docker-daemon:{IMAGE}", f"docker://{ref}"],
            capture_output=True, text=True, timeout=300,
        )
        assert push.returncode == 0, f"skopeo push failed: {push.stderr}"
        yield {"addr": addr, "ref": ref, "dir": work}
    finally:
        subprocess.run(["bash", REGISTRY_SH, "stop", work], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def test_server_pulls_on_first_use_only(make_server, sandboxes, registry, tmp_path):
    store = tmp_path / "images"  # an empty image store
    srv = make_server(env={"STACYVM_IMAGE_DIR": str(store)})
    ref = registry["ref"]

    first = sandboxes.create(srv, {"image": ref, "provider": "native"})
    assert first["image"] == ref
    with srv.client() as c:
        assert run_in(c, first["id"], "python3 -c 'print(40 + 2)'")["stdout"] == "42\n"
    log = srv.log_text()
    assert "pulling image" in log and "image pulled" in log, srv.log_tail()
    pulls = log.count("image pulled")

    # Same image again, and again with the registry gone: no pull at all.
    second = sandboxes.create(srv, {"image": ref, "provider": "native"})
    subprocess.run(["bash", REGISTRY_SH, "stop", registry["dir"]], capture_output=True, timeout=60)
    third = sandboxes.create(srv, {"image": ref, "provider": "native"})
    with srv.client() as c:
        for sb in (second, third):
            assert run_in(c, sb["id"], "python3 -c 'print(6 * 7)'")["stdout"] == "42\n"
    assert srv.log_text().count("image pulled") == pulls, "the image was pulled again"

    # An image the registry does not have is a clear provider error.
    with srv.client() as c:
        r = c.post("/sandboxes", json={"image": f"{registry['addr']}/e2e/none:latest", "provider": "native"})
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "provider_error"
