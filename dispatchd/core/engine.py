"""The dispatch engine: decisions in, records and actions out, no I/O.

The calling contract, which the service (``dispatchd/service.py``) follows:

1. For a request, call a ``decide_*`` method. It never changes state. It returns a
   :class:`Refused` (answer the client with its status and problems), an :class:`Existing`
   (an idempotent repeat: answer with the stored instruction) or a record to journal.
2. Journal the record. Only once it is durably committed, call :meth:`Dispatcher.apply`
   with the journal's sequence number; it changes state and returns the actions to carry
   out (:class:`Send` to the FSP's channels, :class:`Persist` of a follow-up record).
   Calls for one instruction id must not interleave between decide and apply.
3. Call :meth:`Dispatcher.tick` whenever :meth:`Dispatcher.next_wakeup` has passed; it
   returns re-sends and deadline records (expiry, start, end) as actions.
4. Report channel deliveries with :meth:`Dispatcher.delivered` and final channel failures
   with :meth:`Dispatcher.delivery_failed`; journal what they return.
5. On start-up, :meth:`Dispatcher.apply` every journaled record in order with
   ``replay=True`` (no actions), then call :meth:`Dispatcher.recover` once.
6. Now and then call :meth:`Dispatcher.archive`: it lets go of instructions that are
   finished and quiet, and of feed events older than the holding time. What it let go of is
   read back from the journal through the ``archive`` reader given at creation whenever it
   is asked for again (a view, an idempotent repeat, a late acknowledgement), so memory
   follows the instructions in flight rather than every instruction ever accepted.

Which channel gets what: the first send of a revision goes to every push channel of the FSP
(MQTT, email, webhook). Only MQTT is re-sent on the re-send timer, because a broker's PUBACK
says nothing about the FSP; email and webhook adapters retry a hand-over until it succeeds
(asking :meth:`Dispatcher.still_wanted` between attempts), and the journal's ``delivered``
records tell :meth:`Dispatcher.recover` which of them to send again after a restart.
Websocket clients read the per-FSP *feed* instead (:meth:`Dispatcher.feed_event`): every
applied record appends to the feeds of the FSP and SO concerned, numbered from 1 per
principal, rebuilt identically on replay, so a client resumes from the last number it saw.

Time is always passed in (``now``); randomness comes from the ``rng`` given at creation.
"""

from __future__ import annotations

import bisect
import datetime as dt
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from contracts.io import ContractBook
from contracts.model import Channel

from .instruction import (
    Ack,
    AmendRequest,
    CancelRequest,
    Instruction,
    InstructionRequest,
    Kind,
    RelayedRequest,
    Response,
    message_type,
)
from .lifecycle import AMENDABLE, SENDABLE, Event, State, allowed, transition
from .validation import Problem, build_instruction, check

# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class RetryPolicy:
    """When to re-send a revision that the FSP has not acknowledged.

    Attempt ``n`` (0-based) waits ``min(max_s, initial_s * multiplier**n)`` scaled by a
    random factor in [1 - jitter, 1], so re-sends of a burst spread out. The schedule is
    driven by the *absence* of an acknowledgement rather than by a failing call, so it is a
    timer the engine owns rather than a retry decorator around a call.
    """

    initial_s: float = 2.0
    multiplier: float = 2.0
    max_s: float = 60.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> dt.timedelta:
        base = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return dt.timedelta(seconds=base * rng.uniform(1.0 - self.jitter, 1.0))


@dataclass(frozen=True)
class RevisionRecorded:
    """Journal record: a new revision (instruction, amendment or cancellation)."""

    instruction: Instruction
    content: dict[str, Any]
    """What the client sent (without the id), for idempotency checks."""
    at: dt.datetime


@dataclass(frozen=True)
class EventRecorded:
    """Journal record: something that happened to one revision."""

    id: str
    revision: int
    event: Event
    at: dt.datetime
    channel: str | None = None
    reason: str | None = None
    detail: dict[str, Any] | None = None
    """What a ``reconciled`` record attaches: ``contract_id`` and ``assets``."""


class RelayKind(StrEnum):
    HELD = "held"
    """A relayed message whose FSP cannot be identified: kept, alarmed, not delivered."""
    RELEASED = "released"
    """A held message was relayed after all (its mapping was added)."""
    MAPPING = "mapping"
    """A mapping of another platform's id to ours was set (or removed: ``ours`` None)."""


@dataclass(frozen=True)
class RelayRecorded:
    """Journal record about relaying rather than about an instruction. ``key`` names the
    held message (``platform:external id``) or the mapping (``platform/kind/external``)."""

    kind: RelayKind
    key: str
    at: dt.datetime
    detail: dict[str, Any]


Record = RevisionRecorded | EventRecorded | RelayRecorded


@dataclass(frozen=True)
class HeldMessage:
    """A relayed message waiting for its FSP's mapping; ``dispatch`` is the mapper's
    reading of it (JSON), ``raw`` what the platform sent."""

    key: str
    platform: str
    so: str
    external_id: str
    reason: str
    at: dt.datetime
    dispatch: dict[str, Any]
    raw: str


MappingKey = tuple[str, str, str]
"""(platform, kind, external id); kind is ``fsp``, ``contract`` or ``asset``."""


@dataclass(frozen=True)
class Refused:
    """A request that cannot be carried out; ``status`` is the HTTP status to answer."""

    status: int
    problems: tuple[Problem, ...]

    @classmethod
    def one(cls, status: int, field_: str, reason: str) -> Refused:
        return cls(status, (Problem(field_, reason),))


@dataclass(frozen=True)
class Existing:
    """An idempotent repeat: the stored revision answers it."""

    id: str
    revision: int


Decision = Refused | Existing | Record


PUSH_CHANNELS = (Channel.MQTT, Channel.EMAIL, Channel.WEBHOOK)
"""Channels that dispatchd sends to; websocket clients read the feed instead."""
RESENT_CHANNELS = (Channel.MQTT,)
"""Channels re-sent on the re-send timer until the FSP acknowledges."""


@dataclass(frozen=True)
class Send:
    """Action: deliver this revision on ``channels``; ``attempt`` counts sends of it."""

    instruction: Instruction
    attempt: int
    accepted_at: dt.datetime
    channels: tuple[Channel, ...] = (Channel.MQTT,)

    def payload(self) -> dict[str, Any]:
        """The MQTT message body: :func:`message` and which send of it this is."""
        return message(self.instruction, self.accepted_at) | {"attempt": self.attempt}


def message(instruction: Instruction, accepted_at: dt.datetime) -> dict[str, Any]:
    """What FSPs receive of a revision on every channel; receivers de-duplicate on
    (id, revision)."""
    body = dict(instruction.as_json)
    body["type"] = message_type(instruction.kind)
    body["accepted_at"] = accepted_at.isoformat()
    return body


@dataclass(frozen=True)
class Persist:
    """Action: journal this record, then :meth:`Dispatcher.apply` it."""

    record: EventRecorded


@dataclass(frozen=True)
class Notify:
    """Action: the feed of ``principal`` (an ``so`` or ``fsp`` by ``role``) has grown."""

    role: str
    principal: str


@dataclass(frozen=True)
class Escalate:
    """Action: nobody answered ``instruction`` by its respond-by; tell people, then journal
    an ``escalated`` event (:meth:`Dispatcher.recover` repeats this until one is)."""

    instruction: Instruction
    expired_at: dt.datetime


Action = Send | Persist | Notify | Escalate


class FeedKind(StrEnum):
    """What a feed entry says. FSPs see the first four and ``acknowledged``; SOs the rest."""

    INSTRUCTION = "instruction"
    AMENDMENT = "amendment"
    CANCELLATION = "cancellation"
    EXPIRED = "expired"
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    REJECTED = "rejected"
    ESCALATED = "escalated"
    DELIVERY_FAILED = "delivery_failed"
    ACTIVE = "active"
    COMPLETED = "completed"
    RECONCILED = "reconciled"
    RELAY_HELD = "relay_held"
    RELAY_RELEASED = "relay_released"


_RELAY_FEED = frozenset({FeedKind.RELAY_HELD, FeedKind.RELAY_RELEASED})


@dataclass(frozen=True)
class FeedEntry:
    """One event of a principal's feed; its number is its position (from 1)."""

    kind: FeedKind
    id: str
    revision: int
    at: dt.datetime
    channel: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class AckView:
    response: Response
    reason: str | None
    at: dt.datetime
    late: bool


@dataclass(frozen=True)
class RevisionView:
    instruction: Instruction
    state: State
    accepted_at: dt.datetime
    delivered: tuple[tuple[str, dt.datetime], ...]
    ack: AckView | None
    attempts: int
    failed: tuple[tuple[str, str], ...] = ()
    escalated: bool = False
    relay_answer: str | None = None
    """What the platform that relayed it was told of the FSP's answer, once told."""


@dataclass(frozen=True)
class InstructionView:
    """A read-only snapshot of one instruction and all its revisions."""

    id: str
    so: str
    fsp: str
    state: State
    cursor: int
    revisions: tuple[RevisionView, ...]

    @property
    def latest(self) -> RevisionView:
        return self.revisions[-1]

    def as_json(self) -> dict[str, Any]:
        latest = self.latest
        return {
            "id": self.id,
            "revision": latest.instruction.revision,
            "state": self.state.value,
            "cursor": self.cursor,
            "instruction": latest.instruction.as_json,
            "revisions": [
                {
                    "revision": r.instruction.revision,
                    "kind": r.instruction.kind.value,
                    "state": r.state.value,
                    "accepted_at": r.accepted_at.isoformat(),
                    "delivered": {ch: at.isoformat() for ch, at in r.delivered},
                    "send_attempts": r.attempts,
                    "delivery_failed": dict(r.failed),
                    "escalated": r.escalated,
                    "relay_answer": r.relay_answer,
                    "ack": None
                    if r.ack is None
                    else {
                        "response": r.ack.response.value,
                        "reason": r.ack.reason,
                        "at": r.ack.at.isoformat(),
                        "late": r.ack.late,
                    },
                }
                for r in self.revisions
            ],
        }


_MESSAGE_KINDS = frozenset({FeedKind.INSTRUCTION, FeedKind.AMENDMENT, FeedKind.CANCELLATION})

# ---------------------------------------------------------------------------- state


@dataclass
class _Revision:
    instruction: Instruction
    content: dict[str, Any]
    state: State
    accepted_at: dt.datetime
    delivered: dict[str, dt.datetime] = field(default_factory=dict)
    ack: AckView | None = None
    attempts: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    escalated: bool = False
    relay_answer: str | None = None


@dataclass
class _Tracked:
    revisions: list[_Revision]
    seq: int
    changed_at: dt.datetime
    feed_refs: int = 0
    """How many held feed events name this instruction; it is not archived while any do."""

    @property
    def latest(self) -> _Revision:
        return self.revisions[-1]


@dataclass
class _Feed:
    """A principal's feed: events numbered from 1, the oldest ``base`` no longer held."""

    base: int = 0
    entries: list[FeedEntry] = field(default_factory=list)


ArchiveReader = Callable[[str], Sequence[tuple[int, Record]]]
"""Reads one instruction's journaled records, in order, as (sequence number, record)."""


class _Timer(StrEnum):
    RESEND = "resend"
    RESPOND_BY = "respond_by"
    START = "start"
    END = "end"


def _differences(stored: dict[str, Any], given: dict[str, Any]) -> tuple[Problem, ...]:
    return tuple(
        Problem(key, f"differs from the stored request (stored {stored.get(key)!r}, "
                f"given {given.get(key)!r})")
        for key in sorted(set(stored) | set(given))
        if stored.get(key) != given.get(key)
    )


class Dispatcher:
    """Holds every instruction's state; see the module docstring for how to drive it."""

    def __init__(
        self, book: ContractBook, *, retry: RetryPolicy | None = None,
        rng: random.Random | None = None, archive: ArchiveReader | None = None,
    ) -> None:
        self.book = book
        self._archive = archive
        self.archived = 0
        """Instructions let go of by :meth:`archive` (and not revived since)."""
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self._tracked: dict[str, _Tracked] = {}
        self._timers: list[tuple[dt.datetime, int, _Timer, str, int]] = []
        self._counter = itertools.count()
        self._changes: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._pending_delivered: set[tuple[str, int, str]] = set()
        self._feeds: dict[tuple[str, str], _Feed] = {}
        self._mappings: dict[MappingKey, str] = {}
        self._held: dict[str, HeldMessage] = {}
        self.default_response_minutes = 15
        """Response time of a relayed instruction whose contract is not mapped yet."""

    # ------------------------------------------------------------------ decisions

    def decide_submit(
        self, so: str, req: InstructionRequest, now: dt.datetime, *, new_id: str
    ) -> Decision:
        """Decide on a new instruction from ``so``; ``new_id`` is used when the request has none."""
        instruction_id = req.id or new_id
        tracked = self._lookup(instruction_id)
        if tracked is not None:
            first = tracked.revisions[0]
            if first.instruction.so != so:
                return Refused.one(409, "id", f"id {instruction_id!r} is already in use")
            differences = _differences(first.content, req.content())
            if differences:
                return Refused(409, differences)
            return Existing(instruction_id, 0)
        inst, problems = build_instruction(
            req, so=so, book=self.book, now=now, instruction_id=instruction_id
        )
        if inst is None:
            return Refused(422, tuple(problems))
        return RevisionRecorded(inst, req.content(), now)

    def _owned(self, so: str, instruction_id: str) -> _Tracked | Refused:
        tracked = self._lookup(instruction_id)
        if tracked is None or tracked.latest.instruction.so != so:
            return Refused.one(404, "id", f"no instruction {instruction_id!r} for {so}")
        return tracked

    def _next_revision(
        self, tracked: _Tracked, wanted: int | None, kind: Kind, content: dict[str, Any]
    ) -> Refused | Existing | None:
        """Idempotency and staleness of an amend or cancel carrying ``wanted`` revision."""
        count = len(tracked.revisions)
        if wanted is not None and wanted < count:
            stored = tracked.revisions[wanted]
            if stored.instruction.kind is not kind:
                return Refused.one(409, "revision", f"revision {wanted} exists and is a "
                                   f"{stored.instruction.kind.value}")
            differences = _differences(stored.content, content)
            return Refused(409, differences) if differences else Existing(
                stored.instruction.id, wanted)
        if wanted is not None and wanted > count:
            return Refused.one(409, "revision", f"the next revision is {count}, not {wanted}")
        if tracked.latest.state not in AMENDABLE:
            return Refused.one(409, "state", f"the instruction is {tracked.latest.state.value}; "
                               f"it can no longer be {kind.value}ed")
        return None

    def decide_amend(
        self, so: str, instruction_id: str, req: AmendRequest, now: dt.datetime
    ) -> Decision:
        """Decide on an amendment: a new revision with the given fields replaced."""
        tracked = self._owned(so, instruction_id)
        if isinstance(tracked, Refused):
            return tracked
        early = self._next_revision(tracked, req.revision, Kind.AMEND, req.content())
        if early is not None:
            return early
        previous = tracked.latest.instruction
        contract = self.book.contracts.get(previous.contract_id or "")
        changes = req.model_dump(exclude_none=True, exclude={"revision"})
        if req.profile_mw is not None and req.capacity_mw is None:
            changes["capacity_mw"] = max(req.profile_mw)
        elif req.capacity_mw is not None and req.profile_mw is None:
            changes["profile_mw"] = None
        if req.assets == () and contract is not None:
            changes["assets"] = contract.assets
        fields = previous.model_dump() | changes | {
            "revision": len(tracked.revisions),
            "kind": Kind.AMEND,
            "issued_at": now,
            "respond_by": req.respond_by or now + self._response_time(previous),
        }
        inst = Instruction.model_validate(fields)
        problems = check(inst, self.book, now)
        if problems:
            return Refused(422, tuple(problems))
        return RevisionRecorded(inst, req.content(), now)

    def decide_cancel(
        self, so: str, instruction_id: str, req: CancelRequest, now: dt.datetime
    ) -> Decision:
        """Decide on a cancellation: a new revision the FSP must acknowledge."""
        tracked = self._owned(so, instruction_id)
        if isinstance(tracked, Refused):
            return tracked
        early = self._next_revision(tracked, req.revision, Kind.CANCEL, req.content())
        if early is not None:
            return early
        previous = tracked.latest.instruction
        inst = Instruction.model_validate(previous.model_dump() | {
            "revision": len(tracked.revisions),
            "kind": Kind.CANCEL,
            "issued_at": now,
            "respond_by": now + self._response_time(previous),
            "cancel_reason": req.reason,
        })
        return RevisionRecorded(inst, req.content(), now)

    def _response_time(self, inst: Instruction) -> dt.timedelta:
        contract = self.book.contracts.get(inst.contract_id or "")
        minutes = contract.response_minutes if contract else self.default_response_minutes
        return dt.timedelta(minutes=minutes)

    def decide_relay(self, so: str, req: RelayedRequest, now: dt.datetime) -> Decision:
        """Decide on an instruction relayed from ``so``'s platform. Relay first: what the
        mapping lacks is recorded in ``unreconciled``, not refused; only a message that
        cannot be an instruction at all (end before start, a profile that does not fit)
        is refused."""
        tracked = self._lookup(req.id)
        if tracked is not None:
            first = tracked.revisions[0]
            if first.instruction.so != so:
                return Refused.one(409, "id", f"id {req.id!r} is already in use")
            differences = _differences(first.content, req.content())
            return Refused(409, differences) if differences else Existing(req.id, 0)
        capacity = req.capacity_mw if req.profile_mw is None else max(req.profile_mw)
        if capacity is None or capacity <= 0:
            return Refused.one(422, "profile_mw", "the profile has no positive value")
        inst = Instruction(
            id=req.id, revision=0, kind=Kind.INSTRUCT, so=so, fsp=req.fsp,
            contract_id=req.contract_id, assets=req.assets, direction=req.direction,
            capacity_mw=capacity, profile_mw=req.profile_mw, start=req.start, end=req.end,
            issued_at=req.issued_at or now, respond_by=req.respond_by,
            external_ref=req.external_ref, note=req.note, unreconciled=req.unreconciled,
            override=f"relayed from {req.external_ref.platform}",
        )
        problems = check(inst, self.book, now)
        if problems:
            return Refused(422, tuple(problems))
        return RevisionRecorded(inst, req.content(), now)

    def decide_reconcile(self, so: str, instruction_id: str, contract_id: str,
                         assets: tuple[str, ...], now: dt.datetime) -> Decision:
        """Attach a relayed instruction to its contract (and assets: all of the contract's
        when none are named). The FSP must be the contract's; repeating it is a no-op."""
        tracked = self._owned(so, instruction_id)
        if isinstance(tracked, Refused):
            return tracked
        inst = tracked.latest.instruction
        contract = self.book.contracts.get(contract_id)
        if contract is None or contract.so != so:
            return Refused.one(422, "contract_id", f"no contract {contract_id!r} held by {so}")
        if contract.fsp != inst.fsp:
            return Refused.one(422, "contract_id", f"contract {contract_id} is with "
                               f"{contract.fsp}; the instruction went to {inst.fsp}")
        problems = tuple(Problem(f"assets[{i}]", f"asset {a!r} is not obligated under "
                                 f"{contract_id}") for i, a in enumerate(assets)
                         if a not in contract.assets)
        if problems:
            return Refused(422, problems)
        chosen = assets or contract.assets
        if not inst.unreconciled and inst.contract_id == contract_id \
                and inst.assets == chosen:
            return Existing(instruction_id, inst.revision)
        if not inst.unreconciled:
            return Refused.one(409, "contract_id", f"the instruction is already reconciled "
                               f"with {inst.contract_id}")
        return EventRecorded(instruction_id, inst.revision, Event.RECONCILED, now,
                             detail={"contract_id": contract_id, "assets": list(chosen)})

    # ------------------------------------------------------------------ relay

    def mapping(self, platform: str, kind: str, external: str) -> str | None:
        """Our id for another platform's id, if mapped."""
        return self._mappings.get((platform, kind, external))

    def mappings(self, platform: str) -> list[tuple[str, str, str]]:
        """Every mapping of ``platform`` as (kind, external, ours), sorted."""
        return sorted((k, e, o) for (p, k, e), o in self._mappings.items() if p == platform)

    def held_message(self, key: str) -> HeldMessage | None:
        """The held message with ``key`` (``platform:external id``), if still held."""
        return self._held.get(key)

    def held(self, so: str | None = None) -> list[HeldMessage]:
        """Relayed messages waiting for a mapping (of one SO's platforms), oldest first."""
        return sorted((h for h in self._held.values() if so is None or h.so == so),
                      key=lambda h: h.at)

    def _apply_relay(self, record: RelayRecorded) -> list[Action]:
        detail = record.detail
        if record.kind is RelayKind.MAPPING:
            key = (detail["platform"], detail["kind"], detail["external"])
            if detail["ours"] is None:
                self._mappings.pop(key, None)
            else:
                self._mappings[key] = detail["ours"]
            return []
        if record.kind is RelayKind.HELD:
            if record.key in self._held:
                return []
            held = self._held[record.key] = HeldMessage(
                record.key, detail["platform"], detail["so"], detail["external_id"],
                detail["reason"], record.at, detail["dispatch"], detail["raw"])
            entry = FeedEntry(FeedKind.RELAY_HELD, record.key, 0, record.at,
                              reason=held.reason)
            return [self._feed("so", held.so, entry)]
        held_before = self._held.pop(record.key, None)
        if held_before is None:
            return []
        why = (f"relayed as {detail['instruction_id']}" if detail.get("instruction_id")
               else f"withdrawn before delivery: {detail.get('withdrawn')}")
        entry = FeedEntry(FeedKind.RELAY_RELEASED, record.key, 0, record.at, reason=why)
        return [self._feed("so", held_before.so, entry)]

    def decide_ack(self, fsp: str, instruction_id: str, ack: Ack, now: dt.datetime) -> Decision:
        """Decide on an FSP's acknowledgement of one revision."""
        tracked = self._lookup(instruction_id)
        if tracked is None or tracked.latest.instruction.fsp != fsp:
            return Refused.one(404, "id", f"no instruction {instruction_id!r} for {fsp}")
        if ack.id is not None and ack.id != instruction_id:
            return Refused.one(422, "id", f"body names {ack.id!r} but the URL {instruction_id!r}")
        if ack.revision >= len(tracked.revisions):
            return Refused.one(404, "revision", f"instruction {instruction_id} has no revision "
                               f"{ack.revision}")
        rev = tracked.revisions[ack.revision]
        if rev.ack is not None:
            if (rev.ack.response, rev.ack.reason) == (ack.response, ack.reason):
                return Existing(instruction_id, ack.revision)
            return Refused.one(409, "response", f"revision {ack.revision} was already "
                               f"acknowledged as {rev.ack.response.value}")
        if rev is not tracked.latest:
            return Refused.one(409, "revision", f"revision {ack.revision} is superseded; "
                               f"acknowledge revision {tracked.latest.instruction.revision}")
        event = Event.FSP_ACCEPTED if ack.response is Response.ACCEPTED else Event.FSP_REJECTED
        if not allowed(rev.state, event):
            return Refused.one(409, "state", f"the instruction is {rev.state.value}; it can no "
                               "longer be acknowledged")
        return EventRecorded(instruction_id, ack.revision, event, now, reason=ack.reason)

    def delivered(
        self, instruction_id: str, revision: int, channel: str, now: dt.datetime
    ) -> EventRecorded | None:
        """A channel handed revision over; returns the record to journal, if it is news."""
        tracked = self._tracked.get(instruction_id)
        key = (instruction_id, revision, channel)
        if tracked is None or revision >= len(tracked.revisions) or key in self._pending_delivered:
            return None
        if channel in tracked.revisions[revision].delivered:
            return None
        self._pending_delivered.add(key)
        return EventRecorded(instruction_id, revision, Event.DELIVERED, now, channel=channel)

    def delivery_failed(
        self, instruction_id: str, revision: int, channel: str, reason: str, now: dt.datetime
    ) -> EventRecorded | None:
        """A channel gave up on revision for good; returns the record to journal, if news."""
        tracked = self._tracked.get(instruction_id)
        if tracked is None or revision >= len(tracked.revisions):
            return None
        if channel in tracked.revisions[revision].failed:
            return None
        return EventRecorded(instruction_id, revision, Event.DELIVERY_FAILED, now,
                             channel=channel, reason=reason)

    def still_wanted(self, instruction_id: str, revision: int, now: dt.datetime) -> bool:
        """Whether a hand-over of this revision is still worth retrying: it is the latest,
        unacknowledged, still open, and its instruction has not ended."""
        tracked = self._tracked.get(instruction_id)
        return tracked is not None and self._wants_delivery(tracked, revision, now)

    # ------------------------------------------------------------------ applying records

    def apply(self, record: Record, seq: int, now: dt.datetime, *, replay: bool = False
              ) -> list[Action]:
        """Apply a *committed* record; returns the actions to carry out (none on replay)."""
        if isinstance(record, RelayRecorded):
            notes = self._apply_relay(record)
            return [] if replay else list(notes)
        instruction_id = record.instruction.id if isinstance(record, RevisionRecorded) \
            else record.id
        if instruction_id not in self._tracked and self.archived:
            self._revive(instruction_id, before=seq)
        if isinstance(record, RevisionRecorded):
            return self._apply_revision(record, seq, now, replay)
        return self._apply_event(record, seq, now, replay)

    def _note_change(self, tracked: _Tracked, seq: int, at: dt.datetime) -> None:
        tracked.seq = seq
        tracked.changed_at = at
        inst = tracked.latest.instruction
        for key in (("so", inst.so), ("fsp", inst.fsp)):
            self._changes.setdefault(key, []).append((seq, inst.id))

    def _apply_revision(self, record: RevisionRecorded, seq: int, now: dt.datetime,
                        replay: bool) -> list[Action]:
        inst = record.instruction
        tracked = self._tracked.get(inst.id)
        at = record.at if replay else now
        if tracked is None:
            tracked = self._tracked[inst.id] = _Tracked([], seq, at)
        elif tracked.latest.state in AMENDABLE:
            tracked.latest.state = transition(tracked.latest.state, Event.SUPERSEDED)
        event = Event.CANCEL_JOURNALED if inst.kind is Kind.CANCEL else Event.JOURNALED
        # accepted_at is the commit: ``now`` when live; on replay the receipt time, which is
        # at most one journal transaction earlier.
        tracked.revisions.append(_Revision(
            inst, record.content, transition(State.RECEIVED, event),
            record.at if replay else now,
        ))
        self._note_change(tracked, seq, at)
        notes = [self._feed("fsp", inst.fsp, FeedEntry(FeedKind(message_type(inst.kind)),
                                                         inst.id, inst.revision, at)),
                 self._feed("so", inst.so, FeedEntry(FeedKind.ACCEPTED, inst.id,
                                                       inst.revision, at))]
        if replay:
            return []
        if inst.kind is not Kind.CANCEL:
            self._schedule(inst.respond_by, _Timer.RESPOND_BY, inst.id, inst.revision)
        return [*notes, *self._send(tracked.latest, now, self._push_channels(inst.fsp))]

    def _apply_event(self, record: EventRecorded, seq: int, now: dt.datetime, replay: bool
                     ) -> list[Action]:
        tracked = self._tracked.get(record.id)
        if tracked is None or record.revision >= len(tracked.revisions):
            return []
        rev = tracked.revisions[record.revision]
        news = False
        if record.event is Event.DELIVERED and record.channel is not None:
            self._pending_delivered.discard((record.id, record.revision, record.channel))
            news = record.channel not in rev.delivered
            rev.delivered.setdefault(record.channel, record.at)
        if not allowed(rev.state, record.event):
            return []  # overtaken by another change; the record stays in the journal, harmless
        before = rev.state
        rev.state = transition(rev.state, record.event)
        acked = record.event in (Event.FSP_ACCEPTED, Event.FSP_REJECTED) and rev.ack is None
        if acked:
            rev.ack = AckView(
                Response.ACCEPTED if record.event is Event.FSP_ACCEPTED else Response.REJECTED,
                record.reason, record.at, late=before is State.EXPIRED,
            )
        if record.event is Event.DELIVERY_FAILED and record.channel is not None:
            news = record.channel not in rev.failed
            rev.failed.setdefault(record.channel, record.reason or "")
        if record.event is Event.ESCALATED:
            news = not rev.escalated
            rev.escalated = True
        if record.event is Event.RECONCILED and record.detail is not None:
            news = self._reconcile(tracked, record.detail)
        if record.event is Event.RELAY_ANSWERED and rev.relay_answer is None:
            rev.relay_answer = record.reason or ""
            news = True
        if news or rev.state is not before:
            self._note_change(tracked, seq, record.at)
        notes = self._feed_event(rev.instruction, record, news=news, acked=acked,
                                 moved=rev.state is not before)
        if replay:
            return []
        actions: list[Action] = list(notes)
        if rev.state is State.ACKNOWLEDGED_ACCEPTED:
            self._schedule_run(rev.instruction)
        if rev.state is State.EXPIRED and before is not State.EXPIRED:
            actions.append(Escalate(rev.instruction, record.at))
        return actions

    @staticmethod
    def _reconcile(tracked: _Tracked, detail: dict[str, Any]) -> bool:
        """Attach the contract and assets to every revision; False if already attached."""
        if not tracked.latest.instruction.unreconciled:
            return False
        for rev in tracked.revisions:
            rev.instruction = Instruction.model_validate(rev.instruction.model_dump() | {
                "contract_id": detail["contract_id"], "assets": tuple(detail["assets"]),
                "unreconciled": ()})
        return True

    # ------------------------------------------------------------------ feeds

    def _feed(self, role: str, principal: str, entry: FeedEntry) -> Notify:
        feed = self._feeds.get((role, principal))
        if feed is None:
            feed = self._feeds[role, principal] = _Feed()
        feed.entries.append(entry)
        if entry.kind not in _RELAY_FEED:
            self._tracked[entry.id].feed_refs += 1
        return Notify(role, principal)

    def _feed_event(self, inst: Instruction, record: EventRecorded, *, news: bool,
                    acked: bool, moved: bool) -> list[Notify]:
        """Append what ``record`` means to each side's feed; returns the feeds that grew."""
        def entry(kind: FeedKind) -> FeedEntry:
            return FeedEntry(kind, inst.id, inst.revision, record.at, record.channel,
                             record.reason)

        event = record.event
        notes: list[Notify] = []
        if acked:
            response = FeedKind.ACKNOWLEDGED if event is Event.FSP_ACCEPTED else FeedKind.REJECTED
            notes.append(self._feed("so", inst.so, entry(response)))
            notes.append(self._feed("fsp", inst.fsp, entry(response)))
        elif event is Event.RESPONSE_DEADLINE and moved:
            notes.append(self._feed("so", inst.so, entry(FeedKind.EXPIRED)))
            notes.append(self._feed("fsp", inst.fsp, entry(FeedKind.EXPIRED)))
        elif moved and event in (Event.STARTED, Event.ENDED):
            kind = FeedKind.ACTIVE if event is Event.STARTED else FeedKind.COMPLETED
            notes.append(self._feed("so", inst.so, entry(kind)))
        elif news and event in (Event.DELIVERED, Event.DELIVERY_FAILED, Event.ESCALATED,
                                Event.RECONCILED):
            notes.append(self._feed("so", inst.so, entry(FeedKind(event.value))))
        return notes

    def feed_length(self, role: str, principal: str) -> int:
        """The number of the newest event in the feed of ``principal`` (0 when empty)."""
        feed = self._feeds.get((role, principal))
        return 0 if feed is None else feed.base + len(feed.entries)

    def feed_first(self, role: str, principal: str) -> int:
        """The number of the oldest event still held (``feed_length() + 1`` when none is)."""
        feed = self._feeds.get((role, principal))
        return 1 if feed is None else feed.base + 1

    def feed_event(self, role: str, principal: str, number: int) -> dict[str, Any]:
        """Event ``number`` (1-based) of the feed as the JSON that stream clients receive.

        FSP events about a revision carry the full message (as on MQTT); SO events carry the
        revision's current state, and the channel and reason where there is one.
        Raises :class:`LookupError` for a number no longer held (see :meth:`feed_first`).
        """
        feed = self._feeds[role, principal]
        if number <= feed.base:
            raise LookupError(f"event {number} of this feed is no longer held")
        entry = feed.entries[number - 1 - feed.base]
        if entry.kind in _RELAY_FEED:
            return {"seq": number, "event": entry.kind.value, "id": entry.id,
                    "at": entry.at.isoformat(), "reason": entry.reason}
        rev = self._tracked[entry.id].revisions[entry.revision]
        body: dict[str, Any] = {
            "seq": number, "event": entry.kind.value, "id": entry.id,
            "revision": entry.revision, "at": entry.at.isoformat(),
        }
        if role == "fsp" and entry.kind in _MESSAGE_KINDS:
            body["message"] = message(rev.instruction, rev.accepted_at)
        if role == "so":
            body["fsp"] = rev.instruction.fsp
            body["state"] = rev.state.value
        if entry.kind is FeedKind.EXPIRED:
            body["respond_by"] = rev.instruction.respond_by.isoformat()
        if entry.kind is FeedKind.RECONCILED:
            body["contract_id"] = rev.instruction.contract_id
        if entry.channel is not None:
            body["channel"] = entry.channel
        if entry.reason is not None:
            body["reason"] = entry.reason
        return body

    # ------------------------------------------------------------------ time

    def _schedule(self, when: dt.datetime, timer: _Timer, instruction_id: str, rev: int) -> None:
        heapq.heappush(self._timers, (when, next(self._counter), timer, instruction_id, rev))

    def _schedule_run(self, inst: Instruction) -> None:
        self._schedule(inst.start, _Timer.START, inst.id, inst.revision)
        self._schedule(inst.end, _Timer.END, inst.id, inst.revision)

    def _push_channels(self, fsp: str) -> tuple[Channel, ...]:
        """The FSP's configured push channels (MQTT for an FSP no longer in the book)."""
        found = self.book.fsps.get(fsp)
        configured = found.endpoints.channels if found is not None else (Channel.MQTT,)
        return tuple(c for c in PUSH_CHANNELS if c in configured)

    def _send(self, rev: _Revision, now: dt.datetime, channels: tuple[Channel, ...]
              ) -> list[Action]:
        """Send ``rev`` on ``channels``; arms the re-send timer when MQTT is among them."""
        if not channels:
            return []
        inst = rev.instruction
        attempt = rev.attempts
        rev.attempts += 1
        if any(c in RESENT_CHANNELS for c in channels):
            self._schedule(now + self.retry.delay(attempt, self.rng), _Timer.RESEND, inst.id,
                           inst.revision)
        return [Send(inst, attempt, rev.accepted_at, channels)]

    def _wants_delivery(self, tracked: _Tracked, revision: int, now: dt.datetime) -> bool:
        rev = tracked.latest
        return (
            rev.instruction.revision == revision
            and rev.ack is None
            and rev.state in SENDABLE
            and now < rev.instruction.end
        )

    def next_wakeup(self) -> dt.datetime | None:
        """When :meth:`tick` next has something to do."""
        return self._timers[0][0] if self._timers else None

    def tick(self, now: dt.datetime) -> list[Action]:
        """Fire every timer due at ``now``: re-sends and deadline records."""
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, timer, instruction_id, revision = heapq.heappop(self._timers)
            tracked = self._tracked.get(instruction_id)
            if tracked is None or tracked.latest.instruction.revision != revision:
                continue
            rev = tracked.latest
            if timer is _Timer.RESEND:
                if self._wants_delivery(tracked, revision, now):
                    resent = tuple(c for c in self._push_channels(rev.instruction.fsp)
                                   if c in RESENT_CHANNELS)
                    actions += self._send(rev, now, resent)
                continue
            event = {
                _Timer.RESPOND_BY: Event.RESPONSE_DEADLINE,
                _Timer.START: Event.STARTED,
                _Timer.END: Event.ENDED,
            }[timer]
            if allowed(rev.state, event) and rev.state is not transition(rev.state, event):
                actions.append(Persist(EventRecorded(instruction_id, revision, event, now)))
        return actions

    def recover(self, now: dt.datetime) -> list[Action]:
        """After replaying the journal: re-send what is unacknowledged, re-arm deadlines."""
        actions: list[Action] = []
        for tracked in self._tracked.values():
            rev = tracked.latest
            inst = rev.instruction
            if self._wants_delivery(tracked, inst.revision, now):
                channels = tuple(
                    c for c in self._push_channels(inst.fsp)
                    if c in RESENT_CHANNELS or (c not in rev.delivered and c not in rev.failed)
                )
                actions += self._send(rev, now, channels)
            if rev.state is State.EXPIRED and not rev.escalated:
                actions.append(Escalate(inst, inst.respond_by))
            if rev.state in (State.ACCEPTED, State.DELIVERED):
                self._schedule(inst.respond_by, _Timer.RESPOND_BY, inst.id, inst.revision)
            if rev.state in (State.ACKNOWLEDGED_ACCEPTED, State.ACTIVE):
                self._schedule_run(inst)
        return actions

    # ------------------------------------------------------------------ holding

    def _finished(self, tracked: _Tracked, now: dt.datetime) -> bool:
        """Nothing more will happen to it unless someone asks: no send, no timer due."""
        rev = tracked.latest
        if rev.instruction.unreconciled:
            return False  # held until reconciled: it is counted and listed meanwhile
        if rev.state is State.CANCELLED:
            return rev.ack is not None or now >= rev.instruction.end
        return now >= rev.instruction.end and rev.state not in (
            State.ACKNOWLEDGED_ACCEPTED, State.ACTIVE)

    def archive(self, now: dt.datetime, hold: dt.timedelta) -> int:
        """Let go of feed events older than ``hold`` and of finished instructions unchanged
        for ``hold`` that no held feed event names. Returns how many instructions went.

        Does nothing to instructions without an ``archive`` reader to read them back.
        """
        cutoff = now - hold
        for feed in self._feeds.values():
            old = 0
            for entry in feed.entries:
                if entry.at >= cutoff:
                    break
                old += 1
            if old:
                for entry in feed.entries[:old]:
                    if entry.kind not in _RELAY_FEED:
                        self._tracked[entry.id].feed_refs -= 1
                del feed.entries[:old]
                feed.base += old
        if self._archive is None:
            return 0
        gone = [
            instruction_id for instruction_id, tracked in self._tracked.items()
            if tracked.feed_refs == 0 and tracked.changed_at < cutoff
            and self._finished(tracked, now)
        ]
        for instruction_id in gone:
            del self._tracked[instruction_id]
        if gone:
            self.archived += len(gone)
            for key, changes in self._changes.items():
                self._changes[key] = [
                    (seq, i) for seq, i in changes
                    if (t := self._tracked.get(i)) is not None and t.seq == seq
                ]
        return len(gone)

    def _read_back(self, instruction_id: str, before: int | None = None) -> _Tracked | None:
        """An archived instruction rebuilt from its journaled records (those before seq
        ``before`` when given), or None when the journal has none."""
        if self._archive is None or not self.archived:
            return None
        scratch = Dispatcher(self.book, retry=self.retry)
        for seq, record in self._archive(instruction_id):
            if before is not None and seq >= before:
                break
            scratch.apply(record, seq, record.at, replay=True)
        tracked = scratch._tracked.get(instruction_id)
        if tracked is not None:
            tracked.feed_refs = 0
        return tracked

    def _lookup(self, instruction_id: str) -> _Tracked | None:
        """The instruction, held or read back from the archive (without holding it again)."""
        return self._tracked.get(instruction_id) or self._read_back(instruction_id)

    def _revive(self, instruction_id: str, before: int) -> None:
        """Hold an archived instruction again: a record about it is being applied."""
        tracked = self._read_back(instruction_id, before)
        if tracked is not None:
            self._tracked[instruction_id] = tracked
            self.archived -= 1

    # ------------------------------------------------------------------ reads

    def view(self, instruction_id: str) -> InstructionView | None:
        tracked = self._lookup(instruction_id)
        if tracked is None:
            return None
        latest = tracked.latest.instruction
        return InstructionView(
            id=instruction_id,
            so=latest.so,
            fsp=latest.fsp,
            state=tracked.latest.state,
            cursor=tracked.seq,
            revisions=tuple(
                RevisionView(r.instruction, r.state, r.accepted_at,
                             tuple(r.delivered.items()), r.ack, r.attempts,
                             tuple(r.failed.items()), r.escalated, r.relay_answer)
                for r in tracked.revisions
            ),
        )

    def visible(self, instruction_id: str, role: str, principal: str) -> InstructionView | None:
        """The instruction if ``principal`` (an ``so`` or ``fsp``) may see it, else None."""
        if role not in ("so", "fsp"):
            return None
        found = self.view(instruction_id)
        if found is None or getattr(found, role) != principal:
            return None
        return found

    def changed_since(
        self, role: str, principal: str, cursor: int, limit: int
    ) -> tuple[list[InstructionView], int]:
        """Instructions of ``principal`` changed after ``cursor``, oldest change first.

        Returns the views and the cursor to pass next time (unchanged when nothing is new).
        """
        changes = self._changes.get((role, principal), [])
        start = bisect.bisect_right(changes, (cursor, "\uffff"))
        found: list[InstructionView] = []
        next_cursor = cursor
        for seq, instruction_id in changes[start:]:
            if len(found) >= limit:
                break
            next_cursor = seq
            if self._tracked[instruction_id].seq == seq:
                view = self.view(instruction_id)
                assert view is not None
                found.append(view)
        return found, next_cursor

    def ids(self) -> list[str]:
        """Every instruction id known, in no particular order."""
        return list(self._tracked)

    def state_counts(self) -> Counter[State]:
        return Counter(t.latest.state for t in self._tracked.values())

    def unacknowledged(self) -> int:
        """How many instructions still wait for the FSP's answer to their latest revision."""
        return sum(
            1 for t in self._tracked.values() if t.latest.ack is None and t.latest.state in SENDABLE
        )

    def awaiting_relay_answer(self, platforms: set[str]) -> list[InstructionView]:
        """Relayed instructions of ``platforms`` whose first revision was answered by the
        FSP (or expired unanswered) and whose platform has not been told yet."""
        found = []
        for instruction_id, tracked in self._tracked.items():
            first = tracked.revisions[0]
            ref = first.instruction.external_ref
            if ref is None or ref.platform not in platforms or first.relay_answer is not None:
                continue
            if first.ack is not None or first.state is State.EXPIRED:
                view = self.view(instruction_id)
                if view is not None:
                    found.append(view)
        return found

    def unreconciled_views(self, role: str, principal: str) -> list[InstructionView]:
        """The relayed instructions of ``principal`` (an ``so`` or ``fsp``) still lacking
        their contract or assets."""
        found = [self.view(i) for i, t in self._tracked.items()
                 if t.latest.instruction.unreconciled
                 and getattr(t.latest.instruction, role) == principal]
        return sorted((v for v in found if v is not None), key=lambda v: v.id)

    def unreconciled(self) -> int:
        """How many relayed instructions still lack their contract or assets."""
        return sum(1 for t in self._tracked.values() if t.latest.instruction.unreconciled)

    def __len__(self) -> int:
        return len(self._tracked)
