"""The HTTP API: `create_app(build)` and the `Services` it composes at start-up."""

from ._services import Services
from .app import create_app

__all__ = ["Services", "create_app"]
