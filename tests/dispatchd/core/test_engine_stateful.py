"""Stateful property test of the engine over a journal: crashes, and the broker going away
(sends made while it is down reach nobody) included."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dispatchd.core.engine import (
    Dispatcher,
    EventRecorded,
    Persist,
    Record,
    RetryPolicy,
    RevisionRecorded,
    Send,
)
from dispatchd.core.instruction import Ack, AmendRequest, CancelRequest, InstructionRequest, Kind
from dispatchd.core.lifecycle import State
from tests.conftest import NOW, small_book

BOOK = small_book()
CONTRACTS = [c for c in BOOK.contracts.values() if c.service in ("dynamic", "restore")]


class DispatchMachine(RuleBasedStateMachine):
    """Drives the engine as the service does; the journal is a list that survives crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.journal: list[Record] = []
        self.engine = self._fresh()
        self.accepted: dict[str, str] = {}  # id → FSP, for every journaled instruction
        self.sent: list[Send] = []
        self.cancel_acked: dict[str, int] = {}  # id → number of sends when acknowledged
        self.counter = 0
        self.broker_up = True
        self.reached: list[Send] = []  # sends the broker took while it was up

    def _fresh(self) -> Dispatcher:
        return Dispatcher(BOOK, retry=RetryPolicy(initial_s=5, max_s=40), rng=random.Random(0),
                          archive=self._records_of)

    def _records_of(self, instruction_id: str) -> list[tuple[int, Record]]:
        return [(seq, r) for seq, r in enumerate(self.journal, start=1)
                if (r.instruction.id if isinstance(r, RevisionRecorded) else r.id)
                == instruction_id]

    def _commit(self, record: Record) -> None:
        self.journal.append(record)
        self._carry(self.engine.apply(record, len(self.journal), self.now))

    def _carry(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append(action)
                if self.broker_up:  # as the service does on a PUBACK
                    self.reached.append(action)
                    inst = action.instruction
                    record = self.engine.delivered(inst.id, inst.revision, "mqtt", self.now)
                    if record is not None:
                        self._commit(record)
            elif isinstance(action, Persist):
                self._commit(action.record)

    def _decide(self, decision: Any) -> None:
        if isinstance(decision, (RevisionRecorded, EventRecorded)):
            self._commit(decision)

    @rule(contract=st.sampled_from(CONTRACTS), minutes=st.integers(0, 120),
          length=st.integers(30, 180), mw=st.floats(0.1, 6.0))
    def submit(self, contract: Any, minutes: int, length: int, mw: float) -> None:
        self.counter += 1
        start = self.now + dt.timedelta(minutes=minutes)
        req = InstructionRequest(id=f"i{self.counter}", contract_id=contract.id,
                                 capacity_mw=mw, start=start,
                                 end=start + dt.timedelta(minutes=length))
        decision = self.engine.decide_submit(contract.so, req, self.now, new_id="x")
        self._decide(decision)
        if isinstance(decision, RevisionRecorded):
            self.accepted[decision.instruction.id] = decision.instruction.fsp

    def _some(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.accepted)))

    @precondition(lambda self: self.accepted)
    @rule(data=st.data(), mw=st.floats(0.1, 3.0))
    def amend(self, data: st.DataObject, mw: float) -> None:
        instruction_id = self._some(data)
        view = self.engine.view(instruction_id)
        assert view is not None
        self._decide(self.engine.decide_amend(view.so, instruction_id,
                                              AmendRequest(capacity_mw=mw), self.now))

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        instruction_id = self._some(data)
        view = self.engine.view(instruction_id)
        assert view is not None
        self._decide(self.engine.decide_cancel(view.so, instruction_id,
                                               CancelRequest(reason="test"), self.now))

    @precondition(lambda self: self.accepted)
    @rule(data=st.data(), accept=st.booleans(), wrong_fsp=st.booleans())
    def ack(self, data: st.DataObject, accept: bool, wrong_fsp: bool) -> None:
        instruction_id = self._some(data)
        view = self.engine.view(instruction_id)
        assert view is not None
        fsp = view.fsp if not wrong_fsp else next(f for f in BOOK.fsps if f != view.fsp)
        revision = view.latest.instruction.revision
        ack = Ack(revision=revision, response="accepted" if accept else "rejected",
                  reason=None if accept else "no")
        decision = self.engine.decide_ack(fsp, instruction_id, ack, self.now)
        if wrong_fsp:
            assert not isinstance(decision, (RevisionRecorded, EventRecorded))
        self._decide(decision)
        if isinstance(decision, EventRecorded) and view.latest.instruction.kind is Kind.CANCEL:
            self.cancel_acked[instruction_id] = len(self.sent)

    @rule(seconds=st.integers(1, 900))
    def advance(self, seconds: int) -> None:
        self.now += dt.timedelta(seconds=seconds)
        self._carry(self.engine.tick(self.now))

    @rule(hours=st.integers(1, 4))
    def time_passes(self, hours: int) -> None:
        """Long enough for instructions to end, so there is finished work to let go of."""
        for _ in range(hours * 4):
            self.advance(900)

    @rule(minutes=st.integers(0, 120))
    def let_go_of_finished_work(self, minutes: int) -> None:
        """What is finished and quiet leaves memory; every later question reads it back."""
        self.engine.archive(self.now, dt.timedelta(minutes=minutes))

    @rule()
    def broker_goes_down(self) -> None:
        self.broker_up = False

    @rule()
    def broker_comes_back(self) -> None:
        self.broker_up = True

    @rule()
    def crash_and_restart(self) -> None:
        """Lose all memory; rebuild from the journal alone."""
        before = {i: self.engine.view(i) for i in self.accepted}
        self.engine = self._fresh()
        for seq, record in enumerate(self.journal, start=1):
            self.engine.apply(record, seq, self.now, replay=True)
        self._carry(self.engine.recover(self.now))
        self.engine.archive(self.now, dt.timedelta(minutes=30))
        for instruction_id, view in before.items():
            after = self.engine.view(instruction_id)
            assert view is not None and after is not None
            assert [r.instruction for r in after.revisions] == \
                [r.instruction for r in view.revisions]

    @invariant()
    def nothing_accepted_is_lost(self) -> None:
        for instruction_id in self.accepted:
            assert self.engine.view(instruction_id) is not None

    @invariant()
    def sends_go_to_the_right_fsp_in_order(self) -> None:
        latest: dict[str, int] = {}
        for send in self.sent:
            inst = send.instruction
            assert inst.fsp == self.accepted[inst.id] == BOOK.contracts[inst.contract_id].fsp
            assert inst.revision >= latest.get(inst.id, 0), f"{inst.id} went backwards"
            latest[inst.id] = inst.revision

    @invariant()
    def unacknowledged_open_work_is_still_being_sent(self) -> None:
        for instruction_id in self.accepted:
            view = self.engine.view(instruction_id)
            assert view is not None
            latest = view.latest
            if latest.ack is None and latest.state in (State.ACCEPTED, State.DELIVERED) \
                    and self.now < latest.instruction.end:
                assert any(s.instruction.id == instruction_id and
                           s.instruction.revision == latest.instruction.revision
                           for s in self.sent), f"{instruction_id} r{latest.instruction.revision}"

    @invariant()
    def unacknowledged_open_work_has_a_resend_due(self) -> None:
        """Whatever the broker did with earlier sends, an unanswered open revision is sent
        again within the longest back-off (40 s here)."""
        waiting = [i for i in self.accepted
                   if (v := self.engine.view(i)) is not None and v.latest.ack is None
                   and v.latest.state in (State.ACCEPTED, State.DELIVERED, State.EXPIRED)
                   and self.now < v.latest.instruction.end]
        if waiting:
            wake = self.engine.next_wakeup()
            assert wake is not None and wake <= self.now + dt.timedelta(seconds=40), waiting

    @invariant()
    def only_the_right_fsp_was_reached(self) -> None:
        for send in self.reached:
            assert send.instruction.fsp == self.accepted[send.instruction.id]

    @invariant()
    def no_send_after_a_cancellation_is_acknowledged(self) -> None:
        for instruction_id, sends_then in self.cancel_acked.items():
            view = self.engine.view(instruction_id)
            assert view is not None and view.state is State.CANCELLED
            assert not [s for s in self.sent[sends_then:] if s.instruction.id == instruction_id]


class TestDispatchMachine(DispatchMachine.TestCase):  # type: ignore[name-defined,misc]
    settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_nothing_is_sent_after_a_cancellation_is_acknowledged() -> None:
    """Explicit check of the ordering invariant the machine relies on."""
    machine = DispatchMachine()
    contract = CONTRACTS[0]
    machine.submit(contract, 5, 60, 0.5)
    (instruction_id,) = machine.accepted
    machine._decide(machine.engine.decide_cancel(contract.so, instruction_id,
                                                 CancelRequest(reason="x"), machine.now))
    machine._decide(machine.engine.decide_ack(contract.fsp, instruction_id,
                                              Ack(revision=1, response="accepted"), machine.now))
    sent = len(machine.sent)
    for _ in range(10):
        machine.advance(60)
    machine.crash_and_restart()
    assert len(machine.sent) == sent
