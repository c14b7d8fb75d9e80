"""dispatchd: the engine, the journal and the channels, run in one TaskGroup.

Requests for one instruction id are serialised (decide → journal → apply); different ids
run concurrently and share journal transactions. Nothing is sent before it is journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import uvicorn
from pydantic import ValidationError

from contracts.io import ContractBook
from dispatchd.channels.mqtt import MqttChannel, Outgoing
from dispatchd.config import Config, mqtt_password, token_digest
from dispatchd.core.engine import (
    Action,
    Decision,
    Dispatcher,
    EventRecorded,
    Existing,
    InstructionView,
    Persist,
    Record,
    Refused,
    RetryPolicy,
    RevisionRecorded,
    Send,
)
from dispatchd.core.instruction import Ack, AmendRequest, CancelRequest, InstructionRequest
from dispatchd.core.lifecycle import Event
from dispatchd.core.validation import Problem
from dispatchd.journal import Journal, JournalError, JournalSettings
from dispatchd.metrics import Metrics

log = logging.getLogger("dispatchd")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``role`` is ``so`` or ``fsp``."""

    role: str
    id: str


class Refusal(Exception):
    """A request the service will not carry out; the caller's fault (4xx) or overload (503)."""

    def __init__(self, status: int, problems: tuple[Problem, ...], *,
                 retry_after: int | None = None) -> None:
        self.status = status
        self.problems = problems
        self.retry_after = retry_after
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))


class _Stopped(Exception):
    pass


class Service:
    """One dispatchd. Call :meth:`run`; it returns when :meth:`stop` is called."""

    def __init__(self, config: Config, book: ContractBook, *, clock: Clock = utcnow,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.book = book
        self.clock = clock
        self.metrics = Metrics()
        rng = rng or random.Random()
        self.engine = Dispatcher(
            book,
            retry=RetryPolicy(initial_s=config.delivery.retry_initial_s,
                              multiplier=config.delivery.retry_multiplier,
                              max_s=config.delivery.retry_max_s),
            rng=rng,
        )
        self.journal = Journal(
            JournalSettings(config.journal.path, config.journal.synchronous,
                            config.journal.max_batch, config.journal.max_queue),
            on_commit=self._committed,
        )
        self.mqtt = MqttChannel(config.mqtt, password=mqtt_password(config.mqtt),
                                on_ack=self._mqtt_ack, metrics=self.metrics, rng=rng)
        self._callers = {p.token_sha256: Caller(p.role, p.id) for p in config.auth.principals}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: dt.datetime | None = None
        self._server: uvicorn.Server | None = None
        self.ready = asyncio.Event()
        self.port: int | None = None
        self.replayed = 0

    @property
    def base_url(self) -> str:
        """Base of status links: ``service.public_url``, else the address actually bound."""
        if self.config.service.public_url:
            return self.config.service.public_url.rstrip("/")
        return f"http://{self.config.service.host}:{self.port or self.config.service.port}"

    # ------------------------------------------------------------------ running

    def _committed(self, seconds: float, records: int) -> None:
        self.metrics.journal_commit_seconds.observe(seconds)
        self.metrics.journal_batch_records.observe(records)

    def _recover(self) -> list[Action]:
        now = self.clock()
        for seq, record in self.journal.replay():
            self.engine.apply(record, seq, now, replay=True)
            self.replayed += 1
        actions = self.engine.recover(now)
        log.info("replayed %d journal records: %d instructions, %d to re-send",
                 self.replayed, len(self.engine), len(actions))
        return actions

    async def run(self) -> None:
        """Replay the journal, then serve until :meth:`stop` (or a fatal error)."""
        from dispatchd.api import create_app  # the API depends on this module

        actions = self._recover()
        self.metrics.watch(
            states=lambda: {s.value: n for s, n in self.engine.state_counts().items()},
            journal_depth=lambda: self.journal.depth,
            send_depth=lambda: self.mqtt.depth,
            unacknowledged=self.engine.unacknowledged,
        )
        sock = socket.create_server((self.config.service.host, self.config.service.port),
                                    reuse_port=False, backlog=2048)
        self.port = sock.getsockname()[1]
        server = self._server = uvicorn.Server(uvicorn.Config(
            create_app(self), log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=5,
        ))
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.journal.run(), name="dispatchd.journal")
                group.create_task(self.mqtt.run(), name="dispatchd.mqtt")
                group.create_task(self._serve_http(server, sock), name="dispatchd.http")
                self._execute(actions)
        except* _Stopped:
            pass
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for task in list(self._background):
                task.cancel()
            self.journal.close()
            sock.close()

    async def _serve_http(self, server: uvicorn.Server, sock: socket.socket) -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # uvicorn exposes only a flag for "started"; poll it briefly.
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self.ready.set()
        log.info("listening on http://%s:%d", self.config.service.host, self.port)
        await serving
        raise _Stopped

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True

    def _arm_timer(self) -> None:
        """Make sure the loop calls :meth:`_fire_timers` at the engine's next wake-up."""
        wake = self.engine.next_wakeup()
        if wake is None or (self._timer_at is not None and self._timer_at <= wake):
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, (wake - self.clock()).total_seconds())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire_timers)
        self._timer_at = wake

    def _fire_timers(self) -> None:
        self._timer = self._timer_at = None
        self._execute(self.engine.tick(self.clock()))
        self._arm_timer()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ actions

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action)
            elif isinstance(action, Persist):
                self._spawn(self._journal_quietly(action.record))
        self._arm_timer()

    def _send(self, send: Send) -> None:
        inst = send.instruction
        self.metrics.sends.labels("mqtt", "first" if send.attempt == 0 else "retry").inc()
        payload = json.dumps(send.payload(), separators=(",", ":")).encode()
        self.mqtt.enqueue(Outgoing(
            self.config.mqtt.instructions_topic(inst.fsp), payload,
            partial(self._handed_over, inst.id, inst.revision, "mqtt", send)))

    def _handed_over(self, instruction_id: str, revision: int, channel: str, send: Send
                     ) -> None:
        now = self.clock()
        if send.attempt == 0:
            self.metrics.delivered_seconds.labels(channel).observe(
                (now - send.accepted_at).total_seconds())
        record = self.engine.delivered(instruction_id, revision, channel, now)
        if record is not None:
            self._spawn(self._journal_quietly(record))

    async def _journal_quietly(self, record: EventRecorded) -> None:
        """Journal and apply an event the service produced itself (no one waits for it)."""
        try:
            await self._journal_and_apply(record)
        except JournalError as exc:
            log.error("could not journal %s of %s rev %d: %s", record.event.value, record.id,
                      record.revision, exc)

    async def _journal_and_apply(self, record: Record) -> None:
        seq = await self.journal.append(record)
        now = self.clock()
        actions = self.engine.apply(record, seq, now)
        view = self.engine.view(record.id if isinstance(record, EventRecorded)
                                else record.instruction.id)
        if view is not None:
            self._observe(record, view, now)
        self._execute(actions)

    def _observe(self, record: Record, view: InstructionView, now: dt.datetime) -> None:
        if isinstance(record, RevisionRecorded):
            self.metrics.transitions.labels(view.latest.state.value).inc()
            return
        rev = view.revisions[record.revision]
        if record.event is not Event.DELIVERED:
            self.metrics.transitions.labels(rev.state.value).inc()
        if record.event in (Event.FSP_ACCEPTED, Event.FSP_REJECTED) and rev.ack is not None:
            self.metrics.acknowledged_seconds.labels(rev.ack.response.value).observe(
                (now - rev.accepted_at).total_seconds())

    # ------------------------------------------------------------------ requests

    def authenticate(self, token: str | None) -> Caller | None:
        """The caller a bearer token belongs to, or None."""
        if not token:
            return None
        return self._callers.get(token_digest(token))

    @contextlib.asynccontextmanager
    async def _serial(self, instruction_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(instruction_id, (asyncio.Lock(), 0))
        self._locks[instruction_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[instruction_id]
            if users == 1:
                del self._locks[instruction_id]
            else:
                self._locks[instruction_id] = (lock, users - 1)

    async def _carry_out(self, decision: Decision) -> tuple[InstructionView, bool]:
        """Answer a decision: refuse it, return the stored state, or journal and apply it."""
        if isinstance(decision, Refused):
            raise Refusal(decision.status, decision.problems)
        if isinstance(decision, Existing):
            view = self.engine.view(decision.id)
            assert view is not None
            return view, False
        try:
            await self._journal_and_apply(decision)
        except JournalError as exc:
            raise Refusal(503, (Problem("journal", f"not accepted: {exc}"),),
                          retry_after=1) from exc
        instruction_id = (decision.id if isinstance(decision, EventRecorded)
                          else decision.instruction.id)
        view = self.engine.view(instruction_id)
        assert view is not None
        return view, True

    async def submit(self, so: str, req: InstructionRequest) -> tuple[InstructionView, bool]:
        """Accept a new instruction from ``so``; True when it was newly journaled."""
        new_id = req.id or uuid.uuid4().hex
        async with self._serial(new_id):
            decision = self.engine.decide_submit(so, req, self.clock(), new_id=new_id)
            return await self._carry_out(decision)

    async def amend(self, so: str, instruction_id: str, req: AmendRequest
                    ) -> tuple[InstructionView, bool]:
        async with self._serial(instruction_id):
            decision = self.engine.decide_amend(so, instruction_id, req, self.clock())
            return await self._carry_out(decision)

    async def cancel(self, so: str, instruction_id: str, req: CancelRequest
                     ) -> tuple[InstructionView, bool]:
        async with self._serial(instruction_id):
            decision = self.engine.decide_cancel(so, instruction_id, req, self.clock())
            return await self._carry_out(decision)

    async def acknowledge(self, fsp: str, instruction_id: str, ack: Ack
                          ) -> tuple[InstructionView, bool]:
        async with self._serial(instruction_id):
            decision = self.engine.decide_ack(fsp, instruction_id, ack, self.clock())
            return await self._carry_out(decision)

    # ------------------------------------------------------------------ MQTT acks

    def _mqtt_ack(self, fsp: str, body: bytes) -> None:
        self._spawn(self._handle_mqtt_ack(fsp, body))

    async def _handle_mqtt_ack(self, fsp: str, body: bytes) -> None:
        try:
            ack = Ack.model_validate_json(body)
            if ack.id is None:
                raise Refusal(422, (Problem("id", "an acknowledgement on MQTT needs the id"),))
            await self.acknowledge(fsp, ack.id, ack)
        except ValidationError as exc:
            self._ack_error(fsp, body, 422, tuple(
                Problem(".".join(map(str, e["loc"])) or "body", e["msg"])
                for e in exc.errors(include_url=False)))
        except Refusal as refusal:
            self._ack_error(fsp, body, refusal.status, refusal.problems)

    def _ack_error(self, fsp: str, body: bytes, status: int, problems: tuple[Problem, ...]
                   ) -> None:
        """Tell the FSP on its ``errors`` topic why an acknowledgement was refused."""
        self.metrics.invalid_acks.labels("mqtt", str(status)).inc()
        log.warning("refused MQTT ack from %s (%d): %s", fsp, status,
                    "; ".join(f"{p.field}: {p.reason}" for p in problems))
        reply = {
            "error": "acknowledgement refused",
            "status": status,
            "problems": [p.as_json() for p in problems],
            "received": body[:512].decode("utf-8", "replace"),
        }
        self.mqtt.enqueue(Outgoing(self.config.mqtt.errors_topic(fsp),
                                   json.dumps(reply).encode()))
