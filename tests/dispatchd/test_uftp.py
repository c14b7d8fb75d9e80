"""UFTP round trips against an independent implementation: the Shapeshifter library
(``shapeshifter-uftp`` from PyPI) plays the DSO, with its own client and its own service
receiving our signed responses, over real HTTP on loopback.

Each rule tested names its place in the Shapeshifter specification 3.x: "Message
validation" (use case descriptions), "Message transport mechanism" (appendix, Error
handling), the message catalog's FlexOrder, FlexOrderResponse and Power entries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiohttp import web
from nacl.signing import SigningKey
from shapeshifter_uftp import transport
from shapeshifter_uftp.client import ShapeshifterDsoAgrClient
from shapeshifter_uftp.exceptions import ClientTransportException
from shapeshifter_uftp.uftp import (
    FlexOrder,
    FlexOrderISP,
    FlexOrderResponse,
    FlexRequest,
    FlexRequestISP,
    SignedMessage,
    TestMessage,
    UsefRole,
)

from contracts.io import ContractBook
from dispatchd.config import Config, UftpConfig, UftpDso
from dispatchd.localstack import LocalMosquitto, free_port
from dispatchd.simulate import FspBehaviour, FspSimulator, wait_for
from dispatchd.uftp import ENDPOINT
from tests.conftest import pick
from tests.dispatchd.conftest import Stack, auth, running
from tests.dispatchd.test_relay import PLATFORM, relay_config

pytestmark = [pytest.mark.broker, pytest.mark.service]

DSO = "dso.grid.example"
OTHER_DSO = "other-dso.grid.example"
ZONE = "Europe/London"


def keypair() -> tuple[str, str]:
    """(private, public) signing keys, base64, as the specification's CS1 uses them."""
    key = SigningKey.generate()
    return (base64.b64encode(bytes(key) + bytes(key.verify_key)).decode(),
            base64.b64encode(bytes(key.verify_key)).decode())


class Dso:
    """The DSO's receiving end: an HTTP listener handing each body to the library's own
    transport (``from_xml``, ``unseal_message``: signature checked with our public key).

    The library's ready-made service (``ShapeshifterDsoService``) is built on fastapi-xml,
    which does not run on the FastAPI release installed here; its transport functions are
    what that service calls, and they do all the UFTP work.
    """

    def __init__(self, agr_key: str, port: int) -> None:
        self.agr_key = agr_key
        self.port = port
        self.received: list[Any] = []
        self.refused: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        try:
            signed = transport.from_xml(await request.read())
            assert isinstance(signed, SignedMessage) and signed.sender_role == UsefRole.AGR
            message = transport.unseal_message(signed.body, self.agr_key)
        except Exception as exc:  # every refusal is recorded and fails the test
            self.refused.append(f"{type(exc).__name__}: {exc}")
            return web.Response(status=401 if "Signature" in type(exc).__name__ else 400)
        self.received.append(message)
        return web.Response(status=200)

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[Dso]:
        app = web.Application()
        app.router.add_post(ENDPOINT, self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()
            assert self.refused == []

    def responses(self, order_id: str) -> list[FlexOrderResponse]:
        return [m for m in self.received if isinstance(m, FlexOrderResponse)
                and m.flex_order_message_id == order_id]


class World:
    """Keys, domains and the config of one test."""

    def __init__(self, tmp_path: Path, broker: LocalMosquitto, book: ContractBook) -> None:
        self.contract = pick(book)
        self.agr_domain = f"agr-{self.contract.fsp.lower()}.flexops.example"
        self.agr_private, self.agr_public = keypair()
        self.dso_private, self.dso_public = keypair()
        self.dso_port = free_port()
        config = relay_config(tmp_path, broker, book, self.contract.so)
        self.config: Config = config.model_copy(update={"uftp": UftpConfig(
            domains=(self.agr_domain,), signing_key_env="AGR_KEY", time_zone=ZONE,
            retry_max_s=0.5, timeout_s=5,
            dsos={DSO: UftpDso(verify_key=self.dso_public, platform=PLATFORM,
                               endpoint=f"http://127.0.0.1:{self.dso_port}{ENDPOINT}")})})
        self.environ = {"AGR_KEY": self.agr_private}

    def client(self, stack: Stack, *, sender: str = DSO, key: str | None = None,
               recipient: str | None = None) -> ShapeshifterDsoAgrClient:
        return ShapeshifterDsoAgrClient(
            sender_domain=sender, signing_key=key or self.dso_private,
            recipient_domain=recipient or self.agr_domain,
            recipient_endpoint=f"{stack.service.base_url}{ENDPOINT}",
            recipient_signing_key=self.agr_public)

    def dso(self) -> contextlib.AbstractAsyncContextManager[Dso]:
        return Dso(self.agr_public, self.dso_port).listening()


def order(*, power: int = -400_000, isps: list[FlexOrderISP] | None = None,
          message_id: str | None = None, **fields: Any) -> FlexOrder:
    """An unsolicited FlexOrder for the next hour (four 15-minute ISPs from 30 min on)."""
    zone = ZoneInfo(ZONE)
    start = dt.datetime.now(zone) + dt.timedelta(minutes=30)
    if start.date() != (start + dt.timedelta(hours=1)).date():
        start = dt.datetime.combine(start.date() + dt.timedelta(days=1), dt.time(), zone)
    midnight = dt.datetime.combine(start.date(), dt.time(), zone)
    first = int((start - midnight) / dt.timedelta(minutes=15)) + 2
    values = {"isp_duration": "PT15M", "time_zone": ZONE, "period": start.date().isoformat(),
              "congestion_point": "ea1.2026-11.example.grid:cp-17", "price": "42.00",
              "currency": "EUR", "order_reference": "ORDER-77", "contract_id": "DSO-K-19",
              "unsolicited": True, "message_id": message_id or str(uuid.uuid4()),
              "isps": isps or [FlexOrderISP(power=power, start=first, duration=4)]}
    return FlexOrder(**(values | fields))


@contextlib.asynccontextmanager
async def fsp_listening(stack: Stack, fsp: str, *, ack: bool) -> AsyncIterator[FspSimulator]:
    sim = FspSimulator(fsp=fsp, host="127.0.0.1", port=stack.broker.port,
                       behaviour=FspBehaviour(ack_delay_s=0 if ack else None))
    ready = asyncio.Event()
    task = asyncio.create_task(sim.run(ready))
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield sim
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def mapped(stack: Stack, world: World) -> None:
    so = auth("so", world.contract.so)
    for kind, external, ours in (("fsp", world.agr_domain, world.contract.fsp),
                                 ("contract", "DSO-K-19", world.contract.id)):
        r = await stack.client.put(f"/v1/relay/{PLATFORM}/mappings/{kind}/{external}",
                                   headers=so, json={"ours": ours})
        assert r.status_code == 200, r.text


async def send(client: ShapeshifterDsoAgrClient, message: Any) -> None:
    """The library's client is blocking (requests): off the loop dispatchd runs on."""
    sender = (client.send_flex_order if isinstance(message, FlexOrder)
              else client.send_flex_request if isinstance(message, FlexRequest)
              else client.send_test_message)
    await asyncio.to_thread(sender, message)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def world(tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> World:
    return World(tmp_path, broker, live_book)


def test_flex_order_round_trip_delivers_over_mqtt_and_answers_with_signed_response(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """FlexOrder (message catalog) → relayed instruction on MQTT → FSP accepts →
    signed FlexOrderResponse Accepted (FlexOrderResponse: "must reply … indicating whether
    … handled successfully"), verified by the library's DSO service with our key."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack, \
                fsp_listening(stack, world.contract.fsp, ack=True) as sim:
            await mapped(stack, world)
            sent = order()
            async with world.dso() as dso:
                await send(world.client(stack), sent)
                iid = f"{PLATFORM}:{sent.message_id}"
                assert await wait_for(lambda: any(m.id == iid for m in sim.received), 5)
                assert await wait_for(lambda: dso.responses(sent.message_id), 10)
            [response] = dso.responses(sent.message_id)
            assert response.result == "Accepted" and response.rejection_reason is None
            assert response.conversation_id == sent.conversation_id
            assert response.sender_domain == world.agr_domain
            view = (await stack.client.get(f"/v1/instructions/{iid}",
                                           headers=auth("so", world.contract.so))).json()
            inst = view["instruction"]
            # Power (message catalog): negative is less consumption → turn down; four
            # 15-minute ISPs of 400 kW are two half hours of 0.4 MW
            assert (inst["direction"], inst["profile_mw"]) == ("turn_down", [0.4, 0.4])
            assert (inst["contract_id"], inst["unreconciled"]) == (world.contract.id, [])
            assert inst["external_ref"] == {"platform": PLATFORM, "id": sent.message_id,
                                            "conversation": sent.conversation_id}
            assert await wait_for_answer(stack, world, iid, "Accepted")

    run(scenario())


async def wait_for_answer(stack: Stack, world: World, iid: str, answer: str) -> bool:
    for _ in range(100):
        view = (await stack.client.get(f"/v1/instructions/{iid}",
                                       headers=auth("so", world.contract.so))).json()
        if (view["revisions"][0]["relay_answer"] or "").startswith(answer):
            return True
        await asyncio.sleep(0.05)
    return False


def test_message_validation_fsp_rejection_is_a_rejected_flex_order_response(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """FlexOrderResponse with Result Rejected and the FSP's reason as RejectionReason
    ("Message validation": [Other reasonable cause], explained in RejectionReason)."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack, \
                fsp_listening(stack, world.contract.fsp, ack=False) as sim:
            await mapped(stack, world)
            sent = order()
            iid = f"{PLATFORM}:{sent.message_id}"
            async with world.dso() as dso:
                await send(world.client(stack), sent)
                assert await wait_for(lambda: any(m.id == iid for m in sim.received), 5)
                r = await stack.client.post(
                    f"/v1/instructions/{iid}/ack", headers=auth("fsp", world.contract.fsp),
                    json={"revision": 0, "response": "rejected",
                          "reason": "battery site offline"})
                assert r.status_code == 200, r.text
                assert await wait_for(lambda: dso.responses(sent.message_id), 10)
            [response] = dso.responses(sent.message_id)
            assert response.result == "Rejected"
            assert response.rejection_reason == "Rejected by the provider: battery site offline"

    run(scenario())


def test_message_validation_already_submitted_and_duplicate_identifier(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """"Message validation": the same MessageID with the same content is "Already
    Submitted" (relayed once); with other content "Duplicate Identifier"."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack, \
                fsp_listening(stack, world.contract.fsp, ack=False) as sim:
            await mapped(stack, world)
            sent = order()
            async with world.dso() as dso:
                client = world.client(stack)
                await send(client, sent)
                await send(client, sent)
                changed = order(message_id=sent.message_id, power=-900_000)
                await send(client, changed)
                assert await wait_for(lambda: len(dso.responses(sent.message_id)) == 2, 10)
                reasons = sorted(r.rejection_reason for r in dso.responses(sent.message_id))
            assert reasons[0] == "Already Submitted"
            assert reasons[1].startswith("Duplicate Identifier")
            await asyncio.sleep(0.3)
            iid = f"{PLATFORM}:{sent.message_id}"
            assert {m.revision for m in sim.received if m.id == iid} == {0}
            view = (await stack.client.get(f"/v1/instructions/{iid}",
                                           headers=auth("so", world.contract.so))).json()
            assert view["instruction"]["profile_mw"] == [0.4, 0.4]
            assert len(view["revisions"]) == 1

    run(scenario())


def test_transport_invalid_signature_is_401_and_nothing_is_relayed(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """"Message transport mechanism", Error handling: an invalid signature (the inner
    message cannot be unsealed) is 401 Unauthorized."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            await mapped(stack, world)
            sent = order()
            sent.sender_domain, sent.recipient_domain = DSO, world.agr_domain
            sent.time_stamp = dt.datetime.now(dt.UTC).isoformat()
            sent.conversation_id = str(uuid.uuid4())
            sealed = bytearray(transport.seal_message(sent, world.dso_private))
            sealed[70] ^= 0x01  # one bit of the signed XML
            body = transport.to_xml(SignedMessage(sender_domain=DSO, sender_role=UsefRole.DSO,
                                                  body=bytes(sealed)))
            r = await post_xml(stack, body)
            assert r.status_code == 401 and "signature" in r.text
            wrong_key, _ = keypair()
            with pytest.raises(ClientTransportException, match="401"):
                await send(world.client(stack, key=wrong_key), order())
            assert stack.service.engine.ids() == []

    run(scenario())


async def post_xml(stack: Stack, body: str | bytes, content_type: str = "text/xml; "
                   "charset=utf-8") -> httpx.Response:
    return await stack.client.post(ENDPOINT, content=body,
                                   headers={"Content-Type": content_type})


def test_transport_unknown_sender_wrong_content_type_and_bad_xml(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """"Message transport mechanism", Error handling: no key for the sender cannot be
    authenticated (401); a Content-Type other than text/xml, or XML that is not a
    schema-valid SignedMessage, is 400 Bad Request."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            stranger_key, _ = keypair()
            with pytest.raises(ClientTransportException, match="401"):
                await send(world.client(stack, sender=OTHER_DSO, key=stranger_key), order())
            assert (await post_xml(stack, "<SignedMessage/>", "application/json")
                    ).status_code == 400
            assert (await post_xml(stack, "<not-usef/>")).status_code == 400
            assert (await post_xml(stack, b"\xff\xfe garbage")).status_code == 400
            assert stack.service.engine.ids() == []
            metrics = (await stack.client.get("/metrics")).text
            assert 'flexops_uftp_messages_total{kind="refused",status="401"} 1.0' in metrics

    run(scenario())


@pytest.mark.parametrize(("rule", "changes"), [
    ("ISP duration rejected", {"isp_duration": "PT30M"}),
    ("TimeZone rejected", {"time_zone": "Europe/Helsinki"}),
    ("ISP conflict", {"isps": [FlexOrderISP(power=-1, start=90, duration=4),
                               FlexOrderISP(power=-1, start=92, duration=1)]}),
    ("ISPs out of bounds", {"isps": [FlexOrderISP(power=-1, start=95, duration=4)]}),
    ("Period out of bounds", {"period": "2026-01-05"}),
    ("Invalid Message", {"isps": [FlexOrderISP(power=-5, start=93, duration=1),
                                  FlexOrderISP(power=5, start=94, duration=1)]}),
])
def test_message_validation_flex_order_rules(
        world: World, broker: LocalMosquitto, live_book: ContractBook, rule: str,
        changes: dict[str, Any]) -> None:
    """"Message validation" rules for messages with ISPs and a Period: each is a signed
    FlexOrderResponse Rejected naming the rule; nothing is relayed."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            await mapped(stack, world)
            fields = dict(changes)
            if "isps" in fields and "period" not in fields:
                fields["period"] = (dt.datetime.now(ZoneInfo(ZONE)).date()
                                    + dt.timedelta(days=1)).isoformat()
            sent = order(**fields)
            async with world.dso() as dso:
                await send(world.client(stack), sent)
                assert await wait_for(lambda: dso.responses(sent.message_id), 10)
            [response] = dso.responses(sent.message_id)
            assert response.result == "Rejected"
            assert response.rejection_reason.startswith(rule), response.rejection_reason
            assert stack.service.engine.ids() == []

    run(scenario())


def test_message_validation_unknown_recipient_and_mismatched_sender(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """"Message validation": "Unknown RecipientDomain" and "Mismatch SenderDomain"
    (the SignedMessage's SenderDomain differs from the inner message's)."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            async with world.dso() as dso:
                elsewhere = order()
                await send(world.client(stack, recipient="agr-nobody.flexops.example"),
                           elsewhere)
                inner = order()
                inner.sender_domain, inner.recipient_domain = OTHER_DSO, world.agr_domain
                inner.time_stamp = dt.datetime.now(dt.UTC).isoformat()
                inner.conversation_id = str(uuid.uuid4())
                signed = SignedMessage(sender_domain=DSO, sender_role=UsefRole.DSO,
                                       body=transport.seal_message(inner, world.dso_private))
                assert (await post_xml(stack, transport.to_xml(signed))).status_code == 200
                assert await wait_for(lambda: dso.responses(elsewhere.message_id)
                                      and dso.responses(inner.message_id), 10)
            assert dso.responses(elsewhere.message_id)[0].rejection_reason.startswith(
                "Unknown RecipientDomain")
            assert dso.responses(inner.message_id)[0].rejection_reason.startswith(
                "Mismatch SenderDomain")
            assert stack.service.engine.ids() == []

    run(scenario())


def test_test_message_answered_and_flex_request_declined(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """TestMessage → TestMessageResponse Accepted; a FlexRequest asks for offers, which
    this endpoint does not make: FlexRequestResponse Rejected, "Invalid Message"."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            async with world.dso() as dso:
                client = world.client(stack)
                await send(client, TestMessage())
                request = FlexRequest(
                    isp_duration="PT15M", time_zone=ZONE, period=order().period,
                    congestion_point="ea1.2026-11.example.grid:cp-17", revision=1,
                    expiration_date_time=(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
                                          ).isoformat(),
                    isps=[FlexRequestISP(min_power=-1000, max_power=0, start=95)])
                await send(client, request)
                assert await wait_for(lambda: len(dso.received) == 2, 10)
            kinds = {type(m).__name__: m for m in dso.received}
            assert kinds["TestMessageResponse"].result == "Accepted"
            declined = kinds["FlexRequestResponse"]
            assert declined.result == "Rejected"
            assert declined.rejection_reason.startswith("Invalid Message")

    run(scenario())


def test_response_is_retried_until_the_dso_is_back_and_recorded(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """"Message transport mechanism", Transmission: connection failures are temporary and
    retried with exponential back-off; the response arrives once the DSO listens."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack, \
                fsp_listening(stack, world.contract.fsp, ack=True) as sim:
            await mapped(stack, world)
            sent = order()
            iid = f"{PLATFORM}:{sent.message_id}"
            await send(world.client(stack), sent)  # the DSO's own service is down
            assert await wait_for(lambda: any(m.id == iid for m in sim.received), 5)
            await asyncio.sleep(1.0)
            async with world.dso() as dso:
                assert await wait_for(lambda: dso.responses(sent.message_id), 10)
            assert await wait_for_answer(stack, world, iid, "Accepted")
            metrics = (await stack.client.get("/metrics")).text
            assert 'flexops_uftp_responses_total{result="Accepted"} 1.0' in metrics

    run(scenario())


def test_unmapped_agr_domain_holds_the_order_until_mapped(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """Relay first: the AGR domain not yet mapped to an FSP holds the order (nothing is
    lost); mapping it relays the order and the FSP's answer goes back to the DSO."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack, \
                fsp_listening(stack, world.contract.fsp, ack=True) as sim:
            sent = order()
            async with world.dso() as dso:
                await send(world.client(stack), sent)
                so = auth("so", world.contract.so)
                held = (await stack.client.get("/v1/relay/exceptions", headers=so)).json()
                assert [h["external_id"] for h in held["held"]] == [sent.message_id]
                await mapped(stack, world)
                iid = f"{PLATFORM}:{sent.message_id}"
                assert await wait_for(lambda: any(m.id == iid for m in sim.received), 5)
                assert await wait_for(lambda: dso.responses(sent.message_id), 10)
            assert dso.responses(sent.message_id)[0].result == "Accepted"

    run(scenario())


def test_an_answer_not_yet_delivered_is_sent_after_a_restart(
        world: World, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """The FSP answered while the DSO was unreachable and dispatchd then stopped: on
    start-up the FlexOrderResponse still owed is sent ("Message transport mechanism",
    Transmission: delivery is re-attempted; the journal keeps what was answered)."""
    sent = order()
    iid = f"{PLATFORM}:{sent.message_id}"

    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack, \
                fsp_listening(stack, world.contract.fsp, ack=True):
            await mapped(stack, world)
            await send(world.client(stack), sent)
            assert await wait_for(lambda: bool(
                (v := stack.service.engine.view(iid)) and v.revisions[0].ack), 5)
        async with world.dso() as dso, \
                running(world.config, live_book, broker, environ=world.environ) as stack:
            assert await wait_for(lambda: dso.responses(sent.message_id), 10)
            assert dso.responses(sent.message_id)[0].result == "Accepted"
            assert await wait_for_answer(stack, world, iid, "Accepted")
        async with world.dso() as dso, \
                running(world.config, live_book, broker, environ=world.environ):
            await asyncio.sleep(1.0)
            assert dso.responses(sent.message_id) == [], "answered twice"

    run(scenario())


@pytest.mark.parametrize(("field", "value"), [
    ("time_stamp", None), ("time_stamp", "yesterday"), ("time_stamp", "2026-11-23T10:00:00"),
    ("message_id", None), ("message_id", "order-1")])
def test_transport_metadata_outside_the_schema_is_400(
        world: World, broker: LocalMosquitto, live_book: ContractBook, field: str,
        value: Any) -> None:
    """"Message transport mechanism", Error handling: an unsealed body not compliant with
    the schema is 400. The schema requires MessageID (a UUID) and TimeStamp (with its
    offset), which the library's parser lets through; nothing is relayed."""
    async def scenario() -> None:
        async with running(world.config, live_book, broker, environ=world.environ) as stack:
            await mapped(stack, world)
            sent = order()
            sent.sender_domain, sent.recipient_domain = DSO, world.agr_domain
            sent.time_stamp = dt.datetime.now(dt.UTC).isoformat()
            sent.conversation_id = str(uuid.uuid4())
            setattr(sent, field, value)
            signed = SignedMessage(sender_domain=DSO, sender_role=UsefRole.DSO,
                                   body=transport.seal_message(sent, world.dso_private))
            r = await post_xml(stack, transport.to_xml(signed))
            assert r.status_code == 400, r.text
            assert ("MessageID" if field == "message_id" else "TimeStamp") in r.text
            assert stack.service.engine.ids() == []

    run(scenario())
