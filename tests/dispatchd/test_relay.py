"""Relay intake end to end: a platform's dispatches in, real Mosquitto out, the mapping
table, the exceptions list, reconciliation and what settlement makes of it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from contracts.io import ContractBook
from dispatchd import cli
from dispatchd.config import (
    Config,
    EmailConfig,
    Principal,
    RelayConfig,
    RelayPlatform,
    token_digest,
)
from dispatchd.export import dispatch_log
from dispatchd.localstack import LocalMosquitto
from dispatchd.simulate import FspBehaviour, FspSimulator, wait_for
from settlement.compute import classify
from tests.conftest import pick
from tests.dispatchd.channels_peers import SmtpServer, next_event, ws_url
from tests.dispatchd.conftest import Stack, auth, make_config, running, token

pytestmark = [pytest.mark.broker, pytest.mark.service]

PLATFORM = "dsoflex"
OPS = ("control-room-ops@example.net",)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def relay_config(
    tmp_path: Path,
    broker: LocalMosquitto,
    book: ContractBook,
    so: str,
    smtp_port: int | None = None,
) -> Config:
    config = make_config(tmp_path, broker, book)
    platform = Principal(
        role="platform", id=PLATFORM, token_sha256=token_digest(token("platform", PLATFORM))
    )
    update: dict[str, Any] = {
        "relay": RelayConfig(operations_emails=OPS, platforms={PLATFORM: RelayPlatform(so=so)}),
        "auth": config.auth.model_copy(update={"principals": (*config.auth.principals, platform)}),
    }
    if smtp_port is not None:
        update["email"] = EmailConfig(
            enabled=True, port=smtp_port, retry_initial_s=0.1, retry_max_s=0.5, timeout_s=2
        )
    return config.model_copy(update=update)


def dispatch(external_id: str, **fields: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "external_id": external_id,
        "fsp": "AGR-7",
        "contract": "FLEX-2026-19",
        "direction": "turn_down",
        "capacity_mw": 0.5,
        "start": (now + dt.timedelta(minutes=10)).isoformat(),
        "end": (now + dt.timedelta(minutes=70)).isoformat(),
    } | fields


async def post_relay(stack: Stack, body: Any) -> Any:
    return await stack.client.post(
        f"/v1/relay/{PLATFORM}/dispatches",
        headers=auth("platform", PLATFORM),
        content=json.dumps(body),
    )


@contextlib.asynccontextmanager
async def fsp_listening(stack: Stack, fsp: str) -> AsyncIterator[FspSimulator]:
    sim = FspSimulator(
        fsp=fsp, host="127.0.0.1", port=stack.broker.port, behaviour=FspBehaviour(ack_delay_s=0)
    )
    ready = asyncio.Event()
    task = asyncio.create_task(sim.run(ready))
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield sim
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def dispatchd_cli(*argv: str, url: str, so: str) -> int:
    """The CLI, run as an operator would (it blocks, so off the service's loop)."""
    return await asyncio.to_thread(cli.main, [*argv, "--url", url, "--token", token("so", so)])


def settled(journal: Path, book: ContractBook, when: dt.datetime) -> dict[str, Any]:
    month = f"{when.astimezone(dt.UTC):%Y-%m}"
    classified, problems = classify(
        dispatch_log(journal, book, month), book, month, "Europe/London"
    )
    return {"rows": {r["id"]: r for r in classified.iter_rows(named=True)}, "problems": problems}


def test_relay_first_delivers_before_the_contract_is_mapped_then_reconciles(
    tmp_path: Path,
    broker: LocalMosquitto,
    live_book: ContractBook,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The FSP is mapped, the contract not: delivered at once (first send, no waiting),
    listed as unreconciled, blocked in settlement; after `dispatchd relay map` and
    `dispatchd reconcile` settlement takes it."""
    contract = pick(live_book)
    config = relay_config(tmp_path, broker, live_book, contract.so)

    async def scenario() -> None:
        async with (
            running(config, live_book, broker) as stack,
            fsp_listening(stack, contract.fsp) as sim,
        ):
            url = stack.service.base_url
            assert (
                await dispatchd_cli(
                    "relay", "map", PLATFORM, "fsp", "AGR-7", contract.fsp, url=url, so=contract.so
                )
                == 0
            )
            r = await post_relay(stack, dispatch("ORD-1"))
            assert r.status_code == 202, r.text
            [outcome] = r.json()["dispatches"]
            assert outcome["status"] == "relayed" and outcome["id"] == f"{PLATFORM}:ORD-1"
            assert outcome["fsp"] == contract.fsp
            assert outcome["unreconciled"] == [
                f"contract: {PLATFORM} contract 'FLEX-2026-19' is not mapped"
            ]
            assert await wait_for(lambda: any(m.id == outcome["id"] for m in sim.received), 5)
            got = next(m for m in sim.received if m.id == outcome["id"])
            assert got.attempt == 0, "delivered by the first send, not after a mapping"
            print(
                f"relayed, unmapped contract: accepted -> FSP received in "
                f"{got.latency_s * 1000:.1f} ms"
            )
            # the FSP acknowledges (the simulator does); it is listed as unreconciled
            exceptions = (
                await stack.client.get("/v1/relay/exceptions", headers=auth("so", contract.so))
            ).json()
            assert exceptions["held"] == []
            assert [i["id"] for i in exceptions["unreconciled"]] == [outcome["id"]]
            assert stack.service.engine.unreconciled() == 1
            before = settled(config.journal.path, live_book, dt.datetime.now(dt.UTC))
            row = before["rows"][outcome["id"]]
            assert (row["status"], row["reconciliation"]) == ("blocked", "unmapped")
            assert [p.kind for p in before["problems"]] == ["unreconciled"]
            # the mapping and the reconciliation, by CLI
            assert (
                await dispatchd_cli(
                    "relay",
                    "map",
                    PLATFORM,
                    "contract",
                    "FLEX-2026-19",
                    contract.id,
                    url=url,
                    so=contract.so,
                )
                == 0
            )
            assert (
                await dispatchd_cli(
                    "reconcile", outcome["id"], "--contract", contract.id, url=url, so=contract.so
                )
                == 0
            )
            assert await _acknowledged(stack, outcome["id"], contract.so)
            after = settled(config.journal.path, live_book, dt.datetime.now(dt.UTC))
            row = after["rows"][outcome["id"]]
            assert (row["status"], row["reconciliation"]) == ("settle", "mapped")
            assert row["contract_id"] == contract.id and row["assets"] == list(contract.assets)
            assert after["problems"] == []
            view = (
                await stack.client.get(
                    f"/v1/instructions/{outcome['id']}", headers=auth("so", contract.so)
                )
            ).json()
            assert view["instruction"]["unreconciled"] == []
            assert stack.service.engine.unreconciled() == 0
            # with the contract mapped, the next dispatch is reconciled from the start
            r = await post_relay(stack, dispatch("ORD-2"))
            assert r.json()["dispatches"][0]["unreconciled"] == []

    run(scenario())
    out = capsys.readouterr().out
    assert f"contract  FLEX-2026-19 -> {contract.id}" in out
    assert f"reconciled: {PLATFORM}:ORD-1 contract {contract.id}" in out


async def _acknowledged(stack: Stack, instruction_id: str, so: str) -> bool:
    async def check() -> bool:
        r = await stack.client.get(f"/v1/instructions/{instruction_id}", headers=auth("so", so))
        return bool(r.json()["state"] == "acknowledged_accepted")

    for _ in range(100):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


def test_unidentified_fsp_is_held_alarmed_kept_across_restart_and_released_by_mapping(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """No FSP mapping: nothing is delivered, the dispatch is held with its reason, the SO's
    stream and operations' mailbox are told, it survives a restart, and adding the mapping
    relays it at once."""
    contract = pick(live_book)

    async def scenario() -> None:
        with SmtpServer() as smtp:
            config = relay_config(tmp_path, broker, live_book, contract.so, smtp.port)
            async with (
                running(config, live_book, broker) as stack,
                fsp_listening(stack, contract.fsp) as sim,
                connect(
                    ws_url(stack.service, "/v1/so/stream"),
                    additional_headers={"Authorization": f"Bearer {token('so', contract.so)}"},
                ) as so_ws,
            ):
                await next_event(so_ws)  # hello
                body = dispatch("ORD-9", fsp="AGR-UNKNOWN")
                r = await post_relay(stack, body)
                assert r.status_code == 202, r.text
                [outcome] = r.json()["dispatches"]
                assert outcome["status"] == "held"
                assert "'AGR-UNKNOWN', which is not mapped" in outcome["reason"]
                event = await next_event(so_ws)
                assert (event["event"], event["id"]) == ("relay_held", f"{PLATFORM}:ORD-9")
                assert "AGR-UNKNOWN" in event["reason"]
                assert await wait_for(lambda: len(smtp.messages()) == 1, 10)
                alarm = smtp.messages()[0]
                assert "HELD" in alarm["Subject"] and "ORD-9" in alarm["Subject"]
                assert set(smtp.inbox.envelopes[0][1]) == set(OPS)
                metrics = (await stack.client.get("/metrics")).text
                assert f'flexops_relay_held_total{{platform="{PLATFORM}"}} 1.0' in metrics
                assert "flexops_relay_held_now 1.0" in metrics
                # the same message again: still one held, no second alarm
                again = await post_relay(stack, body)
                assert again.json()["dispatches"][0]["status"] == "held"
                changed = await post_relay(stack, body | {"capacity_mw": 0.1})
                assert changed.status_code == 422
                assert "held with other content" in changed.json()["problems"][0]["reason"]
                await asyncio.sleep(0.3)
                assert sim.received == []
            async with (
                running(config, live_book, broker) as stack,
                fsp_listening(stack, contract.fsp) as sim,
            ):
                exceptions = (
                    await stack.client.get("/v1/relay/exceptions", headers=auth("so", contract.so))
                ).json()
                assert [h["external_id"] for h in exceptions["held"]] == ["ORD-9"]
                r = await stack.client.put(
                    f"/v1/relay/{PLATFORM}/mappings/fsp/AGR-UNKNOWN",
                    headers=auth("so", contract.so),
                    json={"ours": contract.fsp},
                )
                assert r.status_code == 200, r.text
                assert [x["external_id"] for x in r.json()["released"]] == ["ORD-9"]
                assert await wait_for(
                    lambda: any(m.id == f"{PLATFORM}:ORD-9" for m in sim.received), 5
                )
                exceptions = (
                    await stack.client.get("/v1/relay/exceptions", headers=auth("so", contract.so))
                ).json()
                assert exceptions["held"] == []
                assert len(smtp.messages()) == 1

    run(scenario())


def test_a_held_dispatch_cancelled_by_its_platform_is_withdrawn_not_lost(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    contract = pick(live_book)
    config = relay_config(tmp_path, broker, live_book, contract.so)

    async def scenario() -> None:
        async with running(config, live_book, broker) as stack:
            await post_relay(stack, dispatch("ORD-5", fsp="AGR-UNKNOWN"))
            r = await post_relay(
                stack, {"kind": "cancel", "external_id": "ORD-5", "reason": "constraint cleared"}
            )
            [outcome] = r.json()["dispatches"]
            assert outcome["status"] == "withdrawn"
            assert "constraint cleared" in outcome["reason"]
            held = (
                await stack.client.get("/v1/relay/exceptions", headers=auth("so", contract.so))
            ).json()["held"]
            assert held == []
            r = await stack.client.put(
                f"/v1/relay/{PLATFORM}/mappings/fsp/AGR-UNKNOWN",
                headers=auth("so", contract.so),
                json={"ours": contract.fsp},
            )
            assert r.json()["released"] == []

    run(scenario())


def test_relayed_cancel_repeat_conflict_and_unreadable_messages(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    """A repeat is answered as a repeat; the same id with other content, a cancel of an
    unknown dispatch and a body that is not the platform's shape are refused with reasons."""
    contract = pick(live_book)
    config = relay_config(tmp_path, broker, live_book, contract.so)

    async def scenario() -> None:
        async with running(config, live_book, broker) as stack:
            await stack.client.put(
                f"/v1/relay/{PLATFORM}/mappings/contract/FLEX-2026-19",
                headers=auth("so", contract.so),
                json={"ours": contract.id},
            )
            first = dispatch("ORD-3", fsp=None)
            r = await post_relay(stack, first)
            assert r.json()["dispatches"][0]["status"] == "relayed"
            assert r.json()["dispatches"][0]["fsp"] == contract.fsp  # from the contract
            assert (await post_relay(stack, first)).json()["dispatches"][0]["status"] == "repeat"
            changed = await post_relay(stack, first | {"capacity_mw": 0.25})
            assert changed.status_code == 422
            assert "capacity_mw" in changed.json()["problems"][0]["reason"]
            r = await post_relay(
                stack,
                [
                    {"kind": "cancel", "external_id": "ORD-3", "reason": "not needed"},
                    {"kind": "cancel", "external_id": "NEVER-SEEN"},
                ],
            )
            assert [o["status"] for o in r.json()["dispatches"]] == ["relayed", "refused"]
            view = (
                await stack.client.get(
                    f"/v1/instructions/{PLATFORM}:ORD-3", headers=auth("so", contract.so)
                )
            ).json()
            assert view["state"] == "cancelled"
            bad = await stack.client.post(
                f"/v1/relay/{PLATFORM}/dispatches",
                headers=auth("platform", PLATFORM),
                content=b"<xml/>",
            )
            assert bad.status_code == 422 and "not JSON" in bad.json()["problems"][0]["reason"]
            missing = await post_relay(stack, {"fsp": "AGR-7"})
            assert missing.status_code == 422
            assert "external_id" in missing.json()["problems"][0]["reason"]

    run(scenario())


def test_relay_and_mappings_are_each_principals_own(
    tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook
) -> None:
    contract = pick(live_book)
    other_so = next(s for s in live_book.system_operators if s != contract.so)
    config = relay_config(tmp_path, broker, live_book, contract.so)

    async def scenario() -> None:
        async with running(config, live_book, broker) as stack:
            c = stack.client
            assert (
                await c.post(
                    f"/v1/relay/{PLATFORM}/dispatches",
                    headers=auth("fsp", contract.fsp),
                    content=b"{}",
                )
            ).status_code == 403
            assert (
                await c.post(
                    f"/v1/relay/{PLATFORM}/dispatches",
                    headers=auth("so", contract.so),
                    content=b"{}",
                )
            ).status_code == 403
            assert (
                await c.post(
                    "/v1/relay/elsewhere/dispatches",
                    headers=auth("platform", PLATFORM),
                    content=b"{}",
                )
            ).status_code == 404
            assert (
                await c.get(f"/v1/relay/{PLATFORM}/mappings", headers=auth("so", other_so))
            ).status_code == 404
            assert (
                await c.put(
                    f"/v1/relay/{PLATFORM}/mappings/fsp/X",
                    headers=auth("so", other_so),
                    json={"ours": contract.fsp},
                )
            ).status_code == 404
            await c.put(
                f"/v1/relay/{PLATFORM}/mappings/fsp/AGR-7",
                headers=auth("so", contract.so),
                json={"ours": contract.fsp},
            )
            await post_relay(stack, dispatch("ORD-4"))
            iid = f"{PLATFORM}:ORD-4"
            assert (
                await c.get(f"/v1/instructions/{iid}", headers=auth("platform", PLATFORM))
            ).status_code == 404
            assert (
                await c.get(f"/v1/instructions/{iid}", headers=auth("so", other_so))
            ).status_code == 404
            assert (
                await c.post(
                    f"/v1/instructions/{iid}/reconcile",
                    headers=auth("so", other_so),
                    json={"contract_id": contract.id},
                )
            ).status_code == 404
            other_contract = next(
                k
                for k in live_book.contracts.values()
                if k.so == contract.so and k.fsp != contract.fsp
            )
            wrong = await c.post(
                f"/v1/instructions/{iid}/reconcile",
                headers=auth("so", contract.so),
                json={"contract_id": other_contract.id},
            )
            assert (
                wrong.status_code == 422 and contract.fsp in wrong.json()["problems"][0]["reason"]
            )
            unknown = await c.put(
                f"/v1/relay/{PLATFORM}/mappings/fsp/AGR-8",
                headers=auth("so", contract.so),
                json={"ours": "NOBODY"},
            )
            assert unknown.status_code == 422

    run(scenario())
