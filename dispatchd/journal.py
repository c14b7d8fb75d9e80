"""The journal: the durable truth of every instruction (SQLite, WAL, ``synchronous=FULL``).

One writer task owns the database. Callers :meth:`Journal.append` a record and wait;
the writer takes every record queued at that moment and commits them in one transaction
(group commit), so one fsync serves many instructions. A record's future resolves only
after its transaction is durably committed, with the record's sequence number.

The schema is versioned in the ``meta`` table; opening a journal written by a newer
schema is refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dispatchd.core.engine import (
    EventRecorded,
    Record,
    RelayKind,
    RelayRecorded,
    RevisionRecorded,
)
from dispatchd.core.instruction import Instruction
from dispatchd.core.lifecycle import Event

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL CHECK (kind IN ('revision', 'event')),
    id       TEXT NOT NULL,
    revision INTEGER NOT NULL,
    so       TEXT,
    fsp      TEXT,
    event    TEXT,
    at       TEXT NOT NULL,
    body     TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_revision ON records(id, revision)
    WHERE kind = 'revision';
CREATE INDEX IF NOT EXISTS records_id ON records(id);
"""


class JournalError(Exception):
    """The journal could not commit (disk full, I/O error, closed); nothing was accepted."""


@dataclass(frozen=True)
class JournalSettings:
    path: Path
    synchronous: str = "FULL"
    """SQLite ``synchronous`` pragma: FULL (default, fsync per commit) or NORMAL/OFF."""
    max_batch: int = 1024
    """Most records committed in one transaction."""
    max_queue: int = 20_000
    """Most records waiting for the writer; beyond it :meth:`Journal.append` is refused."""


_RELAY_PREFIX = "relay."


def _encode(record: Record) -> tuple[str, str, int, str | None, str | None, str | None, str, str]:
    if isinstance(record, RelayRecorded):
        return ("event", record.key, 0, record.detail.get("so"), None,
                _RELAY_PREFIX + record.kind.value, record.at.isoformat(),
                json.dumps(record.detail, separators=(",", ":")))
    if isinstance(record, RevisionRecorded):
        inst = record.instruction
        body = json.dumps({"instruction": inst.as_json,
                           "content": record.content}, separators=(",", ":"))
        return ("revision", inst.id, inst.revision, inst.so, inst.fsp, None,
                record.at.isoformat(), body)
    fields: dict[str, object] = {"channel": record.channel, "reason": record.reason}
    if record.detail is not None:
        fields["detail"] = record.detail
    body = json.dumps(fields, separators=(",", ":"))
    return ("event", record.id, record.revision, None, None, record.event.value,
            record.at.isoformat(), body)


def _decode(kind: str, id_: str, revision: int, event: str | None, at: str, body: str) -> Record:
    data = json.loads(body)
    when = dt.datetime.fromisoformat(at)
    if kind == "revision":
        return RevisionRecorded(Instruction.model_validate(data["instruction"]),
                                data["content"], when)
    assert event is not None
    if event.startswith(_RELAY_PREFIX):
        return RelayRecorded(RelayKind(event.removeprefix(_RELAY_PREFIX)), id_, when, data)
    return EventRecorded(id_, revision, Event(event), when, data.get("channel"),
                         data.get("reason"), data.get("detail"))


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open (creating if needed) a journal database and check its schema version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(_SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) > SCHEMA_VERSION:
        conn.close()
        raise JournalError(f"{path} has schema version {row[0]}; this dispatchd reads up to "
                           f"{SCHEMA_VERSION}")
    return conn


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing journal for reading only (safe while dispatchd is writing to it)."""
    if not path.exists():
        raise JournalError(f"{path}: no journal there")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None or int(row[0]) > SCHEMA_VERSION:
        conn.close()
        raise JournalError(f"{path}: not a journal this dispatchd can read")
    return conn


def read_records(conn: sqlite3.Connection, after: int = 0) -> Iterator[tuple[int, Record]]:
    """Every record after sequence number ``after``, in order."""
    cursor = conn.execute(
        "SELECT seq, kind, id, revision, event, at, body FROM records WHERE seq > ? ORDER BY seq",
        (after,),
    )
    for seq, kind, id_, revision, event, at, body in cursor:
        yield seq, _decode(kind, id_, revision, event, at, body)


def read_instruction(conn: sqlite3.Connection, instruction_id: str
                     ) -> list[tuple[int, Record]]:
    """Every record of one instruction, in order."""
    cursor = conn.execute(
        "SELECT seq, kind, id, revision, event, at, body FROM records WHERE id = ? ORDER BY seq",
        (instruction_id,),
    )
    return [(seq, _decode(kind, id_, revision, event, at, body))
            for seq, kind, id_, revision, event, at, body in cursor]


CommitObserver = Callable[[float, int], None]
"""Called after each commit with its duration in seconds and the number of records."""


class Journal:
    """Group-committing journal. Run :meth:`run` as a task; then :meth:`append`."""

    def __init__(self, settings: JournalSettings, *, on_commit: CommitObserver | None = None
                 ) -> None:
        self.settings = settings
        self._on_commit = on_commit
        self._conn = connect(settings.path, settings.synchronous)
        # Readers use their own connection: the writer's belongs to the writer thread.
        self._reader = sqlite3.connect(settings.path, check_same_thread=False)
        self._queue: asyncio.Queue[tuple[Record, asyncio.Future[int]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self.batches = 0
        self.records = 0

    def replay(self) -> Iterator[tuple[int, Record]]:
        """Everything journaled so far, in order (call before :meth:`run`)."""
        return read_records(self._conn)

    def records_of(self, instruction_id: str) -> list[tuple[int, Record]]:
        """Every committed record of one instruction, in order (reads while writing)."""
        return read_instruction(self._reader, instruction_id)

    @property
    def depth(self) -> int:
        """Records waiting for the writer."""
        return self._queue.qsize()

    def append_nowait(self, record: Record) -> asyncio.Future[int]:
        """Queue ``record``; the future gives its sequence number once durably committed."""
        if self._queue.qsize() >= self.settings.max_queue:
            raise JournalError(f"the journal queue is full ({self.settings.max_queue} waiting)")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, future))
        return future

    async def append(self, record: Record) -> int:
        """Journal ``record`` and wait until it is durable; returns its sequence number."""
        return await self.append_nowait(record)

    def _write(self, batch: list[Record]) -> list[int]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            seqs = [
                conn.execute(
                    "INSERT INTO records (kind, id, revision, so, fsp, event, at, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    _encode(record),
                ).lastrowid
                for record in batch
            ]
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return [s for s in seqs if s is not None]

    async def run(self) -> None:
        """The writer: forever take what is queued and commit it in one transaction."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self.settings.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                seqs = await loop.run_in_executor(self._executor, self._write,
                                                  [r for r, _ in items])
            except sqlite3.Error as exc:
                error = JournalError(f"journal commit failed: {exc}")
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches += 1
            self.records += len(items)
            if self._on_commit is not None:
                self._on_commit(time.perf_counter() - started, len(items))
            for (_, future), seq in zip(items, seqs, strict=True):
                if not future.done():
                    future.set_result(seq)

    def close(self) -> None:
        """Refuse what is still queued, then close the database."""
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(JournalError("the journal was closed"))
        self._executor.shutdown(wait=True)
        self._reader.close()
        self._conn.close()
