"""dispatchd end to end: HTTP API in, real Mosquitto out, FSP control centres answering."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from contracts.io import ContractBook
from dispatchd.localstack import LocalMosquitto
from dispatchd.simulate import FspBehaviour, FspSimulator, wait_for
from tests.conftest import pick
from tests.dispatchd.conftest import Stack, auth, instruction, make_config, running

pytestmark = pytest.mark.broker


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _state(stack: Stack, instruction_id: str, so: str) -> str:
    response = await stack.client.get(f"/v1/instructions/{instruction_id}", headers=auth("so", so))
    return str(response.json()["state"])


async def _until_state(stack: Stack, instruction_id: str, so: str, state: str,
                       timeout: float = 10) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await _state(stack, instruction_id, so) == state:
            return True
        await asyncio.sleep(0.05)
    return False


async def _simulate(stack: Stack, fsp: str, behaviour: FspBehaviour) -> tuple[FspSimulator,
                                                                             asyncio.Task[None]]:
    sim = FspSimulator(fsp=fsp, host="127.0.0.1", port=stack.broker.port,
                       behaviour=behaviour)
    ready = asyncio.Event()
    task = asyncio.create_task(sim.run(ready))
    await asyncio.wait_for(ready.wait(), 5)
    return sim, task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_posted_instruction_reaches_its_fsp_and_mqtt_ack_acknowledges(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """POST → 202 → message on flexops/v1/fsp/{fsp}/instructions → ack → acknowledged."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=0))
            response = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                               json=instruction(contract, id="e2e-1"))
            assert response.status_code == 202, response.text
            body = response.json()
            assert body["status_url"].endswith("/v1/instructions/e2e-1")
            assert response.headers["location"] == body["status_url"]
            assert await _until_state(stack, "e2e-1", contract.so, "acknowledged_accepted")
            got = sim.received[0]
            assert (got.id, got.revision, got.type) == ("e2e-1", 0, "instruction")
            await _stop(task)

    run(scenario())


def test_http_ack_stops_resending(tmp_path: Path, broker: LocalMosquitto,
                                  live_book: ContractBook) -> None:
    """Unanswered, the instruction is re-sent; once the FSP acks over HTTP, re-sends stop."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=None))
            await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                    json=instruction(contract, id="resend-1"))
            assert await wait_for(lambda: sim.duplicates >= 2, 10)
            ack = await stack.client.post("/v1/instructions/resend-1/ack",
                                          headers=auth("fsp", contract.fsp),
                                          json={"revision": 0, "response": "rejected",
                                                "reason": "battery fleet offline"})
            assert ack.status_code == 200, ack.text
            assert ack.json()["state"] == "acknowledged_rejected"
            assert ack.json()["revisions"][0]["ack"]["reason"] == "battery fleet offline"
            await asyncio.sleep(0.5)
            settled = sim.duplicates
            await asyncio.sleep(2.5)
            assert sim.duplicates == settled
            await _stop(task)

    run(scenario())


def test_tokens_see_and_answer_only_their_own(tmp_path: Path, broker: LocalMosquitto,
                                              live_book: ContractBook) -> None:
    """Another FSP cannot read or ack; another SO cannot read, amend or cancel; roles hold."""
    contract = pick(live_book, so="SO1")
    other_fsp = next(f for f in live_book.fsps if f != contract.fsp)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            c = stack.client
            created = await c.post("/v1/instructions", headers=auth("so", "SO1"),
                                   json=instruction(contract, id="mine"))
            assert created.status_code == 202
            assert (await c.get("/v1/instructions/mine",
                                headers=auth("fsp", contract.fsp))).status_code == 200
            assert (await c.get("/v1/instructions/mine",
                                headers=auth("fsp", other_fsp))).status_code == 404
            assert (await c.get("/v1/instructions/mine",
                                headers=auth("so", "SO2"))).status_code == 404
            stolen = await c.post("/v1/instructions/mine/ack", headers=auth("fsp", other_fsp),
                                  json={"revision": 0, "response": "accepted"})
            assert stolen.status_code == 404
            for action, body in (("amend", {"capacity_mw": 0.1}), ("cancel", {"reason": "x"})):
                refused = await c.post(f"/v1/instructions/mine/{action}",
                                       headers=auth("so", "SO2"), json=body)
                assert refused.status_code == 404
            listed = (await c.get("/v1/instructions", headers=auth("fsp", other_fsp))).json()
            assert "mine" not in [i["id"] for i in listed["instructions"]]
            listed = (await c.get("/v1/instructions", headers=auth("so", "SO2"))).json()
            assert listed["instructions"] == []
            as_fsp = await c.post("/v1/instructions", headers=auth("fsp", contract.fsp),
                                  json=instruction(contract))
            assert as_fsp.status_code == 403
            as_so = await c.post("/v1/instructions/mine/ack", headers=auth("so", "SO1"),
                                 json={"revision": 0, "response": "accepted"})
            assert as_so.status_code == 403
            anonymous = await c.get("/v1/instructions/mine")
            assert anonymous.status_code == 401
            assert anonymous.headers["www-authenticate"] == "Bearer"
            wrong = await c.get("/v1/instructions/mine",
                                headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert await _state(stack, "mine", "SO1") in ("accepted", "delivered")

    run(scenario())


def test_invalid_instruction_gets_422_with_every_problem(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """Schema errors are listed together; contract problems are listed together."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            shape = await stack.client.post(
                "/v1/instructions", headers=auth("so", contract.so),
                json={"contract_id": contract.id, "capacity_mw": "lots",
                      "start": "tomorrow", "end": "2026-01-01T10:00:00"})
            assert shape.status_code == 422
            fields = {p["field"] for p in shape.json()["problems"]}
            assert {"capacity_mw", "start", "end"} <= fields
            terms = await stack.client.post(
                "/v1/instructions", headers=auth("so", contract.so),
                json=instruction(contract, capacity_mw=contract.contracted_mw + 100,
                                 assets=["NOPE"]))
            assert terms.status_code == 422
            problems = terms.json()["problems"]
            assert {p["field"] for p in problems} == {"capacity_mw", "assets[0]"}
            assert [p["overridable"] for p in problems if p["field"] == "capacity_mw"] == [True]
            garbage = await stack.client.post(
                "/v1/instructions", headers={**auth("so", contract.so),
                                             "content-type": "application/json"},
                content=b"{not json")
            assert garbage.status_code == 422
            listed = await stack.client.get("/v1/instructions", headers=auth("so", contract.so))
            assert listed.json()["instructions"] == []

    run(scenario())


def test_idempotent_repeat_and_conflict_over_http(tmp_path: Path, broker: LocalMosquitto,
                                                  live_book: ContractBook) -> None:
    """Same id and body → 200 with the stored instruction; other body → 409 naming fields."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            body = instruction(contract, id="idem-1")
            first = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                            json=body)
            again = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                            json=body)
            assert (first.status_code, again.status_code) == (202, 200)
            assert again.json()["created"] is False
            assert again.json()["instruction"] == first.json()["instruction"]
            clash = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                            json=body | {"capacity_mw": 0.1, "test": True})
            assert clash.status_code == 409
            assert {p["field"] for p in clash.json()["problems"]} == {"capacity_mw", "test"}

    run(scenario())


def test_amend_and_cancel_reach_the_fsp_as_revisions_in_order(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """The FSP receives revision 0, then the amendment, then the cancellation."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=None))
            headers = auth("so", contract.so)
            for _ in range(5):  # several instructions, so order is tested under some load
                await stack.client.post("/v1/instructions", headers=headers,
                                        json=instruction(contract))
            await stack.client.post("/v1/instructions", headers=headers,
                                    json=instruction(contract, id="rev-1"))
            amended = await stack.client.post("/v1/instructions/rev-1/amend", headers=headers,
                                              json={"revision": 1, "capacity_mw": 0.1})
            assert amended.status_code == 202 and amended.json()["revision"] == 1
            cancelled = await stack.client.post("/v1/instructions/rev-1/cancel", headers=headers,
                                                json={"revision": 2, "reason": "cleared"})
            assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
            assert await wait_for(
                lambda: [r.revision for r in sim.received if r.id == "rev-1"] == [0, 1, 2], 5)
            kinds = [(r.revision, r.type) for r in sim.received if r.id == "rev-1"]
            assert kinds == [(0, "instruction"), (1, "amendment"), (2, "cancellation")]
            assert sim.out_of_order == 0
            stale = await stack.client.post("/v1/instructions/rev-1/ack",
                                            headers=auth("fsp", contract.fsp),
                                            json={"revision": 1, "response": "accepted"})
            assert stale.status_code == 409
            await _stop(task)

    run(scenario())


def test_invalid_mqtt_ack_is_answered_on_the_errors_topic(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """Garbage or a wrong id on the acks topic gets a reason back; the service keeps going."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=None))
            async with aiomqtt.Client("127.0.0.1", broker.port) as fsp:
                topic = f"flexops/v1/fsp/{contract.fsp}/acks"
                await fsp.publish(topic, b"\xff not json", qos=1)
                await fsp.publish(topic, json.dumps({"id": "nope", "revision": 0,
                                                     "response": "accepted"}), qos=1)
            assert await wait_for(lambda: len(sim.errors) == 2, 5)
            assert {e["status"] for e in sim.errors} == {422, 404}
            ok = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                         json=instruction(contract))
            assert ok.status_code == 202
            await _stop(task)

    run(scenario())


def test_broker_restart_is_survived(tmp_path: Path, broker: LocalMosquitto,
                                    live_book: ContractBook) -> None:
    """Instructions accepted while the broker is down are delivered once it is back."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            broker.kill()
            assert await wait_for(lambda: not stack.service.mqtt.connected.is_set(), 5)
            down = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                           json=instruction(contract, id="while-down"))
            assert down.status_code == 202  # the journal, not the broker, decides acceptance
            broker.start()
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=0))
            assert await _until_state(stack, "while-down", contract.so, "acknowledged_accepted",
                                      timeout=20)
            assert [r.id for r in sim.received] == ["while-down"]
            await _stop(task)

    run(scenario())


def test_restart_resends_what_is_unacknowledged(tmp_path: Path, broker: LocalMosquitto,
                                                live_book: ContractBook) -> None:
    """A new service on the same journal re-sends the unacked instruction, not the acked."""
    contract = pick(live_book)
    config = make_config(tmp_path, broker, live_book)

    async def first() -> None:
        async with running(config, live_book, broker) as stack:
            for name in ("acked", "pending"):
                await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                        json=instruction(contract, id=name))
            await stack.client.post("/v1/instructions/acked/ack",
                                    headers=auth("fsp", contract.fsp),
                                    json={"revision": 0, "response": "accepted"})

    async def second() -> None:
        async with running(config, live_book, broker) as stack:
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=None))
            assert stack.service.replayed >= 3
            assert await wait_for(lambda: len(sim.received) >= 1, 10)
            await asyncio.sleep(0.5)
            assert {r.id for r in sim.received} == {"pending"}
            assert await _state(stack, "acked", contract.so) == "acknowledged_accepted"
            await _stop(task)

    run(first())
    run(second())


def test_openapi_healthz_and_metrics_are_served(tmp_path: Path, broker: LocalMosquitto,
                                                live_book: ContractBook) -> None:
    """The OpenAPI document lists the API; /metrics has the latency histograms."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                    json=instruction(contract))
            await asyncio.sleep(0.3)
            spec = (await stack.client.get("/openapi.json")).json()
            assert {"/v1/instructions", "/v1/instructions/{instruction_id}",
                    "/v1/instructions/{instruction_id}/amend",
                    "/v1/instructions/{instruction_id}/cancel",
                    "/v1/instructions/{instruction_id}/ack"} <= set(spec["paths"])
            health = (await stack.client.get("/healthz")).json()
            assert health == {"status": "ok", "mqtt_connected": True, "instructions": 1,
                              "journal_queue": 0, "stream_clients": {"fsp": 0, "so": 0},
                              "email_queue": 0, "webhook_queue": 0}
            text = (await stack.client.get("/metrics")).text
            for name in ('flexops_accept_seconds_count{endpoint="submit"} 1.0',
                         "flexops_journal_commit_seconds_count",
                         'flexops_accepted_to_delivered_seconds_count{channel="mqtt"} 1.0',
                         "flexops_accepted_to_acknowledged_seconds",
                         'flexops_transitions_total{state="accepted"} 1.0',
                         "flexops_unacknowledged 1.0", "flexops_journal_queue_depth",
                         "flexops_mqtt_queue_depth"):
                assert name in text, name

    run(scenario())


def test_journal_failure_refuses_with_503_and_service_resumes(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """When the journal cannot commit, the SO gets 503 + Retry-After and nothing is sent;
    once it can commit again, instructions are accepted as before."""
    contract = pick(live_book)

    async def scenario() -> None:
        async with running(make_config(tmp_path, broker, live_book), live_book, broker) as stack:
            sim, task = await _simulate(stack, contract.fsp, FspBehaviour(ack_delay_s=None))
            # Stands in for a failing disk: SQLite refuses every write on this connection.
            stack.service.journal._conn.execute("PRAGMA query_only=1")
            refused = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                              json=instruction(contract, id="lost-1"))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["problems"][0]["field"] == "journal"
            missing = await stack.client.get("/v1/instructions/lost-1",
                                             headers=auth("so", contract.so))
            assert missing.status_code == 404
            stack.service.journal._conn.execute("PRAGMA query_only=0")
            again = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                            json=instruction(contract, id="lost-1"))
            assert again.status_code == 202
            assert await wait_for(lambda: [r.id for r in sim.received] == ["lost-1"], 5)
            await _stop(task)

    run(scenario())
