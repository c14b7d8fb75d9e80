"""Faults of the machine: the journal's disk fills up; more requests than the journal can
take. New work is refused with 503 and a reason; nothing accepted is lost."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from contracts.io import ContractBook
from tests.conftest import pick
from tests.dispatchd.channels_peers import channel_book, channel_config, serving
from tests.dispatchd.conftest import auth, instruction

pytestmark = pytest.mark.service


@pytest.fixture
def small_disk(tmp_path: Path) -> object:
    """A 1 MiB tmpfs of the test's own (skipped, saying why, where mounting is refused)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip() or 'refused'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.fault
def test_a_full_disk_refuses_new_instructions_and_loses_none(
        tmp_path: Path, live_book: ContractBook, small_disk: Path) -> None:
    book = channel_book(live_book, {})
    contract = pick(book)
    base = channel_config(tmp_path, book)
    config = base.model_copy(update={"journal": base.journal.model_copy(
        update={"path": small_disk / "journal.sqlite3"})})
    accepted: list[str] = []

    async def fill() -> None:
        async with serving(config, book) as (_, client):
            filler = small_disk / "filler"
            statuses: Counter[int] = Counter()
            reason = ""
            for i in range(5000):
                r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=instruction(contract, id=f"full-{i}",
                                                       note="x" * 1500))
                statuses[r.status_code] += 1
                if r.status_code == 202:
                    accepted.append(f"full-{i}")
                elif r.status_code == 503:
                    reason = r.json()["problems"][0]["reason"]
                    assert r.headers["retry-after"] == "1"
                    if statuses[503] >= 3:
                        break
                if i == 20:  # leave the journal little room from here on
                    with filler.open("wb") as out, contextlib.suppress(OSError):
                        out.write(b"\0" * 2_000_000)  # as much as fits
            assert statuses[503] >= 3 and accepted, statuses
            assert "full" in reason, reason
            assert set(statuses) <= {202, 503}
            for iid in accepted:
                got = await client.get(f"/v1/instructions/{iid}",
                                       headers=auth("so", contract.so))
                assert got.status_code == 200, iid
            filler.unlink()
            again = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=instruction(contract, id="after-space"))
            assert again.status_code == 202
            accepted.append("after-space")

    async def restart() -> None:
        async with serving(config, book) as (service, _):
            assert set(accepted) <= set(service.engine.ids())

    asyncio.run(fill())
    asyncio.run(restart())
    print(f"\ndisk full: {len(accepted)} accepted, all kept after a restart")


@pytest.mark.fault
def test_beyond_the_journal_queue_requests_get_503_not_a_promise(
        tmp_path: Path, live_book: ContractBook) -> None:
    """With a tiny journal queue and a flood of requests, the ones that do not fit are
    refused with Retry-After; every 202 is journaled."""
    book = channel_book(live_book, {})
    contract = pick(book)
    base = channel_config(tmp_path, book)
    config = base.model_copy(update={"journal": base.journal.model_copy(
        update={"max_queue": 2})})

    async def scenario() -> None:
        async with serving(config, book) as (service, client):
            async def post(i: int) -> tuple[int, str, str | None]:
                r = await client.post("/v1/instructions", headers=auth("so", contract.so),
                                      json=instruction(contract, id=f"flood-{i}"))
                return r.status_code, f"flood-{i}", r.headers.get("retry-after")

            results = await asyncio.gather(*(post(i) for i in range(300)))
            codes = Counter(code for code, _, _ in results)
            assert set(codes) <= {202, 503} and codes[503] > 0 and codes[202] > 0, codes
            assert all(after == "1" for code, _, after in results if code == 503)
            journaled = set(service.engine.ids())
            assert {iid for code, iid, _ in results if code == 202} <= journaled
            assert not {iid for code, iid, _ in results if code == 503} & journaled
            print(f"\noverload: {codes[202]} accepted, {codes[503]} refused with 503")

    asyncio.run(scenario())
