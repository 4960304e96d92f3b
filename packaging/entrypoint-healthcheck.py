#!/usr/bin/env python3
"""`appliance-healthcheck SERVICE`: the compose healthcheck of one service (exit 0: healthy).

Stdlib only, loopback only (every service shares the pod's network namespace). Ports come from
the state directory (`stack.json`, which `appliance prepare` writes; the relay's own
`redis/relay.json`), falling back to the stack's defaults.

  redis     answers PING over TLS (with Redis's own `vault` client certificate; NOAUTH counts)
  relay     accepts a TCP connection
  openbao   answers /v1/sys/health (sealed or not: `init` unseals it)
  api       answers 200 on /readyz (Redis, OpenBao and its key reachable)
  flower    answers HTTP at all (its pages want a login)
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DEFAULTS = {"redis": 16379, "bao": 18200, "api": 8000, "flower": 5555}
USAGE = "redis|relay|openbao|api|flower"
STATE = Path(os.environ.get("APPLIANCE_STATE", "/state"))


def port(name: str) -> int:
    try:
        recorded = json.loads((STATE / "stack.json").read_text())["ports"]
    except (OSError, ValueError, KeyError):
        recorded = {}
    return int(recorded.get(name, DEFAULTS[name]))


def relay_port() -> int:
    return int(json.loads((STATE / "redis" / "relay.json").read_text())["port"])


def tcp(port_number: int) -> None:
    socket.create_connection((HOST, port_number), timeout=3).close()


def http_status(port_number: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port_number}{path}", timeout=5) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def redis_ping() -> str:
    tls = STATE / "tls"
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.check_hostname = False  # the server certificate names the stack, not an address
    context.load_cert_chain(str(tls / "client-vault.crt"), str(tls / "client-vault.key"))
    with socket.create_connection((HOST, port("redis")), timeout=3) as raw:
        with context.wrap_socket(raw) as conn:
            conn.sendall(b"PING\r\n")
            reply = conn.recv(64)
    if not reply.startswith((b"+PONG", b"-NOAUTH")):
        raise RuntimeError(f"PING answered {reply[:40]!r}")
    return "serving TLS"


def check(service: str) -> str:
    if service == "redis":
        return redis_ping()
    if service == "relay":
        tcp(relay_port())
        return "accepts connections"
    if service == "openbao":
        status = http_status(port("bao"), "/v1/sys/health?sealedcode=200&uninitcode=200")
        if status != 200:
            raise RuntimeError(f"/v1/sys/health answered {status}")
        return "serving"
    if service == "api":
        status = http_status(int(os.environ.get("APPLIANCE_API_PORT", port("api"))), "/readyz")
        if status != 200:
            raise RuntimeError(f"/readyz answered {status}")
        return "ready"
    if service == "flower":
        http_status(port("flower"), "/healthcheck")
        return "serving"
    raise SystemExit(f"usage: appliance-healthcheck {USAGE} (not {service!r})")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: appliance-healthcheck {USAGE}")
    try:
        print(check(sys.argv[1]))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SystemExit(f"unhealthy: {exc}") from None


if __name__ == "__main__":
    main()
