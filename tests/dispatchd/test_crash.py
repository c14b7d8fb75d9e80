"""Crash safety: kill -9 of ``dispatchd serve`` mid-burst loses no accepted instruction."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from contracts.io import dump_contracts
from dispatchd.config import write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto
from dispatchd.simulate import wait_for
from tests.conftest import small_book
from tests.dispatchd.conftest import instruction

pytestmark = [pytest.mark.broker, pytest.mark.service]

ROUNDS = int(os.environ.get("FLEXOPS_FAULT_ROUNDS", "50"))
"""kill -9 rounds; FLEXOPS_FAULT_ROUNDS sets more (or fewer) for a longer (or shorter) run."""
PER_ROUND = 60


async def _monitor(port: int, seen: list[tuple[str, int]], ready: asyncio.Event) -> None:
    """Stands in for every FSP at once (no broker ACLs yet), recording (id, revision).

    Like a real control centre it keeps a persistent session and reconnects when the
    broker goes away. It never acknowledges, so dispatchd must keep every instruction."""
    while True:
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier="crash-monitor",
                                      clean_session=False) as client:
                await client.subscribe("flexops/v1/fsp/+/instructions", qos=1)
                ready.set()
                async for message in client.messages:
                    body = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    seen.append((body["id"], body["revision"]))
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


async def _burst(url: str, tokens: dict[str, str], contracts: list[Any], prefix: str,
                 accepted: set[str], stop_after: int, kill: Any) -> None:
    """Post until ``stop_after`` are accepted, then kill the service with posts in flight."""
    rng = random.Random(prefix)
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:

        async def post(i: int) -> None:
            contract = rng.choice(contracts)
            body = instruction(contract, id=f"{prefix}-{i}")
            try:
                response = await client.post(
                    "/v1/instructions", json=body,
                    headers={"Authorization": f"Bearer {tokens[contract.so]}"})
            except httpx.HTTPError:
                return  # no answer: the SO would retry with the same id; no promise made
            if response.status_code == 202:
                accepted.add(body["id"])
            if len(accepted) >= stop_after and kill is not None:
                kill()

        await asyncio.gather(*(post(i) for i in range(PER_ROUND * 2)))


def _market(directory: Path) -> tuple[dict[str, str], list[Any]]:
    """The small market's files in ``directory``; the SO tokens and the contracts usable
    at any hour."""
    book = small_book(today=None)
    dump_contracts(book, directory / "contracts.json")
    tokens = write_sample_config(book, directory)["so"]
    return tokens, [c for c in book.contracts.values() if c.service in ("dynamic", "restore")]


async def _watching(broker: LocalMosquitto, seen: list[tuple[str, int]]
                    ) -> asyncio.Task[None]:
    ready = asyncio.Event()
    monitor = asyncio.create_task(_monitor(broker.port, seen, ready))
    await asyncio.wait_for(ready.wait(), 5)
    return monitor


@pytest.mark.fault
def test_every_202_reaches_its_fsp_across_kill_9(tmp_path: Path) -> None:
    """Rounds of kill -9 at a random point of a burst, with the broker up or down on
    alternate rounds: every 202'd id is delivered after the restart, only as revision 0."""
    tokens, contracts = _market(tmp_path)
    accepted: set[str] = set()
    seen: list[tuple[str, int]] = []

    async def scenario(broker: LocalMosquitto) -> None:
        monitor = await _watching(broker, seen)
        service = DispatchdProcess(tmp_path / "config.toml", mqtt_url=broker.url)
        try:
            for round_ in range(ROUNDS):
                # On odd rounds the broker is down: what is accepted then can only reach the
                # FSP through the journal, after dispatchd is killed and restarted.
                if round_ % 2:
                    broker.kill()
                await asyncio.to_thread(service.start)
                before = len(accepted)
                kill_after = random.Random(round_).randint(1, PER_ROUND)
                await _burst(service.url, tokens, contracts, f"r{round_}", accepted,
                             before + kill_after, service.kill)
                service.kill()
                assert len(accepted) > before, "the burst got no 202 before the kill"
                if round_ % 2:
                    broker.start()
            await asyncio.to_thread(service.start)
            delivered = await wait_for(lambda: accepted <= {i for i, _ in seen}, 30)
            missing = accepted - {i for i, _ in seen}
            assert delivered, f"{len(missing)} accepted instructions never arrived: " \
                              f"{sorted(missing)[:10]}"
        finally:
            service.stop()
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    with LocalMosquitto() as broker:
        asyncio.run(scenario(broker))
    assert {revision for _, revision in seen} == {0}
    assert len(accepted) >= ROUNDS
    print(f"\nkill -9 rounds {ROUNDS}: accepted {len(accepted)}, delivered "
          f"{len(accepted & {i for i, _ in seen})}, lost 0, duplicate deliveries "
          f"{len(seen) - len({i for i, _ in seen})} (same id and revision)")


@pytest.mark.fault
@pytest.mark.parametrize("persistence", [True, False], ids=["persistent", "in-memory"])
def test_every_202_reaches_its_fsp_across_a_broker_kill_mid_burst(
        tmp_path: Path, persistence: bool) -> None:
    """kill -9 of the broker while instructions pour in, then a restart (with or without
    its persistence): dispatchd re-sends from its journal until each 202'd id arrives."""
    tokens, contracts = _market(tmp_path)
    accepted: set[str] = set()
    seen: list[tuple[str, int]] = []

    async def scenario(broker: LocalMosquitto) -> None:
        monitor = await _watching(broker, seen)
        service = DispatchdProcess(tmp_path / "config.toml", mqtt_url=broker.url)
        await asyncio.to_thread(service.start)
        try:
            for round_ in range(3):
                await _burst(service.url, tokens, contracts, f"b{round_}", accepted,
                             len(accepted) + 40, broker.kill)
                await asyncio.sleep(0.5)
                broker.start()
            delivered = await wait_for(lambda: accepted <= {i for i, _ in seen}, 60)
            missing = accepted - {i for i, _ in seen}
            assert delivered, f"{len(missing)} accepted instructions never arrived"
        finally:
            service.stop()
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    with LocalMosquitto(persistence=persistence) as broker:
        asyncio.run(scenario(broker))
    assert {revision for _, revision in seen} == {0}
    print(f"\nbroker kill -9 x3 (persistence {persistence}): accepted {len(accepted)}, "
          f"delivered {len(accepted & {i for i, _ in seen})}, lost 0")
