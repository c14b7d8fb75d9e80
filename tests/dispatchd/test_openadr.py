"""OpenADR 3.1 round trip against an independent VEN: the openadr3-client library from
PyPI, in its own Python (it needs 3.12 or later), talking to dispatchd's VTN over HTTP and
to the test's Mosquitto. Each rule names the OpenADR 3.1 part it comes from."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from contracts.io import ContractBook
from dispatchd.config import Config, OpenadrClient, OpenadrConfig, token_digest
from dispatchd.localstack import LocalMosquitto
from tests.conftest import pick
from tests.dispatchd.conftest import Stack, auth, instruction, make_config, running

pytestmark = [pytest.mark.broker, pytest.mark.service]

ROOT = Path(__file__).resolve().parents[2]
VEN_PYTHON = ROOT / ".venv-ven" / "bin" / "python"
PEER = Path(__file__).with_name("ven_peer.py")

if not VEN_PYTHON.exists():  # pragma: no cover - depends on the machine
    pytest.skip("no .venv-ven: ./dev setup makes it where a Python >= 3.12 is installed "
                "(openadr3-client needs one)", allow_module_level=True)


class Ven:
    """The VEN process: its JSON lines, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.seen: list[dict[str, Any]] = []

    async def next(self, timeout: float = 15) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise AssertionError("the VEN exited")
        found = dict(json.loads(line))
        self.seen.append(found)
        return found

    async def until(self, step: str, **match: Any) -> dict[str, Any]:
        while True:
            found = await self.next()
            if found["step"] == step and all(found.get(k) == v for k, v in match.items()):
                return found

    async def notified(self, operation: str, event: str) -> dict[str, dict[str, Any]]:
        """The same notification by webhook and by MQTT."""
        got: dict[str, dict[str, Any]] = {}
        while len(got) < 2:
            found = await self.until("notified", operation=operation, event=event)
            got[found["via"]] = found
        return got


async def start_ven(stack: Stack, *args: str) -> Ven:
    process = await asyncio.create_subprocess_exec(
        str(VEN_PYTHON), str(PEER), "--vtn", f"{stack.service.base_url}/openadr3", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=sys.stderr,
        env={**os.environ, "OAUTHLIB_INSECURE_TRANSPORT": "1"})  # plain HTTP on loopback
    return Ven(process)


def openadr_config(tmp_path: Path, broker: LocalMosquitto, book: ContractBook,
                   clients: dict[str, tuple[str, str]]) -> Config:
    config = make_config(tmp_path, broker, book)
    return config.model_copy(update={"openadr": OpenadrConfig(clients={
        cid: OpenadrClient(fsp=fsp, secret_sha256=token_digest(secret))
        for cid, (fsp, secret) in clients.items()})})


async def state(stack: Stack, so: str, iid: str) -> dict[str, Any]:
    return dict((await stack.client.get(f"/v1/instructions/{iid}", headers=auth("so", so))
                 ).json())


async def until_acknowledged(stack: Stack, so: str, iid: str, revision: int) -> bool:
    for _ in range(200):
        view = await state(stack, so, iid)
        if len(view["revisions"]) > revision and view["revisions"][revision]["ack"]:
            return True
        await asyncio.sleep(0.05)
    return False


def test_ven_registers_subscribes_receives_modification_and_deletion_and_reports(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """OpenADR 3.1: VEN and resource registration, program discovery, subscriptions with
    webhook callbacks, MQTT notifier discovery and notifications, event modification (PUT)
    and deletion (DELETE) notifications, reports back; another VEN sees none of it."""
    contract = pick(live_book)
    other = next(f for f in live_book.fsps if f != contract.fsp)
    config = openadr_config(tmp_path, broker, live_book, {
        "ven-a": (contract.fsp, "secret-a"), "ven-b": (other, "secret-b")})

    async def scenario() -> None:
        async with running(config, live_book, broker) as stack:
            ven = await start_ven(stack, "--mode", "ven", "--client-id", "ven-a",
                                  "--secret", "secret-a", "--ven-name", "site-a")
            registered = await ven.until("registered")
            programs = await ven.until("programs")
            assert contract.id in programs["ids"]
            assert all(live_book.contracts[p].fsp == contract.fsp for p in programs["ids"])
            await ven.until("ready")
            so = auth("so", contract.so)
            r = await stack.client.post("/v1/instructions", headers=so,
                                        json=instruction(contract, id="oadr-1"))
            assert r.status_code == 202, r.text
            created = await ven.notified("POST", "oadr-1")
            kw = -contract.contracted_mw * 1000 if contract.direction.value == "turn_down" \
                else contract.contracted_mw * 1000
            assert created["webhook"]["values"] == [kw] == created["mqtt"]["values"]
            await ven.until("report", event="oadr-1")
            assert await until_acknowledged(stack, contract.so, "oadr-1", 0)

            r = await stack.client.post("/v1/instructions/oadr-1/amend", headers=so,
                                        json={"capacity_mw": contract.contracted_mw / 2})
            assert r.status_code == 202, r.text
            modified = await ven.notified("PUT", "oadr-1")
            assert modified["webhook"]["values"] == [kw / 2]
            assert modified["webhook"]["modified"] > created["webhook"]["modified"]
            await ven.until("report", event="oadr-1")
            assert await until_acknowledged(stack, contract.so, "oadr-1", 1)

            spy = await start_ven(stack, "--mode", "spy", "--client-id", "ven-b",
                                  "--secret", "secret-b", "--event", "oadr-1",
                                  "--ven", registered["ven"])
            seen = await spy.until("spy")
            await spy.process.wait()
            assert "oadr-1" not in seen["events"] and contract.id not in seen["programs"]
            assert (seen["get"], seen["report"], seen["topics"]) == (404, 404, 404)

            r = await stack.client.post("/v1/instructions/oadr-1/cancel", headers=so,
                                        json={"reason": "constraint cleared"})
            assert r.status_code == 202, r.text
            await ven.notified("DELETE", "oadr-1")
            await ven.until("report", event="oadr-1")
            assert await until_acknowledged(stack, contract.so, "oadr-1", 2)
            assert ven.process.stdin is not None
            ven.process.stdin.close()
            listed = await ven.until("events")
            assert "oadr-1" not in listed["ids"]
            await ven.process.wait()
            view = await state(stack, contract.so, "oadr-1")
            assert "openadr" in view["revisions"][0]["delivered"]
            assert view["state"] == "cancelled"

    asyncio.run(scenario())


def test_token_endpoint_refuses_wrong_secrets_and_the_vtn_wants_a_token(
        tmp_path: Path, broker: LocalMosquitto, live_book: ContractBook) -> None:
    """OpenADR 3.1 authentication: OAuth2 client credentials; a wrong secret gets
    ``invalid_client``, a request without a token 401, discovery is open."""
    contract = pick(live_book)
    config = openadr_config(tmp_path, broker, live_book, {"ven-a": (contract.fsp, "s")})

    async def scenario() -> None:
        async with running(config, live_book, broker) as stack:
            c = stack.client
            server = (await c.get("/openadr3/auth/server")).json()
            assert server["tokenURL"].endswith("/openadr3/auth/token")
            bad = await c.post("/openadr3/auth/token", data={
                "grant_type": "client_credentials", "client_id": "ven-a",
                "client_secret": "wrong"})
            assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
            grant = await c.post("/openadr3/auth/token", data={"grant_type": "password"})
            assert grant.json()["error"] == "unsupported_grant_type"
            assert (await c.get("/openadr3/events")).status_code == 401
            good = await c.post("/openadr3/auth/token", auth=("ven-a", "s"),
                                data={"grant_type": "client_credentials"})
            token = good.json()["access_token"]
            events = await c.get("/openadr3/events",
                                 headers={"Authorization": f"Bearer {token}"})
            assert events.status_code == 200 and events.json() == []

    asyncio.run(scenario())
