"""Property: the vectorised X-of-Y equals the plain reference on random data."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.calendar import Calendar
from baselines.compute import compute
from baselines.methods import XofY
from baselines.periods import period_starts
from tests.baselines.reference import reference

# Spans the clocks-back day (25 Oct 2026) and a bank holiday period would be too long; the
# start date is drawn so that some runs include the clock change.
STARTS = [dt.date(2026, 1, 5), dt.date(2026, 10, 1), dt.date(2026, 3, 10)]


@dataclass(frozen=True)
class Scenario:
    """Generated readings, events and method; its repr leaves out the thousands of rows so
    that a failing example is reported readably."""

    rows: list
    events: list
    method: XofY

    def __repr__(self) -> str:
        first = self.rows[0][1] if self.rows else None
        return (f"Scenario({len(self.rows)} readings from {first}, events={self.events!r}, "
                f"method={self.method!r})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints dataclasses field by field unless this says otherwise."""
        printer.text(repr(self))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    first = draw(st.sampled_from(STARTS))
    days = draw(st.integers(12, 30))
    assets = [f"A{i}" for i in range(draw(st.integers(1, 3)))]
    rows = []
    for asset in assets:
        base = draw(st.floats(0, 5))
        for i in range(days):
            day = first + dt.timedelta(days=i)
            skip = draw(st.booleans()) and draw(st.integers(0, 9)) == 0  # some gaps
            estimated = draw(st.integers(0, 9)) == 0
            daily = draw(st.floats(-1, 10, allow_nan=False))
            for j, start in enumerate(period_starts(day)):
                if skip and j == 5:
                    continue
                rows.append((asset, start, round(base + daily + (j % 7) * 0.5, 3), estimated))
    events = []
    for n, asset in enumerate(assets):
        for k in range(draw(st.integers(1, 2))):
            day = first + dt.timedelta(days=draw(st.integers(days // 2, days - 1)))
            starts = period_starts(day)
            index = draw(st.integers(0, len(starts) - 2))
            length = draw(st.integers(1, min(6, len(starts) - index)))
            start = starts[index]
            events.append((asset, f"E{n}{k}", start, start + dt.timedelta(minutes=30 * length)))
    # distinct (asset, event) pairs
    y = draw(st.integers(1, 6))
    method = XofY(
        x=draw(st.integers(1, y)), y=y,
        select=draw(st.sampled_from(["high", "mid", "all"])),
        lookback_days=draw(st.integers(y, 20)),
        min_days=draw(st.integers(1, y)),
        match=draw(st.sampled_from(["day_type", "weekday"])),
        low_usage_fraction=draw(st.sampled_from([None, 0.5])),
        exclude_estimated=draw(st.booleans()),
    )
    return Scenario(rows, events, method)


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_vectorised_equals_reference(case: Scenario) -> None:
    rows, events, method = case.rows, case.events, case.method
    calendar = Calendar()
    frame = pl.DataFrame(rows, schema={"asset_id": pl.String, "start": pl.Datetime("us", "UTC"),
                                       "kwh": pl.Float64, "estimated": pl.Boolean},
                         orient="row")
    event_frame = pl.DataFrame(events, schema={
        "asset_id": pl.String, "event_id": pl.String, "start": pl.Datetime("us", "UTC"),
        "end": pl.Datetime("us", "UTC")}, orient="row")
    got = compute(frame, event_frame, method, calendar=calendar)
    expected = reference(rows, events, method, calendar)
    for (asset, event_id), answer in expected.items():
        part = got.filter((pl.col("asset_id") == asset) & (pl.col("event_id") == event_id))
        values = part["baseline_kwh"].to_list()
        assert len(values) == len(answer.baseline)
        for v, w in zip(values, answer.baseline, strict=True):
            if w is None:
                assert v is None
            else:
                assert v is not None and math.isclose(v, w, rel_tol=1e-9, abs_tol=1e-9)
        assert part["eligible_days"][0] == answer.eligible
        used = part["selected_days"][0]
        assert used == ",".join(d.isoformat() for d in answer.days)
