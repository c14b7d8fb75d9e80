"""The fixture market settled end to end, every payment worked by hand.

Baselines: loads are flat (A1 150, A2 50, B1 200 kWh per half hour), so each baseline is
the flat load. Asset shares of C1's requests: A1 400 kW, A2 200 kW → 2/3 and 1/3.

C1 (turn-down, 0.5 MW, every day 16:00–20:00, £10.005/MW/h, £200/MWh, floor 50%):

- I1, Tue 6 Oct 17:00–18:00 BST, 0.4 MW: requested 0.2 MWh per half hour, 0.4 MWh.
  Metered A1 50, A2 30 → delivered (150−50)+(50−30) = 120 kWh = 0.12 MWh per half hour
  (under the 0.2 cap) → 0.24 MWh. Performance 0.24/0.4 = 0.6 → multiplier 0.6.
  Utilisation 0.24 × £200 × 0.6 = £28.80.
- I2, Sun 25 Oct (clocks go back) 17:00–18:30 GMT, 0.2 MW: 0.1 MWh per half hour, three
  half hours = 0.3 MWh. Metered A1 0 → delivered 0.15 per half hour, capped at 0.1 →
  0.3 MWh. Performance 1 → multiplier 1. Utilisation 0.3 × £200 = £60.00.
- I3, Tue 13 Oct 18:00–19:00 BST, 0.5 MW: 0.5 MWh requested; A1 140 → 0.01 MWh per half
  hour, 0.02 MWh. Performance 0.04 < 0.5 → multiplier 0, £0.00, and a failed dispatch.
- I6 is cancelled and I7 is a test: neither is settled.
- Availability: 31 windows × 4 h × 0.5 MW = 62 MW·h, less the 5 Oct declaration of 0.3 MW
  for 16:00–18:00 (2 h × 0.2 MW = 0.4) → 61.6 MW·h. I3 failed, so its window (13 Oct,
  4 h × 0.5 MW = 2 MW·h) is forfeited: (61.6 − 2) × £10.005 = £596.298 → £596.30 (the only
  rounding: once, on the line).

C2 (turn-up, 1 MW, Sat–Sun 10:00–14:00, £5/MW/h, £100/MWh, penalty £50/MWh shortfall):

- I4, Sat 10 Oct 11:00–12:00 BST, 0.8 MW: 0.4 MWh per half hour. Metered B1 500 →
  delivered 0.3 per half hour → 0.6 MWh; performance 0.75 → £100 × 0.75 × 0.6 = £45.00.
- I5, Sun 18 Oct, 1 MW for an hour, rejected: failed; shortfall 1 MWh × £50 = −£50.00.
- Availability: 9 weekend days × 4 h × 1 MW = 36 MW·h, less I5's window (4 MW·h):
  32 × £5 = £160.00.

Totals: FSPA £596.30 + £28.80 + £60.00 + £0.00 = £685.10; FSPB £160 + £45 − £50 = £155.00.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from contracts.io import load_contracts
from settlement.meterdata import ingest
from settlement.run import RunResult, run
from tests.settlement.fixture import MONTH, dispatch_log, local, meter_rows, write_inputs

EXPECTED_PENCE = {
    f"{MONTH}:C1:availability": 59630,
    f"{MONTH}:C1:utilisation:I1": 2880,
    f"{MONTH}:C1:utilisation:I2": 6000,
    f"{MONTH}:C1:utilisation:I3": 0,
    f"{MONTH}:C2:availability": 16000,
    f"{MONTH}:C2:utilisation:I4": 4500,
    f"{MONTH}:C2:penalty:I5": -5000,
}


def settle_fixture(tmp_path: Path, *, log: pl.DataFrame | None = None,
                   meters: pl.DataFrame | None = None, out: Path | None = None) -> RunResult:
    paths = write_inputs(tmp_path / "inputs", log=log, meters=meters)
    book = load_contracts(paths["contracts"])
    ingest(paths["meters"], book, tmp_path / "dataset", quarantine=tmp_path / "quarantine")
    return run(book=book, contracts_path=paths["contracts"], log_path=paths["log"],
               dataset=tmp_path / "dataset", month=MONTH, out=out or tmp_path / "runs")


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return settle_fixture(tmp_path_factory.mktemp("e2e"))


def test_every_invoice_line_is_the_hand_worked_amount(settled: RunResult) -> None:
    lines = settled.settlement.lines
    assert dict(zip(lines["line_id"], lines["amount_pence"], strict=True)) == EXPECTED_PENCE
    assert set(lines["status"]) == {"payable"}


def test_totals_per_fsp_add_up_exactly(settled: RunResult) -> None:
    invoices = pl.read_csv(settled.directory / "invoices.csv", infer_schema=False)
    by_fsp = dict(zip(invoices["fsp"], invoices["amount"], strict=True))
    assert by_fsp == {"FSPA": "685.10", "FSPB": "155.00"}


def test_performance_multiplier_and_failure_per_instruction(settled: RunResult) -> None:
    rows = {r["id"]: r for r in settled.settlement.instructions.iter_rows(named=True)}
    got = {i: (rows[i]["requested_mwh"], rows[i]["delivered_mwh"], rows[i]["performance"],
               rows[i]["multiplier"], rows[i]["failed"]) for i in ("I1", "I2", "I3", "I4")}
    assert got == {
        "I1": ("0.4", "0.24", "0.6", "0.6", False),
        "I2": ("0.3", "0.3", "1", "1", False),
        "I3": ("0.5", "0.02", "0.04", "0", True),
        "I4": ("0.8", "0.6", "0.75", "0.75", False),
    }
    assert (rows["I5"]["status"], rows["I5"]["failed"], rows["I5"]["penalty"]) == (
        "failed", True, "50")
    assert (rows["I6"]["status"], rows["I7"]["status"]) == ("cancelled", "test")


def test_the_clock_change_dispatch_is_measured_in_its_own_half_hours(
        settled: RunResult) -> None:
    """I2 runs 17:00–18:30 GMT on the 50-period day: three half hours, capped at 0.1 MWh."""
    periods = settled.settlement.periods.filter(pl.col("instruction_id") == "I2")
    assert periods["period_start"].to_list() == [
        local("2026-10-25", t) for t in ("17:00", "17:30", "18:00")]
    assert periods["delivered_mwh"].round(6).to_list() == [0.15, 0.15, 0.15]
    assert periods["counted_mwh"].round(6).to_list() == [0.1, 0.1, 0.1]
    flags = settled.settlement.asset_periods.filter(pl.col("instruction_id") == "I2")["flags"]
    assert all("clock_change_day:50_periods" in f for f in flags)


def test_availability_follows_declarations_and_forfeits_failed_windows(
        settled: RunResult) -> None:
    windows = settled.settlement.availability
    c1 = windows.filter(pl.col("contract_id") == "C1")
    assert c1.height == 31
    declared = c1.filter(pl.col("declared"))
    assert declared["mw_hours"].to_list() == ["1.6"]  # 2 h × 0.3 MW + 2 h × 0.5 MW
    forfeited = c1.filter(pl.col("forfeited") != "0")
    assert forfeited["window_start"].to_list() == [local("2026-10-13", "16:00")]
    c2 = windows.filter(pl.col("contract_id") == "C2")
    assert c2.height == 9
    assert c2.filter(pl.col("forfeited") != "0")["window_start"].to_list() == [
        local("2026-10-18", "10:00")]


def test_a_missing_days_readings_hold_back_the_lines_they_decide(tmp_path: Path) -> None:
    """Without B1's readings on 10 Oct, I4 is held, and so is C2's availability (a failed
    I4 would reduce it); each problem says what to do. C1 is unaffected."""
    result = settle_fixture(tmp_path, meters=meter_rows(skip={("B1", dt.date(2026, 10, 10))}))
    lines = {r["line_id"]: r for r in result.settlement.lines.iter_rows(named=True)}
    assert lines[f"{MONTH}:C2:utilisation:I4"]["status"] == "held"
    assert lines[f"{MONTH}:C2:utilisation:I4"]["amount_pence"] == 0  # nothing measured
    assert lines[f"{MONTH}:C2:availability"]["status"] == "held"
    assert "waits for instruction I4" in lines[f"{MONTH}:C2:availability"]["hold_reason"]
    assert all(r["status"] == "payable" for k, r in lines.items() if ":C1:" in k)
    problems = result.settlement.problems
    assert problems.select("kind", "instruction_id", "asset_id").rows() == [
        ("no_meter_data", "I4", "B1")]
    assert "settlement ingest" in problems["action"][0]


def test_an_unreconciled_relayed_instruction_holds_its_contract(tmp_path: Path) -> None:
    relayed = dispatch_log().filter(pl.col("id") == "I1").with_columns(
        id=pl.lit("R1"), external_platform=pl.lit("piclo"), external_id=pl.lit("D-77"),
        reconciliation=pl.lit("unmapped"))
    log = pl.concat([dispatch_log(), relayed])
    result = settle_fixture(tmp_path, log=log)
    lines = result.settlement.lines
    assert set(lines.filter(pl.col("contract_id") == "C1")["status"]) == {"held"}
    assert set(lines.filter(pl.col("contract_id") == "C2")["status"]) == {"payable"}
    problem = result.settlement.problems.row(0, named=True)
    assert (problem["kind"], problem["instruction_id"]) == ("unreconciled", "R1")
    assert "piclo" in problem["detail"] and "map the external id" in problem["action"]


def test_a_relayed_instruction_without_a_contract_is_listed_on_its_fsps_page(
        tmp_path: Path) -> None:
    """As exported before reconciliation: no contract, no assets. Nothing is invoiced for
    it, the other lines are untouched, and its FSP's report page names the problem."""
    relayed = dispatch_log().filter(pl.col("id") == "I1").with_columns(
        id=pl.lit("R2"), contract_id=pl.lit(None, pl.String),
        assets=pl.lit([], pl.List(pl.String)), external_platform=pl.lit("dsoflex"),
        external_id=pl.lit("ORD-3"), reconciliation=pl.lit("unmapped"))
    plain = settle_fixture(tmp_path / "plain").settlement.lines
    result = settle_fixture(tmp_path / "relayed", log=pl.concat([dispatch_log(), relayed]))
    assert result.settlement.lines.equals(plain)
    problem = result.settlement.problems.row(0, named=True)
    assert (problem["kind"], problem["contract_id"], problem["instruction_id"]) == (
        "unreconciled", None, "R2")
    fsp = relayed["fsp"][0]
    page = (result.directory / "fsp" / f"{fsp}.html").read_text()
    assert "R2" in page and "dsoflex" in page
