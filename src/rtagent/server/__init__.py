"""``rtagent serve``: the web side of rtagent, an agent behind AG-UI over SSE and WebSocket.

The app and its endpoints (``_app``), the two transports (``_transport``), rtagent events as AG-UI
events (``_agui``), what stands between the network and the agent (``_limits``, ``_security``,
``_websocket``), the conversations' store (``_store``), worker processes on one database
(``_workers``) and the browser page (``static/``). It uses the core; the core never imports it.
"""

from ._app import create_app, serve_main
from ._limits import Limits

__all__ = ["Limits", "create_app", "serve_main"]
