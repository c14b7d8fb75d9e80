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
import os
import random
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import uvicorn
from pydantic import ValidationError
from shapeshifter_uftp.exceptions import ClientTransportException
from shapeshifter_uftp.uftp import (
    AcceptedRejected,
    FlexOrder,
    FlexOrderResponse,
    FlexRequest,
    PayloadMessage,
    PayloadMessageResponse,
    TestMessage,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from contracts.io import ContractBook
from contracts.model import Channel
from dispatchd.channels.email import (
    AckLinks,
    EmailChannel,
    OutgoingEmail,
    escalation_email,
    held_email,
    instruction_email,
)
from dispatchd.channels.mqtt import MqttChannel, Outgoing
from dispatchd.channels.settings import check_channels
from dispatchd.channels.stream import StreamHub
from dispatchd.channels.webhook import OutgoingWebhook, WebhookChannel
from dispatchd.config import (
    Config,
    ConfigError,
    Principal,
    RelayPlatform,
    mqtt_password,
    secret_from_env,
    token_digest,
)
from dispatchd.core.engine import (
    Action,
    Decision,
    Dispatcher,
    Escalate,
    EventRecorded,
    Existing,
    HeldMessage,
    InstructionView,
    Notify,
    Persist,
    Record,
    Refused,
    RelayKind,
    RelayRecorded,
    RetryPolicy,
    RevisionRecorded,
    Send,
    message,
)
from dispatchd.core.instruction import (
    Ack,
    AmendRequest,
    CancelRequest,
    Instruction,
    InstructionRequest,
    RelayedRequest,
    Response,
    message_type,
)
from dispatchd.core.lifecycle import Event, State
from dispatchd.core.validation import Problem
from dispatchd.gcpolicy import GcPolicy
from dispatchd.journal import Journal, JournalError, JournalSettings
from dispatchd.metrics import Metrics
from dispatchd.openadr import Store as OpenadrStore
from dispatchd.openadr import Tokens as OpenadrTokens
from dispatchd.openadr import event as openadr_event
from dispatchd.relay import KINDS as RELAY_KINDS
from dispatchd.relay import (
    ExternalDispatch,
    Mapper,
    MapperError,
    Unidentified,
    held_key,
    load_mapper,
)
from dispatchd.relay import dispatch_json as relay_dispatch_json
from dispatchd.relay import instruction_id as relay_instruction_id
from dispatchd.relay import resolve as relay_resolve
from dispatchd.uftp import ALREADY_SUBMITTED as UFTP_ALREADY_SUBMITTED
from dispatchd.uftp import DUPLICATE as UFTP_DUPLICATE
from dispatchd.uftp import INVALID_MESSAGE as UFTP_INVALID
from dispatchd.uftp import (
    Opened,
    TransportRefusal,
    envelope_problems,
    open_signed,
    order_dispatch,
    order_problems,
    response_to,
)
from dispatchd.uftp import sender as uftp_sender

log = logging.getLogger("dispatchd")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``role`` is ``so``, ``fsp`` or ``platform`` (a relaying platform)."""

    role: str
    id: str


def _relay_mappers(book: ContractBook, config: Config) -> dict[str, Mapper]:
    """Each relay platform's mapper; ConfigError lists every platform that cannot work."""
    mappers: dict[str, Mapper] = {}
    problems = []
    for name, platform in config.relay.platforms.items():
        if platform.so not in book.system_operators:
            problems.append(f"relay.platforms.{name}.so: no SO {platform.so!r} in the "
                            "contracts file")
        try:
            mappers[name] = load_mapper(platform.mapper)
        except ValueError as exc:
            problems.append(f"relay.platforms.{name}.mapper: {exc}")
    if problems:
        raise ConfigError(f"{len(problems)} relay setting problem(s):\n  "
                          + "\n  ".join(problems))
    return mappers


def _uftp_settings(config: Config, environ: Mapping[str, str]) -> str | None:
    """This endpoint's UFTP signing key; ConfigError lists every UFTP setting that cannot
    work."""
    cfg = config.uftp
    if not cfg.dsos:
        return None
    problems = []
    key = None
    try:
        key = secret_from_env("uftp.signing_key_env", cfg.signing_key_env, environ)
    except ConfigError as exc:
        problems.append(str(exc))
    if key is None and not problems:
        problems.append("uftp.signing_key_env: responses to DSOs must be signed; name the "
                        "environment variable holding the private key")
    if not cfg.domains:
        problems.append("uftp.domains: name the AGR domains this endpoint answers for")
    try:
        ZoneInfo(cfg.time_zone)
    except (KeyError, ValueError):
        problems.append(f"uftp.time_zone: {cfg.time_zone!r} is not a time zone")
    for domain, dso in cfg.dsos.items():
        if dso.platform not in config.relay.platforms:
            problems.append(f"uftp.dsos.{domain}.platform: no [relay.platforms."
                            f"{dso.platform}]")
    if problems:
        raise ConfigError(f"{len(problems)} UFTP setting problem(s):\n  "
                          + "\n  ".join(problems))
    return key


def _openadr_callbacks(subscriptions: list[dict[str, Any]], operation: str, program_id: str
                       ) -> list[tuple[str, str | None]]:
    """(callback URL, bearer token) of each subscription wanting this event operation."""
    found = []
    for subscription in subscriptions:
        if subscription.get("programID") not in (None, program_id):
            continue
        for wanted in subscription.get("objectOperations") or []:
            if "EVENT" in (wanted.get("objects") or []) and \
                    operation in (wanted.get("operations") or []):
                found.append((str(wanted["callbackUrl"]), wanted.get("bearerToken")))
    return found


def _uftp_temporary(exc: BaseException) -> bool:
    """Whether a failed response POST is worth retrying (the transport appendix: 5xx,
    404, 429, timeouts and connection errors are temporary; other 4xx final)."""
    if isinstance(exc, ClientTransportException):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", 500)
        return status >= 500 or status in (404, 408, 419, 429)
    return isinstance(exc, OSError) or type(exc).__module__.startswith("requests")


class Refusal(Exception):
    """A request the service will not carry out; the caller's fault (4xx) or overload (503)."""

    def __init__(self, status: int, problems: tuple[Problem, ...], *,
                 retry_after: int | None = None) -> None:
        self.status = status
        self.problems = problems
        self.retry_after = retry_after
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))


class AckRefused(Refusal):
    """An acknowledgement message refused; ``ack`` is what parsed of it (None if nothing)."""

    def __init__(self, status: int, problems: tuple[Problem, ...], ack: Ack | None) -> None:
        super().__init__(status, problems)
        self.ack = ack


class _Stopped(Exception):
    pass


def _link_key(config: Config, environ: Mapping[str, str]) -> bytes:
    """The key signing acknowledge links: from ``email.link_secret_env``, else a key kept in
    a file beside the journal (created once), so links survive a restart."""
    named = secret_from_env("email.link_secret_env", config.email.link_secret_env, environ)
    if named is not None:
        return named.encode()
    path = Path(f"{config.journal.path}.link-key")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class Service:
    """One dispatchd. Call :meth:`run`; it returns when :meth:`stop` is called."""

    def __init__(self, config: Config, book: ContractBook, *, clock: Clock = utcnow,
                 rng: random.Random | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        """Raises :class:`~dispatchd.config.ConfigError` when a channel setting cannot work
        (secrets are read from ``environ``, by default the process environment)."""
        environ = os.environ if environ is None else environ
        webhook_keys = check_channels(book, config, environ)
        self._mappers = _relay_mappers(book, config)
        self._uftp_key = _uftp_settings(config, environ)
        self._uftp_answering: set[tuple[str, int]] = set()
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
            archive=self._records_of,
        )
        self.journal = Journal(
            JournalSettings(config.journal.path, config.journal.synchronous,
                            config.journal.max_batch, config.journal.max_queue),
            on_commit=self._committed,
        )
        self.openadr_store = OpenadrStore(config.journal.path)
        self.openadr_tokens = OpenadrTokens(config.openadr, clock)
        self.openadr_started = clock()
        self._openadr_cursor: dict[str, int] = {}
        self.mqtt = MqttChannel(config.mqtt, password=mqtt_password(config.mqtt, environ),
                                on_ack=self._mqtt_ack, metrics=self.metrics, rng=rng)
        self.email = EmailChannel(
            config.email, metrics=self.metrics,
            password=secret_from_env("email.password_env", config.email.password_env,
                                     environ))
        self.webhook = WebhookChannel(config.webhook, keys=webhook_keys, metrics=self.metrics)
        self.streams = StreamHub(self.metrics, send_timeout_s=config.websocket.send_timeout_s)
        self._link_key = _link_key(config, environ)
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
    def links(self) -> AckLinks:
        """Signed acknowledge links (their base is :attr:`base_url`)."""
        return AckLinks(self._link_key, self.base_url)

    @property
    def base_url(self) -> str:
        """Base of status links: ``service.public_url``, else the address actually bound."""
        if self.config.service.public_url:
            return self.config.service.public_url.rstrip("/")
        return f"http://{self.config.service.host}:{self.port or self.config.service.port}"

    # ------------------------------------------------------------------ running

    def _records_of(self, instruction_id: str) -> list[tuple[int, Record]]:
        return self.journal.records_of(instruction_id)

    def _archive(self) -> None:
        hold = dt.timedelta(seconds=self.config.service.hold_finished_s)
        gone = self.engine.archive(self.clock(), hold)
        if gone:
            log.info("let go of %d finished instructions (%d held, %d in the journal only)",
                     gone, len(self.engine), self.engine.archived)

    async def _archive_sweeps(self) -> None:
        while True:
            await asyncio.sleep(self.config.service.archive_sweep_s)
            self._archive()

    def _committed(self, seconds: float, records: int) -> None:
        self.metrics.journal_commit_seconds.observe(seconds)
        self.metrics.journal_batch_records.observe(records)

    def _recover(self) -> list[Action]:
        now = self.clock()
        for seq, record in self.journal.replay():
            self.engine.apply(record, seq, now, replay=True)
            self.replayed += 1
        actions = self.engine.recover(now)
        self._archive()
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
            email_depth=lambda: self.email.depth,
            webhook_depth=lambda: self.webhook.depth,
            unacknowledged=self.engine.unacknowledged,
            held=lambda: len(self.engine.held()),
            unreconciled=self.engine.unreconciled,
        )
        sock = socket.create_server((self.config.service.host, self.config.service.port),
                                    reuse_port=False, backlog=2048)
        # Accepted sockets inherit both: a bounded kernel buffer per client, and a kernel
        # that gives up on a peer that acknowledges nothing (Linux).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                        self.config.websocket.send_buffer_bytes)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(self.config.websocket.tcp_user_timeout_s * 1000))
        self.port = sock.getsockname()[1]
        ws = self.config.websocket
        server = self._server = uvicorn.Server(uvicorn.Config(
            create_app(self), log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=5, ws="websockets-sansio",
            ws_ping_interval=ws.ping_interval_s, ws_ping_timeout=ws.ping_timeout_s,
            ws_per_message_deflate=ws.compression,
        ))
        gc_policy = GcPolicy(sweep_s=self.config.service.gc_sweep_s)
        try:
            with gc_policy:
                await self._run_tasks(server, sock, actions, gc_policy)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for task in list(self._background):
                task.cancel()
            self.journal.close()
            self.openadr_store.close()
            sock.close()

    async def _run_tasks(self, server: uvicorn.Server, sock: socket.socket,
                         actions: list[Action], gc_policy: GcPolicy) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(gc_policy.sweeps(), name="dispatchd.gc")
                group.create_task(self._archive_sweeps(), name="dispatchd.archive")
                group.create_task(self.journal.run(), name="dispatchd.journal")
                if self.config.mqtt.enabled:
                    group.create_task(self.mqtt.run(), name="dispatchd.mqtt")
                if self.config.email.enabled:
                    group.create_task(self.email.run(), name="dispatchd.email")
                group.create_task(self.webhook.run(), name="dispatchd.webhook")
                group.create_task(self._serve_http(server, sock), name="dispatchd.http")
                await asyncio.sleep(0)  # let the webhook channel start before sends
                self._execute(actions)
                self._openadr_cursor = {f: self.engine.feed_length("fsp", f)
                                        for f in self.book.fsps}
                platforms = set(self._uftp_platforms())
                for view in self.engine.awaiting_relay_answer(platforms):
                    self._uftp_answer(view)
        except* _Stopped:
            pass

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

    def rearm(self) -> None:
        """Re-read the clock for the next deadline (call after moving an injected clock)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        self._arm_timer()

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
                for channel in action.channels:
                    self._send(action, channel)
            elif isinstance(action, Notify):
                self.streams.notify(action.role, action.principal)
                if action.role == "fsp" and self.config.openadr.clients:
                    self._openadr_notify(action.principal)
            elif isinstance(action, Escalate):
                self._escalate(action)
            elif isinstance(action, Persist):
                self._spawn(self._journal_quietly(action.record))
        self._arm_timer()

    def _send(self, send: Send, channel: Channel) -> None:
        inst = send.instruction
        self.metrics.sends.labels(channel.value, "first" if send.attempt == 0 else "retry").inc()
        handed_over = partial(self._handed_over, inst.id, inst.revision, channel.value,
                              send.accepted_at)
        if channel is Channel.MQTT:
            payload = json.dumps(send.payload(), separators=(",", ":")).encode()
            self.mqtt.enqueue(Outgoing(self.config.mqtt.instructions_topic(inst.fsp), payload,
                                       handed_over))
            return
        wanted = partial(self._still_wanted, inst.id, inst.revision)
        failed = partial(self._failed, inst.id, inst.revision, channel.value)
        if channel is Channel.EMAIL:
            self.email.enqueue(OutgoingEmail(
                inst.fsp, partial(instruction_email, inst, self.book,
                                  sender=self.config.email.from_address, links=self.links),
                wanted, handed_over, failed))
        elif channel is Channel.WEBHOOK:
            self.webhook.enqueue(OutgoingWebhook(
                inst.fsp, self.book.fsps[inst.fsp].endpoints.webhook_url or "",
                f"{inst.id}.{inst.revision}", self._webhook_body(send), wanted, handed_over,
                failed))

    @staticmethod
    def _webhook_body(send: Send) -> bytes:
        """A Standard Webhooks payload: ``type``, ``timestamp`` and the message as ``data``."""
        data = message(send.instruction, send.accepted_at)
        kind = {"instruction": "created", "amendment": "amended", "cancellation": "cancelled"}
        return json.dumps({
            "type": f"instruction.{kind[message_type(send.instruction.kind)]}",
            "timestamp": send.accepted_at.isoformat(),
            "data": data,
        }, separators=(",", ":")).encode()

    def _still_wanted(self, instruction_id: str, revision: int) -> bool:
        return self.engine.still_wanted(instruction_id, revision, self.clock())

    def _handed_over(self, instruction_id: str, revision: int, channel: str,
                     accepted_at: dt.datetime) -> None:
        now = self.clock()
        record = self.engine.delivered(instruction_id, revision, channel, now)
        if record is not None:
            self.metrics.delivered_seconds.labels(channel).observe(
                (now - accepted_at).total_seconds())
            self._spawn(self._journal_quietly(record))

    def _failed(self, instruction_id: str, revision: int, channel: str, reason: str) -> None:
        record = self.engine.delivery_failed(instruction_id, revision, channel, reason,
                                             self.clock())
        if record is not None:
            self._spawn(self._journal_quietly(record))

    def _escalate(self, action: Escalate) -> None:
        """Tell the FSP's escalation contacts and the SO's control room; journal that."""
        inst = action.instruction
        self.metrics.escalations.inc()
        fsp = self.book.fsps.get(inst.fsp)
        so = self.book.system_operators.get(inst.so)
        to = tuple(dict.fromkeys((*(fsp.escalation_emails if fsp else ()),
                                  *(so.escalation_emails if so else ()))))
        log.warning("no answer from %s to %s rev %d by %s: escalating to %s", inst.fsp, inst.id,
                    inst.revision, inst.respond_by.isoformat(), ", ".join(to) or "nobody")

        def escalated(channel: str | None, reason: str) -> None:
            self._spawn(self._journal_quietly(EventRecorded(
                inst.id, inst.revision, Event.ESCALATED, self.clock(), channel, reason)))

        if not self.config.email.enabled or not to:
            escalated(None, "no escalation email: " + (
                "email is not enabled" if to else "no escalation contacts"))
            return
        self.email.enqueue(OutgoingEmail(
            inst.fsp,
            partial(escalation_email, inst, self.book, sender=self.config.email.from_address,
                    to=to, links=self.links),
            lambda: True,
            partial(escalated, "email", f"emailed {', '.join(to)}"),
            lambda reason: escalated("email", f"escalation email refused: {reason}")))

    async def _journal_quietly(self, record: EventRecorded) -> None:
        """Journal and apply an event the service produced itself (no one waits for it)."""
        try:
            await self._journal_and_apply(record)
        except JournalError as exc:
            log.error("could not journal %s of %s rev %d: %s", record.event.value, record.id,
                      record.revision, exc)

    async def _journal_or_503(self, record: Record) -> None:
        """Journal and apply a record someone waits for; a journal that cannot take it is
        a 503 with the reason (nothing was accepted)."""
        try:
            await self._journal_and_apply(record)
        except JournalError as exc:
            raise Refusal(503, (Problem("journal", f"not accepted: {exc}"),),
                          retry_after=1) from exc

    async def _journal_and_apply(self, record: Record) -> None:
        seq = await self.journal.append(record)
        now = self.clock()
        actions = self.engine.apply(record, seq, now)
        view = None
        if not isinstance(record, RelayRecorded):
            view = self.engine.view(record.id if isinstance(record, EventRecorded)
                                    else record.instruction.id)
            if view is not None:
                self._observe(record, view, now)
        self._execute(actions)
        if view is not None and isinstance(record, EventRecorded) and record.revision == 0 \
                and record.event in (Event.FSP_ACCEPTED, Event.FSP_REJECTED,
                                     Event.RESPONSE_DEADLINE) and self.config.uftp.dsos:
            self._uftp_answer(view)

    def _observe(self, record: EventRecorded | RevisionRecorded, view: InstructionView,
                 now: dt.datetime) -> None:
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

    def replace_principals(self, principals: Iterable[Principal]) -> None:
        """Swap the accepted tokens at once (rotation without a restart): requests already
        authenticated finish; the next request sees only the new set."""
        self._callers = {p.token_sha256: Caller(p.role, p.id) for p in principals}
        log.info("tokens replaced: %d principals", len(self._callers))

    def authenticate(self, token: str | None) -> Caller | None:
        """The caller a bearer token belongs to, or None. Only SHA-256 digests are kept;
        a token is looked up by its digest, so no stored secret is compared with it."""
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
        await self._journal_or_503(decision)
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

    # ------------------------------------------------------------------ relay intake

    def _platform(self, platform: str) -> RelayPlatform:
        found = self.config.relay.platforms.get(platform)
        if found is None:
            raise Refusal(404, (Problem("platform", f"no relay platform {platform!r}"),))
        return found

    async def relay(self, platform: str, body: bytes, content_type: str
                    ) -> list[dict[str, Any]]:
        """Relay what ``platform`` sent: each dispatch is relayed (possibly unreconciled),
        a repeat, or held for want of an FSP mapping. Raises :class:`Refusal` (422) for a
        message the platform's mapper cannot read; nothing of it is then journaled."""
        settings = self._platform(platform)
        try:
            dispatches = self._mappers[platform].parse(body, content_type)
        except MapperError as exc:
            self.metrics.relay_messages.labels(platform, "unreadable").inc()
            raise Refusal(422, (Problem("body", f"{platform}: {exc}"),)) from exc
        outcomes = []
        for dispatch in dispatches:
            try:
                outcome = await self._relay_one(platform, settings, dispatch, body)
            except MapperError as exc:
                outcome = {"external_id": dispatch.external_id, "status": "refused",
                           "reason": str(exc)}
            self.metrics.relay_messages.labels(platform, outcome["status"]).inc()
            outcomes.append(outcome)
        return outcomes

    async def _relay_one(self, platform: str, settings: RelayPlatform,
                         dispatch: ExternalDispatch, raw: bytes) -> dict[str, Any]:
        our_id = relay_instruction_id(platform, dispatch.external_id)
        base = {"external_id": dispatch.external_id, "id": our_id}
        if dispatch.kind == "cancel":
            try:
                view, created = await self.cancel(settings.so, our_id, CancelRequest(
                    reason=dispatch.reason or f"cancelled on {platform}"))
            except Refusal as refusal:
                key = held_key(platform, dispatch.external_id)
                if refusal.status != 404 or self.engine.held_message(key) is None:
                    raise MapperError(f"cancel {dispatch.external_id}: "
                                      f"{refusal.problems[0].reason}") from refusal
                why = dispatch.reason or f"cancelled on {platform}"
                await self._journal_or_503(RelayRecorded(
                    RelayKind.RELEASED, key, self.clock(),
                    {"platform": platform, "so": settings.so, "instruction_id": None,
                     "withdrawn": why}))
                return base | {"status": "withdrawn", "reason": "it was held, never "
                               f"delivered; now withdrawn: {why}"}
            return base | {"status": "relayed" if created else "repeat",
                           "revision": view.latest.instruction.revision}
        resolved = self._resolve(platform, settings, dispatch)
        if isinstance(resolved, Unidentified):
            return base | await self._hold(platform, settings, dispatch, raw, resolved.reason)
        relayed = await self._relay_resolved(settings.so, resolved)
        if isinstance(relayed, Refused):
            raise MapperError(f"dispatch {dispatch.external_id}: " + "; ".join(
                f"{p.field}: {p.reason}" for p in relayed.problems),
                conflict=relayed.status == 409)
        view, created = relayed
        unreconciled = list(view.latest.instruction.unreconciled)
        return base | {"status": "relayed" if created else "repeat", "fsp": view.fsp,
                       "state": view.state.value, "unreconciled": unreconciled,
                       "status_url": f"{self.base_url}/v1/instructions/{view.id}"}

    def _resolve(self, platform: str, settings: RelayPlatform, dispatch: ExternalDispatch
                 ) -> RelayedRequest | Unidentified:
        """``dispatch`` in our ids, as far as the mapping table goes now."""
        return relay_resolve(
            dispatch, platform=platform, so=settings.so, lookup=self.engine.mapping,
            book=self.book, now=self.clock(), response_minutes=settings.response_minutes)

    async def _relay_resolved(self, so: str, resolved: RelayedRequest
                              ) -> Refused | tuple[InstructionView, bool]:
        """Journal and deliver a relayed instruction (or say why it cannot be one)."""
        async with self._serial(resolved.id):
            decision = self.engine.decide_relay(so, resolved, self.clock())
            if isinstance(decision, Refused):
                return decision
            return await self._carry_out(decision)

    async def _hold(self, platform: str, settings: RelayPlatform, dispatch: ExternalDispatch,
                    raw: bytes, reason: str) -> dict[str, Any]:
        key = held_key(platform, dispatch.external_id)
        already = self.engine.held_message(key)
        if already is not None:
            if already.dispatch != relay_dispatch_json(dispatch):
                raise MapperError(f"dispatch {dispatch.external_id} is held with other "
                                  "content; a changed dispatch needs a new id", conflict=True)
            return {"status": "held", "reason": already.reason}
        record = RelayRecorded(RelayKind.HELD, key, self.clock(), {
            "platform": platform, "so": settings.so, "external_id": dispatch.external_id,
            "reason": reason, "dispatch": relay_dispatch_json(dispatch),
            "raw": raw.decode("utf-8", "replace")})
        await self._journal_or_503(record)
        self.metrics.relay_held_total.labels(platform).inc()
        log.warning("held %s dispatch %s: %s", platform, dispatch.external_id, reason)
        held = self.engine.held_message(key)
        assert held is not None  # just journaled and applied
        self._tell_operations(held)
        return {"status": "held", "reason": reason}

    # ------------------------------------------------------------------ UFTP

    async def uftp(self, body: bytes, content_type: str) -> tuple[int, str]:
        """A message posted to the UFTP endpoint: the HTTP status and a reason. Problems
        found after the signature checks out are answered with a signed response message
        (sent in the background), the transport answer then being 200."""
        cfg = self.config.uftp
        try:
            opened = open_signed(body, content_type, cfg)
        except TransportRefusal as refusal:
            self.metrics.uftp_messages.labels("refused", str(refusal.status)).inc()
            log.warning("UFTP message refused (%d): %s", refusal.status, refusal.reason)
            return refusal.status, refusal.reason
        message = opened.message
        kind = type(message).__name__
        self.metrics.uftp_messages.labels(kind, "200").inc()
        problems = envelope_problems(opened, cfg)
        if not problems and isinstance(message, FlexOrder):
            problems = order_problems(message, cfg, self.clock())
        if problems:
            self._uftp_reply(opened, message, accepted=False, reason="; ".join(problems))
        elif isinstance(message, TestMessage):
            self._uftp_reply(opened, message, accepted=True, reason=None)
        elif isinstance(message, FlexOrder):
            await self._uftp_order(opened, message)
        elif isinstance(message, FlexRequest):
            self._uftp_reply(opened, message, accepted=False, reason=(
                f"{UFTP_INVALID}: this endpoint relays FlexOrders to providers and makes no "
                "FlexOffers; offers are made on the platform"))
        else:
            self._uftp_reply(opened, message, accepted=False,
                             reason=f"{UFTP_INVALID}: '{kind}' is not handled by this endpoint")
        return 200, ""

    async def _uftp_order(self, opened: Opened, order: FlexOrder) -> None:
        platform = opened.dso.platform
        dispatch = order_dispatch(order, self.config.uftp).model_copy(
            update={"conversation": order.conversation_id})
        try:
            outcome = await self._relay_one(platform, self.config.relay.platforms[platform],
                                            dispatch, opened.xml.encode())
        except MapperError as exc:
            reason = (f"{UFTP_DUPLICATE}: MessageID {order.message_id} was used before for "
                      "another order" if exc.conflict else f"{UFTP_INVALID}: {exc}")
            self._uftp_reply(opened, order, accepted=False, reason=reason)
            return
        self.metrics.relay_messages.labels(platform, outcome["status"]).inc()
        if outcome["status"] == "repeat":
            self._uftp_reply(opened, order, accepted=False, reason=UFTP_ALREADY_SUBMITTED)

    def _uftp_reply(self, opened: Opened, message: PayloadMessage, *, accepted: bool,
                    reason: str | None) -> None:
        """Answer a message at once (validation results): sent and retried in the
        background; not journaled (the message itself was not taken)."""
        response = response_to(message, accepted=accepted, reason=reason,
                               our_domain=message.recipient_domain or "")
        if response is None:
            return
        self._spawn(self._uftp_send(opened.domain, response, None))

    def _uftp_platforms(self) -> dict[str, str]:
        """Relay platform name → the DSO domain it speaks UFTP for."""
        return {dso.platform: domain for domain, dso in self.config.uftp.dsos.items()}

    def _uftp_answer(self, view: InstructionView) -> None:
        """Tell the DSO what became of the order behind ``view`` (its first revision)."""
        first = view.revisions[0]
        ref = first.instruction.external_ref
        domain = self._uftp_platforms().get(ref.platform if ref else "")
        if ref is None or domain is None or first.relay_answer is not None:
            return
        if first.ack is not None and first.ack.response is Response.ACCEPTED:
            accepted, reason = True, None
        elif first.ack is not None:
            accepted, reason = False, f"Rejected by the provider: {first.ack.reason}"
        elif first.state is State.EXPIRED:
            accepted, reason = False, ("No answer from the provider by "
                                       f"{first.instruction.respond_by.isoformat()}")
        else:
            return
        our_domain = next((d for d in self.config.uftp.domains
                           if self.engine.mapping(ref.platform, "fsp", d) == view.fsp),
                          self.config.uftp.domains[0])
        response = FlexOrderResponse(
            flex_order_message_id=ref.id, conversation_id=ref.conversation,
            result=AcceptedRejected.ACCEPTED if accepted else AcceptedRejected.REJECTED,
            rejection_reason=reason, recipient_domain=domain, sender_domain=our_domain)
        key = (view.id, 0)
        if key in self._uftp_answering:
            return
        self._uftp_answering.add(key)
        self._spawn(self._uftp_send(domain, response, view.id))

    async def _uftp_send(self, domain: str, response: PayloadMessageResponse,
                         instruction_id: str | None) -> None:
        """POST one signed response to the DSO, retried with jittered exponential backoff
        on connection errors, 5xx, 404 and 429 (the specification's temporary failures);
        once delivered, an answer about an instruction is journaled."""
        cfg = self.config.uftp
        send = uftp_sender(cfg, self._uftp_key or "", domain)
        what = f"{type(response).__name__} {response.result} to {domain}"
        try:
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_uftp_temporary),
                    wait=wait_random_exponential(multiplier=0.2, max=cfg.retry_max_s),
                    stop=stop_after_delay(86_400), reraise=True):
                with attempt:
                    await asyncio.to_thread(send, response)
        except Exception as exc:  # a final refusal by the DSO, or a day of failures
            self.metrics.uftp_responses.labels("failed").inc()
            log.error("UFTP %s not delivered: %s", what, exc)
            return
        finally:
            if instruction_id is not None:
                self._uftp_answering.discard((instruction_id, 0))
        self.metrics.uftp_responses.labels(str(response.result)).inc()
        log.info("UFTP %s delivered", what)
        if instruction_id is not None:
            reason = str(response.result) + (f": {response.rejection_reason}"
                                             if response.rejection_reason else "")
            await self._journal_quietly(EventRecorded(
                instruction_id, 0, Event.RELAY_ANSWERED, self.clock(), "uftp", reason))

    # ------------------------------------------------------------------ OpenADR

    @property
    def openadr_mqtt_uri(self) -> str:
        return self.config.openadr.mqtt_uri or self.config.mqtt.url

    def openadr_views(self, fsp: str) -> list[InstructionView]:
        """``fsp``'s instructions held in memory (the events a VEN can see)."""
        return self.engine.changed_since("fsp", fsp, 0, 1_000_000_000)[0]

    def openadr_reached(self, view: InstructionView) -> None:
        """The VEN showed it has the latest revision (it reported on it)."""
        latest = view.latest
        self._handed_over(view.id, latest.instruction.revision, "openadr", latest.accepted_at)

    def _openadr_notify(self, fsp: str) -> None:
        """Tell ``fsp``'s VENs of each new instruction, amendment and cancellation: by
        webhook to their subscriptions and on the broker."""
        start = self._openadr_cursor.get(fsp, 0)
        end = self.engine.feed_length("fsp", fsp)
        self._openadr_cursor[fsp] = end
        vens = self.openadr_store.all("vens", fsp)
        subscriptions = self.openadr_store.all("subscriptions", fsp)
        if not vens and not subscriptions:
            return  # no VEN of this FSP to tell
        for number in range(max(start + 1, self.engine.feed_first("fsp", fsp)), end + 1):
            entry = self.engine.feed_event("fsp", fsp, number)
            operation = {"instruction": "POST", "amendment": "PUT",
                         "cancellation": "DELETE"}.get(entry["event"])
            view = self.engine.visible(entry["id"], "fsp", fsp)
            if operation is None or view is None:
                continue
            shown = openadr_event(view)
            notification = {"objectType": "EVENT", "operation": operation, "object": shown,
                            "targets": shown["targets"]}
            payload = json.dumps(notification, separators=(",", ":")).encode()
            handed = partial(self._handed_over, view.id, entry["revision"], "openadr",
                             view.revisions[entry["revision"]].accepted_at)
            for url, token in _openadr_callbacks(subscriptions, operation,
                                                 shown["programID"]):
                self._spawn(self._openadr_webhook(url, token, payload, handed))
            if self.config.mqtt.enabled and vens:
                prefix = self.config.openadr.mqtt_topic_prefix
                verb = {"POST": "create", "PUT": "update", "DELETE": "delete"}[operation]
                paths = [f"fsp/{fsp}/events", f"programs/{shown['programID']}/events",
                         *(f"vens/{v['id']}/events" for v in vens)]
                for path in paths:
                    self.mqtt.enqueue(Outgoing(f"{prefix}/{path}/{verb}", payload, handed))

    async def _openadr_webhook(self, url: str, token: str | None, payload: bytes,
                               handed: Callable[[], None]) -> None:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = self.config.openadr.webhook_timeout_s
        try:
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(httpx.HTTPError),
                    wait=wait_random_exponential(multiplier=0.2, max=30),
                    stop=stop_after_delay(600), reraise=True):
                with attempt:
                    async with httpx.AsyncClient(timeout=timeout) as client:
                        response = await client.post(url, content=payload, headers=headers)
                    if response.status_code >= 500 or response.status_code == 429:
                        raise httpx.HTTPStatusError(f"{response.status_code}",
                                                    request=response.request,
                                                    response=response)
        except httpx.HTTPError as exc:
            log.error("OpenADR notification to %s not delivered: %s", url, exc)
            return
        if response.status_code < 300:
            handed()
        else:
            log.error("OpenADR notification to %s refused: HTTP %d", url,
                      response.status_code)


    def _tell_operations(self, held: HeldMessage) -> None:
        to = self.config.relay.operations_emails
        if not self.config.email.enabled or not to:
            return
        self.email.enqueue(OutgoingEmail(
            f"relay:{held.platform}",
            partial(held_email, held, sender=self.config.email.from_address, to=to,
                    base_url=self.base_url),
            lambda: True, lambda: None,
            lambda reason: log.error("operations email about %s refused: %s", held.key,
                                     reason)))

    async def set_mapping(self, so: str, platform: str, kind: str, external: str,
                          ours: str | None) -> list[dict[str, Any]]:
        """Map (or, with ``ours`` None, unmap) one of ``platform``'s ids; then relay every
        held dispatch the new mapping identifies. Returns what was released."""
        settings = self._platform(platform)
        if settings.so != so:
            raise Refusal(404, (Problem("platform", f"no relay platform {platform!r}"),))
        if kind not in RELAY_KINDS:
            raise Refusal(422, (Problem("kind", f"{kind!r} is not one of "
                                        f"{', '.join(RELAY_KINDS)}"),))
        known = {"fsp": self.book.fsps, "contract": self.book.contracts,
                 "asset": self.book.assets}[kind]
        if ours is not None and ours not in known:
            raise Refusal(422, (Problem("ours", f"no {kind} {ours!r} in the contracts file"),))
        if ours is not None and kind == "contract" and self.book.contracts[ours].so != so:
            raise Refusal(422, (Problem("ours", f"contract {ours} is not {so}'s"),))
        if self.engine.mapping(platform, kind, external) != ours:
            await self._journal_or_503(RelayRecorded(
                RelayKind.MAPPING, f"{platform}/{kind}/{external}", self.clock(),
                {"platform": platform, "kind": kind, "external": external, "ours": ours,
                 "so": so}))
        return await self.release_held(so, platform)

    async def release_held(self, so: str, platform: str) -> list[dict[str, Any]]:
        """Relay every held dispatch of ``platform`` that the mappings now identify."""
        settings = self._platform(platform)
        released = []
        for held in self.engine.held(so):
            if held.platform != platform:
                continue
            resolved = self._resolve(platform, settings,
                                     ExternalDispatch.model_validate(held.dispatch))
            if isinstance(resolved, Unidentified):
                continue
            relayed = await self._relay_resolved(so, resolved)
            if isinstance(relayed, Refused):
                log.error("held %s cannot be relayed: %s", held.key, relayed.problems)
                continue
            view, _ = relayed
            await self._journal_or_503(RelayRecorded(
                RelayKind.RELEASED, held.key, self.clock(),
                {"platform": platform, "so": so, "instruction_id": view.id}))
            self.metrics.relay_messages.labels(platform, "released").inc()
            log.info("released held %s as %s to %s", held.key, view.id, view.fsp)
            released.append({"external_id": held.external_id, "id": view.id,
                             "fsp": view.fsp,
                             "unreconciled": list(view.latest.instruction.unreconciled)})
        return released

    async def reconcile(self, so: str, instruction_id: str, contract_id: str,
                        assets: tuple[str, ...]) -> tuple[InstructionView, bool]:
        """Attach a relayed instruction to its contract (and assets)."""
        async with self._serial(instruction_id):
            decision = self.engine.decide_reconcile(so, instruction_id, contract_id, assets,
                                                    self.clock())
            return await self._carry_out(decision)

    # ------------------------------------------------------------------ streams

    async def acknowledge_message(self, channel: str, fsp: str, body: str | bytes
                                  ) -> tuple[InstructionView, Ack, bool]:
        """An acknowledgement arriving as a message (MQTT, websocket): it must name the id.
        Raises :class:`AckRefused` (counted per channel) with the parsed ack, if any."""
        ack: Ack | None = None
        try:
            ack = Ack.model_validate_json(body)
            if ack.id is None:
                where = "MQTT" if channel == "mqtt" else "a stream"
                raise Refusal(422, (Problem("id", f"an acknowledgement on {where} needs the id"),))
            view, created = await self.acknowledge(fsp, ack.id, ack)
        except ValidationError as exc:
            self.metrics.invalid_acks.labels(channel, "422").inc()
            raise AckRefused(422, tuple(
                Problem(".".join(map(str, e["loc"])) or "body", e["msg"])
                for e in exc.errors(include_url=False)), None) from exc
        except Refusal as refusal:
            self.metrics.invalid_acks.labels(channel, str(refusal.status)).inc()
            raise AckRefused(refusal.status, refusal.problems, ack) from refusal
        return view, ack, created

    async def stream_ack(self, fsp: str, text: str) -> dict[str, Any]:
        """Answer an acknowledgement sent on ``fsp``'s websocket stream."""
        try:
            view, ack, created = await self.acknowledge_message("websocket", fsp, text)
        except AckRefused as refused:
            problems = [p.as_json() for p in refused.problems]
            if refused.ack is None:
                return {"reply": "ack", "status": refused.status, "error": "invalid request",
                        "problems": problems}
            return {"reply": "ack", "status": refused.status, "id": refused.ack.id,
                    "revision": refused.ack.revision, "problems": problems}
        return {"reply": "ack", "status": 200, "id": view.id, "revision": ack.revision,
                "created": created, "state": view.revisions[ack.revision].state.value}

    def stream_sent(self, body: dict[str, Any]) -> None:
        """A feed event went out on an FSP's stream: a revision's websocket hand-over."""
        message = body.get("message")
        if message is not None:
            self._handed_over(body["id"], body["revision"], Channel.WEBSOCKET.value,
                              dt.datetime.fromisoformat(message["accepted_at"]))

    async def respond_by_link(self, fsp: str, instruction_id: str, revision: int,
                              response: str, reason: str | None) -> tuple[InstructionView, bool]:
        """An answer given on the page an email's acknowledge link opens."""
        ack = Ack.model_validate({"id": instruction_id, "revision": revision,
                                  "response": response, "reason": reason or None})
        return await self.acknowledge(fsp, instruction_id, ack)

    def instruction_for_link(self, fsp: str, instruction_id: str, revision: int
                             ) -> Instruction | None:
        view = self.engine.visible(instruction_id, "fsp", fsp)
        if view is None or revision >= len(view.revisions):
            return None
        return view.revisions[revision].instruction

    # ------------------------------------------------------------------ MQTT acks

    def _mqtt_ack(self, fsp: str, body: bytes) -> None:
        self._spawn(self._handle_mqtt_ack(fsp, body))

    async def _handle_mqtt_ack(self, fsp: str, body: bytes) -> None:
        try:
            await self.acknowledge_message("mqtt", fsp, body)
        except AckRefused as refused:
            self._ack_error(fsp, body, refused.status, refused.problems)

    def _ack_error(self, fsp: str, body: bytes, status: int, problems: tuple[Problem, ...]
                   ) -> None:
        """Tell the FSP on its ``errors`` topic why an acknowledgement was refused."""
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
