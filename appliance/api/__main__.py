"""`python -m appliance.api --host HOST --port PORT [--tls-cert FILE --tls-key FILE]`: the API
under uvicorn, with the read deadlines, the concurrency limit and the connection cap of
`_server` (issue 12, finding 11); over TLS 1.2 or later when given a certificate (issue 15).

`appliance up` starts the API this way. Plain `uvicorn appliance.api.main:app` would serve the
same app without any of them: do not deploy it so.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
from collections.abc import Callable
from pathlib import Path

import uvicorn

from ..settings import get_settings
from ._server import ReadLimits, handshake_bounded_loop, protocol


def main(argv: list[str] | None = None) -> None:
    """Serve the API on HOST:PORT until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m appliance.api")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    settings = get_settings()
    limits = ReadLimits.from_settings(settings)
    _allow_files(limits.max_connections + 256)
    from .main import app  # Configures the API's JSON logging; uvicorn must not redo it.

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        # The protocol limits requests in progress and connections itself (see `_server`).
        http=protocol(limits),
        # The source of a request (audited, and the key unauthenticated failures are counted
        # under) is the socket's peer unless proxies are configured: uvicorn's default trusts
        # X-Forwarded-For from 127.0.0.1, where every local caller may write it (red team of
        # issue 12, item 3). `forwarded_allow_ips` is always given: unset, uvicorn reads it
        # from FORWARDED_ALLOW_IPS, which is no setting of ours.
        proxy_headers=bool(settings.api_trusted_proxies),
        forwarded_allow_ips=list(settings.api_trusted_proxies),
        server_header=False,
        access_log=False,
        log_config=None,
        log_level="info",
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        ssl_context_factory=_tls_context if args.tls_cert else None,
    )
    server = uvicorn.Server(config)
    if args.tls_cert is None:
        server.run()
        return
    with asyncio.Runner(loop_factory=handshake_bounded_loop(limits.header_seconds)) as runner:
        runner.run(server.serve())


def _tls_context(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's server context (the certificate and key loaded), refusing TLS below 1.2."""
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _allow_files(wanted: int) -> None:
    """Raise this process's open-file limit towards `wanted` (a socket is a file), within the
    hard limit: below it, accept() would fail with EMFILE before the connection cap applies."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


if __name__ == "__main__":
    main()
