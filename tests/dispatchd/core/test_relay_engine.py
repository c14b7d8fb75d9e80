"""Relay mapping and reconciliation in the engine, with no sockets."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from contracts.io import ContractBook
from dispatchd.core.engine import (
    Existing,
    Refused,
    RelayKind,
    RelayRecorded,
    RevisionRecorded,
    Send,
)
from dispatchd.core.lifecycle import State
from dispatchd.relay import (
    ExternalDispatch,
    JsonMapper,
    MapperError,
    Unidentified,
    instruction_id,
    load_mapper,
    resolve,
)
from tests.conftest import NOW, pick
from tests.dispatchd.core.test_engine import MIN, Harness

P = "dsoflex"


@pytest.fixture(name="h")
def harness(book: ContractBook) -> Harness:
    return Harness(book)


def mapped(h: Harness, kind: str, external: str, ours: str | None) -> None:
    h.commit(RelayRecorded(RelayKind.MAPPING, f"{P}/{kind}/{external}", h.now,
                           {"platform": P, "kind": kind, "external": external, "ours": ours}))


def external(**fields: Any) -> ExternalDispatch:
    return ExternalDispatch.model_validate({
        "external_id": "ORD-1", "fsp": "AGR-7", "contract": "K-19", "direction": "turn_down",
        "capacity_mw": 0.5, "start": (NOW + 10 * MIN).isoformat(),
        "end": (NOW + 70 * MIN).isoformat()} | fields)


def resolved(h: Harness, so: str, dispatch: ExternalDispatch) -> Any:
    return resolve(dispatch, platform=P, so=so, lookup=h.engine.mapping, book=h.book,
                   now=h.now, response_minutes=15)


def test_without_any_mapping_the_fsp_is_unidentified(h: Harness) -> None:
    contract = pick(h.book)
    found = resolved(h, contract.so, external())
    assert isinstance(found, Unidentified)
    assert "'AGR-7', which is not mapped" in found.reason


def test_fsp_mapping_alone_relays_with_the_contract_missing(h: Harness) -> None:
    contract = pick(h.book)
    mapped(h, "fsp", "AGR-7", contract.fsp)
    found = resolved(h, contract.so, external(assets=["M-1"]))
    assert not isinstance(found, Unidentified)
    assert (found.fsp, found.contract_id, found.assets) == (contract.fsp, None, ())
    assert found.unreconciled == (f"contract: {P} contract 'K-19' is not mapped",
                                  f"asset: {P} asset 'M-1' is not mapped")
    assert found.respond_by == h.now + 15 * MIN


def test_the_contract_mapping_gives_fsp_assets_and_response_time(h: Harness) -> None:
    contract = pick(h.book)
    mapped(h, "contract", "K-19", contract.id)
    found = resolved(h, contract.so, external(fsp=None, direction=None))
    assert not isinstance(found, Unidentified)
    assert (found.fsp, found.contract_id, found.assets, found.direction) == (
        contract.fsp, contract.id, contract.assets, contract.direction)
    assert found.unreconciled == ()
    assert found.respond_by == h.now + dt.timedelta(minutes=contract.response_minutes)


def test_mappings_that_disagree_are_unreconciled_not_guessed(h: Harness) -> None:
    contract = pick(h.book)
    other = next(c for c in h.book.contracts.values()
                 if c.so == contract.so and c.fsp != contract.fsp)
    foreign = next(c for c in h.book.contracts.values() if c.so != contract.so)
    mapped(h, "fsp", "AGR-7", contract.fsp)
    mapped(h, "contract", "K-19", other.id)
    mapped(h, "asset", "M-1", next(iter(foreign.assets)))
    found = resolved(h, contract.so, external(assets=["M-1"]))
    assert not isinstance(found, Unidentified)
    assert found.contract_id is None and found.fsp == contract.fsp
    assert found.unreconciled[0] == (f"contract: {other.id} is with {other.fsp}, but {P} sent "
                                     f"the dispatch to {contract.fsp}")
    mapped(h, "contract", "K-19", foreign.id)
    found = resolved(h, contract.so, external())
    assert not isinstance(found, Unidentified)
    assert f"not a contract of {contract.so}" in found.unreconciled[0]


def test_unmapping_removes_and_the_table_replays_from_the_journal(h: Harness) -> None:
    contract = pick(h.book)
    mapped(h, "fsp", "AGR-7", contract.fsp)
    mapped(h, "asset", "M-1", "A1")
    mapped(h, "asset", "M-1", None)
    assert h.engine.mappings(P) == [("fsp", "AGR-7", contract.fsp)]
    fresh = Harness(h.book)
    for seq, record in enumerate(h.journal, start=1):
        fresh.engine.apply(record, seq, h.now, replay=True)
    assert fresh.engine.mappings(P) == h.engine.mappings(P)


def test_a_relayed_instruction_is_sent_reconciled_once_and_then_settles_normally(
        h: Harness) -> None:
    contract = pick(h.book)
    mapped(h, "fsp", "AGR-7", contract.fsp)
    req = resolved(h, contract.so, external())
    decision = h.decide_and_commit(h.engine.decide_relay(contract.so, req, h.now))
    assert isinstance(decision, RevisionRecorded)
    assert [s.instruction.id for s in h.sent if isinstance(s, Send)] == [f"{P}:ORD-1"]
    assert h.engine.unreconciled() == 1
    # the same dispatch again, even after a mapping was added, is a repeat
    mapped(h, "contract", "K-19", contract.id)
    again = resolved(h, contract.so, external())
    assert isinstance(h.engine.decide_relay(contract.so, again, h.now), Existing)
    changed = resolved(h, contract.so, external(capacity_mw=0.25))
    assert isinstance(h.engine.decide_relay(contract.so, changed, h.now), Refused)
    done = h.decide_and_commit(h.engine.decide_reconcile(contract.so, f"{P}:ORD-1",
                                                         contract.id, (), h.now))
    assert not isinstance(done, Refused)
    view = h.engine.view(f"{P}:ORD-1")
    assert view is not None
    assert (view.latest.instruction.contract_id, view.latest.instruction.unreconciled) == (
        contract.id, ())
    assert view.latest.instruction.assets == contract.assets
    assert h.engine.unreconciled() == 0
    assert isinstance(h.engine.decide_reconcile(contract.so, f"{P}:ORD-1", contract.id, (),
                                                h.now), Existing)
    assert h.engine.feed_event("so", contract.so, h.engine.feed_length("so", contract.so)
                               )["event"] == "reconciled"


def test_an_unreconciled_instruction_stays_in_memory_until_reconciled(h: Harness) -> None:
    contract = pick(h.book)
    mapped(h, "fsp", "AGR-7", contract.fsp)
    h.decide_and_commit(h.engine.decide_relay(contract.so, resolved(h, contract.so, external()),
                                              h.now))
    h.ack(contract.fsp, f"{P}:ORD-1", 0)
    h.advance(71 * MIN)
    assert h.state(f"{P}:ORD-1") is State.COMPLETED
    h.advance(120 * MIN)
    assert h.engine.archive(h.now, 30 * MIN) == 0
    h.decide_and_commit(h.engine.decide_reconcile(contract.so, f"{P}:ORD-1", contract.id, (),
                                                  h.now))
    h.advance(31 * MIN)
    assert h.engine.archive(h.now, 30 * MIN) == 1


def test_reconcile_refuses_another_fsps_contract_and_foreign_assets(h: Harness) -> None:
    contract = pick(h.book)
    other = next(c for c in h.book.contracts.values()
                 if c.so == contract.so and c.fsp != contract.fsp)
    mapped(h, "fsp", "AGR-7", contract.fsp)
    h.decide_and_commit(h.engine.decide_relay(contract.so, resolved(h, contract.so, external()),
                                              h.now))
    wrong = h.engine.decide_reconcile(contract.so, f"{P}:ORD-1", other.id, (), h.now)
    assert isinstance(wrong, Refused) and wrong.status == 422
    foreign = h.engine.decide_reconcile(contract.so, f"{P}:ORD-1", contract.id, ("ZZZ",),
                                        h.now)
    assert isinstance(foreign, Refused) and foreign.problems[0].field == "assets[0]"
    nobody = h.engine.decide_reconcile("SO-ELSE", f"{P}:ORD-1", contract.id, (), h.now)
    assert isinstance(nobody, Refused) and nobody.status == 404


def test_held_and_released_appear_on_the_so_feed(h: Harness) -> None:
    contract = pick(h.book)
    h.commit(RelayRecorded(RelayKind.HELD, f"{P}:ORD-9", h.now, {
        "platform": P, "so": contract.so, "external_id": "ORD-9", "reason": "no FSP",
        "dispatch": external(external_id="ORD-9").model_dump(mode="json"), "raw": "{}"}))
    assert [x.external_id for x in h.engine.held(contract.so)] == ["ORD-9"]
    h.commit(RelayRecorded(RelayKind.RELEASED, f"{P}:ORD-9", h.now,
                           {"platform": P, "so": contract.so, "instruction_id": "x"}))
    assert h.engine.held() == []
    n = h.engine.feed_length("so", contract.so)
    events = [h.engine.feed_event("so", contract.so, i)["event"] for i in (n - 1, n)]
    assert events == ["relay_held", "relay_released"]


def test_ids_mappers_and_their_errors() -> None:
    assert instruction_id(P, "ORD-1") == f"{P}:ORD-1"
    odd = instruction_id(P, "order #1/2")
    assert odd.startswith(f"{P}:") and len(odd) == len(P) + 33
    assert isinstance(load_mapper("json"), JsonMapper)
    with pytest.raises(ValueError, match="not built in"):
        load_mapper("nope")
    with pytest.raises(ValueError, match="No module named"):
        load_mapper("no_such_module:Thing")
    with pytest.raises(MapperError, match="not JSON"):
        JsonMapper().parse(b"<x/>", "text/xml")
    with pytest.raises(MapperError, match="item 1, external_id"):
        JsonMapper().parse(b'[{"external_id": "a"}, {"fsp": "b"}]', "application/json")
