"""A bare Celery app on the stack's Redis (admin user, db 1, Redis result backend): the baseline
that `bench/end_to_end.py` compares the appliance with."""

import os

from celery import Celery

_url = os.environ["BENCH_BROKER_URL"]
_tls = {
    "ssl_cert_reqs": 2,
    "ssl_ca_certs": os.environ["BENCH_CA"],
    "ssl_certfile": os.environ["BENCH_CERT"],
    "ssl_keyfile": os.environ["BENCH_KEY"],
}
app = Celery("bare", broker=_url, backend=_url)
app.conf.update(
    broker_use_ssl=_tls,
    redis_backend_use_ssl=_tls,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_default_queue="bare",
    broker_connection_retry_on_startup=True,
)


@app.task(name="bare.add")
def add(a: int, b: int) -> int:
    """The same trivial function the appliance runs."""
    return a + b
