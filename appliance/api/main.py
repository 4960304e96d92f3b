"""The ASGI app. Serve it with `python -m appliance.api` (`__main__`), which adds the read
deadlines and caps of `_server`; plain `uvicorn appliance.api.main:app` has none of them."""

from ..observability import configure_logging
from ..settings import get_settings
from . import Services, create_app

configure_logging("api")
app = create_app(lambda: Services.from_settings(get_settings()))
