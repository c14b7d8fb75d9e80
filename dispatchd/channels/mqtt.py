"""MQTT channel: QoS 1 publishes to ``{prefix}/fsp/{fsp}/instructions``, acks from ``.../acks``.

The adapter only moves bytes. A PUBACK means the broker has the message, not that the FSP
has it, so it is reported as a hand-over (``on_delivered``); the engine keeps re-sending
until the FSP's application-level acknowledgement arrives.

The session is persistent (``clean_session=False``, fixed client id), so acknowledgements
that FSPs publish while dispatchd is down are queued by the broker and arrive on reconnect.
The connection is re-established by itself with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from dispatchd.config import MqttConfig
from dispatchd.metrics import Metrics

log = logging.getLogger("dispatchd.mqtt")

NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
"""paho leaves Nagle's algorithm on; small QoS 1 messages would then wait for the peer's
delayed ACK (tens of milliseconds) whenever an earlier one is unacknowledged."""


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    on_published: Callable[[], None] | None = None


class MqttChannel:
    """Run :meth:`run` as a long-lived task; :meth:`enqueue` never blocks."""

    name = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        *,
        password: str | None,
        on_ack: Callable[[str, bytes], None],
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._password = password
        self._on_ack = on_ack
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.connected = asyncio.Event()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def enqueue(self, item: Outgoing) -> bool:
        """Queue a publish; False (and counted) when the queue is full."""
        if self._queue.qsize() >= self.config.max_queue:
            self._metrics.dropped_sends.labels(self.name).inc()
            return False
        self._queue.put_nowait(item)
        return True

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                async with aiomqtt.Client(
                    self.config.host,
                    self.config.port,
                    identifier=self.config.client_id,
                    username=self.config.username,
                    password=self._password,
                    clean_session=False,
                    keepalive=self.config.keepalive_s,
                    max_inflight_messages=self.config.max_inflight,
                    timeout=10,
                    socket_options=NODELAY,
                ) as client:
                    # Many publishes in flight is the normal state here, not a warning.
                    client.pending_calls_threshold = self.config.max_inflight + 1
                    attempt = 0
                    await client.subscribe(f"{self.config.topic_prefix}/fsp/+/acks", qos=1)
                    self.connected.set()
                    self._metrics.mqtt_connected.set(1)
                    log.info("connected to broker %s", self.config.url)
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._receive(client),
                                          name=f"mqtt[{self.config.client_id}].receive")
                        group.create_task(self._publish(client, group),
                                          name=f"mqtt[{self.config.client_id}].publish")
            except* aiomqtt.MqttError as failure:
                log.warning("broker %s: %s", self.config.url, failure.exceptions[0])
            self.connected.clear()
            self._metrics.mqtt_connected.set(0)
            self._metrics.mqtt_reconnects.inc()
            attempt += 1
            await asyncio.sleep(self._rng.uniform(0, min(self.config.reconnect_max_s,
                                                         0.2 * 1.5 ** min(attempt, 20))))

    async def _publish(self, client: aiomqtt.Client, group: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(self.config.max_inflight)
        while True:
            item = await self._queue.get()
            await slots.acquire()
            # Tasks start in creation order, so per-topic order is the queue's order.
            group.create_task(self._publish_one(client, item, slots))

    async def _publish_one(self, client: aiomqtt.Client, item: Outgoing,
                           slots: asyncio.Semaphore) -> None:
        try:
            # No per-publish timeout: a lost connection fails every pending publish anyway,
            # and the timeout wrapper costs a task per message.
            await client.publish(item.topic, item.payload, qos=1, timeout=math.inf)
        except aiomqtt.MqttError:
            self._metrics.send_failures.labels(self.name).inc()
            raise
        finally:
            slots.release()
        if item.on_published is not None:
            item.on_published()

    async def _receive(self, client: aiomqtt.Client) -> None:
        prefix = f"{self.config.topic_prefix}/fsp/"
        async for message in client.messages:
            topic = message.topic.value
            if not (topic.startswith(prefix) and topic.endswith("/acks")):
                continue
            fsp = topic[len(prefix):-len("/acks")]
            payload = message.payload
            body = payload if isinstance(payload, bytes) else str(payload or "").encode()
            self._on_ack(fsp, body)
