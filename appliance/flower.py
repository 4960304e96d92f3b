"""Flower for the appliance: a read-only view of workers and tasks, behind a login from OpenBao.

`python -m appliance.flower --address 127.0.0.1 --port N`, started by `appliance up`:

1. logs in to OpenBao with the `flower` AppRole (role_id file and a response-wrapped secret_id,
   as every service), reads its basic-auth credential from `kv/appliance/flower`, then revokes its
   own token: the password lives in this process's memory only, never in argv, the environment,
   a file or a log;
2. connects to Redis as the `flower` ACL user, which can read the queues and the event stream but
   cannot push to the task queue;
3. serves Flower with only the pages and API routes that read (workers, tasks, queue lengths),
   each behind basic auth, `/metrics` included. Every route that would act on the cluster (task
   apply/send/abort/revoke, timeouts, rate limits, worker shutdown, pool and consumer control) is
   answered 403, and Flower's own `read_only` mode is on as a second lock. A route that a newer
   Flower adds is refused until it is listed here (default deny); an unknown path is 401, then
   404. `/healthcheck` stays open: it answers `OK` and nothing else.
4. redacts task events as they arrive, before Flower stores them: arguments, results, exception
   messages and tracebacks never reach its pages, its API or its metrics. Our task messages carry
   only identifiers and ciphertext anyway (`argsrepr="[sealed job]"`); this is the second layer.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import re
import signal
import sys
from collections.abc import Mapping
from typing import Any

import flower.app
from celery import Celery
from flower.app import Flower
from flower.events import Events
from flower.options import options as flower_options
from flower.urls import handlers as flower_handlers
from flower.urls import settings as flower_settings
from flower.views import BaseHandler
from flower.views.monitor import Metrics
from tornado import web
from tornado.routing import URLSpec

from .queue import make_celery
from .services import login
from .settings import ConfigurationError, Settings, get_settings
from .vault import FlowerCredential, read_flower_credential

log = logging.getLogger("appliance.flower")

REDACTED = "[redacted]"

#: Task event fields that may carry what a job computed or received: replaced on arrival.
_REDACTED_FIELDS = ("args", "kwargs", "result", "traceback")
#: A task result that is one of our status words (`'succeeded'`, `'rejected'`, ...) is shown; any
#: other value is redacted.
_STATUS_WORD = re.compile(r"'[a-z_]{1,32}'")
#: An exception repr starts with its type; only the type is kept, never the message.
_EXCEPTION_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,100}")

#: Flower's routes (patterns as in `flower.urls`) that only read. Everything else is refused.
_READ_ROUTES = frozenset(
    {
        "/",
        "/workers",
        "/worker/(.+)",
        "/task/(.+)",
        "/tasks",
        "/tasks/datatable",
        "/broker",
        "/api/workers",
        "/api/tasks",
        "/api/task/types",
        "/api/queues/length",
        "/api/task/info/(.*)",
        "/healthcheck",
        "/static/(.*)",
        "/logout",
    }
)


def redact_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a Celery event with nothing of a job's data: arguments, results, messages."""
    clean = dict(event)
    if not str(clean.get("type", "")).startswith("task-"):
        return clean
    for name in _REDACTED_FIELDS:
        if name in clean:
            clean[name] = REDACTED
    if "result" in event and _STATUS_WORD.fullmatch(str(event["result"])):
        clean["result"] = event["result"]
    if "exception" in clean:
        kind = _EXCEPTION_TYPE.match(str(clean["exception"]))
        clean["exception"] = kind.group(0) if kind else REDACTED
    return clean


class RedactingEvents(Events):  # type: ignore[misc]
    """Flower's event consumer, redacting every event before Flower's state sees it."""

    def on_event(self, event: Mapping[str, Any]) -> None:
        super().on_event(redact_event(event))


class AuthenticatedMetrics(Metrics):  # type: ignore[misc]
    """Flower's Prometheus endpoint, behind the same basic auth as the pages (it names tasks and
    workers, and is open in Flower 2.2)."""

    @web.authenticated
    async def get(self) -> None:
        await super().get()


class Refused(BaseHandler):  # type: ignore[misc]
    """Every route that would act on the cluster: 401 without the login, then always 403."""

    def prepare(self) -> None:
        if not self.current_user:  # Raises 401 when the basic-auth header is missing or wrong.
            raise web.HTTPError(401)
        raise web.HTTPError(
            403, "this Flower is read-only: submit work through the appliance's signed API"
        )


class NotFound(BaseHandler):  # type: ignore[misc]
    """Any other path: 401 without the login, then 404 (an unknown path reveals nothing)."""

    def prepare(self) -> None:
        if not self.current_user:
            raise web.HTTPError(401)
        raise web.HTTPError(404)


def _pattern(handler: Any) -> str:
    if isinstance(handler, URLSpec):
        return str(handler.regex.pattern).removesuffix("$")
    return str(handler[0])


def read_only_handlers(handlers: list[Any] = flower_handlers) -> list[Any]:
    """Flower's routes with every acting route answered by `Refused` and `/metrics` behind auth."""
    routed: list[Any] = []
    for handler in handlers:
        pattern = _pattern(handler)
        if pattern == "/metrics":
            routed.append((pattern, AuthenticatedMetrics))
        elif pattern == ".*":
            routed.append((pattern, NotFound))
        elif pattern in _READ_ROUTES:
            routed.append(handler)
        else:
            routed.append((pattern, Refused))
    return routed


def build(capp: Celery, credential: FlowerCredential, *, address: str, port: int) -> Flower:
    """A configured Flower application (not yet listening)."""
    opts = flower_options
    opts.address = address
    opts.port = port
    opts.basic_auth = [f"{credential.username}:{credential.password}"]
    opts.auth = ""
    opts.read_only = True
    opts.persistent = False
    opts.purge_offline_workers = 60
    opts.enable_events = True
    opts.unix_socket = ""
    opts.url_prefix = ""
    opts.debug = False
    # Flower reads its route table from this module attribute when it builds the application;
    # this process runs one Flower, so replacing it here is the way to choose the routes.
    flower.app.default_handlers = read_only_handlers()
    events = RedactingEvents(
        capp,
        io_loop=_io_loop(),
        db=opts.db,
        persistent=False,
        enable_events=True,
        state_save_interval=0,
        max_workers_in_memory=opts.max_workers,
        max_tasks_in_memory=opts.max_tasks,
    )
    return Flower(
        capp=capp,
        options=opts,
        events=events,
        io_loop=_io_loop(),
        **{**flower_settings, "debug": False},
    )


def _io_loop() -> Any:
    from tornado.ioloop import IOLoop

    return IOLoop.current()


def fetch_credential(settings: Settings) -> FlowerCredential:
    """Log in with the `flower` AppRole, read the login, revoke the token."""
    try:
        session = login(settings)
    except ConfigurationError as exc:
        raise SystemExit(f"Flower needs its AppRole: {exc.detail}") from None
    try:
        return read_flower_credential(session, settings.kv_mount)
    finally:
        session.close()


def main(argv: list[str] | None = None) -> None:
    """Start Flower (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="appliance-flower")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5555)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Flower's access log names URLs only, but stays off as in Flower's own default.
    logging.getLogger("tornado.access").disabled = True
    settings = get_settings()
    credential = fetch_credential(settings)
    app = build(
        make_celery(settings, "appliance-flower"), credential, address=args.address, port=args.port
    )
    atexit.register(app.stop)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port = app.start_http_server()
    log.info("Flower listens on http://%s:%s (read-only, basic auth)", args.address, port)
    try:
        app.start()
    except (KeyboardInterrupt, SystemExit):
        pass


if __name__ == "__main__":
    main()
