"""The ASGI entry point: `uvicorn appliance.api.main:app`."""

from ..settings import get_settings
from .app import Services, create_app

app = create_app(lambda: Services.from_settings(get_settings()))
