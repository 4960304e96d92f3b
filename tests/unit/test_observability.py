"""The worker's metrics endpoint: token-protected, and no client can hold it for everyone."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from appliance.observability import serve_metrics

TOKEN = b"metrics-token-for-the-test"


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = serve_metrics("127.0.0.1", 0, TOKEN)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def _scrape(url: str, token: bytes = TOKEN) -> httpx.Response:
    # The timeout bounds a hang (the bug), it is not a speed check.
    return httpx.get(url, headers={"Authorization": f"Bearer {token.decode()}"}, timeout=10)


def test_a_scrape_needs_the_token(endpoint: str) -> None:
    assert _scrape(endpoint).status_code == 200
    assert _scrape(endpoint, b"wrong").status_code == 401


def test_idle_connections_do_not_block_a_scrape(endpoint: str) -> None:
    # Issue 12, finding 17: one idle connection to the single-threaded wsgiref server blocked
    # every scrape, for as long as it stayed open.
    host, port = endpoint.split("//")[1].split("/")[0].split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(5)]
    try:
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request, then nothing
        assert _scrape(endpoint).status_code == 200
    finally:
        for conn in idle:
            conn.close()
