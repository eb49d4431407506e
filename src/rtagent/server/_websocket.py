"""uvicorn's WebSocket protocol (``websockets-sansio``), with three of its answers to clients fixed.

- A text frame that is not UTF-8: uvicorn logged a traceback for each (any client could fill the
  log), and when the client's close frame came in the same read it failed on closing and dropped
  the connection with no close frame. Here the socket closes with 1007, as it does for JSON no
  decoder should take (``_transport.UNREADABLE``), and waits for the client's close as usual.
- A frame the parser refuses (over ``ws_max_size``: 1009; broken framing: 1002): uvicorn closed
  the TCP connection with the close frame, while the client was still sending, and the reset that
  the client's unread data caused lost it the close frame too. Here the server shuts its side
  (the close frame, then FIN), reads on until the client closes or ``close_timeout``.
- A handshake refused with a response (``_limits.deny``): uvicorn logged "ASGI callable returned
  without completing handshake" at ERROR for every one, though the refusal was complete.

Run the server with ``ws=WebSocketProtocol`` (``serve_main`` does).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

NOT_TEXT = "text frames must be UTF-8"


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent and not _is_utf8(self.frames):
            self.frames = []
            self._close_unreadable()
            return
        super().send_receive_event_to_app()

    def _close_unreadable(self) -> None:
        if self.conn.state is State.OPEN:  # else the client's close came first, and is answered
            self.conn.send_close(1007, NOT_TEXT)
        self._closing(1007, NOT_TEXT)

    def handle_parser_exception(self) -> None:
        if self.close_sent:  # answered already; the parser discards what still comes
            return
        sent = self.conn.close_sent
        self._closing(*((sent.code, sent.reason) if sent is not None else (1002, "")))

    def _closing(self, code: int, reason: str) -> None:
        """Tell the app, send what the connection has for the client, and wait for its close.

        As uvicorn does when the app closes (``send`` of ``websocket.close``), except that an empty
        chunk from ``data_to_send`` (websockets' request to half-close, after a protocol error) is
        honoured: the server's side ends, and the client's close can still be read.
        """
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        chunks = self.conn.data_to_send()
        self.transport.write(b"".join(chunks))
        if b"" in chunks and self.transport.can_write_eof():
            self.transport.write_eof()
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # refused, and the refusal sent


def _is_utf8(frames: list[bytes]) -> bool:
    try:
        b"".join(frames).decode()
    except UnicodeDecodeError:
        return False
    return True
