"""`python -m appliance.api --host HOST --port PORT`: the API under uvicorn, with the read
deadlines, the concurrency limit and the connection cap of `_server` (issue 12, finding 11).

`appliance up` starts the API this way. Plain `uvicorn appliance.api.main:app` would serve the
same app without any of them: do not deploy it so.
"""

from __future__ import annotations

import argparse
import resource

import uvicorn

from ..settings import get_settings
from ._server import ReadLimits, protocol


def main(argv: list[str] | None = None) -> None:
    """Serve the API on HOST:PORT until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m appliance.api")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
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
    )
    uvicorn.Server(config).run()


def _allow_files(wanted: int) -> None:
    """Raise this process's open-file limit towards `wanted` (a socket is a file), within the
    hard limit: below it, accept() would fail with EMFILE before the connection cap applies."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


if __name__ == "__main__":
    main()
