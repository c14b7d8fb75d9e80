"""Garbage on every input that is not the HTTP API: acknowledgements on MQTT and on the
websocket stream (malformed, huge, wrong types, another FSP's instruction), and broken
meter-data files. The service answers with clear errors and keeps running."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.io import ContractBook
from dispatchd.localstack import LocalMosquitto
from settlement.meterdata import MeterFileError, ingest
from tests.conftest import pick
from tests.dispatchd.channels_peers import channel_book, channel_config, serving, stream
from tests.dispatchd.conftest import auth, instruction, make_config, running
from tests.settlement.fixture import book as settlement_book

pytestmark = pytest.mark.fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
ack_like = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=40), st.integers(), st.none()),
    "revision": st.one_of(st.integers(-5, 5), st.text(max_size=5), st.none()),
    "response": st.one_of(st.sampled_from(["accepted", "rejected", "maybe", ""]), st.none()),
    "reason": st.one_of(st.text(max_size=2000), st.integers(), st.none()),
})
garbage = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    ack_like.map(lambda v: json.dumps(v).encode()),
    st.just(b"{" * 10_000),
    st.just(json.dumps({"id": "x" * 100_000, "revision": 0, "response": "accepted"}).encode()),
)


def drawn(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` values of ``strategy``, drawn reproducibly (the same in every run)."""
    found: list[Any] = []

    @settings(max_examples=count, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value: Any) -> None:
        found.append(value)

    draw()
    return found[:count]


def _cases(count: int) -> list[bytes]:
    """``count`` garbage payloads."""
    return drawn(garbage, count) or [b""]


@pytest.mark.broker
def test_garbage_acks_on_mqtt_are_answered_and_the_service_keeps_working(
        tmp_path: Path, live_book: ContractBook) -> None:
    contract = pick(live_book)
    other = pick(live_book, exclude=(contract.id,), so="SO2")
    cases = _cases(150)

    async def scenario(broker: LocalMosquitto) -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            theirs = await stack.client.post("/v1/instructions", headers=auth("so", other.so),
                                             json=instruction(other, id="theirs"))
            assert theirs.status_code == 202
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="fuzzer") as fsp:
                await fsp.subscribe(f"flexops/v1/fsp/{contract.fsp}/errors", qos=1)
                payloads = [*cases, json.dumps({"id": "theirs", "revision": 0,
                                                "response": "accepted"}).encode()]
                for payload in payloads:
                    await fsp.publish(f"flexops/v1/fsp/{contract.fsp}/acks", payload, qos=1)
                answers = []
                async with asyncio.timeout(20):
                    async for message in fsp.messages:
                        answers.append(json.loads(bytes(message.payload)))  # type: ignore[arg-type]
                        if len(answers) == len(payloads):
                            break
            assert all(a["status"] in (404, 409, 422) and a["problems"] for a in answers)
            assert answers[-1]["status"] == 404  # another FSP's instruction: not found
            health = await stack.client.get("/healthz")
            assert health.status_code == 200 and health.json()["mqtt_connected"]
            state = (await stack.client.get("/v1/instructions/theirs",
                                            headers=auth("so", other.so))).json()
            assert state["revisions"][0]["ack"] is None
            print(f"\nMQTT ack garbage: {len(payloads)} payloads, {len(answers)} refusals, "
                  "service up")

    with LocalMosquitto() as broker:
        asyncio.run(scenario(broker))


@pytest.mark.service
def test_garbage_on_the_websocket_stream_gets_replies_and_the_stream_stays(
        tmp_path: Path, live_book: ContractBook) -> None:
    book = channel_book(live_book, {})
    contract = pick(book)
    cases = _cases(150)

    async def scenario() -> None:
        async with serving(channel_config(tmp_path, book), book) as (service, client):
            async with stream(service, "fsp", contract.fsp) as ws:
                replies: list[dict[str, Any]] = []
                for payload in cases:
                    await ws.send(payload.decode("utf-8", "replace"))
                    replies.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
                assert all(r["reply"] in ("ack", "error") and r["status"] >= 400
                           for r in replies)
                await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id="after-garbage"))
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert event["id"] == "after-garbage"
            print(f"\nwebsocket garbage: {len(cases)} frames, {len(replies)} refusals, "
                  "stream kept")

    asyncio.run(scenario())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.text(max_size=30), min_size=0, max_size=7), max_size=30),
       header=st.sampled_from([
           "meter_id,period_start,kwh,flow,quality", "meter_id,period_start,kwh",
           "meter_id,settlement_date,settlement_period,kwh", "kwh,meter_id,period_start",
           "nonsense"]))
def test_broken_meter_files_never_crash_the_intake_and_counts_add_up(
        tmp_path_factory: pytest.TempPathFactory, rows: list[list[str]], header: str) -> None:
    directory = tmp_path_factory.mktemp("fuzz-ingest")
    source = directory / "broken.csv"
    lines = [header] + [",".join(cell.replace("\n", " ").replace(",", ";") for cell in row)
                        for row in rows]
    source.write_text("\n".join(lines) + "\n")
    try:
        intake = ingest(source, settlement_book(), directory / "dataset",
                        quarantine=directory / "q")
    except MeterFileError as exc:
        assert str(source) in str(exc)
        return
    assert intake.rows_in == intake.stored + intake.merged + intake.quarantined
