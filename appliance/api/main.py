"""The ASGI entry point: `uvicorn appliance.api.main:app`."""

from ..observability import configure_logging
from ..settings import get_settings
from . import Services, create_app

configure_logging("api")
app = create_app(lambda: Services.from_settings(get_settings()))
