"""The engine's channel routing, per-principal feeds and escalation, with no sockets."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from contracts.io import ContractBook
from contracts.model import Channel, Endpoints
from dispatchd.core.engine import Dispatcher, Escalate, EventRecorded, Notify, Persist, Send
from dispatchd.core.lifecycle import Event, State
from tests.conftest import NOW, pick
from tests.dispatchd.core.test_engine import MIN, SEC, Harness, request

ALL = (Channel.MQTT, Channel.WEBSOCKET, Channel.EMAIL, Channel.WEBHOOK)


def with_channels(book: ContractBook, fsp: str, channels: tuple[Channel, ...]) -> ContractBook:
    endpoints = Endpoints(channels=channels, webhook_url="http://127.0.0.1:9/hook",
                          webhook_secret_env="SECRET")
    fsps = dict(book.fsps)
    fsps[fsp] = fsps[fsp].model_copy(update={"endpoints": endpoints})
    return dataclasses.replace(book, fsps=fsps)


@pytest.fixture
def wide(book: ContractBook) -> Harness:
    """A harness whose first dynamic contract's FSP lists every channel."""
    return Harness(with_channels(book, pick(book).fsp, ALL))


def feed(h: Harness, role: str, principal: str) -> list[dict[str, Any]]:
    n = h.engine.feed_length(role, principal)
    return [h.engine.feed_event(role, principal, i) for i in range(1, n + 1)]


def test_first_send_goes_to_every_push_channel_and_resends_only_to_mqtt(wide: Harness) -> None:
    """Email and webhook get one send per revision; MQTT is re-sent until acknowledged."""
    contract = pick(wide.book)
    wide.submit(contract.so, **request(contract))
    assert [s.channels for s in wide.sent] == [(Channel.MQTT, Channel.EMAIL, Channel.WEBHOOK)]
    wide.advance(3 * SEC)
    assert [s.channels for s in wide.sent[1:]] == [(Channel.MQTT,)]


def test_fsp_without_mqtt_has_no_resend_timer(book: ContractBook) -> None:
    """Only channels that need re-sending arm the re-send timer."""
    contract = pick(book)
    h = Harness(with_channels(book, contract.fsp, (Channel.EMAIL,)))
    h.submit(contract.so, **request(contract, respond_by=(NOW + 60 * MIN).isoformat()))
    h.advance(10 * MIN)
    assert [s.channels for s in h.sent] == [(Channel.EMAIL,)]


def test_recover_resends_email_and_webhook_only_where_not_handed_over(wide: Harness) -> None:
    """After a restart the journal's delivered and failed records decide what goes again."""
    contract = pick(wide.book)
    wide.submit(contract.so, **request(contract))
    wide.commit(EventRecorded("I1", 0, Event.DELIVERED, wide.now, channel="email"))
    fresh = Dispatcher(wide.book, rng=random.Random(2))
    for seq, record in enumerate(wide.journal, start=1):
        fresh.apply(record, seq, wide.now, replay=True)
    sends = [a for a in fresh.recover(wide.now) if isinstance(a, Send)]
    assert [s.channels for s in sends] == [(Channel.MQTT, Channel.WEBHOOK)]
    failed = fresh.delivery_failed("I1", 0, "webhook", "HTTP 400", wide.now)
    assert failed is not None
    wide.commit(failed)
    again = Dispatcher(wide.book, rng=random.Random(2))
    for seq, record in enumerate(wide.journal, start=1):
        again.apply(record, seq, wide.now, replay=True)
    assert [a.channels for a in again.recover(wide.now) if isinstance(a, Send)] == [
        (Channel.MQTT,)]


def test_still_wanted_ends_with_ack_supersession_or_end(wide: Harness) -> None:
    contract = pick(wide.book)
    wide.submit(contract.so, **request(contract))
    assert wide.engine.still_wanted("I1", 0, wide.now)
    wide.submit(contract.so, **request(contract, id="I2"))
    wide.ack(contract.fsp, "I2", 0)
    assert not wide.engine.still_wanted("I2", 0, wide.now)
    assert not wide.engine.still_wanted("I1", 0, NOW + 71 * MIN)
    assert not wide.engine.still_wanted("missing", 0, wide.now)


def test_feeds_number_each_principals_events_from_one(wide: Harness) -> None:
    """The FSP's feed has its instruction events, the SO's every state change, both from 1."""
    contract = pick(wide.book)
    wide.submit(contract.so, **request(contract, respond_by=(NOW + 30 * SEC).isoformat()))
    wide.commit(EventRecorded("I1", 0, Event.DELIVERED, wide.now, channel="mqtt"))
    wide.commit(EventRecorded("I1", 0, Event.DELIVERED, wide.now, channel="mqtt"))  # no news
    wide.advance(31 * SEC)
    wide.commit(EventRecorded("I1", 0, Event.ESCALATED, wide.now, channel="email",
                              reason="emailed oncall"))
    wide.ack(contract.fsp, "I1", 0, "rejected", "fleet offline")
    fsp = feed(wide, "fsp", contract.fsp)
    so = feed(wide, "so", contract.so)
    assert [(e["seq"], e["event"]) for e in fsp] == [
        (1, "instruction"), (2, "expired"), (3, "rejected")]
    assert fsp[0]["message"]["id"] == "I1" and fsp[0]["message"]["type"] == "instruction"
    assert [e["event"] for e in so] == ["accepted", "delivered", "expired", "escalated",
                                        "rejected"]
    assert so[1]["channel"] == "mqtt" and so[3]["reason"] == "emailed oncall"
    assert so[4]["reason"] == "fleet offline" and so[4]["state"] == "acknowledged_rejected"
    assert [e["seq"] for e in so] == [1, 2, 3, 4, 5]


def test_feeds_hold_no_other_principals_events(wide: Harness) -> None:
    so1, so2 = pick(wide.book, so="SO1"), pick(wide.book, so="SO2")
    wide.submit(so1.so, **request(so1, id="a"))
    wide.submit(so2.so, **request(so2, id="b"))
    for role, owner in (("so", "so"), ("fsp", "fsp")):
        for principal in {getattr(so1, owner), getattr(so2, owner)}:
            for event in feed(wide, role, principal):
                view = wide.engine.view(event["id"])
                assert view is not None and getattr(view, owner) == principal


def test_replay_rebuilds_identical_feeds(wide: Harness) -> None:
    """A resuming client gets the same numbers after a restart."""
    contract = pick(wide.book)
    wide.submit(contract.so, **request(contract))
    wide.commit(EventRecorded("I1", 0, Event.DELIVERED, wide.now, channel="webhook"))
    wide.submit(contract.so, **request(contract, id="I2"))
    wide.ack(contract.fsp, "I2", 0)
    fresh = Dispatcher(wide.book, rng=random.Random(2))
    for seq, record in enumerate(wide.journal, start=1):
        fresh.apply(record, seq, wide.now, replay=True)
    for role, principal in (("so", contract.so), ("fsp", contract.fsp)):
        assert feed(wide, role, principal) == [
            fresh.feed_event(role, principal, n)
            for n in range(1, fresh.feed_length(role, principal) + 1)]


def test_applying_live_records_notifies_both_sides(wide: Harness) -> None:
    contract = pick(wide.book)
    decision = wide.engine.decide_submit(contract.so, wide_request(contract), wide.now,
                                         new_id="x")
    actions = wide.engine.apply(decision, 1, wide.now)  # type: ignore[arg-type]
    assert Notify("fsp", contract.fsp) in actions and Notify("so", contract.so) in actions


def wide_request(contract: Any) -> Any:
    from dispatchd.core.instruction import InstructionRequest

    return InstructionRequest.model_validate(request(contract))


def test_expiry_escalates_once_and_recover_repeats_an_unrecorded_escalation(
        wide: Harness) -> None:
    """Expiry yields an Escalate action; after a restart without an escalated record, again."""
    contract = pick(wide.book)
    wide.submit(contract.so, **request(contract, respond_by=(NOW + MIN).isoformat()))
    escalations: list[Escalate] = []
    wide.now += 2 * MIN
    for action in wide.engine.tick(wide.now):
        assert not isinstance(action, Escalate)
        if isinstance(action, Persist):
            escalations += [a for a in wide.commit(action.record) if isinstance(a, Escalate)]
    assert [e.instruction.id for e in escalations] == ["I1"]
    fresh = Dispatcher(wide.book, rng=random.Random(2))
    for seq, record in enumerate(wide.journal, start=1):
        fresh.apply(record, seq, wide.now, replay=True)
    assert fresh.view("I1").state is State.EXPIRED  # type: ignore[union-attr]
    assert [a.instruction.id for a in fresh.recover(wide.now) if isinstance(a, Escalate)] == [
        "I1"]
    wide.commit(EventRecorded("I1", 0, Event.ESCALATED, wide.now, channel="email"))
    done = Dispatcher(wide.book, rng=random.Random(2))
    for seq, record in enumerate(wide.journal, start=1):
        done.apply(record, seq, wide.now, replay=True)
    assert not [a for a in done.recover(wide.now) if isinstance(a, Escalate)]
    view = done.view("I1")
    assert view is not None and view.latest.escalated
