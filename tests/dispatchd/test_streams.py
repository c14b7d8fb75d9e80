"""Websocket streams against real `websockets` clients on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from contracts.io import ContractBook
from dispatchd.simulate import wait_for
from tests.conftest import pick
from tests.dispatchd.channels_peers import (
    FakeClock,
    channel_book,
    channel_config,
    next_event,
    serving,
    stream,
    ws_url,
)
from tests.dispatchd.conftest import auth, instruction, token

pytestmark = pytest.mark.service


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def ws_book(live_book: ContractBook) -> ContractBook:
    return channel_book(live_book, {})


@pytest.mark.fault
def test_stream_resumes_after_a_disconnect_mid_burst_without_gap_or_foreign_event(
        tmp_path: Path, ws_book: ContractBook) -> None:
    """Events are numbered 1, 2, 3 … per FSP; ?since=N after a drop delivers the rest."""
    mine = pick(ws_book, so="SO1")
    other = pick(ws_book, exclude=(mine.id,), so="SO2")
    assert mine.fsp != other.fsp

    async def scenario() -> None:
        async with serving(channel_config(tmp_path, ws_book), ws_book) as (service, client):
            posted: list[str] = []

            async def burst() -> None:
                for i in range(40):
                    for contract, tag in ((mine, "m"), (other, "o")):
                        r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                              json=instruction(contract, id=f"{tag}{i}"))
                        assert r.status_code == 202, r.text
                    posted.append(f"m{i}")
                    await asyncio.sleep(0.005)

            sending = asyncio.create_task(burst())
            seen: list[dict[str, Any]] = []
            async with stream(service, "fsp", mine.fsp) as ws:
                while len(seen) < 10:
                    seen.append(await next_event(ws))
            assert not sending.done(), "the burst ended before the client dropped"
            await sending
            async with stream(service, "fsp", mine.fsp, since=seen[-1]["seq"]) as ws:
                while len(seen) < 40:
                    seen.append(await next_event(ws))
                with pytest.raises(TimeoutError):
                    await next_event(ws, timeout=0.3)
            assert [e["seq"] for e in seen] == list(range(1, 41))
            assert [e["id"] for e in seen] == posted
            assert all(e["event"] == "instruction" for e in seen)
            assert all(e["message"]["fsp"] == mine.fsp for e in seen)
            view = (await client.get("/v1/instructions/m0", headers=auth("so", mine.so))).json()
            assert "websocket" in view["revisions"][0]["delivered"]

    run(scenario())


def test_acks_on_the_stream_get_replies_and_foreign_ids_are_refused(
        tmp_path: Path, ws_book: ContractBook) -> None:
    """An FSP acks on its socket; a reply says what happened; another FSP's id is a 404."""
    mine = pick(ws_book, so="SO1")
    other = pick(ws_book, so="SO2")

    async def scenario() -> None:
        async with serving(channel_config(tmp_path, ws_book), ws_book) as (service, client):
            for contract, iid in ((mine, "a1"), (other, "b1")):
                await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id=iid))
            async with stream(service, "fsp", mine.fsp) as ws:
                assert (await next_event(ws))["id"] == "a1"
                await ws.send(json.dumps({"id": "a1", "revision": 0, "response": "accepted"}))
                events = [await next_event(ws), await next_event(ws)]
                reply = next(e for e in events if e.get("reply") == "ack")
                assert (reply["status"], reply["state"]) == (200, "acknowledged_accepted")
                echo = next(e for e in events if e.get("event"))
                assert (echo["event"], echo["id"], echo["seq"]) == ("acknowledged", "a1", 2)
                await ws.send(json.dumps({"id": "b1", "revision": 0, "response": "accepted"}))
                refused = await next_event(ws)
                assert refused["status"] == 404 and refused["reply"] == "ack"
                await ws.send("not json")
                assert (await next_event(ws))["status"] == 422
            b1 = (await client.get("/v1/instructions/b1", headers=auth("so", other.so))).json()
            assert b1["revisions"][0]["ack"] is None

    run(scenario())


def test_so_stream_shows_each_state_change_as_it_happens(
        tmp_path: Path, ws_book: ContractBook) -> None:
    """Accepted, delivered (on which channel), rejected with the reason — and only its own."""
    mine = pick(ws_book, so="SO1")
    other = pick(ws_book, so="SO2")

    async def scenario() -> None:
        async with serving(channel_config(tmp_path, ws_book), ws_book) as (service, client), \
                stream(service, "so", "SO1") as so_ws, stream(service, "fsp", mine.fsp) as fsp_ws:
            await client.post("/v1/instructions", headers=auth("so", other.so),
                              json=instruction(other, id="theirs"))
            await client.post("/v1/instructions", headers=auth("so", "SO1"),
                              json=instruction(mine, id="x"))
            assert (await next_event(fsp_ws))["id"] == "x"
            await client.post("/v1/instructions/x/ack", headers=auth("fsp", mine.fsp),
                              json={"revision": 0, "response": "rejected",
                                    "reason": "site maintenance"})
            events = [await next_event(so_ws) for _ in range(3)]
            assert [(e["event"], e["id"]) for e in events] == [
                ("accepted", "x"), ("delivered", "x"), ("rejected", "x")]
            assert events[1]["channel"] == "websocket"
            assert events[2]["reason"] == "site maintenance"
        # Resume: the same numbers again from the start.
        async with serving(channel_config(tmp_path, ws_book), ws_book) as (service, _), \
                stream(service, "so", "SO1", since=1) as again:
            assert [(await next_event(again))["seq"] for _ in range(2)] == [2, 3]

    run(scenario())


def test_stream_handshake_refuses_bad_tokens_roles_and_cursors(
        tmp_path: Path, ws_book: ContractBook) -> None:
    contract = pick(ws_book)

    async def status(path: str, headers: dict[str, str]) -> int:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(path, additional_headers=headers):
                pass
        return refused.value.response.status_code

    async def scenario() -> None:
        async with serving(channel_config(tmp_path, ws_book), ws_book) as (service, _):
            fsp_url = ws_url(service, "/v1/stream")
            assert await status(fsp_url, {}) == 401
            assert await status(fsp_url, {"Authorization": "Bearer nope"}) == 401
            assert await status(fsp_url, auth("so", contract.so)) == 403
            assert await status(ws_url(service, "/v1/so/stream"), auth("fsp", contract.fsp)) == 403
            assert await status(ws_url(service, "/v1/stream", since=5),
                                auth("fsp", contract.fsp)) == 409

    run(scenario())


@pytest.mark.fault
def test_a_client_that_stops_reading_is_dropped_without_delaying_others(
        tmp_path: Path, ws_book: ContractBook) -> None:
    """A stalled socket fills its bounded buffer and is dropped; the other client keeps up."""
    contract = pick(ws_book)

    async def stalled_client(port: int) -> socket.socket:
        """A raw websocket handshake on a socket that then never reads (tiny receive buffer)."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall((
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token('fsp', contract.fsp)}"
            "\r\n\r\n").encode())
        return sock

    async def scenario() -> None:
        config = channel_config(tmp_path, ws_book, send_timeout_s=0.5,
                                send_buffer_bytes=16384)
        async with serving(config, ws_book) as (service, client), \
                stream(service, "fsp", contract.fsp) as reader:
            stalled = await stalled_client(service.port or 0)
            try:
                await flood(service, client, reader)
            finally:
                stalled.close()

    async def flood(service: Any, client: Any, reader: Any) -> None:
        assert await wait_for(lambda: service.streams.connected("fsp") == 2, 5)
        note = "x" * 1900
        for i in range(150):
            r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                  json=instruction(contract, id=f"big{i}", note=note))
            assert r.status_code == 202
            got = await next_event(reader, timeout=2)
            assert got["id"] == f"big{i}"
        assert await wait_for(lambda: service.streams.connected("fsp") == 1, 5)
        assert service.metrics.stream_dropped.labels("fsp", "send_timeout")._value.get() == 1

    run(scenario())


def test_finished_instructions_leave_memory_and_still_answer(
        tmp_path: Path, ws_book: ContractBook) -> None:
    """After ``hold_finished_s`` a completed instruction is read back from the journal: its
    status, an idempotent repeat and a restart all behave as before; a stream resuming from
    events no longer held gets one gap frame, then what follows."""
    contract = pick(ws_book)
    clock = FakeClock()
    config = channel_config(tmp_path, ws_book)
    config = config.model_copy(update={"service": config.service.model_copy(
        update={"hold_finished_s": 60.0, "archive_sweep_s": 0.05})})
    body = instruction(contract, id="done",
                       start=(clock.now + dt.timedelta(minutes=10)).isoformat(),
                       end=(clock.now + dt.timedelta(minutes=70)).isoformat())

    async def scenario() -> None:
        async with serving(config, ws_book, clock=clock) as (service, client):
            so, fsp = auth("so", contract.so), auth("fsp", contract.fsp)
            assert (await client.post("/v1/instructions", headers=so, json=body)
                    ).status_code == 202
            r = await client.post("/v1/instructions/done/ack", headers=fsp,
                                  json={"revision": 0, "response": "accepted"})
            assert r.status_code == 200, r.text
            clock.advance(dt.timedelta(minutes=71))
            service.rearm()
            assert await wait_for(lambda: service.engine.view("done").state.value  # type: ignore
                                  == "completed", 5)
            before = (await client.get("/v1/instructions/done", headers=so)).json()
            held = service.engine.feed_length("fsp", contract.fsp)
            clock.advance(dt.timedelta(minutes=2))
            assert await wait_for(lambda: service.engine.archived == 1, 5)
            assert len(service.engine) == 0
            after = (await client.get("/v1/instructions/done", headers=so)).json()
            for view in (before, after):
                for revision in view["revisions"]:
                    revision.pop("send_attempts")
            assert after == before
            again = await client.post("/v1/instructions", headers=so, json=body)
            assert again.status_code == 200, again.text
            async with stream(service, "fsp", contract.fsp, since=0) as ws:
                gap = await next_event(ws)
                assert (gap["event"], gap["from"], gap["to"]) == ("gap", 1, held)
                fresh = instruction(contract, id="next",
                                    start=(clock.now + dt.timedelta(minutes=10)).isoformat(),
                                    end=(clock.now + dt.timedelta(minutes=70)).isoformat())
                assert (await client.post("/v1/instructions", headers=so, json=fresh)
                        ).status_code == 202
                event = await next_event(ws)
                assert (event["seq"], event["id"]) == (held + 1, "next")
        async with serving(config, ws_book, clock=clock) as (service, client):
            assert sorted(service.engine.ids()) == ["next"]
            restarted = (await client.get("/v1/instructions/done", headers=so)).json()
            assert restarted["state"] == "completed"

    run(scenario())
