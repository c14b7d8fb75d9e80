"""Simulated FSP control centres and an SO control room, for the demo and the benchmarks.

A :class:`FspSimulator` is a real MQTT client, as an FSP's control centre would be: it
subscribes to its instruction topic, de-duplicates on (id, revision), and acknowledges on
its ``acks`` topic after a delay its :class:`FspBehaviour` sets (or never).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

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


@dataclass
class FspSimulator:
    fsp: str
    host: str
    port: int
    behaviour: FspBehaviour = field(default_factory=FspBehaviour)
    topic_prefix: str = "flexops/v1"
    received: list[Received] = field(default_factory=list)
    duplicates: int = 0
    out_of_order: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    on_message: Callable[[Received], None] | None = None
    _latest: dict[str, int] = field(default_factory=dict)
    _count: int = 0

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
                    self._handle(client, group, body)

    def _handle(self, client: aiomqtt.Client, group: asyncio.TaskGroup, body: dict[str, Any]
                ) -> None:
        now = dt.datetime.now(dt.UTC)
        accepted = dt.datetime.fromisoformat(body["accepted_at"])
        item = Received(body["id"], body["revision"], body["type"],
                        (now - accepted).total_seconds(), body["attempt"])
        seen = self._latest.get(item.id, -1)
        if item.revision < seen:
            self.out_of_order += 1  # an older revision after a newer one: must never happen
            return
        if item.revision == seen:
            self.duplicates += 1  # a re-send: same id and revision, ignored
            return
        self._latest[item.id] = item.revision
        self.received.append(item)
        if self.on_message is not None:
            self.on_message(item)
        if self.behaviour.ack_delay_s is None:
            return
        self._count += 1
        reject = (self.behaviour.reject_every and body["type"] == "instruction"
                  and self._count % self.behaviour.reject_every == 0)
        ack = {"id": item.id, "revision": item.revision,
               "response": "rejected" if reject else "accepted",
               "reason": self.behaviour.reject_reason if reject else None}
        group.create_task(self._ack(client, ack))

    async def _ack(self, client: aiomqtt.Client, ack: dict[str, Any]) -> None:
        if self.behaviour.ack_delay_s:
            await asyncio.sleep(self.behaviour.ack_delay_s)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(f"{self.topic_prefix}/fsp/{self.fsp}/acks",
                                 json.dumps(ack).encode(), qos=1)


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
