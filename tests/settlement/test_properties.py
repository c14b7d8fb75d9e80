"""Invariants of a settlement, whatever the metered responses and requested MW."""

from __future__ import annotations

import random
from decimal import Decimal

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from settlement.compute import settle
from settlement.rules import quantity
from tests.settlement import fixture
from tests.settlement.fixture import MONTH, book, dispatch_log

EVENTS = {"I1": ("A1", "2026-10-06", "17:00", 2), "I3": ("A2", "2026-10-13", "18:00", 2),
          "I4": ("B1", "2026-10-10", "11:00", 2)}


def readings(responses: dict[str, float]) -> pl.LazyFrame:
    """The fixture's readings with each event's asset metering ``responses[event]`` kWh."""
    saved = dict(fixture.RESPONSES)
    try:
        fixture.RESPONSES.clear()
        for event, kwh in responses.items():
            asset, day, start, halves = EVENTS[event]
            fixture._respond(asset, day, start, halves, kwh)
        rows = fixture.meter_rows()
    finally:
        fixture.RESPONSES.clear()
        fixture.RESPONSES.update(saved)
    assets = {v: k for k, v in fixture.METERS.items()}
    return rows.select(
        pl.col("meter_id").replace_strict(assets).alias("asset_id"),
        pl.col("period_start").str.to_datetime(time_zone="UTC").dt.cast_time_unit("us")
        .alias("start"),
        pl.col("kwh").cast(pl.Float64), pl.lit(False).alias("estimated")).lazy()


scenarios = st.fixed_dictionaries({
    "responses": st.fixed_dictionaries({e: st.floats(0, 500, allow_nan=False) for e in EVENTS}),
    "mw": st.fixed_dictionaries({e: st.floats(0.05, 1.0) for e in ("I1", "I3", "I4")}),
})


def log_with(mw: dict[str, float]) -> pl.DataFrame:
    return dispatch_log().with_columns(capacity_mw=pl.col("id").replace_strict(
        mw, default=pl.col("capacity_mw"), return_dtype=pl.Float64))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_energy_and_money_are_conserved(scenario: dict[str, dict[str, float]]) -> None:
    """Per-period counted energy sums to each instruction's delivered energy; paid energy
    never exceeds requested; invoice lines sum to the FSP totals; amounts are whole pence."""
    result = settle(book(), log_with(scenario["mw"]), readings(scenario["responses"]), MONTH)
    periods = result.periods.group_by("instruction_id").agg(
        pl.col("counted_mwh").sum(), pl.col("paid_mwh").sum(), pl.col("requested_mwh").sum())
    by_id = {r["id"]: r for r in result.instructions.iter_rows(named=True)}
    contracts = book().contracts
    for row in periods.iter_rows(named=True):
        inst = by_id[row["instruction_id"]]
        if inst["status"] != "settle":
            continue
        assert Decimal(inst["delivered_mwh"]) == quantity(row["counted_mwh"])
        assert row["paid_mwh"] <= row["requested_mwh"] + 1e-12
        price = contracts[inst["contract_id"]].utilisation_price
        assert Decimal(inst["utilisation"]) <= quantity(row["requested_mwh"]) * price
    lines = result.lines
    totals = lines.group_by("fsp").agg(pl.col("amount_pence").sum())
    assert int(totals["amount_pence"].sum()) == int(lines["amount_pence"].sum())
    assert lines["amount_pence"].dtype == pl.Int64


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios, st.integers(0, 2**32 - 1))
def test_the_order_of_input_rows_changes_nothing(scenario: dict[str, dict[str, float]],
                                                  seed: int) -> None:
    log = log_with(scenario["mw"])
    meters = readings(scenario["responses"]).collect()
    first = settle(book(), log, meters.lazy(), MONTH)
    rng = random.Random(seed)
    shuffled_log = log[rng.sample(range(log.height), log.height)]
    shuffled_meters = meters[rng.sample(range(meters.height), meters.height)]
    second = settle(book(), shuffled_log, shuffled_meters.lazy(), MONTH)
    for name in ("instructions", "periods", "availability", "lines", "problems"):
        assert getattr(first, name).equals(getattr(second, name)), name


def test_a_flat_response_at_the_floor_is_paid_at_the_floors_multiplier() -> None:
    """A half-delivered I1 (performance exactly 0.5) is not a failure; 0.4999 would be."""
    # I1 asks 0.4 MW for an hour: 0.2 MWh per half hour, of which A1 carries 2/3 and A2 1/3.
    # A1 alone dropping 100 kWh per half hour delivers 0.1 MWh: performance 0.5.
    result = settle(book(), log_with({"I1": 0.4, "I3": 0.5, "I4": 0.8}),
                    readings({"I1": 50.0, "I3": 150.0, "I4": 200.0}), MONTH)
    i1 = result.instructions.filter(pl.col("id") == "I1").row(0, named=True)
    assert (i1["performance"], i1["multiplier"], i1["failed"]) == ("0.5", "0.5", False)
    assert i1["utilisation"] == "20"  # 0.2 MWh × £200 × 0.5
