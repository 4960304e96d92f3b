"""The broker seam: one Celery configuration for every role (JSON only, TLS, no result backend,
no plaintext) and the one place a publish is attempted and its errors translated."""

from __future__ import annotations

from celery import Celery

from .errors import DependencyUnavailable
from .jobs import JobMessage
from .settings import Settings
from .store import broker_url, keys, ssl_options

TASK_NAME = "appliance.run_job"
BROKER_KEY_PREFIX = keys.BROKER


def make_celery(settings: Settings, name: str = "appliance") -> Celery:
    """A Celery app for this process's role (API: producer only; worker: consumer)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(
        broker_url=broker_url(settings),
        broker_use_ssl=ssl_options(settings),
        broker_transport_options={
            "global_keyprefix": BROKER_KEY_PREFIX,
            # A message whose worker died is delivered again once it has been unacknowledged
            # this long; the sweep that finds it runs every few seconds.
            "visibility_timeout": settings.visibility_timeout_seconds,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_seconds // 4)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        # JSON only, everywhere: a pickled message is refused before it is deserialized.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Results never go through Celery: they are sealed into our own keys.
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def publish(
    app: Celery, settings: Settings, message: JobMessage, request_id: str | None = None
) -> None:
    """Enqueue a signed job message, or raise DependencyUnavailable (the job was not queued).

    Flower and task events see only `[sealed job]`. The request id (not secret) rides in a
    header so logs can follow the job.
    """
    try:
        app.send_task(
            TASK_NAME,
            args=[message.to_wire()],
            task_id=message.task_id,
            queue=settings.queue_name,
            argsrepr="[sealed job]",
            kwargsrepr="{}",
            headers={"appliance_request_id": request_id} if request_id else None,
        )
    except Exception as exc:  # kombu raises many unrelated types; the job was not queued.
        raise DependencyUnavailable("the broker is unreachable") from exc
