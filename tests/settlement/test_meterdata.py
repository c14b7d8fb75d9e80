"""Meter-data intake on deliberately broken files: every reason, counts that add up."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from settlement.meterdata import MeterFileError, ingest, readings
from tests.settlement.fixture import book

HEADER = "meter_id,period_start,kwh,flow,quality"
GOOD = [
    "M-A1,2026-10-01T00:00:00+01:00,1.5,import,actual",
    "M-A1,2026-10-01T00:30:00+01:00,2.5,import,estimated",
    "M-B1,2026-10-01T00:00:00Z,3,import,actual",
]
BROKEN = {
    "M-A1,2026-10-01T00:00:00+01:00,1.5,import,actual": "merged",  # repeats GOOD[0]
    "M-A1,2026-10-01T01:00:00+01:00,4,import,actual": "conflicting values",
    "M-A1,2026-10-01T01:00:00+01:00,5,import,actual": "conflicting values",
    "M-XX,2026-10-01T00:00:00Z,1,import,actual": "unknown meter",
    ",2026-10-01T00:00:00Z,1,import,actual": "meter_id missing",
    "M-A2,yesterday,1,import,actual": "period_start is not a time",
    "M-A2,2026-10-01T00:10:00Z,1,import,actual": "period_start is not on a",
    "M-A2,2026-10-25T01:30:00,1,import,actual": "period_start is ambiguous",
    "M-A2,2026-03-29T01:30:00,1,import,actual": "period_start does not exist in",
    "M-A2,2026-10-01T02:00:00Z,lots,import,actual": "kwh is not a number",
    "M-A2,2026-10-01T02:30:00Z,nan,import,actual": "kwh is not a number",
    "M-A2,2026-10-01T03:00:00Z,-1,import,actual": "kwh is negative",
    "M-A2,2026-10-01T03:30:00Z,1,sideways,actual": "flow is neither",
    "M-A2,2026-10-01T04:00:00Z,1,import,guessed": "quality is neither",
    "M-A2,2026-10-01T04:30:00Z,102,import,actual": "kwh is more than",  # 200 kW → 100 kWh
    "M-A2,2026-10-01T05:00:00Z,1,export,actual": "kwh is more than",  # no export at all
    "M-A2,2026-09-30T22:30:00Z,1,import,actual": "period_start is outside",
}


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


def test_every_rejection_reason_is_quarantined_and_the_counts_add_up(tmp_path: Path) -> None:
    source = write(tmp_path / "october.csv", GOOD + list(BROKEN))
    intake = ingest(source, book(), tmp_path / "dataset", quarantine=tmp_path / "q",
                    month="2026-10")
    expected = [r for r in BROKEN.values() if r != "merged"]
    assert intake.rows_in == len(GOOD) + len(BROKEN) == 20
    assert (intake.stored, intake.merged, intake.quarantined) == (3, 1, len(expected))
    assert intake.rows_in == intake.stored + intake.merged + intake.quarantined
    assert sorted(intake.reasons.elements()) == sorted(expected)
    assert intake.quarantine_file is not None
    quarantined = pl.read_csv(intake.quarantine_file, infer_schema=False)
    assert quarantined.height == len(expected)
    by_row = dict(zip(quarantined["row"].cast(int), quarantined["reason"], strict=True))
    assert by_row[7] == "unknown meter M-XX: no asset in the contracts file has it"
    assert "the clocks went back" in by_row[11]
    assert "A2 can import in a half hour (100.0 kWh at 200.0 kW)" in by_row[18]


def test_settlement_date_and_period_follow_the_clock_change(tmp_path: Path) -> None:
    """25 Oct 2026 has 50 periods, 29 Mar 46; period 49 on an ordinary day does not exist."""
    source = tmp_path / "periods.csv"
    source.write_text("meter_id,settlement_date,settlement_period,kwh\n"
                      "M-A1,2026-10-25,50,1\n"
                      "M-A1,2026-10-25,5,1\n"
                      "M-A1,2026-10-24,49,1\n"
                      "M-A1,2026-03-29,47,1\n"
                      "M-A1,2026-10-24,x,1\n")
    intake = ingest(source, book(), tmp_path / "dataset", quarantine=tmp_path / "q")
    assert (intake.stored, intake.quarantined) == (2, 3)
    stored = readings(tmp_path / "dataset", ["2026-10"]).collect().sort("start")
    # Period 5 of 25 Oct is the second 01:00 (GMT); period 50 starts at 23:30 GMT.
    assert stored["start"].to_list() == [
        dt.datetime(2026, 10, 25, 1, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 10, 25, 23, 30, tzinfo=dt.UTC)]
    reasons = pl.read_csv(intake.quarantine_file, infer_schema=False)["reason"].to_list()
    assert "that day has 48 periods" in reasons[0] and "that day has 46 periods" in reasons[1]
    assert "is not a whole number" in reasons[2]


def test_parquet_files_with_typed_columns_are_checked_alike(tmp_path: Path) -> None:
    source = tmp_path / "typed.parquet"
    pl.DataFrame({
        "meter_id": ["M-A1", "M-A1", "M-ZZ"],
        "period_start": [dt.datetime(2026, 10, 2, 10, 0, tzinfo=dt.UTC),
                         dt.datetime(2026, 10, 2, 10, 15, tzinfo=dt.UTC),
                         dt.datetime(2026, 10, 2, 10, 0, tzinfo=dt.UTC)],
        "kwh": [1.25, 1.0, 1.0],
    }).write_parquet(source)
    intake = ingest(source, book(), tmp_path / "dataset", quarantine=tmp_path / "q")
    assert (intake.rows_in, intake.stored, intake.quarantined) == (3, 1, 2)
    assert set(intake.reasons) == {"period_start is not on a", "unknown meter"}


def test_reingesting_a_file_changes_nothing(tmp_path: Path) -> None:
    source = write(tmp_path / "october.csv", GOOD + list(BROKEN))
    ingest(source, book(), tmp_path / "dataset", quarantine=tmp_path / "q")
    snapshot = {p: p.read_bytes() for p in sorted((tmp_path / "dataset").rglob("*.parquet"))}
    again = ingest(source, book(), tmp_path / "dataset", quarantine=tmp_path / "q")
    # Without --month the September reading is stored too: 4 stored, and 1 in-file repeat.
    assert again.stored == 0 and again.merged == 5
    assert again.rows_in == again.stored + again.merged + again.quarantined
    assert {p: p.read_bytes() for p in sorted(
        (tmp_path / "dataset").rglob("*.parquet"))} == snapshot


def test_a_different_value_for_a_stored_reading_is_a_conflict(tmp_path: Path) -> None:
    ingest(write(tmp_path / "a.csv", GOOD), book(), tmp_path / "dataset",
           quarantine=tmp_path / "q")
    changed = ingest(write(tmp_path / "b.csv", ["M-A1,2026-10-01T00:00:00+01:00,9,import,"
                                                "actual"]),
                     book(), tmp_path / "dataset", quarantine=tmp_path / "q")
    assert (changed.stored, changed.quarantined) == (0, 1)
    assert set(changed.reasons) == {"conflicts with the stored"}
    assert readings(tmp_path / "dataset", ["2026-10"]).collect().filter(
        pl.col("asset_id") == "A1")["kwh"].sort().to_list() == [1.5, 2.5]


def test_export_is_netted_against_import_for_baselines(tmp_path: Path) -> None:
    from contracts.model import Asset

    market = book()
    assets = dict(market.assets)
    assets["A3"] = Asset(id="A3", fsp="FSPA", meter_id="M-A3", zone="Z1",
                         technology="battery", import_kw=100, export_kw=100)
    import dataclasses

    market = dataclasses.replace(market, assets=assets)
    source = tmp_path / "battery.csv"
    source.write_text("meter_id,period_start,kwh,flow\n"
                      "M-A3,2026-10-01T12:00:00Z,10,import\n"
                      "M-A3,2026-10-01T12:00:00Z,30,export\n")
    ingest(source, market, tmp_path / "dataset", quarantine=tmp_path / "q")
    assert readings(tmp_path / "dataset", ["2026-10"]).collect()["kwh"].to_list() == [-20.0]
    netted = readings(tmp_path / "dataset", ["2026-10"], exporters=["A3"]).collect()
    assert netted["kwh"].to_list() == [-20.0]


@pytest.mark.parametrize("content", ["meter_id,kwh\nM-A1,1\n", "\x00\x01garbage"])
def test_an_unreadable_file_is_refused_whole(tmp_path: Path, content: str) -> None:
    source = tmp_path / "bad.csv"
    source.write_text(content)
    with pytest.raises(MeterFileError, match=r"bad\.csv"):
        ingest(source, book(), tmp_path / "dataset", quarantine=tmp_path / "q")
    assert not (tmp_path / "dataset").exists()
