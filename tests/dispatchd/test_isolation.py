"""Tenant isolation, every pair: each FSP and SO tries to read, acknowledge, amend and
cancel every instruction that is not its own, over HTTP and over the websocket streams;
every attempt is refused, and nothing it tried changed anything."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from contracts.io import ContractBook
from tests.dispatchd.channels_peers import channel_book, channel_config, serving, stream
from tests.dispatchd.conftest import auth, instruction

pytestmark = pytest.mark.service


def essentials(view: dict[str, object]) -> tuple[object, ...]:
    revisions = view["revisions"]
    assert isinstance(revisions, list)
    return (view["instruction"], len(revisions), [r["ack"] for r in revisions])


def test_no_principal_reaches_another_ones_instructions(tmp_path: Path,
                                                        live_book: ContractBook) -> None:
    book = channel_book(live_book, {})
    owned = {}  # instruction id → contract, one per FSP (on dynamic contracts)
    for contract in book.contracts.values():
        if contract.service == "dynamic" and contract.fsp not in {c.fsp for c in owned.values()}:
            owned[f"own-{contract.fsp}"] = contract

    async def scenario() -> dict[str, int]:
        attempts = {"http": 0, "websocket": 0}
        async with serving(channel_config(tmp_path, book), book) as (service, client):
            for iid, contract in owned.items():
                r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=instruction(contract, id=iid))
                assert r.status_code == 202
            before = {iid: (await client.get(f"/v1/instructions/{iid}",
                                              headers=auth("so", c.so))).json()
                      for iid, c in owned.items()}
            for iid, contract in owned.items():
                for fsp in book.fsps:
                    if fsp == contract.fsp:
                        continue
                    who = auth("fsp", fsp)
                    got = await client.get(f"/v1/instructions/{iid}", headers=who)
                    ack = await client.post(f"/v1/instructions/{iid}/ack", headers=who,
                                            json={"revision": 0, "response": "accepted"})
                    assert (got.status_code, ack.status_code) == (404, 404)
                    attempts["http"] += 2
                for so in book.system_operators:
                    if so == contract.so:
                        continue
                    who = auth("so", so)
                    got = await client.get(f"/v1/instructions/{iid}", headers=who)
                    amend = await client.post(f"/v1/instructions/{iid}/amend", headers=who,
                                              json={"capacity_mw": 0.1})
                    cancel = await client.post(f"/v1/instructions/{iid}/cancel", headers=who,
                                               json={"reason": "not mine"})
                    assert (got.status_code, amend.status_code, cancel.status_code) == (
                        404, 404, 404)
                    attempts["http"] += 3
            for fsp in book.fsps:
                mine = {iid for iid, c in owned.items() if c.fsp == fsp}
                pages = (await client.get("/v1/instructions", headers=auth("fsp", fsp))).json()
                assert {v["id"] for v in pages["instructions"]} == mine
                async with stream(service, "fsp", fsp) as ws:
                    for iid in set(owned) - mine:
                        await ws.send(json.dumps({"id": iid, "revision": 0,
                                                  "response": "accepted"}))
                        reply: dict[str, object] = {}
                        while reply.get("reply") != "ack":
                            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
                            if "seq" in reply:
                                assert reply["id"] in mine
                        assert reply["status"] == 404
                        attempts["websocket"] += 1
            for so in book.system_operators:
                async with stream(service, "so", so) as ws:
                    for _ in range(sum(1 for c in owned.values() if c.so == so)):
                        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        assert owned[event["id"]].so == so
            after = {iid: (await client.get(f"/v1/instructions/{iid}",
                                             headers=auth("so", c.so))).json()
                     for iid, c in owned.items()}
            # The owners' own streams delivered their instructions meanwhile; nothing else
            # moved: no revision, no answer, the same instruction.
            assert {iid: essentials(v) for iid, v in after.items()} == {
                iid: essentials(v) for iid, v in before.items()}
        return attempts

    attempts = asyncio.run(scenario())
    assert attempts["http"] > 0 and attempts["websocket"] > 0
    print(f"\ncross-tenant attempts refused: {attempts['http']} over HTTP, "
          f"{attempts['websocket']} acks over websockets; nothing changed")
