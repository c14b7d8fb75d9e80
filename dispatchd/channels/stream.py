"""Websocket streams: each client reads its principal's feed from a number onwards.

The engine keeps every principal's feed (numbered from 1, rebuilt from the journal on
start-up); a connection is just a reader of it. Each connection has one writer loop that
sends every feed entry after the one it last sent and then sleeps until the hub wakes it,
so nothing is queued per connection: a client that stops reading blocks only its own
writer, once the bounded transport buffer is full, and is dropped when a send makes no
progress for ``send_timeout_s``. It resumes with ``?since=`` the last number it saw.

The engine holds a feed's events for a while (``service.hold_finished_s``), not forever.
A client that asks for, or falls behind to, events no longer held gets one
``{"event": "gap", "from": F, "to": T}`` frame for the numbers it missed and then the
events that follow; ``GET /v1/instructions/{id}`` still answers for every instruction.

Frames are JSON text. The first is ``{"event": "hello", ...}`` (no ``seq``); then one
frame per feed entry (``seq``, ``event``, ``id``, ``revision``, ``at`` ...). FSP clients may
send acknowledgements (the HTTP ack body with ``id``); each gets a ``{"reply": "ack", ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from dispatchd.metrics import Metrics

log = logging.getLogger("dispatchd.stream")

FeedLength = Callable[[], int]
FeedEvent = Callable[[int], dict[str, Any]]
Reply = Callable[[str], Awaitable[dict[str, Any]]]
Sent = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class _Connection:
    next: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    replies: list[dict[str, Any]] = field(default_factory=list)


def _frame(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


class StreamHub:
    """The connected stream clients, by (role, principal)."""

    def __init__(self, metrics: Metrics, *, send_timeout_s: float) -> None:
        self._metrics = metrics
        self._send_timeout = send_timeout_s
        self._connections: dict[tuple[str, str], set[_Connection]] = {}

    def connected(self, role: str) -> int:
        return sum(len(c) for (r, _), c in self._connections.items() if r == role)

    def notify(self, role: str, principal: str) -> None:
        """The feed of ``principal`` has grown: wake its clients' writers."""
        for conn in self._connections.get((role, principal), ()):
            conn.wake.set()

    async def serve(self, ws: WebSocket, *, role: str, principal: str, since: int,
                    first: FeedLength, length: FeedLength, event: FeedEvent,
                    reply: Reply | None, sent: Sent | None) -> None:
        """Stream the feed after ``since`` to the accepted ``ws`` until either side ends.

        ``reply`` answers a text frame from the client (None: frames are refused);
        ``sent`` is told of each feed event once it is written to the socket.
        """
        conn = _Connection(next=since + 1)
        key = (role, principal)
        self._connections.setdefault(key, set()).add(conn)
        self._metrics.stream_clients.labels(role).inc()
        try:
            await ws.send_text(_frame({"event": "hello", "role": role, "principal": principal,
                                       "since": since, "latest": length()}))
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(ws, conn, reply),
                                           name=f"dispatchd.stream[{principal}].read")
                writer = group.create_task(self._write(ws, conn, first, length, event, sent),
                                           name=f"dispatchd.stream[{principal}].write")
                await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
                reader.cancel()
                writer.cancel()
        except* (WebSocketDisconnect, ConnectionError):
            pass
        except* TimeoutError:
            self._metrics.stream_dropped.labels(role, "send_timeout").inc()
            log.warning("dropped %s stream of %s: no send progress for %.1f s", role, principal,
                        self._send_timeout)
        finally:
            self._connections[key].discard(conn)
            if not self._connections[key]:
                del self._connections[key]
            self._metrics.stream_clients.labels(role).dec()

    async def _send(self, ws: WebSocket, body: dict[str, Any]) -> None:
        await asyncio.wait_for(ws.send_text(_frame(body)), self._send_timeout)

    async def _write(self, ws: WebSocket, conn: _Connection, first: FeedLength,
                     length: FeedLength, event: FeedEvent, sent: Sent | None) -> None:
        while True:
            conn.wake.clear()
            while conn.replies:
                await self._send(ws, conn.replies.pop(0))
            while conn.next <= length():
                held = first()
                if conn.next < held:
                    await self._send(ws, {"event": "gap", "from": conn.next, "to": held - 1,
                                          "reason": "these events are no longer held; GET "
                                          "/v1/instructions/{id} answers for every "
                                          "instruction"})
                    conn.next = held
                    continue
                body = event(conn.next)
                await self._send(ws, body)
                conn.next += 1
                if sent is not None:
                    sent(body)
            await conn.wake.wait()

    async def _read(self, ws: WebSocket, conn: _Connection, reply: Reply | None) -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                answer: dict[str, Any] = {"reply": "error", "status": 400,
                                          "error": "frames are JSON text"}
            elif reply is None:
                answer = {"reply": "error", "status": 405,
                          "error": "this stream takes no messages"}
            else:
                answer = await reply(text)
            conn.replies.append(answer)
            conn.wake.set()
