"""The lifecycle table."""

from __future__ import annotations

import pytest

from dispatchd.core.lifecycle import (
    AMENDABLE,
    FINAL,
    SENDABLE,
    TRANSITIONS,
    Event,
    InvalidTransition,
    State,
    transition,
)


def test_every_state_is_reachable_from_received() -> None:
    """No state in the enum is dead: each can be reached through the table."""
    reached, frontier = {State.RECEIVED}, [State.RECEIVED]
    while frontier:
        state = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in reached:
                reached.add(dst)
                frontier.append(dst)
    assert reached == set(State)


def test_final_states_only_absorb_delivery_and_answers() -> None:
    """Completed, cancelled and superseded never turn into another state."""
    for (src, _), dst in TRANSITIONS.items():
        if src in FINAL:
            assert dst is src


def test_unknown_transition_raises() -> None:
    with pytest.raises(InvalidTransition, match="fsp_accepted is not possible in state completed"):
        transition(State.COMPLETED, Event.FSP_ACCEPTED)


def test_only_open_instructions_are_sent_or_amended() -> None:
    assert not SENDABLE & {State.COMPLETED, State.SUPERSEDED, State.ACKNOWLEDGED_ACCEPTED}
    assert not AMENDABLE & FINAL
