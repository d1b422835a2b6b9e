"""The splitexport server: trains segment B over HTTP (FastAPI), see docs/protocol.md."""

from ._app import create_app
from ._listen import listen
from ._settings import ServerSettings
from ._state import ServerState

__all__ = ["ServerSettings", "ServerState", "create_app", "listen"]
