"""The Celery app Flower loads (`celery -A appliance.worker.flower flower`), as the `flower`
Redis user: it can watch queues and events but cannot enqueue tasks."""

from ..settings import get_settings
from .celery_config import make_celery

app = make_celery(get_settings(), "appliance-flower")
