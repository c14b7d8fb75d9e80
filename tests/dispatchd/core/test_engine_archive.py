"""Letting go of finished instructions and old feed events, and reading them back."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from contracts.io import ContractBook
from dispatchd.core.engine import (
    Dispatcher,
    Existing,
    InstructionView,
    Refused,
    RetryPolicy,
    RevisionRecorded,
)
from dispatchd.core.instruction import CancelRequest, InstructionRequest
from dispatchd.core.lifecycle import State
from tests.conftest import pick
from tests.dispatchd.core.test_engine import MIN, Harness, request

HOLD = 30 * MIN


@pytest.fixture(name="h")
def harness(book: ContractBook) -> Harness:
    return Harness(book)


def journaled(view: InstructionView | None) -> dict[str, Any]:
    """A view's JSON without the send count, which the journal does not keep."""
    assert view is not None
    body = view.as_json()
    for revision in body["revisions"]:
        del revision["send_attempts"]
    return body


def finished_instruction(h: Harness) -> str:
    """I1: accepted by its FSP, run, completed; then everything about it is quiet."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.ack(contract.fsp, "I1", 0)
    h.advance(71 * MIN)
    assert h.state("I1") is State.COMPLETED
    return "I1"


def test_a_finished_quiet_instruction_is_let_go_and_reads_back_the_same(h: Harness) -> None:
    """Memory holds what is in flight; the journal answers identically for the rest."""
    finished_instruction(h)
    before = journaled(h.engine.view("I1"))
    assert h.engine.archive(h.now, HOLD) == 0  # finished, but changed within the hold
    h.advance(HOLD + MIN)
    assert h.engine.archive(h.now, HOLD) == 1
    assert len(h.engine) == 0 and h.engine.archived == 1
    assert journaled(h.engine.view("I1")) == before


def test_instructions_still_in_flight_are_held(h: Harness) -> None:
    """Unanswered (still re-sent until its end) or accepted and not yet ended: kept."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract, id="waiting"))
    h.submit(contract.so, **request(contract, id="running",
                                     end=(h.now + 600 * MIN).isoformat()))
    h.ack(contract.fsp, "running", 0)
    h.advance(60 * MIN)
    assert h.engine.archive(h.now, dt.timedelta(0)) == 0
    assert sorted(h.engine.ids()) == ["running", "waiting"]


def test_a_cancel_is_let_go_only_once_acknowledged(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.decide_and_commit(h.engine.decide_cancel(contract.so, "I1", CancelRequest(reason="x"),
                                               h.now))
    h.advance(MIN)
    assert h.engine.archive(h.now, dt.timedelta(0)) == 0
    h.ack(contract.fsp, "I1", 1)
    h.advance(MIN)
    assert h.engine.archive(h.now, dt.timedelta(0)) == 1


def test_an_archived_id_is_still_idempotent_and_still_taken(h: Harness) -> None:
    """A repeat of the same request is answered with the stored one, never a second copy."""
    contract = pick(h.book)
    finished_instruction(h)
    h.advance(HOLD + MIN)
    h.engine.archive(h.now, HOLD)
    same = InstructionRequest.model_validate(request(contract))
    assert isinstance(h.engine.decide_submit(contract.so, same, h.now, new_id="x"), Existing)
    other = InstructionRequest.model_validate(request(contract, capacity_mw=0.1))
    refused = h.engine.decide_submit(contract.so, other, h.now, new_id="x")
    assert isinstance(refused, Refused) and refused.status == 409
    assert isinstance(h.engine.decide_submit("someone-else", same, h.now, new_id="x"), Refused)


def test_a_late_answer_to_an_archived_instruction_is_recorded(h: Harness) -> None:
    """An expired instruction can still be answered; the record revives it from the journal."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.advance(71 * MIN)
    assert h.state("I1") is State.EXPIRED
    h.advance(HOLD + MIN)
    h.engine.archive(h.now, HOLD)
    assert len(h.engine) == 0
    assert isinstance(h.ack(contract.fsp, "I1", 0), type(h.journal[-1]))
    assert "I1" in h.engine.ids() and h.engine.archived == 0
    view = h.engine.view("I1")
    assert view is not None and view.latest.ack is not None and view.latest.ack.late
    assert len(view.revisions) == 1
    # revived with its history: once its past run is recorded (the next tick), a later
    # sweep lets it go again, and it still reads back
    h.advance(MIN)
    assert h.state("I1") is State.COMPLETED
    view = h.engine.view("I1")
    h.advance(HOLD + MIN)
    assert h.engine.archive(h.now, HOLD) == 1
    assert journaled(h.engine.view("I1")) == journaled(view)


def test_old_feed_events_are_let_go_and_numbers_stay(h: Harness) -> None:
    """A feed keeps its numbering; the oldest held number moves, newer events are unchanged."""
    contract = pick(h.book)
    finished_instruction(h)
    h.advance(HOLD + MIN)
    h.submit(contract.so, **request(contract, id="I2", start=(h.now + 10 * MIN).isoformat(),
                                    end=(h.now + 70 * MIN).isoformat()))
    length = h.engine.feed_length("fsp", contract.fsp)
    newest = h.engine.feed_event("fsp", contract.fsp, length)
    h.engine.archive(h.now, HOLD)
    assert h.engine.feed_length("fsp", contract.fsp) == length
    first = h.engine.feed_first("fsp", contract.fsp)
    assert first == length  # only I2's instruction event is still held
    assert h.engine.feed_event("fsp", contract.fsp, length) == newest
    with pytest.raises(LookupError):
        h.engine.feed_event("fsp", contract.fsp, first - 1)


def test_changes_pager_lists_only_what_is_held(h: Harness) -> None:
    contract = pick(h.book)
    finished_instruction(h)
    h.advance(HOLD + MIN)
    h.submit(contract.so, **request(contract, id="I2", start=(h.now + 10 * MIN).isoformat(),
                                    end=(h.now + 70 * MIN).isoformat()))
    h.engine.archive(h.now, HOLD)
    views, _ = h.engine.changed_since("so", contract.so, 0, 100)
    assert [v.id for v in views] == ["I2"]


def test_a_day_of_traffic_holds_only_what_is_in_flight(book: ContractBook) -> None:
    """One instruction a minute, each an hour long, answered, swept every 10 minutes:
    memory holds about (run + hold) / interval instructions however long the day is."""
    contract = pick(book)
    h = Harness(book)
    peak = 0
    for minute in range(24 * 60):
        iid = f"I{minute}"
        decision = h.submit(contract.so, **request(
            contract, id=iid, start=(h.now + 5 * MIN).isoformat(),
            end=(h.now + 65 * MIN).isoformat()))
        assert isinstance(decision, RevisionRecorded), decision
        h.ack(contract.fsp, iid, 0)
        h.advance(MIN)
        if minute % 10 == 0:
            h.engine.archive(h.now, HOLD)
        peak = max(peak, len(h.engine))
    assert peak <= 65 + 30 + 10 + 2
    assert h.engine.archived >= 24 * 60 - peak
    assert h.engine.view("I0") is not None
    assert h.engine.feed_length("fsp", contract.fsp) == 2 * 24 * 60


def test_without_a_reader_instructions_are_all_held(book: ContractBook) -> None:
    """A dispatcher with nowhere to read back from keeps everything (and says it let go of
    nothing), though its feeds still drop old events."""
    h = Harness(book)
    h.engine = Dispatcher(book, retry=RetryPolicy(initial_s=2, max_s=16, jitter=0))
    finished_instruction(h)
    h.advance(HOLD + MIN)
    assert h.engine.archive(h.now, HOLD) == 0
    assert h.engine.ids() == ["I1"]
