"""The dispatch log: the journal of one month as a Parquet file for settlement.

One row per revision of every instruction whose latest revision overlaps the month (local
calendar month of ``tz``), sorted by id and revision. The journal is read, never written,
so the export may run beside a serving dispatchd. ``docs/settlement.md`` documents the
columns; :data:`DISPATCH_LOG_SCHEMA` is the schema.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl

from contracts.io import ContractBook
from dispatchd.core.engine import Dispatcher, InstructionView
from dispatchd.journal import open_readonly, read_records

UTC_TS = pl.Datetime("us", "UTC")

DISPATCH_LOG_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(), "revision": pl.Int32(), "kind": pl.String(), "latest": pl.Boolean(),
    "so": pl.String(), "fsp": pl.String(), "contract_id": pl.String(),
    "assets": pl.List(pl.String()), "direction": pl.String(), "capacity_mw": pl.Float64(),
    "profile_mw": pl.List(pl.Float64()), "start": UTC_TS, "end": UTC_TS,
    "issued_at": UTC_TS, "respond_by": UTC_TS, "accepted_at": UTC_TS, "state": pl.String(),
    "ack_response": pl.String(), "ack_reason": pl.String(), "ack_at": UTC_TS,
    "ack_late": pl.Boolean(), "test": pl.Boolean(), "override": pl.String(),
    "cancel_reason": pl.String(), "external_platform": pl.String(),
    "external_id": pl.String(), "reconciliation": pl.String(),
}
"""``reconciliation``: ``direct`` (issued here against a contract), ``mapped`` (relayed from
another platform and mapped to a contract) or ``unmapped`` (relayed, not yet mapped:
settlement holds the contract's invoice lines back until it is)."""


def next_month(day: dt.date) -> dt.date:
    """The first day of the month after ``day``'s."""
    return (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)


def month_dates(month: str) -> tuple[dt.date, dt.date]:
    """The first day of month ``YYYY-MM`` and of the month after; ValueError if not one."""
    try:
        first = dt.date.fromisoformat(f"{month}-01")
    except ValueError:
        raise ValueError(f"{month!r} is not a month (YYYY-MM)") from None
    return first, next_month(first)


def month_bounds(month: str, tz: str = "Europe/London") -> tuple[dt.datetime, dt.datetime]:
    """The UTC instants where local calendar month ``YYYY-MM`` starts and ends."""
    first, after = month_dates(month)
    zone = ZoneInfo(tz)
    return (dt.datetime.combine(first, dt.time(), zone).astimezone(dt.UTC),
            dt.datetime.combine(after, dt.time(), zone).astimezone(dt.UTC))


def _rows(view: InstructionView) -> list[dict[str, Any]]:
    rows = []
    last = len(view.revisions) - 1
    for n, rev in enumerate(view.revisions):
        inst = rev.instruction
        ref = inst.external_ref
        rows.append({
            "id": inst.id, "revision": inst.revision, "kind": inst.kind.value,
            "latest": n == last, "so": inst.so, "fsp": inst.fsp,
            "contract_id": inst.contract_id, "assets": list(inst.assets),
            "direction": inst.direction.value, "capacity_mw": inst.capacity_mw,
            "profile_mw": list(inst.profile_mw) if inst.profile_mw is not None else None,
            "start": inst.start, "end": inst.end, "issued_at": inst.issued_at,
            "respond_by": inst.respond_by, "accepted_at": rev.accepted_at,
            "state": rev.state.value,
            "ack_response": rev.ack.response.value if rev.ack else None,
            "ack_reason": rev.ack.reason if rev.ack else None,
            "ack_at": rev.ack.at if rev.ack else None,
            "ack_late": rev.ack.late if rev.ack else None,
            "test": inst.test, "override": inst.override, "cancel_reason": inst.cancel_reason,
            "external_platform": ref.platform if ref else None,
            "external_id": ref.id if ref else None,
            "reconciliation": "unmapped" if inst.unreconciled else
                              "mapped" if ref else "direct",
        })
    return rows


def dispatch_log(journal: Path, book: ContractBook, month: str, *, tz: str = "Europe/London"
                 ) -> pl.DataFrame:
    """The month's dispatch log, read from the journal at ``journal``."""
    begin, end = month_bounds(month, tz)
    engine = Dispatcher(book)
    conn = open_readonly(journal)
    try:
        now = dt.datetime.now(dt.UTC)
        for seq, record in read_records(conn):
            engine.apply(record, seq, now, replay=True)
    finally:
        conn.close()
    rows: list[dict[str, Any]] = []
    for instruction_id in sorted(engine.ids()):
        view = engine.view(instruction_id)
        assert view is not None
        latest = view.latest.instruction
        if latest.start < end and begin < latest.end:
            rows += _rows(view)
    return pl.DataFrame(rows, schema=DISPATCH_LOG_SCHEMA, orient="row") if rows else \
        pl.DataFrame(schema=DISPATCH_LOG_SCHEMA)


def write_dispatch_log(frame: pl.DataFrame, out: Path) -> None:
    """Write ``frame`` to ``out`` atomically (a partial file is never left under the name)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    frame.write_parquet(partial, statistics=False)
    partial.replace(out)
