"""The dispatch engine, driven with an injected clock and no sockets."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest

from contracts.io import ContractBook
from dispatchd.core.engine import (
    Dispatcher,
    EventRecorded,
    Existing,
    Persist,
    Record,
    Refused,
    RetryPolicy,
    RevisionRecorded,
    Send,
)
from dispatchd.core.instruction import Ack, AmendRequest, CancelRequest, InstructionRequest
from dispatchd.core.lifecycle import Event, State
from tests.conftest import NOW, pick

MIN = dt.timedelta(minutes=1)
SEC = dt.timedelta(seconds=1)


class Harness:
    """Drives a Dispatcher the way the service does, with a journal kept in a list."""

    def __init__(self, book: ContractBook) -> None:
        self.book = book
        self.engine = Dispatcher(book, retry=RetryPolicy(initial_s=2, max_s=16, jitter=0),
                                 rng=random.Random(1), archive=self.records_of)
        self.now = NOW
        self.journal: list[Record] = []
        self.sent: list[Send] = []

    def records_of(self, instruction_id: str) -> list[tuple[int, Record]]:
        """The journal's records of one instruction (what the service reads from SQLite)."""
        return [(seq, r) for seq, r in enumerate(self.journal, start=1)
                if (r.instruction.id if isinstance(r, RevisionRecorded) else r.id)
                == instruction_id]

    def commit(self, record: Record) -> list[Any]:
        self.journal.append(record)
        actions = self.engine.apply(record, len(self.journal), self.now)
        self._carry(actions)
        return actions

    def _carry(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append(action)
            elif isinstance(action, Persist):
                self.commit(action.record)

    def decide_and_commit(self, decision: Any) -> Any:
        if isinstance(decision, (RevisionRecorded, EventRecorded)):
            self.commit(decision)
        return decision

    def submit(self, so: str, **fields: Any) -> Any:
        req = InstructionRequest.model_validate(fields)
        return self.decide_and_commit(self.engine.decide_submit(so, req, self.now,
                                                                new_id="generated"))

    def ack(self, fsp: str, instruction_id: str, revision: int, response: str = "accepted",
            reason: str | None = None) -> Any:
        ack = Ack(revision=revision, response=response, reason=reason)  # type: ignore[arg-type]
        return self.decide_and_commit(self.engine.decide_ack(fsp, instruction_id, ack, self.now))

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta
        self._carry(self.engine.tick(self.now))

    def state(self, instruction_id: str) -> State:
        view = self.engine.view(instruction_id)
        assert view is not None
        return view.state


@pytest.fixture
def h(book: ContractBook) -> Harness:
    return Harness(book)


def request(contract: Any, **overrides: Any) -> dict[str, Any]:
    fields = {
        "id": "I1",
        "contract_id": contract.id,
        "capacity_mw": contract.contracted_mw,
        "start": (NOW + 10 * MIN).isoformat(),
        "end": (NOW + 70 * MIN).isoformat(),
    }
    return fields | overrides


def test_accepted_instruction_is_sent_once_journaled(h: Harness) -> None:
    """Applying the committed revision makes it accepted and sends it to its FSP."""
    contract = pick(h.book)
    decision = h.submit(contract.so, **request(contract))
    assert isinstance(decision, RevisionRecorded)
    assert h.state("I1") is State.ACCEPTED
    assert [(s.instruction.fsp, s.instruction.revision, s.attempt) for s in h.sent] == [
        (contract.fsp, 0, 0)]
    assert h.sent[0].payload()["type"] == "instruction"


def test_decide_changes_nothing_until_applied(h: Harness) -> None:
    """A decision alone leaves no trace: the journal commit is what accepts."""
    contract = pick(h.book)
    req = InstructionRequest.model_validate(request(contract))
    assert isinstance(h.engine.decide_submit(contract.so, req, h.now, new_id="x"),
                      RevisionRecorded)
    assert h.engine.view("I1") is None


def test_same_id_same_content_returns_the_stored_instruction(h: Harness) -> None:
    """Idempotent repeat: Existing, nothing journaled twice."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.now += 5 * SEC
    assert h.submit(contract.so, **request(contract)) == Existing("I1", 0)
    assert len(h.journal) == 1


def test_same_id_other_content_is_a_conflict_naming_the_fields(h: Harness) -> None:
    """409 lists exactly the fields that differ."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    again = h.submit(contract.so, **request(contract, capacity_mw=0.1, note="changed"))
    assert isinstance(again, Refused) and again.status == 409
    assert sorted(p.field for p in again.problems) == ["capacity_mw", "note"]


def test_another_sos_id_is_refused_without_detail(h: Harness) -> None:
    """An id used by another SO is a conflict that reveals nothing of its content."""
    mine = pick(h.book, so="SO1")
    theirs = pick(h.book, so="SO2")
    h.submit(mine.so, **request(mine))
    refused = h.submit(theirs.so, **request(theirs))
    assert isinstance(refused, Refused) and refused.status == 409
    assert [p.field for p in refused.problems] == ["id"]
    assert str(mine.contracted_mw) not in refused.problems[0].reason


def test_validation_lists_every_problem(h: Harness) -> None:
    """Capacity, notice, window and an unobligated asset are all reported at once."""
    contract = pick(h.book, service="secure")
    start = dt.datetime(2026, 3, 3, 3, 0, tzinfo=dt.UTC)  # Tuesday 03:00, outside 16–20
    refused = h.submit(contract.so, **request(
        contract, capacity_mw=contract.contracted_mw + 10, start=start.isoformat(),
        end=(start + 20 * MIN).isoformat(), assets=["A999999"], issued_at=(start - MIN)
        .isoformat()))
    assert isinstance(refused, Refused) and refused.status == 422
    reasons = " | ".join(f"{p.field}: {p.reason}" for p in refused.problems)
    assert "assets[0]: asset 'A999999' is not obligated" in reasons
    assert "above the contracted" in reasons
    assert "outside the service windows" in reasons
    assert "min notice" in reasons
    assert "the contract's minimum is 30 min" in reasons


def test_override_forgives_contract_terms_but_not_identity(h: Harness) -> None:
    """With an override reason, capacity above contract passes; a wrong FSP never does."""
    contract = pick(h.book)
    forced = h.submit(contract.so, **request(contract, capacity_mw=contract.contracted_mw * 2,
                                             override="storm: network emergency"))
    assert isinstance(forced, RevisionRecorded)
    assert forced.instruction.override == "storm: network emergency"
    other_fsp = next(f for f in h.book.fsps if f != contract.fsp)
    refused = h.submit(contract.so, **request(contract, id="I2", fsp=other_fsp,
                                              override="storm: network emergency"))
    assert isinstance(refused, Refused) and [p.field for p in refused.problems] == ["fsp"]


def test_unknown_or_foreign_contract_is_refused_alike(h: Harness) -> None:
    """An SO cannot tell another SO's contract from a missing one."""
    theirs = pick(h.book, so="SO2")
    foreign = h.submit("SO1", **request(theirs))
    missing = h.submit("SO1", **request(theirs, contract_id="C99999"))
    assert isinstance(foreign, Refused) and isinstance(missing, Refused)
    assert foreign.status == missing.status == 422
    assert foreign.problems[0].reason.replace(theirs.id, "X") == \
        missing.problems[0].reason.replace("C99999", "X")


def test_declared_availability_caps_capacity(h: Harness) -> None:
    """Capacity above the FSP's declaration for the period is refused."""
    contract_id, (declaration,) = next(iter(h.book.declarations.items()))
    contract = h.book.contracts[contract_id]
    h.now = declaration.start - dt.timedelta(hours=3)
    refused = h.submit(contract.so, **request(
        contract, capacity_mw=contract.contracted_mw, start=declaration.start.isoformat(),
        end=(declaration.start + dt.timedelta(hours=1)).isoformat()))
    assert isinstance(refused, Refused)
    assert any("declared available" in p.reason for p in refused.problems)


def test_unacknowledged_revision_is_resent_with_capped_backoff(h: Harness) -> None:
    """No ack: re-sends at 2, 4, 8, 16, 16 s (jitter off), same id and revision."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    times = []
    for _ in range(60):
        before = len(h.sent)
        h.advance(SEC)
        if len(h.sent) > before:
            times.append((h.now - NOW).total_seconds())
    assert times == [2, 6, 14, 30, 46]
    assert {(s.instruction.id, s.instruction.revision) for s in h.sent} == {("I1", 0)}
    assert [s.attempt for s in h.sent] == [0, 1, 2, 3, 4, 5]


def test_jitter_spreads_resends_within_the_cap(book: ContractBook) -> None:
    """With jitter, every delay lies in [half, all] of the capped exponential."""
    policy = RetryPolicy(initial_s=2, max_s=60, jitter=0.5)
    rng = random.Random(5)
    for attempt in range(12):
        cap = min(60, 2 * 2**attempt)
        delay = policy.delay(attempt, rng).total_seconds()
        assert cap / 2 <= delay <= cap


def test_ack_stops_resending_and_moves_the_state(h: Harness) -> None:
    """After the FSP accepts, nothing more is sent and the state is acknowledged_accepted."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    assert isinstance(h.ack(contract.fsp, "I1", 0), EventRecorded)
    assert h.state("I1") is State.ACKNOWLEDGED_ACCEPTED
    sent = len(h.sent)
    h.advance(5 * MIN)
    assert len(h.sent) == sent


def test_another_fsp_cannot_acknowledge(h: Harness) -> None:
    """An ack from a different FSP is refused as if the instruction did not exist."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    other = next(f for f in h.book.fsps if f != contract.fsp)
    refused = h.ack(other, "I1", 0)
    assert isinstance(refused, Refused) and refused.status == 404
    assert h.state("I1") is State.ACCEPTED


def test_repeated_ack_is_idempotent_and_a_changed_one_conflicts(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.ack(contract.fsp, "I1", 0)
    assert h.ack(contract.fsp, "I1", 0) == Existing("I1", 0)
    changed = h.ack(contract.fsp, "I1", 0, "rejected", "no")
    assert isinstance(changed, Refused) and changed.status == 409


def test_rejection_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        Ack(revision=0, response="rejected")  # type: ignore[arg-type]


def test_no_answer_by_respond_by_expires_but_keeps_delivering(h: Harness) -> None:
    """At respond_by the instruction expires; it is still re-sent, and a late ack counts."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract, respond_by=(NOW + 30 * SEC).isoformat()))
    h.advance(31 * SEC)
    assert h.state("I1") is State.EXPIRED
    sent = len(h.sent)
    h.advance(2 * MIN)
    assert len(h.sent) > sent
    h.ack(contract.fsp, "I1", 0)
    view = h.engine.view("I1")
    assert view is not None and view.state is State.ACKNOWLEDGED_ACCEPTED
    assert view.latest.ack is not None and view.latest.ack.late


def test_accepted_instruction_becomes_active_then_completed(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.ack(contract.fsp, "I1", 0)
    h.advance(10 * MIN)
    assert h.state("I1") is State.ACTIVE
    h.advance(60 * MIN)
    assert h.state("I1") is State.COMPLETED


def test_amend_is_a_new_revision_sent_after_the_old(h: Harness) -> None:
    """Amend: revision 1 sent, revision 0 superseded and no longer re-sent."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    amended = h.decide_and_commit(h.engine.decide_amend(
        contract.so, "I1", AmendRequest(revision=1, capacity_mw=0.1), h.now))
    assert isinstance(amended, RevisionRecorded)
    assert amended.instruction.capacity_mw == 0.1 and amended.instruction.revision == 1
    assert (h.sent[-1].payload()["revision"], h.sent[-1].payload()["capacity_mw"]) == (1, 0.1)
    view = h.engine.view("I1")
    assert view is not None
    assert [r.state for r in view.revisions] == [State.SUPERSEDED, State.ACCEPTED]
    assert [s.instruction.revision for s in h.sent] == [0, 1]
    h.advance(5 * MIN)
    assert {s.instruction.revision for s in h.sent[2:]} == {1}
    stale = h.ack(contract.fsp, "I1", 0)
    assert isinstance(stale, Refused) and "superseded" in stale.problems[0].reason


def test_amend_is_idempotent_on_its_revision(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    amend = AmendRequest(revision=1, capacity_mw=0.1)
    h.decide_and_commit(h.engine.decide_amend(contract.so, "I1", amend, h.now))
    assert h.engine.decide_amend(contract.so, "I1", amend, h.now) == Existing("I1", 1)
    skipped = h.engine.decide_amend(contract.so, "I1", AmendRequest(revision=3), h.now)
    assert isinstance(skipped, Refused) and skipped.status == 409


def test_amend_is_validated_against_the_contract(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    refused = h.engine.decide_amend(contract.so, "I1",
                                    AmendRequest(capacity_mw=contract.contracted_mw + 5), h.now)
    assert isinstance(refused, Refused) and refused.status == 422


def test_cancel_is_delivered_and_acknowledged_and_ends_amendments(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    h.ack(contract.fsp, "I1", 0)
    h.decide_and_commit(h.engine.decide_cancel(contract.so, "I1",
                                               CancelRequest(reason="constraint cleared"), h.now))
    assert h.state("I1") is State.CANCELLED
    payload = h.sent[-1].payload()
    assert (payload["type"], payload["kind"], payload["revision"]) == (
        "cancellation", "cancel", 1)
    assert payload["cancel_reason"] == "constraint cleared"
    h.advance(3 * SEC)
    assert h.sent[-1].instruction.revision == 1  # re-sent until acknowledged
    assert isinstance(h.ack(contract.fsp, "I1", 1), EventRecorded)
    sent = len(h.sent)
    h.advance(5 * MIN)
    assert len(h.sent) == sent
    refused = h.engine.decide_amend(contract.so, "I1", AmendRequest(capacity_mw=0.1), h.now)
    assert isinstance(refused, Refused) and refused.status == 409


def test_another_so_cannot_amend_or_cancel(h: Harness) -> None:
    contract = pick(h.book, so="SO1")
    h.submit(contract.so, **request(contract))
    assert isinstance(h.engine.decide_cancel("SO2", "I1", CancelRequest(reason="x"), h.now),
                      Refused)
    assert isinstance(h.engine.decide_amend("SO2", "I1", AmendRequest(note="x"), h.now),
                      Refused)


def test_replay_and_recover_resends_only_what_is_unacknowledged(h: Harness) -> None:
    """A new engine fed the journal re-sends the unacked instruction, not the acked one."""
    a = pick(h.book)
    h.submit(a.so, **request(a, id="acked"))
    h.submit(a.so, **request(a, id="pending"))
    h.ack(a.fsp, "acked", 0)
    fresh = Dispatcher(h.book, rng=random.Random(2))
    for seq, record in enumerate(h.journal, start=1):
        assert fresh.apply(record, seq, h.now, replay=True) == []
    actions = fresh.recover(h.now + SEC)
    assert [(x.instruction.id, x.instruction.revision) for x in actions
            if isinstance(x, Send)] == [("pending", 0)]
    acked = fresh.view("acked")
    assert acked is not None and acked.state is State.ACKNOWLEDGED_ACCEPTED


def test_recover_rearms_deadlines(h: Harness) -> None:
    """After a restart, an instruction whose respond_by passed during downtime expires."""
    contract = pick(h.book)
    h.submit(contract.so, **request(contract, respond_by=(NOW + MIN).isoformat()))
    fresh = Dispatcher(h.book, rng=random.Random(2))
    for seq, record in enumerate(h.journal, start=1):
        fresh.apply(record, seq, h.now, replay=True)
    fresh.recover(h.now)
    actions = fresh.tick(h.now + 2 * MIN)
    assert [a.record.event for a in actions if isinstance(a, Persist)] == [
        Event.RESPONSE_DEADLINE]


def test_changed_since_pages_by_cursor_and_filters_by_owner(h: Harness) -> None:
    """Each principal sees only its own instructions, each once, at its latest change."""
    so1, so2 = pick(h.book, so="SO1"), pick(h.book, so="SO2")
    h.submit(so1.so, **request(so1, id="a"))
    h.submit(so2.so, **request(so2, id="b"))
    h.submit(so1.so, **request(so1, id="c"))
    h.ack(so1.fsp, "a", 0)
    views, cursor = h.engine.changed_since("so", "SO1", 0, 100)
    assert [v.id for v in views] == ["c", "a"]
    # One at a time: "a"'s first change is skipped (it changed again later), then "c", "a".
    first, mid = h.engine.changed_since("so", "SO1", 0, 1)
    more, _ = h.engine.changed_since("so", "SO1", mid, 100)
    assert ([v.id for v in first], [v.id for v in more]) == (["c"], ["a"])
    assert h.engine.changed_since("so", "SO1", cursor, 100) == ([], cursor)
    fsp_views, _ = h.engine.changed_since("fsp", so2.fsp, 0, 100)
    assert all(v.fsp == so2.fsp for v in fsp_views) and "b" in [v.id for v in fsp_views]


def test_delivery_report_is_recorded_once_per_channel(h: Harness) -> None:
    contract = pick(h.book)
    h.submit(contract.so, **request(contract))
    record = h.engine.delivered("I1", 0, "mqtt", h.now)
    assert record is not None
    assert h.engine.delivered("I1", 0, "mqtt", h.now) is None  # pending: not twice
    h.commit(record)
    assert h.state("I1") is State.DELIVERED
    assert h.engine.delivered("I1", 0, "mqtt", h.now) is None
