"""Email to a real SMTP server (aiosmtpd) and signed webhooks to a real HTTP receiver."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from contracts.io import ContractBook
from contracts.model import Channel, Endpoints
from dispatchd.config import ConfigError
from dispatchd.service import Service
from dispatchd.simulate import wait_for
from dispatchd.webhooks import secret_key, signature
from tests.conftest import pick
from tests.dispatchd.channels_peers import (
    FakeClock,
    SmtpServer,
    WebhookReceiver,
    channel_book,
    channel_config,
    next_event,
    parts,
    self_signed,
    serving,
    stream,
)
from tests.dispatchd.conftest import auth, instruction

pytestmark = pytest.mark.service

EMAIL = Endpoints(channels=(Channel.EMAIL,))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_instruction_email_carries_everything_needed_to_act(
        tmp_path: Path, live_book: ContractBook) -> None:
    """One message per revision, plain and HTML, with who/what/when/how much and a link."""
    contract = pick(live_book)
    book = channel_book(live_book, {contract.fsp: EMAIL})
    fsp, so = book.fsps[contract.fsp], book.system_operators[contract.so]

    async def scenario() -> None:
        with SmtpServer() as smtp:
            async with serving(channel_config(tmp_path, book, smtp_port=smtp.port), book) as (
                    _, client):
                sent = instruction(contract, id="mail-1", note="feeder 7 constraint")
                r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=sent)
                assert r.status_code == 202, r.text
                start = dt.datetime.fromisoformat(sent["start"])
                mw = contract.contracted_mw
                assert await wait_for(lambda: len(smtp.messages()) == 1, 10)
                message = smtp.messages()[0]
                plain, page = parts(message)
                local = start.astimezone(ZoneInfo(contract.timezone))
                assert message["To"] == ", ".join(fsp.dispatch_emails)
                assert message["X-Flexops-Instruction"] == "mail-1"
                assert message["X-Flexops-Revision"] == "0"
                subject = message["Subject"]
                assert "TURN" in subject and f"{mw:g} MW" in subject and "mail-1 rev 0" in subject
                for text in (plain, page):
                    assert so.name in text and contract.id in text
                    assert all(asset in text for asset in contract.assets)
                    assert f"{mw:.3f} MW" in text and "feeder 7 constraint" in text
                    assert f"{local:%H:%M} {local.tzname()}" in text
                    assert f"{start:%Y-%m-%d %H:%M} UTC" in text
                    assert "Respond by" in text and "revision 0" in text
                link = re.search(r"http://\S+/v1/respond/mail-1/0\?fsp=\S+&sig=[\w=-]+", plain)
                assert link is not None

                async with httpx.AsyncClient() as browser:
                    page_response = await browser.get(link[0])
                    assert page_response.status_code == 200 and "Accept" in page_response.text
                    state = (await client.get("/v1/instructions/mail-1",
                                              headers=auth("so", contract.so))).json()
                    assert state["state"] == "delivered"  # looking changes nothing
                    assert "email" in state["revisions"][0]["delivered"]
                    forged = await browser.post(link[0].replace("sig=", "sig=x"),
                                                data={"response": "accepted"})
                    assert forged.status_code == 404
                    answered = await browser.post(link[0], data={"response": "accepted"})
                    assert answered.status_code == 200 and "Recorded" in answered.text
                state = (await client.get("/v1/instructions/mail-1",
                                          headers=auth("so", contract.so))).json()
                assert state["state"] == "acknowledged_accepted"

                amended = await client.post("/v1/instructions/mail-1/amend",
                                            headers=auth("so", contract.so),
                                            json={"capacity_mw": mw / 2})
                assert amended.status_code == 202, amended.text
                assert await wait_for(lambda: len(smtp.messages()) == 2, 10)
                second = smtp.messages()[1]
                assert second["X-Flexops-Revision"] == "1"
                assert "AMENDED" in second["Subject"] and f"{mw / 2:g} MW" in second["Subject"]

    run(scenario())


def test_email_goes_over_starttls_with_the_configured_credentials(
        tmp_path: Path, live_book: ContractBook) -> None:
    """security = starttls, ca_file and username/password_env reach an SMTP server that
    requires all three."""
    contract = pick(live_book)
    book = channel_book(live_book, {contract.fsp: EMAIL})
    cert, key = self_signed(tmp_path)

    async def scenario() -> None:
        with SmtpServer(tls=(cert, key), login=("dispatchd", "s3cret")) as smtp:
            base = channel_config(tmp_path, book, smtp_port=smtp.port)
            config = base.model_copy(update={"email": base.email.model_copy(update={
                "security": "starttls", "ca_file": cert, "username": "dispatchd",
                "password_env": "SMTP_PASSWORD"})})
            async with serving(config, book, environ={"SMTP_PASSWORD": "s3cret"}) as (
                    _, client):
                r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=instruction(contract, id="tls-1"))
                assert r.status_code == 202
                assert await wait_for(lambda: len(smtp.messages()) == 1, 10)
            assert smtp.logins == ["dispatchd"]

    run(scenario())


@pytest.mark.fault
def test_emails_sent_while_smtp_is_down_all_arrive_after_it_returns(
        tmp_path: Path, live_book: ContractBook) -> None:
    """Stop the SMTP server mid-stream, keep dispatching, restart it: every email arrives."""
    contract = pick(live_book)
    book = channel_book(live_book, {contract.fsp: EMAIL})

    async def scenario() -> None:
        smtp = SmtpServer()
        smtp.start()
        try:
            async with serving(channel_config(tmp_path, book, smtp_port=smtp.port), book) as (
                    service, client):
                async def post(i: int) -> None:
                    r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                          json=instruction(contract, id=f"out-{i}"))
                    assert r.status_code == 202, r.text

                for i in range(3):
                    await post(i)
                assert await wait_for(lambda: len(smtp.messages()) == 3, 10)
                smtp.stop()
                for i in range(3, 10):
                    await post(i)
                await asyncio.sleep(1.0)
                assert service.email.depth > 0
                assert service.metrics.send_failures.labels("email")._value.get() > 0
                smtp.start()
                assert await wait_for(lambda: len(smtp.messages()) == 10, 20)
                ids = [m["X-Flexops-Instruction"] for m in smtp.messages()]
                assert ids == [f"out-{i}" for i in range(10)]  # in order, once each
                assert await wait_for(lambda: service.email.depth == 0, 5)
        finally:
            smtp.stop()

    run(scenario())


@pytest.mark.fault
def test_email_not_handed_over_before_a_restart_is_sent_after_it(
        tmp_path: Path, live_book: ContractBook) -> None:
    """The journal records what was handed to SMTP; a restart sends what was not."""
    contract = pick(live_book)
    book = channel_book(live_book, {contract.fsp: EMAIL})

    async def scenario() -> None:
        smtp = SmtpServer()
        config = channel_config(tmp_path, book, smtp_port=smtp.port)
        async with serving(config, book) as (_, client):
            r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id="pending-mail"))
            assert r.status_code == 202
        with smtp:
            async with serving(config, book) as (_, client):
                assert await wait_for(lambda: len(smtp.messages()) == 1, 10)
                await asyncio.sleep(0.2)  # the delivered record is journaled after hand-over
                state = (await client.get("/v1/instructions/pending-mail",
                                          headers=auth("so", contract.so))).json()
                assert "email" in state["revisions"][0]["delivered"]
            async with serving(config, book):
                await asyncio.sleep(0.5)
            assert len(smtp.messages()) == 1  # handed over once, not again

    run(scenario())


def webhook_market(book: ContractBook, fsp: str, receiver: WebhookReceiver
                   ) -> tuple[ContractBook, dict[str, str]]:
    """``book`` with ``fsp`` on webhooks to ``receiver``, and the environment with its secret."""
    webhook = Endpoints(channels=(Channel.WEBHOOK,), webhook_url=receiver.url,
                        webhook_secret_env="HOOK_SECRET")
    return channel_book(book, {fsp: webhook}), {"HOOK_SECRET": receiver.secret}


@pytest.mark.fault
def test_webhook_is_signed_retried_after_5xx_and_received_exactly_as_signed(
        tmp_path: Path, live_book: ContractBook) -> None:
    """The receiver verifies the signature, answers 500 three times, then 200."""
    contract = pick(live_book)

    async def scenario() -> None:
        receiver = WebhookReceiver(answers=[500, 503, 429])
        async with receiver.serving():
            book, env = webhook_market(live_book, contract.fsp, receiver)
            async with serving(channel_config(tmp_path, book), book, environ=env) as (
                    service, client):
                r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=instruction(contract, id="hook-1"))
                assert r.status_code == 202
                assert await wait_for(lambda: len(receiver.accepted) == 1, 10)
                body, headers, event = receiver.accepted[0]
                assert receiver.attempts == 4 and not receiver.refused
                # The receiver verified these exact bytes; they decode to the event it kept.
                assert json.loads(body) == event
                assert signature(secret_key(receiver.secret), headers["webhook-id"],
                                 int(headers["webhook-timestamp"]), body) in headers[
                    "webhook-signature"].split()
                assert headers["webhook-id"] == "hook-1.0"
                assert event["type"] == "instruction.created"
                assert event["data"]["id"] == "hook-1" and event["data"]["fsp"] == contract.fsp
                assert await wait_for(lambda: service.engine.view("hook-1").latest.delivered
                                      != (), 5)  # type: ignore[union-attr]
                assert service.metrics.send_failures.labels("webhook")._value.get() == 3

    run(scenario())


def test_webhook_4xx_is_final_and_raises_an_alarm(tmp_path: Path, live_book: ContractBook
                                                  ) -> None:
    """A 400 is not retried: a failure metric and a delivery_failed event on the SO stream."""
    contract = pick(live_book)

    async def scenario() -> None:
        receiver = WebhookReceiver(answers=[400])
        async with receiver.serving():
            book, env = webhook_market(live_book, contract.fsp, receiver)
            async with serving(channel_config(tmp_path, book), book, environ=env) as (
                    service, client), stream(service, "so", contract.so) as so_ws:
                await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id="hook-bad"))
                events = [await next_event(so_ws), await next_event(so_ws)]
                assert [e["event"] for e in events] == ["accepted", "delivery_failed"]
                assert events[1]["channel"] == "webhook" and "HTTP 400" in events[1]["reason"]
                assert service.metrics.final_failures.labels("webhook")._value.get() == 1
                await asyncio.sleep(0.5)
                assert receiver.attempts == 1
                view = (await client.get("/v1/instructions/hook-bad",
                                         headers=auth("so", contract.so))).json()
                assert "HTTP 400" in view["revisions"][0]["delivery_failed"]["webhook"]

    run(scenario())


def test_unworkable_channel_settings_stop_the_service_with_every_problem(
        tmp_path: Path, live_book: ContractBook) -> None:
    fsps = list(live_book.fsps)
    book = channel_book(live_book, {
        fsps[0]: Endpoints(channels=()),
        fsps[1]: Endpoints(channels=(Channel.WEBHOOK,), webhook_url="ftp://x",
                           webhook_secret_env="MISSING"),
        fsps[2]: Endpoints(channels=(Channel.EMAIL, Channel.MQTT)),
    })
    with pytest.raises(ConfigError) as raised:
        Service(channel_config(tmp_path, book), book, environ={})
    text = str(raised.value)
    assert f"FSP {fsps[0]}: no channel" in text
    assert f"FSP {fsps[1]}, channel webhook: webhook_url 'ftp://x'" in text
    assert "MISSING" in text
    assert f"FSP {fsps[2]}, channel email: email.enabled is false" in text
    assert f"FSP {fsps[2]}, channel mqtt: mqtt.enabled is false" in text
    assert "4 channel setting problem(s)" in text or "5 channel setting problem(s)" in text


# ---------------------------------------------------------------------------- deadlines


def test_no_answer_by_respond_by_expires_and_escalates_by_the_clock(
        tmp_path: Path, live_book: ContractBook) -> None:
    """Moving the injected clock past respond_by: expired, emails to both sides, SO event."""
    contract = pick(live_book)
    book = channel_book(live_book, {contract.fsp: EMAIL})
    clock = FakeClock()

    async def scenario() -> None:
        with SmtpServer() as smtp:
            config = channel_config(tmp_path, book, smtp_port=smtp.port)
            async with serving(config, book, clock=clock) as (service, client), \
                    stream(service, "so", contract.so) as so_ws:
                respond_by = clock.now + dt.timedelta(minutes=5)
                await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id="late",
                                                   start=(clock.now + dt.timedelta(minutes=10)
                                                          ).isoformat(),
                                                   respond_by=respond_by.isoformat()))
                assert await wait_for(lambda: len(smtp.messages()) == 1, 10)
                await asyncio.sleep(0.3)
                assert service.engine.view("late").state.value == "delivered"  # type: ignore
                clock.advance(dt.timedelta(minutes=5, seconds=1))
                service.rearm()
                seen = [(await next_event(so_ws))["event"] for _ in range(4)]
                assert seen == ["accepted", "delivered", "expired", "escalated"]
                assert await wait_for(lambda: len(smtp.messages()) == 2, 10)
                escalation = smtp.messages()[1]
                assert "NO ANSWER" in escalation["Subject"]
                recipients = set(smtp.inbox.envelopes[1][1])
                assert recipients == {*book.fsps[contract.fsp].escalation_emails,
                                      *book.system_operators[contract.so].escalation_emails}
                assert service.metrics.escalations._value.get() == 1

    run(scenario())


@pytest.mark.fault
def test_deadline_passing_while_down_expires_and_escalates_after_restart(
        tmp_path: Path, live_book: ContractBook) -> None:
    """respond_by passes while dispatchd is stopped: on start-up it expires and escalates."""
    contract = pick(live_book)
    book = channel_book(live_book, {contract.fsp: EMAIL})
    clock = FakeClock()

    async def scenario() -> None:
        with SmtpServer() as smtp:
            config = channel_config(tmp_path, book, smtp_port=smtp.port)
            async with serving(config, book, clock=clock) as (_, client):
                await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id="overnight",
                                                   respond_by=(clock.now + dt.timedelta(
                                                       minutes=2)).isoformat()))
                assert await wait_for(lambda: len(smtp.messages()) == 1, 10)
            clock.advance(dt.timedelta(minutes=3))
            async with serving(config, book, clock=clock) as (service, client):
                assert await wait_for(lambda: len(smtp.messages()) == 2, 10)
                assert "NO ANSWER" in smtp.messages()[1]["Subject"]
                assert await wait_for(
                    lambda: service.engine.view("overnight").latest.escalated, 5)  # type: ignore
                view = (await client.get("/v1/instructions/overnight",
                                         headers=auth("so", contract.so))).json()
                assert view["state"] == "expired" and view["revisions"][0]["escalated"]
            async with serving(config, book, clock=clock):
                await asyncio.sleep(0.5)
            assert len(smtp.messages()) == 2  # escalated once, not on every start

    run(scenario())
