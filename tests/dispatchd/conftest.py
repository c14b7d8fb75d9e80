"""Fixtures that start real peers: a private Mosquitto and an in-process dispatchd."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.io import ContractBook
from dispatchd.config import (
    AuthConfig,
    Config,
    DeliveryConfig,
    JournalConfig,
    MqttConfig,
    Principal,
    ServiceConfig,
    token_digest,
)
from dispatchd.localstack import LocalMosquitto
from dispatchd.service import Service
from tests.conftest import small_book


@pytest.fixture
def broker() -> Iterator[LocalMosquitto]:
    """A Mosquitto of the test's own on a free loopback port."""
    with LocalMosquitto() as running:
        yield running


def token(role: str, principal: str) -> str:
    return f"token-{role}-{principal}"


def auth(role: str, principal: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, principal)}"}


def principals(book: ContractBook) -> tuple[Principal, ...]:
    """One principal per SO and FSP of ``book``, with the tokens :func:`token` gives."""
    return tuple(
        Principal(role=role, id=pid, token_sha256=token_digest(token(role, pid)))
        for role, ids in (("so", book.system_operators), ("fsp", book.fsps)) for pid in ids)


def make_config(tmp_path: Path, broker: LocalMosquitto, book: ContractBook) -> Config:
    return Config(
        service=ServiceConfig(listen="127.0.0.1:0"),
        journal=JournalConfig(path=tmp_path / "journal.sqlite3"),
        mqtt=MqttConfig(url=broker.url, client_id=f"dispatchd-{uuid.uuid4().hex[:8]}"),
        delivery=DeliveryConfig(retry_initial_s=0.3, retry_max_s=2.0),
        auth=AuthConfig(principals=principals(book)),
    )


@dataclass
class Stack:
    service: Service
    book: ContractBook
    client: httpx.AsyncClient
    broker: LocalMosquitto


@contextlib.asynccontextmanager
async def running(config: Config, book: ContractBook, broker: LocalMosquitto, *,
                  environ: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    """An in-process dispatchd, ready and connected to the broker, stopped on exit
    (``environ``: the environment it reads secrets from, default the process's)."""
    service = Service(config, book, environ=environ)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await asyncio.wait_for(service.mqtt.connected.wait(), 10)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            yield Stack(service, book, client, broker)
    finally:
        service.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)


@pytest.fixture
def live_book() -> ContractBook:
    """The small sample market centred on today (the service runs on the real clock)."""
    return small_book(today=None)


def instruction(contract: Any, **overrides: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "contract_id": contract.id,
        "capacity_mw": contract.contracted_mw,
        "start": (now + dt.timedelta(minutes=10)).isoformat(),
        "end": (now + dt.timedelta(minutes=70)).isoformat(),
    } | overrides
