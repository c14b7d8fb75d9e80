"""dispatchd export: the journal of a month as the dispatch log settlement reads."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from contracts.io import ContractBook, dump_contracts
from dispatchd.export import DISPATCH_LOG_SCHEMA, dispatch_log, month_bounds
from settlement.run import read_log
from tests.conftest import pick
from tests.dispatchd.channels_peers import channel_book, channel_config, serving
from tests.dispatchd.conftest import auth, instruction

pytestmark = pytest.mark.service


def test_month_bounds_are_local_midnights() -> None:
    assert month_bounds("2026-10") == (dt.datetime(2026, 9, 30, 23, tzinfo=dt.UTC),
                                       dt.datetime(2026, 11, 1, 0, tzinfo=dt.UTC))
    with pytest.raises(ValueError, match="not a month"):
        month_bounds("2026-13")


def test_export_writes_every_revision_with_its_answer(tmp_path: Path,
                                                     live_book: ContractBook) -> None:
    """Instructions answered, rejected, amended and cancelled appear with each revision's
    state and answer, in the documented schema, readable by settlement."""
    book = channel_book(live_book, {})
    contract = pick(book)
    config = channel_config(tmp_path, book)

    async def scenario() -> None:
        async with serving(config, book) as (_, client):
            so, fsp = auth("so", contract.so), auth("fsp", contract.fsp)
            for iid in ("ok", "no", "moved", "gone"):
                r = await client.post("/v1/instructions", headers=so,
                                      json=instruction(contract, id=iid))
                assert r.status_code == 202, r.text
            await client.post("/v1/instructions/ok/ack", headers=fsp,
                              json={"revision": 0, "response": "accepted"})
            await client.post("/v1/instructions/no/ack", headers=fsp,
                              json={"revision": 0, "response": "rejected",
                                    "reason": "fleet offline"})
            await client.post("/v1/instructions/moved/amend", headers=so,
                              json={"capacity_mw": contract.contracted_mw / 2})
            await client.post("/v1/instructions/gone/cancel", headers=so,
                              json={"reason": "constraint cleared"})

    asyncio.run(scenario())
    starts = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)  # as instruction() has it
    month = f"{starts.astimezone(ZoneInfo('Europe/London')):%Y-%m}"
    log = dispatch_log(config.journal.path, book, month)
    assert log.schema == pl.Schema(DISPATCH_LOG_SCHEMA)
    rows = {(r["id"], r["revision"]): r for r in log.iter_rows(named=True)}
    assert sorted(rows) == [("gone", 0), ("gone", 1), ("moved", 0), ("moved", 1),
                            ("no", 0), ("ok", 0)]
    assert (rows["ok", 0]["state"], rows["ok", 0]["ack_response"]) == (
        "acknowledged_accepted", "accepted")
    assert (rows["no", 0]["ack_reason"], rows["no", 0]["state"]) == (
        "fleet offline", "acknowledged_rejected")
    assert rows["moved", 1]["capacity_mw"] == contract.contracted_mw / 2
    assert (rows["moved", 0]["latest"], rows["moved", 1]["latest"]) == (False, True)
    assert (rows["gone", 1]["kind"], rows["gone", 1]["cancel_reason"]) == (
        "cancel", "constraint cleared")
    assert {r["reconciliation"] for r in rows.values()} == {"direct"}
    assert dispatch_log(config.journal.path, book, "2001-01").height == 0

    # The command, as finance would run it, writing a file settlement accepts.
    dump_contracts(book, tmp_path / "contracts.json")
    (tmp_path / "config.toml").write_text(
        f'[service]\ncontracts = "contracts.json"\n[journal]\npath = '
        f'"{config.journal.path.name}"\n')
    out = tmp_path / "log.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "dispatchd.cli", "export", "--config",
         str(tmp_path / "config.toml"), "--month", month, "--out", str(out)],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert f"6 revisions of 4 instructions for {month}" in result.stdout
    assert read_log(out).equals(log)
    missing = subprocess.run(
        [sys.executable, "-m", "dispatchd.cli", "export", "--config",
         str(tmp_path / "config.toml"), "--month", "someday"],
        capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "not a month" in missing.stderr
