"""The OpenADR 3.1 VTN's rules one by one, over HTTP, each test named after what the
specification's API description says of the endpoint it exercises (the VEN library's
round trip is in ``test_openadr.py``)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from contracts.io import ContractBook
from dispatchd.localstack import LocalMosquitto
from tests.conftest import pick
from tests.dispatchd.conftest import Stack, auth, instruction, running
from tests.dispatchd.test_openadr import openadr_config

pytestmark = [pytest.mark.broker, pytest.mark.service]


async def token(stack: Stack, client_id: str, secret: str) -> dict[str, str]:
    r = await stack.client.post("/openadr3/auth/token", auth=(client_id, secret),
                                data={"grant_type": "client_credentials"})
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "Bearer" and r.headers["cache-control"] == "no-store"
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def scenario(tmp_path: Path, broker: LocalMosquitto, book: ContractBook,
             body: Any) -> None:
    contract = pick(book)
    other = next(f for f in book.fsps if f != contract.fsp)
    config = openadr_config(tmp_path, broker, book, {"a": (contract.fsp, "sa"),
                                                     "b": (other, "sb")})

    async def run() -> None:
        async with running(config, book, broker) as stack:
            await body(stack, contract, await token(stack, "a", "sa"),
                       await token(stack, "b", "sb"))

    asyncio.run(run())


def test_oadr_events_query_by_program_id_and_cancelled_events_are_deleted(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """Events: ``GET /events?programID=`` lists that program's events only; an event of a
    cancelled instruction is deleted (not listed, 404 by id)."""
    async def body(stack: Stack, contract: Any, mine: dict[str, str], _: Any) -> None:
        so = auth("so", contract.so)
        for iid in ("e1", "e2"):
            r = await stack.client.post("/v1/instructions", headers=so,
                                        json=instruction(contract, id=iid))
            assert r.status_code == 202
        listed = (await stack.client.get(f"/openadr3/events?programID={contract.id}",
                                         headers=mine)).json()
        assert [e["id"] for e in listed] == ["e1", "e2"]
        assert all(e["programID"] == contract.id and e["objectType"] == "EVENT"
                   for e in listed)
        assert (await stack.client.get("/openadr3/events?programID=nope", headers=mine)
                ).json() == []
        await stack.client.post("/v1/instructions/e1/cancel", headers=so,
                                json={"reason": "not needed"})
        listed = (await stack.client.get("/openadr3/events", headers=mine)).json()
        assert [e["id"] for e in listed] == ["e2"]
        assert (await stack.client.get("/openadr3/events/e1", headers=mine)
                ).status_code == 404

    scenario(tmp_path, broker, live_book, body)


def test_oadr_event_intervals_carry_the_profile_in_kw(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """Events: ``intervalPeriod`` and ``intervals`` with payloads; the payload descriptor
    names the type and units (``DISPATCH_SETPOINT_RELATIVE``, ``KW``)."""
    async def body(stack: Stack, contract: Any, mine: dict[str, str], _: Any) -> None:
        start = instruction(contract)["start"]
        end = (dt.datetime.fromisoformat(start) + dt.timedelta(hours=1)).isoformat()
        r = await stack.client.post("/v1/instructions", headers=auth("so", contract.so),
                                    json=instruction(contract, id="p1", capacity_mw=None,
                                                     profile_mw=[0.2, 0.1], start=start,
                                                     end=end))
        assert r.status_code == 202, r.text
        shown = (await stack.client.get("/openadr3/events/p1", headers=mine)).json()
        sign = -1 if contract.direction.value == "turn_down" else 1
        assert [i["payloads"][0]["values"][0] for i in shown["intervals"]] == [
            sign * 200.0, sign * 100.0]
        assert [i["intervalPeriod"]["duration"] for i in shown["intervals"]] == [
            "PT0H30M0S", "PT0H30M0S"]
        assert shown["payloadDescriptors"][0] == {
            "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
            "payloadType": "DISPATCH_SETPOINT_RELATIVE", "units": "KW"}
        assert shown["targets"] == list(contract.assets)

    scenario(tmp_path, broker, live_book, body)


def test_oadr_vens_subscriptions_and_reports_are_each_clients_own(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """VENs, subscriptions, reports: objects are created with ``id``, times and
    ``clientID``; another client's objects are not listed and answer 404; a VEN name is
    unique (409); a subscription needs ``objectOperations`` with a ``callbackUrl`` (400)."""
    async def body(stack: Stack, contract: Any, mine: dict[str, str],
                   theirs: dict[str, str]) -> None:
        c = stack.client
        # issued while the FSP has no VEN: nothing is sent; a report later shows delivery
        await c.post("/v1/instructions", headers=auth("so", contract.so),
                     json=instruction(contract, id="r1"))
        ven = (await c.post("/openadr3/vens", headers=mine, json={"venName": "v1"})).json()
        assert ven["clientID"] == "a" and ven["objectType"] == "VEN" and ven["id"]
        assert (await c.post("/openadr3/vens", headers=theirs, json={"venName": "v1"})
                ).status_code == 409
        assert (await c.get("/openadr3/vens", headers=theirs)).json() == []
        assert (await c.post("/openadr3/resources", headers=theirs, json={
            "resourceName": "r", "venID": ven["id"]})).status_code == 404
        bad = await c.post("/openadr3/subscriptions", headers=mine,
                           json={"clientName": "x", "objectOperations": []})
        assert bad.status_code == 400 and bad.json()["status"] == 400
        sub = (await c.post("/openadr3/subscriptions", headers=mine, json={
            "clientName": "x", "objectOperations": [{
                "objects": ["EVENT"], "operations": ["POST"],
                "callbackUrl": "http://127.0.0.1:9/hook", "bearerToken": None}]})).json()
        assert (await c.get(f"/openadr3/subscriptions/{sub['id']}", headers=theirs)
                ).status_code == 404
        assert (await c.delete(f"/openadr3/subscriptions/{sub['id']}", headers=theirs)
                ).status_code == 404
        assert (await c.get("/openadr3/subscriptions", headers=mine)).json()[0]["id"] == \
            sub["id"]
        delivered = {"eventID": "r1", "clientName": "v1", "resources": [{
            "resourceName": "r", "intervals": [{"id": 0, "payloads": [
                {"type": "DELTA_USAGE", "values": [-0.5]}]}]}]}
        kept = await c.post("/openadr3/reports", headers=mine, json=delivered)
        assert kept.status_code == 201 and kept.json()["programID"] == contract.id
        view = (await c.get("/v1/instructions/r1", headers=auth("so", contract.so))).json()
        assert view["revisions"][0]["ack"] is None  # a quantity report is not an answer
        for _ in range(50):  # but it shows the VEN has the event: its delivery record
            if "openadr" in view["revisions"][0]["delivered"]:
                break
            await asyncio.sleep(0.05)
            view = (await c.get("/v1/instructions/r1", headers=auth("so", contract.so))
                    ).json()
        assert "openadr" in view["revisions"][0]["delivered"]
        assert (await c.post("/openadr3/reports", headers=theirs, json=delivered)
                ).status_code == 404
        assert [r["eventID"] for r in (await c.get("/openadr3/reports", headers=mine)
                                       ).json()] == ["r1"]
        assert (await c.get("/openadr3/reports", headers=theirs)).json() == []

    scenario(tmp_path, broker, live_book, body)


def test_oadr_rejected_report_is_a_rejection_with_its_reason(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """Reports: ``OPERATING_STATE`` ``REJECTED`` with a reason answers the event's current
    revision as rejected; a second, different answer is refused (409)."""
    async def body(stack: Stack, contract: Any, mine: dict[str, str], _: Any) -> None:
        c = stack.client
        await c.post("/v1/instructions", headers=auth("so", contract.so),
                     json=instruction(contract, id="x1"))

        def report(*values: str) -> dict[str, Any]:
            return {"eventID": "x1", "clientName": "v", "resources": [{
                "resourceName": "r", "intervals": [{"id": 0, "payloads": [
                    {"type": "OPERATING_STATE", "values": list(values)}]}]}]}

        assert (await c.post("/openadr3/reports", headers=mine,
                             json=report("REJECTED", "inverter", "fault"))).status_code == 201
        view = (await c.get("/v1/instructions/x1", headers=auth("so", contract.so))).json()
        assert view["revisions"][0]["ack"]["response"] == "rejected"
        assert view["revisions"][0]["ack"]["reason"] == "inverter fault"
        assert (await c.post("/openadr3/reports", headers=mine, json=report("ACCEPTED"))
                ).status_code == 409

    scenario(tmp_path, broker, live_book, body)


def test_oadr_notifiers_name_the_broker_and_per_ven_topics(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """Notifiers: ``GET /notifiers`` gives the webhook flag and the MQTT binding (URIs,
    serialization, authentication); the topic endpoints give CREATE, UPDATE, DELETE and
    ALL topics, for the caller's own VENs and programs only."""
    async def body(stack: Stack, contract: Any, mine: dict[str, str],
                   theirs: dict[str, str]) -> None:
        c = stack.client
        found = (await c.get("/openadr3/notifiers", headers=mine)).json()
        assert found["WEBHOOK"] is True
        assert found["MQTT"]["URIS"] == [broker.url]
        assert found["MQTT"]["authentication"] == {"method": "ANONYMOUS"}
        ven = (await c.post("/openadr3/vens", headers=mine, json={"venName": "v"})).json()
        topics = (await c.get(f"/openadr3/notifiers/mqtt/topics/vens/{ven['id']}/events",
                              headers=mine)).json()["topics"]
        assert topics == {op: f"openadr3/vens/{ven['id']}/events/{leaf}" for op, leaf in (
            ("CREATE", "create"), ("UPDATE", "update"), ("DELETE", "delete"), ("ALL", "+"))}
        assert (await c.get(f"/openadr3/notifiers/mqtt/topics/vens/{ven['id']}/events",
                            headers=theirs)).status_code == 404
        assert (await c.get(f"/openadr3/notifiers/mqtt/topics/programs/{contract.id}/events",
                            headers=theirs)).status_code == 404

    scenario(tmp_path, broker, live_book, body)


def test_oadr_bodies_of_the_wrong_shape_are_refused_and_dispatch_goes_on(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """VENs, resources, subscriptions, reports: a body of the wrong shape is a 400 naming
    the field, and nothing is stored; the SO's next instruction is accepted and delivered
    as usual (a stored subscription of the wrong shape once made it fail)."""
    async def body(stack: Stack, contract: Any, mine: dict[str, str], _: Any) -> None:
        c = stack.client
        for path, sent, field in (
                ("/openadr3/vens", {"venName": 5}, "venName"),
                ("/openadr3/resources", {"resourceName": "r"}, "venID"),
                ("/openadr3/subscriptions", {"clientName": "x", "objectOperations": [
                    {"objects": 5, "operations": ["POST"], "callbackUrl": "http://x"}]},
                 "objectOperations.0.objects"),
                ("/openadr3/subscriptions", {"clientName": "x", "objectOperations": [
                    {"objects": ["EVENT"], "operations": ["POST"],
                     "callbackUrl": "ftp://x"}]}, "objectOperations.0.callbackUrl"),
                ("/openadr3/reports", {"eventID": "z1", "clientName": "v",
                                       "resources": ["oops"]}, "resources.0")):
            r = await c.post(path, headers=mine, json=sent)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["detail"].startswith(field), r.json()
        assert (await c.get("/openadr3/subscriptions", headers=mine)).json() == []
        r = await c.post("/v1/instructions", headers=auth("so", contract.so),
                         json=instruction(contract, id="z1"))
        assert r.status_code == 202, r.text
        long_reason = {"eventID": "z1", "clientName": "v", "resources": [{
            "resourceName": "r", "intervals": [{"id": 0, "payloads": [
                {"type": "OPERATING_STATE", "values": ["REJECTED", "x" * 2000]}]}]}]}
        r = await c.post("/openadr3/reports", headers=mine, json=long_reason)
        assert r.status_code == 400 and "reason" in r.json()["detail"]

    scenario(tmp_path, broker, live_book, body)
