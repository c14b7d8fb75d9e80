"""Signed webhooks: POST each instruction event to the FSP's URL (Standard Webhooks).

A 2xx answer is delivery. A timeout, a connection failure, 429 or 5xx is retried with
capped, jittered backoff (honouring ``Retry-After``) for as long as the sender still wants
the message; any other answer is final for that message and reported as a failure, which
the service turns into an alarm. Each FSP has its own queue and worker, so one FSP's
failing endpoint delays nobody else and its messages arrive in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from tenacity import RetryCallState, wait_random_exponential

from dispatchd.channels.retry import while_wanted
from dispatchd.config import WebhookConfig
from dispatchd.metrics import Metrics
from dispatchd.webhooks import signed_headers

log = logging.getLogger("dispatchd.webhook")


@dataclass(frozen=True)
class OutgoingWebhook:
    """One message; ``msg_id`` stays the same on every attempt (receivers de-duplicate)."""

    fsp: str
    url: str
    msg_id: str
    body: bytes
    wanted: Callable[[], bool]
    on_delivered: Callable[[], None]
    on_failed: Callable[[str], None]


class _Retry(Exception):
    def __init__(self, reason: str, after: float | None = None) -> None:
        self.after = after
        super().__init__(reason)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


class WebhookChannel:
    """Run :meth:`run` as a long-lived task; :meth:`enqueue` never blocks."""

    name = "webhook"

    def __init__(self, config: WebhookConfig, *, keys: dict[str, bytes], metrics: Metrics
                 ) -> None:
        self.config = config
        self._keys = keys
        self._metrics = metrics
        self._queues: dict[str, asyncio.Queue[OutgoingWebhook]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._client: httpx.AsyncClient | None = None
        self._in_hand = 0
        self._backoff = wait_random_exponential(multiplier=config.retry_initial_s,
                                                max=config.retry_max_s)

    @property
    def depth(self) -> int:
        return sum(q.qsize() for q in self._queues.values()) + self._in_hand

    def enqueue(self, out: OutgoingWebhook) -> None:
        """Queue ``out``; must be called while :meth:`run` is running."""
        queue = self._queues.get(out.fsp)
        if queue is None:
            assert self._group is not None, "WebhookChannel.run() is not running"
            queue = self._queues[out.fsp] = asyncio.Queue()
            self._group.create_task(self._worker(queue), name=f"dispatchd.webhook[{out.fsp}]")
        queue.put_nowait(out)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.config.max_connections)
        async with httpx.AsyncClient(timeout=self.config.timeout_s, limits=limits) as client, \
                asyncio.TaskGroup() as group:
            self._client, self._group = client, group
            try:
                await asyncio.Event().wait()  # workers are added by enqueue()
            finally:
                self._group = None

    async def _worker(self, queue: asyncio.Queue[OutgoingWebhook]) -> None:
        while True:
            out = await queue.get()
            self._in_hand += 1
            try:
                await self._deliver(out)
            finally:
                self._in_hand -= 1

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        failure = state.outcome.exception() if state.outcome is not None else None
        after = failure.after if isinstance(failure, _Retry) else None
        return min(self.config.retry_max_s, max(backoff, after or 0.0))

    async def _deliver(self, out: OutgoingWebhook) -> None:
        assert self._client is not None
        retrying = while_wanted(out.wanted, retryable=_Retry, wait=self._wait,
                                on_retry=self._metrics.send_failures.labels(self.name).inc)
        async for attempt in retrying:
            with attempt:
                if not out.wanted():
                    return
                headers = signed_headers(self._keys[out.fsp], out.msg_id, out.body)
                headers["content-type"] = "application/json"
                try:
                    response = await self._client.post(out.url, content=out.body,
                                                       headers=headers)
                except httpx.HTTPError as exc:
                    log.warning("webhook %s for %s: %s; retrying", out.msg_id, out.fsp,
                                exc or type(exc).__name__)
                    raise _Retry(str(exc)) from exc
                status = response.status_code
                if 200 <= status < 300:
                    out.on_delivered()
                    return
                if status == 429 or status >= 500:
                    log.warning("webhook %s for %s: HTTP %d; retrying", out.msg_id, out.fsp,
                                status)
                    raise _Retry(f"HTTP {status}", _retry_after(response))
                reason = f"HTTP {status} from {out.url}: {response.text[:200]}"
                log.error("webhook %s for %s refused for good: %s", out.msg_id, out.fsp, reason)
                self._metrics.final_failures.labels(self.name).inc()
                out.on_failed(reason)
