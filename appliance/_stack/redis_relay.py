"""A loopback TLS relay that lets OpenBao's Redis database plugin reach a Redis that requires
client certificates.

The plugin (`redis-database-plugin`) speaks TLS but cannot present a client certificate (its
configuration has `tls`, `insecure_tls` and `ca_cert` only); our Redis runs with
`tls-auth-clients yes`, and making certificates optional would drop that layer for every user.
So the plugin connects here instead: this relay serves TLS with the stack's server certificate,
reads the connection's first command, and forwards the connection, presenting the `vault` client
certificate, only when that command authenticates as the `vault` Redis user (`AUTH vault …` or
`HELLO … AUTH vault …`). Anything else is closed before a byte reaches Redis, so the relay grants
nobody a certificate-less login as any other user; Redis still checks the password.

    python -m appliance._stack.redis_relay LISTEN_PORT REDIS_PORT TLS_DIR
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from pathlib import Path

from ..errors import ApplianceError
from .pki import Pki
from .procs import (
    StackError,
    free_port,
    read_pid_file,
    start_detached,
    stop_by_pid_file,
    wait_for_port,
)

HOST = "127.0.0.1"
RELAYED_USER = b"vault"
#: The first command must arrive whole within this many bytes and seconds.
_FIRST_COMMAND_LIMIT = 4096
_FIRST_COMMAND_SECONDS = 5.0


class Refused(ApplianceError):
    """Raised when a connection's first command is not a login as the relayed user."""

    code, title = "relay_refused", "Relay refused the connection"


async def read_command(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes]:
    """One RESP array of bulk strings: its items and its raw bytes; raise Refused otherwise."""
    raw = bytearray()

    async def line() -> bytes:
        data = await reader.readuntil(b"\r\n")
        raw.extend(data)
        if len(raw) > _FIRST_COMMAND_LIMIT:
            raise Refused("first command too long")
        return data[:-2]

    header = await line()
    if not header.startswith(b"*") or not header[1:].isdigit():
        raise Refused("not a RESP array")
    items = []
    for _ in range(int(header[1:])):
        size = await line()
        if not size.startswith(b"$") or not size[1:].isdigit():
            raise Refused("not a bulk string")
        length = int(size[1:])
        if len(raw) + length + 2 > _FIRST_COMMAND_LIMIT:
            raise Refused("first command too long")
        data = await reader.readexactly(length + 2)
        raw.extend(data)
        items.append(data[:-2])
    return items, bytes(raw)


def logs_in_as_relayed_user(command: list[bytes]) -> bool:
    """True for `AUTH vault PASSWORD` or `HELLO VERSION [...] AUTH vault PASSWORD [...]`."""
    words = [c.upper() for c in command]
    if len(command) == 3 and words[0] == b"AUTH":
        return command[1] == RELAYED_USER
    if words and words[0] == b"HELLO" and b"AUTH" in words:
        at = words.index(b"AUTH")
        return len(command) > at + 2 and command[at + 1] == RELAYED_USER
    return False


class Relay:
    """The relay's listener and upstream TLS settings."""

    def __init__(self, redis_port: int, pki: Pki) -> None:
        self.redis_port = redis_port
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_tls.load_cert_chain(pki.server_cert, pki.server_key)
        self.upstream_tls = ssl.create_default_context(cafile=str(pki.ca))
        cert, key = pki.client("vault")
        self.upstream_tls.load_cert_chain(cert, key)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command, raw = await asyncio.wait_for(read_command(reader), _FIRST_COMMAND_SECONDS)
            if not logs_in_as_relayed_user(command):
                raise Refused("not a login as the relayed user")
            up_reader, up_writer = await asyncio.open_connection(
                HOST, self.redis_port, ssl=self.upstream_tls, server_hostname=HOST
            )
        except (
            Refused,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            OSError,
            ssl.SSLError,
        ):
            writer.close()
            return
        up_writer.write(raw)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(self.handle, HOST, port, ssl=self.server_tls)
        async with server:
            await server.serve_forever()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, ssl.SSLError):
            sink.close()


def relay_port(state_dir: Path) -> int:
    """The relay's port: picked free on first start, then kept (OpenBao's config names it)."""
    path = state_dir / "redis" / "relay.json"
    if path.is_file():
        return int(json.loads(path.read_text())["port"])
    port = free_port(HOST)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(json.dumps({"port": port}))
    return port


def start_relay(state_dir: Path, redis_port: int, pki: Pki) -> int:
    """Start this state's relay (idempotent) and return the port it listens on."""
    port = relay_port(state_dir)
    workdir = state_dir / "redis"
    pid_file = workdir / "relay.pid"
    if read_pid_file(pid_file) is not None:
        return port
    pid = start_detached(
        [
            sys.executable,
            "-m",
            "appliance._stack.redis_relay",
            str(port),
            str(redis_port),
            str(pki.dir),
        ],
        log_file=workdir / "relay.log",
        pid_file=pid_file,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        cwd=workdir,
    )
    try:
        wait_for_port(HOST, port, pid=pid)
    except StackError as exc:
        stop_relay(state_dir)
        raise StackError(f"{exc}; see {workdir / 'relay.log'}") from exc
    return port


def stop_relay(state_dir: Path) -> bool:
    """Stop this state's relay if it runs; True when it was running."""
    return stop_by_pid_file(state_dir / "redis" / "relay.pid")


def main(argv: list[str]) -> None:
    listen_port, redis_port, tls_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    asyncio.run(Relay(redis_port, Pki(tls_dir)).serve(listen_port))


if __name__ == "__main__":
    main(sys.argv[1:])
