"""A 1 GiB download and upload through a real gateway process raise its memory < 64 MiB.

The gateway runs as a child process (`python -m meetinity_gateway serve`), so its resident
memory is its own: the peak (VmHWM) is read from /proc before and after each transfer.
"""
from __future__ import annotations

import hashlib
import sys

import pytest

from tests.servers import TEST_JWT_SECRET, GatewayProcess, session
from tests.upstream import Upstream, pattern, pattern_digest

GIB = 1024 ** 3
LIMIT_KIB = 64 * 1024

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the gateway's memory from /proc (Linux)"
)


@pytest.fixture(scope="module")
def gateway_process():
    with Upstream() as upstream:
        env = {"USER_SERVICE_URL": upstream.url, "JWT_SECRET": TEST_JWT_SECRET,
               "MAX_BODY_SIZE": "1G", "RATE_LIMIT_AUTH": "1000/minute"}
        with GatewayProcess(env=env, threads=4) as gateway:
            # Warm up: imports, pools and the first request's allocations are not streaming.
            assert session().get(gateway.url + "/api/auth/echo").status_code == 200
            yield gateway


def test_1gib_download_streams(gateway_process):
    before = gateway_process.rss_kib("VmHWM")
    digest = hashlib.sha256()
    received = 0
    with session().get(gateway_process.url + f"/api/auth/download?size={GIB}",
                       stream=True, timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_content(1024 * 1024):
            digest.update(chunk)
            received += len(chunk)
    grown = gateway_process.rss_kib("VmHWM") - before
    assert received == GIB
    assert digest.hexdigest() == pattern_digest(GIB)
    assert grown < LIMIT_KIB, f"peak resident memory grew by {grown} KiB"


def test_1gib_upload_streams(gateway_process):
    class Body:
        def __len__(self):
            return GIB

        def __iter__(self):
            return pattern(GIB)

    before = gateway_process.rss_kib("VmHWM")
    response = session().post(gateway_process.url + "/api/auth/upload", data=Body(),
                              headers={"Content-Length": str(GIB)}, timeout=300)
    grown = gateway_process.rss_kib("VmHWM") - before
    assert response.status_code == 200, response.text
    assert response.json() == {"body_length": GIB, "body_sha256": pattern_digest(GIB)}
    assert grown < LIMIT_KIB, f"peak resident memory grew by {grown} KiB"
