"""The SQLite journal: durability settings, group commit, replay, schema version."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from dispatchd.core.engine import EventRecorded, RevisionRecorded
from dispatchd.core.instruction import Instruction, Kind
from dispatchd.core.lifecycle import Event
from dispatchd.journal import Journal, JournalError, JournalSettings, connect
from tests.conftest import NOW


def revision(n: int, rev: int = 0) -> RevisionRecorded:
    inst = Instruction(
        id=f"I{n}", revision=rev, kind=Kind.INSTRUCT, so="SO1", fsp="FSP001",
        contract_id="C1", assets=("A1",), direction="turn_down", capacity_mw=1.5,
        start=NOW, end=NOW + dt.timedelta(hours=1), issued_at=NOW,
        respond_by=NOW + dt.timedelta(minutes=15),
    )
    return RevisionRecorded(inst, {"capacity_mw": 1.5}, NOW)


async def _with_journal(path: Path, body, **settings):  # type: ignore[no-untyped-def]
    journal = Journal(JournalSettings(path, **settings))
    writer = asyncio.create_task(journal.run())
    try:
        return await body(journal)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        journal.close()


def test_journal_is_wal_with_full_sync(tmp_path: Path) -> None:
    """The database runs in WAL mode with synchronous=FULL (2) by default."""
    conn = connect(tmp_path / "j.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    """500 appends at once commit in far fewer transactions, each getting its own seq."""

    async def body(journal: Journal) -> list[int]:
        seqs = await asyncio.gather(*(journal.append(revision(i)) for i in range(500)))
        assert journal.records == 500
        assert journal.batches < 50
        return list(seqs)

    seqs = asyncio.run(_with_journal(tmp_path / "j.sqlite3", body))
    assert sorted(seqs) == list(range(1, 501))


def test_replay_returns_every_record_in_order(tmp_path: Path) -> None:
    """What was appended comes back equal, in commit order, after reopening."""
    records = [revision(1), EventRecorded("I1", 0, Event.DELIVERED, NOW, channel="mqtt"),
               EventRecorded("I1", 0, Event.FSP_REJECTED, NOW, reason="site offline")]

    async def body(journal: Journal) -> None:
        for record in records:
            await journal.append(record)

    asyncio.run(_with_journal(tmp_path / "j.sqlite3", body))
    reopened = Journal(JournalSettings(tmp_path / "j.sqlite3"))
    assert [r for _, r in reopened.replay()] == records
    reopened.close()


def test_failed_transaction_refuses_all_its_records_and_keeps_none(tmp_path: Path) -> None:
    """A batch that cannot commit raises JournalError for each record; none is stored."""

    async def body(journal: Journal) -> list[object]:
        await journal.append(revision(1))
        # Queued together, they share one transaction; the duplicate makes it fail.
        futures = [journal.append_nowait(revision(2)), journal.append_nowait(revision(1))]
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(_with_journal(tmp_path / "j.sqlite3", body))
    assert all(isinstance(r, JournalError) for r in results)
    reopened = Journal(JournalSettings(tmp_path / "j.sqlite3"))
    assert [r.instruction.id for _, r in reopened.replay()] == ["I1"]  # type: ignore[union-attr]
    reopened.close()


def test_full_queue_is_refused_at_once(tmp_path: Path) -> None:
    """Beyond max_queue, append refuses instead of growing without bound."""

    async def body(journal: Journal) -> None:
        journal.append_nowait(revision(1))
        with pytest.raises(JournalError, match="queue is full"):
            journal.append_nowait(revision(2))

    async def run() -> None:
        journal = Journal(JournalSettings(tmp_path / "j.sqlite3", max_queue=1))
        try:
            await body(journal)
        finally:
            journal.close()

    asyncio.run(run())


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer schema is not guessed at."""
    path = tmp_path / "j.sqlite3"
    connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match="schema version 99"):
        connect(path)
