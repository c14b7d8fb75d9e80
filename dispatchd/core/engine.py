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
4. Report channel deliveries with :meth:`Dispatcher.delivered`; journal what it returns.
5. On start-up, :meth:`Dispatcher.apply` every journaled record in order with
   ``replay=True`` (no actions), then call :meth:`Dispatcher.recover` once.

Time is always passed in (``now``); randomness comes from the ``rng`` given at creation.
"""

from __future__ import annotations

import bisect
import datetime as dt
import heapq
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from contracts.io import ContractBook

from .instruction import (
    Ack,
    AmendRequest,
    CancelRequest,
    Instruction,
    InstructionRequest,
    Kind,
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


Record = RevisionRecorded | EventRecorded


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


@dataclass(frozen=True)
class Send:
    """Action: deliver this revision to the FSP (every channel), attempt ``attempt``."""

    instruction: Instruction
    attempt: int
    accepted_at: dt.datetime

    def payload(self) -> dict[str, Any]:
        """The message body FSPs receive; receivers de-duplicate on (id, revision)."""
        body = dict(self.instruction.as_json)
        body["type"] = message_type(self.instruction.kind)
        body["accepted_at"] = self.accepted_at.isoformat()
        body["attempt"] = self.attempt
        return body


@dataclass(frozen=True)
class Persist:
    """Action: journal this record, then :meth:`Dispatcher.apply` it."""

    record: EventRecorded


Action = Send | Persist


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


@dataclass
class _Tracked:
    revisions: list[_Revision]
    seq: int

    @property
    def latest(self) -> _Revision:
        return self.revisions[-1]


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
        rng: random.Random | None = None,
    ) -> None:
        self.book = book
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        self._tracked: dict[str, _Tracked] = {}
        self._timers: list[tuple[dt.datetime, int, _Timer, str, int]] = []
        self._counter = itertools.count()
        self._changes: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._pending_delivered: set[tuple[str, int, str]] = set()

    # ------------------------------------------------------------------ decisions

    def decide_submit(
        self, so: str, req: InstructionRequest, now: dt.datetime, *, new_id: str
    ) -> Decision:
        """Decide on a new instruction from ``so``; ``new_id`` is used when the request has none."""
        instruction_id = req.id or new_id
        tracked = self._tracked.get(instruction_id)
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
        tracked = self._tracked.get(instruction_id)
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
        contract = self.book.contracts[previous.contract_id]
        changes = req.model_dump(exclude_none=True, exclude={"revision"})
        if req.profile_mw is not None and req.capacity_mw is None:
            changes["capacity_mw"] = max(req.profile_mw)
        elif req.capacity_mw is not None and req.profile_mw is None:
            changes["profile_mw"] = None
        if req.assets == ():
            changes["assets"] = contract.assets
        fields = previous.model_dump() | changes | {
            "revision": len(tracked.revisions),
            "kind": Kind.AMEND,
            "issued_at": now,
            "respond_by": req.respond_by or now + dt.timedelta(minutes=contract.response_minutes),
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
        contract = self.book.contracts[previous.contract_id]
        inst = Instruction.model_validate(previous.model_dump() | {
            "revision": len(tracked.revisions),
            "kind": Kind.CANCEL,
            "issued_at": now,
            "respond_by": now + dt.timedelta(minutes=contract.response_minutes),
            "cancel_reason": req.reason,
        })
        return RevisionRecorded(inst, req.content(), now)

    def decide_ack(self, fsp: str, instruction_id: str, ack: Ack, now: dt.datetime) -> Decision:
        """Decide on an FSP's acknowledgement of one revision."""
        tracked = self._tracked.get(instruction_id)
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

    # ------------------------------------------------------------------ applying records

    def apply(self, record: Record, seq: int, now: dt.datetime, *, replay: bool = False
              ) -> list[Action]:
        """Apply a *committed* record; returns the actions to carry out (none on replay)."""
        if isinstance(record, RevisionRecorded):
            return self._apply_revision(record, seq, now, replay)
        return self._apply_event(record, seq, now, replay)

    def _note_change(self, tracked: _Tracked, seq: int) -> None:
        tracked.seq = seq
        inst = tracked.latest.instruction
        for key in (("so", inst.so), ("fsp", inst.fsp)):
            self._changes.setdefault(key, []).append((seq, inst.id))

    def _apply_revision(self, record: RevisionRecorded, seq: int, now: dt.datetime,
                        replay: bool) -> list[Action]:
        inst = record.instruction
        tracked = self._tracked.get(inst.id)
        if tracked is None:
            tracked = self._tracked[inst.id] = _Tracked([], seq)
        elif tracked.latest.state in AMENDABLE:
            tracked.latest.state = transition(tracked.latest.state, Event.SUPERSEDED)
        event = Event.CANCEL_JOURNALED if inst.kind is Kind.CANCEL else Event.JOURNALED
        # accepted_at is the commit: ``now`` when live; on replay the receipt time, which is
        # at most one journal transaction earlier.
        tracked.revisions.append(_Revision(
            inst, record.content, transition(State.RECEIVED, event),
            record.at if replay else now,
        ))
        self._note_change(tracked, seq)
        if replay:
            return []
        if inst.kind is not Kind.CANCEL:
            self._schedule(inst.respond_by, _Timer.RESPOND_BY, inst.id, inst.revision)
        return self._send(tracked.latest, now)

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
        if record.event in (Event.FSP_ACCEPTED, Event.FSP_REJECTED):
            rev.ack = AckView(
                Response.ACCEPTED if record.event is Event.FSP_ACCEPTED else Response.REJECTED,
                record.reason, record.at, late=before is State.EXPIRED,
            )
        if news or rev.state is not before:
            self._note_change(tracked, seq)
        if not replay and rev.state is State.ACKNOWLEDGED_ACCEPTED:
            self._schedule_run(rev.instruction)
        return []

    # ------------------------------------------------------------------ time

    def _schedule(self, when: dt.datetime, timer: _Timer, instruction_id: str, rev: int) -> None:
        heapq.heappush(self._timers, (when, next(self._counter), timer, instruction_id, rev))

    def _schedule_run(self, inst: Instruction) -> None:
        self._schedule(inst.start, _Timer.START, inst.id, inst.revision)
        self._schedule(inst.end, _Timer.END, inst.id, inst.revision)

    def _send(self, rev: _Revision, now: dt.datetime) -> list[Action]:
        inst = rev.instruction
        attempt = rev.attempts
        rev.attempts += 1
        self._schedule(now + self.retry.delay(attempt, self.rng), _Timer.RESEND, inst.id,
                       inst.revision)
        return [Send(inst, attempt, rev.accepted_at)]

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
                    actions += self._send(rev, now)
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
                actions += self._send(rev, now)
            if rev.state in (State.ACCEPTED, State.DELIVERED):
                self._schedule(inst.respond_by, _Timer.RESPOND_BY, inst.id, inst.revision)
            if rev.state in (State.ACKNOWLEDGED_ACCEPTED, State.ACTIVE):
                self._schedule_run(inst)
        return actions

    # ------------------------------------------------------------------ reads

    def view(self, instruction_id: str) -> InstructionView | None:
        tracked = self._tracked.get(instruction_id)
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
                             tuple(r.delivered.items()), r.ack, r.attempts)
                for r in tracked.revisions
            ),
        )

    def visible(self, instruction_id: str, role: str, principal: str) -> InstructionView | None:
        """The instruction if ``principal`` (an ``so`` or ``fsp``) may see it, else None."""
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

    def state_counts(self) -> Counter[State]:
        return Counter(t.latest.state for t in self._tracked.values())

    def unacknowledged(self) -> int:
        """How many instructions still wait for the FSP's answer to their latest revision."""
        return sum(
            1 for t in self._tracked.values() if t.latest.ack is None and t.latest.state in SENDABLE
        )

    def __len__(self) -> int:
        return len(self._tracked)
