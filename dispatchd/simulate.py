"""Simulated FSP control centres and an SO control room, for the demo and the benchmarks.

A :class:`FspSimulator` is a real MQTT client, as an FSP's control centre would be: it
subscribes to its instruction topic, de-duplicates on (id, revision), and acknowledges on
its ``acks`` topic after a delay its :class:`FspBehaviour` sets (or never). A
:class:`StreamFspSimulator` does the same on the websocket stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import httpx
import uvicorn
import websockets.asyncio.client
import websockets.exceptions

from dispatchd.channels.mqtt import NODELAY


@dataclass(frozen=True)
class FspBehaviour:
    ack_delay_s: float | None = 0.0
    """Seconds before acknowledging; None never acknowledges."""
    reject_every: int = 0
    """Reject every n-th instruction (0: never) with ``reject_reason``."""
    reject_reason: str = "assets unavailable: site maintenance"


@dataclass
class Received:
    id: str
    revision: int
    type: str
    latency_s: float
    """Wall clock: received minus the instruction's ``accepted_at``."""
    attempt: int


@dataclass(kw_only=True)
class ControlCentre:
    """What every simulated control centre does with what it receives, whatever the channel:
    de-duplicate on (id, revision), count anything out of order, and decide the answer."""

    fsp: str
    behaviour: FspBehaviour = field(default_factory=FspBehaviour)
    received: list[Received] = field(default_factory=list)
    duplicates: int = 0
    out_of_order: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    on_message: Callable[[Received], None] | None = None
    _latest: dict[str, int] = field(default_factory=dict)
    _count: int = 0

    def take(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Record one instruction message; returns the acknowledgement to send, if any."""
        now = dt.datetime.now(dt.UTC)
        accepted = dt.datetime.fromisoformat(body["accepted_at"])
        item = Received(body["id"], body["revision"], body["type"],
                        (now - accepted).total_seconds(), body.get("attempt", 0))
        seen = self._latest.get(item.id, -1)
        if item.revision < seen:
            self.out_of_order += 1  # an older revision after a newer one: must never happen
            return None
        if item.revision == seen:
            self.duplicates += 1  # a re-send: same id and revision, ignored
            return None
        self._latest[item.id] = item.revision
        self.received.append(item)
        if self.on_message is not None:
            self.on_message(item)
        if self.behaviour.ack_delay_s is None:
            return None
        self._count += 1
        reject = (self.behaviour.reject_every and body["type"] == "instruction"
                  and self._count % self.behaviour.reject_every == 0)
        return {"id": item.id, "revision": item.revision,
                "response": "rejected" if reject else "accepted",
                "reason": self.behaviour.reject_reason if reject else None}


@dataclass(kw_only=True)
class FspSimulator(ControlCentre):
    """A control centre on MQTT: subscribes to its topic, answers on its ``acks`` topic."""

    host: str
    port: int
    topic_prefix: str = "flexops/v1"

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Connect, subscribe and answer until cancelled."""
        base = f"{self.topic_prefix}/fsp/{self.fsp}"
        async with aiomqtt.Client(self.host, self.port, identifier=f"sim-{self.fsp}",
                                  clean_session=True, socket_options=NODELAY) as client:
            await client.subscribe(f"{base}/instructions", qos=1)
            await client.subscribe(f"{base}/errors", qos=1)
            if ready is not None:
                ready.set()
            async with asyncio.TaskGroup() as group:
                async for message in client.messages:
                    body = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    if message.topic.value.endswith("/errors"):
                        self.errors.append(body)
                        continue
                    ack = self.take(body)
                    if ack is not None:
                        group.create_task(self._ack(client, ack))

    async def _ack(self, client: aiomqtt.Client, ack: dict[str, Any]) -> None:
        if self.behaviour.ack_delay_s:
            await asyncio.sleep(self.behaviour.ack_delay_s)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(f"{self.topic_prefix}/fsp/{self.fsp}/acks",
                                 json.dumps(ack).encode(), qos=1)


@dataclass(kw_only=True)
class StreamFspSimulator(ControlCentre):
    """A control centre on the websocket stream: resumes after the last event it saw and
    answers on the same socket."""

    url: str
    """The service's base URL (http://…)."""
    token: str
    last_seq: int = 0

    async def run(self, ready: asyncio.Event | None = None) -> None:
        stream = self.url.replace("http://", "ws://").replace("https://", "wss://")
        while True:
            try:
                async with websockets.asyncio.client.connect(
                        f"{stream}/v1/stream?since={self.last_seq}", compression=None,
                        additional_headers={"Authorization": f"Bearer {self.token}"}) as ws:
                    json.loads(await ws.recv())  # the hello frame
                    if ready is not None:
                        ready.set()
                    async with asyncio.TaskGroup() as group:
                        async for frame in ws:
                            self._frame(ws, group, json.loads(frame))
            except (OSError, websockets.exceptions.WebSocketException):
                await asyncio.sleep(0.5)  # dropped: resume from last_seq

    def _frame(self, ws: Any, group: asyncio.TaskGroup, body: dict[str, Any]) -> None:
        if "reply" in body:
            if body.get("status") != 200:
                self.errors.append(body)
            return
        self.last_seq = body["seq"]
        message = body.get("message")
        if message is None:
            return
        ack = self.take(message)
        if ack is not None:
            group.create_task(self._ack(ws, ack))

    async def _ack(self, ws: Any, ack: dict[str, Any]) -> None:
        if self.behaviour.ack_delay_s:
            await asyncio.sleep(self.behaviour.ack_delay_s)
        with contextlib.suppress(websockets.exceptions.WebSocketException):
            await ws.send(json.dumps(ack))


@dataclass(kw_only=True)
class WebhookFspSimulator(ControlCentre):
    """A control centre taking webhooks: an HTTP server (Starlette on uvicorn) that verifies
    each signature with :class:`dispatchd.webhooks.Verifier` and answers over the HTTP API."""

    secret: str
    api_url: str
    token: str
    port: int = 0
    refused: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/flexops"

    async def run(self, ready: asyncio.Event | None = None) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        from dispatchd.localstack import free_port
        from dispatchd.webhooks import Replayed, VerificationError, Verifier

        verifier = Verifier(self.secret)
        self.port = self.port or free_port()
        async with httpx.AsyncClient(base_url=self.api_url, timeout=10) as api, \
                asyncio.TaskGroup() as group:

            async def receive(request: Request) -> Response:
                try:
                    event = verifier.verify(await request.body(), dict(request.headers))
                except Replayed:
                    return Response(status_code=200)
                except VerificationError as exc:
                    self.refused += 1
                    return Response(exc.reason, status_code=400)
                ack = self.take(event["data"])
                if ack is not None:
                    group.create_task(self._ack(api, ack))
                return Response(status_code=204)

            app = Starlette(routes=[Route("/flexops", receive, methods=["POST"])])
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", lifespan="off"))
            serving = group.create_task(server.serve())
            while not server.started and not serving.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if ready is not None:
                ready.set()
            try:
                await serving
            finally:
                server.should_exit = True

    async def _ack(self, api: httpx.AsyncClient, ack: dict[str, Any]) -> None:
        if self.behaviour.ack_delay_s:
            await asyncio.sleep(self.behaviour.ack_delay_s)
        response = await api.post(f"/v1/instructions/{ack['id']}/ack", json=ack,
                                  headers={"Authorization": f"Bearer {self.token}"})
        if response.status_code != 200:
            self.errors.append(response.json())


async def every_instruction(url: str, tokens: Iterable[str]) -> AsyncIterator[dict[str, Any]]:
    """Every instruction each token may see, paging through ``GET /v1/instructions`` until
    the cursor stops moving."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for token in tokens:
            cursor = 0
            while True:
                page = (await client.get("/v1/instructions",
                                         params={"since": cursor, "limit": 1000},
                                         headers={"Authorization": f"Bearer {token}"})).json()
                for item in page["instructions"]:
                    yield item
                if page["cursor"] == cursor:
                    break
                cursor = page["cursor"]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


async def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


async def paced(count: int, rate: float | None) -> AsyncIterator[int]:
    """Yield 0 … count-1, the i-th no earlier than i/rate seconds from the first (as fast
    as possible when ``rate`` is None)."""
    started = time.perf_counter()
    for i in range(count):
        if rate is not None:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield i
