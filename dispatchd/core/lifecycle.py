"""The instruction lifecycle: every state transition lives in this table.

Each *revision* of an instruction has a state. The instruction's state is the state of its
latest revision; earlier revisions end ``superseded``. Nothing outside this module decides
what state follows another: it asks :func:`transition`.

::

    received ─journaled──────────▶ accepted ─delivered─▶ delivered
    received ─cancel_journaled───▶ cancelled (delivered and acknowledged like any revision)
    accepted|delivered ─fsp_accepted─▶ acknowledged_accepted ─started─▶ active ─ended─▶ completed
    accepted|delivered ─fsp_rejected─▶ acknowledged_rejected
    accepted|delivered ─response_deadline─▶ expired   (a late answer is still recorded)
    any open revision ─superseded─▶ superseded        (an amend or cancel was journaled)

Four events record what happened around a revision without changing its state:
``escalated`` (the expiry was escalated to people), ``delivery_failed`` (a channel gave
up for good, e.g. a webhook answered 4xx), ``reconciled`` (a relayed instruction was
mapped to its contract and assets) and ``relay_answered`` (the platform that relayed it
was told the FSP's answer).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    RECEIVED = "received"
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    ACKNOWLEDGED_ACCEPTED = "acknowledged_accepted"
    ACKNOWLEDGED_REJECTED = "acknowledged_rejected"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"


class Event(StrEnum):
    JOURNALED = "journaled"
    CANCEL_JOURNALED = "cancel_journaled"
    DELIVERED = "delivered"
    FSP_ACCEPTED = "fsp_accepted"
    FSP_REJECTED = "fsp_rejected"
    RESPONSE_DEADLINE = "response_deadline"
    STARTED = "started"
    ENDED = "ended"
    SUPERSEDED = "superseded"
    ESCALATED = "escalated"
    DELIVERY_FAILED = "delivery_failed"
    RECONCILED = "reconciled"
    RELAY_ANSWERED = "relay_answered"


class InvalidTransition(Exception):
    """An event that the lifecycle does not allow in the current state (a bug or a race)."""

    def __init__(self, state: State, event: Event) -> None:
        self.state, self.event = state, event
        super().__init__(f"{event.value} is not possible in state {state.value}")


S, E = State, Event
_AWAITING = (S.ACCEPTED, S.DELIVERED)
_OPEN = (*_AWAITING, S.ACKNOWLEDGED_ACCEPTED, S.ACKNOWLEDGED_REJECTED, S.ACTIVE, S.EXPIRED)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.RECEIVED, E.JOURNALED): S.ACCEPTED,
    (S.RECEIVED, E.CANCEL_JOURNALED): S.CANCELLED,
    **{(s, E.DELIVERED): S.DELIVERED for s in _AWAITING},
    **{(s, E.FSP_ACCEPTED): S.ACKNOWLEDGED_ACCEPTED for s in (*_AWAITING, S.EXPIRED)},
    **{(s, E.FSP_REJECTED): S.ACKNOWLEDGED_REJECTED for s in (*_AWAITING, S.EXPIRED)},
    **{(s, E.RESPONSE_DEADLINE): S.EXPIRED for s in _AWAITING},
    (S.ACKNOWLEDGED_ACCEPTED, E.STARTED): S.ACTIVE,
    (S.ACKNOWLEDGED_ACCEPTED, E.ENDED): S.COMPLETED,
    (S.ACTIVE, E.ENDED): S.COMPLETED,
    **{(s, E.SUPERSEDED): S.SUPERSEDED for s in _OPEN},
    # A cancellation is delivered and acknowledged, but stays cancelled.
    (S.CANCELLED, E.DELIVERED): S.CANCELLED,
    (S.CANCELLED, E.FSP_ACCEPTED): S.CANCELLED,
    (S.CANCELLED, E.FSP_REJECTED): S.CANCELLED,
    # Late delivery reports (another channel, or a re-send) change nothing.
    **{
        (s, E.DELIVERED): s
        for s in (S.ACKNOWLEDGED_ACCEPTED, S.ACKNOWLEDGED_REJECTED, S.ACTIVE, S.COMPLETED,
                  S.EXPIRED, S.SUPERSEDED)
    },
    # Records of what happened around a revision; the state stays as it is.
    **{(s, e): s for s in State if s is not S.RECEIVED
       for e in (E.ESCALATED, E.DELIVERY_FAILED, E.RECONCILED, E.RELAY_ANSWERED)},
}

SENDABLE = frozenset({S.ACCEPTED, S.DELIVERED, S.EXPIRED, S.CANCELLED})
"""States in which the latest revision is (re-)sent until the FSP acknowledges it or the
instruction's end passes (an expired one too: a control centre that comes back late must
still see it)."""
AMENDABLE = frozenset(_OPEN)
"""States in which the SO may amend or cancel."""
FINAL = frozenset({S.COMPLETED, S.CANCELLED, S.SUPERSEDED})


def transition(state: State, event: Event) -> State:
    """The state that ``event`` leads to from ``state``; raises :class:`InvalidTransition`."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(state, event) from None


def allowed(state: State, event: Event) -> bool:
    return (state, event) in TRANSITIONS
