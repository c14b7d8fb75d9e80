"""Hand-worked baselines: each test writes out the arithmetic a reader can check.

Unless a test says otherwise, the asset's load is flat all day and equals the day's number
counted from Mon 5 Jan 2026 = 1 (so Tue 20 Jan = 16, Mon 2 Feb = 29, Tue 3 Feb = 30); the
event is Tue 3 Feb 2026 17:00–18:00 UTC (= local time in winter), periods 35 and 36.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import polars as pl
import pytest

from baselines.calendar import Calendar
from baselines.compute import BaselineInputError, compute
from baselines.methods import (
    PRESETS,
    Fixed,
    Nominated,
    PreEvent,
    ReferenceProfile,
    SameDayAdjustment,
    XofY,
)
from baselines.periods import clock_slot, label, period_starts, periods_in_day

FIRST = dt.date(2026, 1, 5)
EVENT_START = dt.datetime(2026, 2, 3, 17, tzinfo=dt.UTC)
READINGS_SCHEMA = {"asset_id": pl.String, "start": pl.Datetime("us", "UTC"), "kwh": pl.Float64,
                   "estimated": pl.Boolean}


def day_number(day: dt.date) -> int:
    return (day - FIRST).days + 1


def readings(value: Callable[[dt.date, dt.datetime], float | None] | None = None, *,
             first: dt.date = FIRST, days: int = 30, asset: str = "A1",
             estimated: Callable[[dt.date], bool] = lambda d: False) -> pl.DataFrame:
    value = value or (lambda day, start: float(day_number(day)))
    rows = []
    for i in range(days):
        day = first + dt.timedelta(days=i)
        for start in period_starts(day):
            kwh = value(day, start)
            if kwh is not None:
                rows.append((asset, start, kwh, estimated(day)))
    return pl.DataFrame(rows, schema=READINGS_SCHEMA, orient="row")


def event(start: dt.datetime = EVENT_START, minutes: int = 60, *, asset: str = "A1",
          event_id: str = "E1") -> pl.DataFrame:
    return pl.DataFrame({"asset_id": [asset], "event_id": [event_id], "start": [start],
                         "end": [start + dt.timedelta(minutes=minutes)]})


def one(frame: pl.DataFrame, column: str) -> object:
    values = set(frame[column].to_list())
    assert len(values) == 1, values
    return values.pop()


# ---------------------------------------------------------------------------- periods


def test_period_counts_on_clock_change_days() -> None:
    """29 Mar 2026 (clocks forward) has 46 periods, 25 Oct 2026 (back) 50, others 48."""
    assert periods_in_day(dt.date(2026, 3, 29)) == 46
    assert periods_in_day(dt.date(2026, 10, 25)) == 50
    assert periods_in_day(dt.date(2026, 10, 26)) == 48
    assert periods_in_day(dt.date(2026, 3, 29), "UTC") == 48


def test_the_repeated_hour_gives_two_distinct_periods() -> None:
    """25 Oct 2026: 00:00Z and 01:00Z are both 01:00 local, periods 3 and 5."""
    first = dt.datetime(2026, 10, 25, 0, 0, tzinfo=dt.UTC)   # 01:00 BST
    second = dt.datetime(2026, 10, 25, 1, 0, tzinfo=dt.UTC)  # 01:00 GMT
    assert (label(first), label(second)) == ((dt.date(2026, 10, 25), 3),
                                             (dt.date(2026, 10, 25), 5))
    assert clock_slot(first) == clock_slot(second) == 2


def test_labels_refuse_naive_and_off_boundary_times() -> None:
    with pytest.raises(ValueError, match="no UTC offset"):
        label(dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="half-hour"):
        label(dt.datetime(2026, 1, 1, 0, 10, tzinfo=dt.UTC))


# ---------------------------------------------------------------------------- calendar


@pytest.mark.parametrize(("region", "day", "holiday"), [
    ("england-and-wales", dt.date(2026, 4, 6), True),    # Easter Monday
    ("scotland", dt.date(2026, 4, 6), False),            # not a Scottish holiday
    ("scotland", dt.date(2026, 8, 3), True),             # first Monday of August
    ("england-and-wales", dt.date(2026, 12, 28), True),  # Boxing Day (Sat 26) substitute
    ("northern-ireland", dt.date(2026, 7, 13), True),    # Battle of the Boyne substitute
    ("england-and-wales", dt.date(2020, 5, 8), True),    # VE Day move of Early May
    ("england-and-wales", dt.date(2020, 5, 4), False),
    ("england-and-wales", dt.date(2022, 9, 19), True),   # State Funeral
    ("england-and-wales", dt.date(2035, 3, 23), True),   # Good Friday 2035
])
def test_gb_bank_holidays(region: str, day: dt.date, holiday: bool) -> None:
    assert Calendar(region).is_holiday(day) is holiday


def test_extra_days_and_day_types() -> None:
    calendar = Calendar.with_extra("england-and-wales", [dt.date(2026, 2, 2)])
    assert calendar.day_type(dt.date(2026, 2, 2)).value == "holiday"
    assert calendar.day_type(dt.date(2026, 2, 7)).value == "weekend"
    assert calendar.day_type(dt.date(2026, 2, 3)).value == "weekday"


# ---------------------------------------------------------------------------- X of Y


def test_presets_by_hand() -> None:
    """Tue 3 Feb; the 10 previous weekdays are 20–23, 26–30 Jan and 2 Feb, worth
    16 17 18 19 22 23 24 25 26 29.
    10 of 10: 219/10 = 21.9.   high 4 of 5 (27–30 Jan, 2 Feb = 23 24 25 26 29):
    top four 24+25+26+29 = 104, /4 = 26.   mid 8 of 10: drop 29 and 16, 174/8 = 21.75.
    previous 3 weeks (Tuesdays 13, 20, 27 Jan = 9 16 23): 48/3 = 16."""
    expected = {"10_of_10": 21.9, "high_4_of_5": 26.0, "mid_8_of_10": 21.75,
                "previous_3_weeks": 16.0}
    for name, value in expected.items():
        out = compute(readings(), event(), PRESETS[name])
        assert out["baseline_kwh"].to_list() == pytest.approx([value, value]), name
        assert out["period"].to_list() == [35, 36]
    high = compute(readings(), event(), PRESETS["high_4_of_5"])
    assert one(high, "selected_days") == "2026-01-28,2026-01-29,2026-01-30,2026-02-02"


def test_an_earlier_event_day_pushes_selection_back() -> None:
    """An event on Mon 2 Feb makes that day ineligible: high 4 of 5 then looks at
    26–30 Jan (22 23 24 25 26) and keeps 23+24+25+26 = 98, /4 = 24.5."""
    events = pl.concat([event(), event(dt.datetime(2026, 2, 2, 9, tzinfo=dt.UTC), event_id="E0")])
    out = compute(readings(), events, PRESETS["high_4_of_5"]).filter(
        pl.col("event_id") == "E1")
    assert out["baseline_kwh"].to_list() == pytest.approx([24.5, 24.5])
    assert one(out, "selected_days") == "2026-01-27,2026-01-28,2026-01-29,2026-01-30"


def test_an_event_ending_at_midnight_leaves_the_next_day_eligible() -> None:
    """An event 22:00–00:00 on Thu 29 Jan makes 29 Jan ineligible but not 30 Jan: high 4
    of 5 then uses 26, 27, 28, 30 Jan and 2 Feb (22 23 24 26 29) and keeps 23+24+26+29 =
    102, /4 = 25.5."""
    earlier = event(dt.datetime(2026, 1, 29, 22, tzinfo=dt.UTC), 120, event_id="E0")
    out = compute(readings(), pl.concat([event(), earlier]), PRESETS["high_4_of_5"]).filter(
        pl.col("event_id") == "E1")
    assert out["baseline_kwh"].to_list() == pytest.approx([25.5, 25.5])
    assert one(out, "selected_days") == "2026-01-27,2026-01-28,2026-01-30,2026-02-02"


def test_a_bank_holiday_is_not_a_weekday_candidate() -> None:
    """Declare Mon 2 Feb a holiday: high 4 of 5 looks back to 26–30 Jan as above: 24.5.
    Without the holiday it was 26."""
    calendar = Calendar.with_extra("england-and-wales", [dt.date(2026, 2, 2)])
    out = compute(readings(), event(), PRESETS["high_4_of_5"], calendar=calendar)
    assert out["baseline_kwh"].to_list() == pytest.approx([24.5, 24.5])


def test_weekend_event_uses_weekend_and_holiday_days() -> None:
    """Sat 31 Jan event, 3 of 3 all: the previous Sun 25, Sat 24 and Sun 18 Jan
    (21 20 14) → 55/3 = 18.333…"""
    out = compute(readings(), event(dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
                  XofY(x=3, y=3, select="all"))
    assert out["baseline_kwh"].to_list() == pytest.approx([55 / 3] * 2)


def test_only_four_eligible_days_is_flagged_and_used() -> None:
    """Readings start on Tue 27 Jan: 10 of 10 (minimum 4) finds only 27, 28, 29, 30 Jan
    and 2 Feb… that is five; drop 27 Jan's readings to leave four: 24 25 26 29 → 26."""
    data = readings(first=dt.date(2026, 1, 28), days=7)
    out = compute(data, event(), XofY(x=10, y=10, min_days=4))
    assert out["baseline_kwh"].to_list() == pytest.approx([26.0, 26.0])
    assert one(out, "eligible_days") == 4
    assert "fewer_eligible_days:4_of_10" in str(one(out, "flags"))


def test_below_the_minimum_there_is_no_baseline_and_a_reason() -> None:
    """Three eligible days with a minimum of four: null baseline, never zero."""
    data = readings(first=dt.date(2026, 1, 29), days=6)
    out = compute(data, event(), XofY(x=10, y=10, min_days=4))
    assert out["baseline_kwh"].to_list() == [None, None]
    assert "no_baseline:3_eligible_days_below_minimum_4" in str(one(out, "flags"))


def test_a_day_with_a_missing_reading_is_ineligible() -> None:
    """Drop one half hour of Mon 2 Feb: high 4 of 5 moves back as for an event: 24.5."""
    gap = dt.datetime(2026, 2, 2, 3, tzinfo=dt.UTC)
    data = readings(lambda day, start: None if start == gap else float(day_number(day)))
    out = compute(data, event(), PRESETS["high_4_of_5"])
    assert out["baseline_kwh"].to_list() == pytest.approx([24.5, 24.5])


def test_zero_readings_are_readings_and_exports_negative() -> None:
    """An asset that exports 2 kWh every half hour has a −2 baseline, not a missing one."""
    data = readings(lambda day, start: -2.0)
    out = compute(data, event(), PRESETS["mid_8_of_10"])
    assert out["baseline_kwh"].to_list() == [-2.0, -2.0]
    zero = compute(readings(lambda day, start: 0.0), event(), PRESETS["mid_8_of_10"])
    assert zero["baseline_kwh"].to_list() == [0.0, 0.0] and one(zero, "flags") == ""


def test_estimated_reads_excluded_when_asked() -> None:
    """Mark Mon 2 Feb estimated: excluded, high 4 of 5 gives 24.5; allowed, 26 + a flag."""
    data = readings(estimated=lambda day: day == dt.date(2026, 2, 2))
    excluded = compute(data, event(), XofY(x=4, y=5, select="high", exclude_estimated=True))
    allowed = compute(data, event(), PRESETS["high_4_of_5"])
    assert excluded["baseline_kwh"].to_list() == pytest.approx([24.5, 24.5])
    assert allowed["baseline_kwh"].to_list() == pytest.approx([26.0, 26.0])
    assert "estimated_reads_used" in str(one(allowed, "flags"))


def test_low_usage_days_are_ineligible() -> None:
    """Fri 30 Jan reads 1 (not 26). The five most recent weekdays average
    (23+24+25+1+29)/5 = 20.4; 1 < 0.25 × 20.4, so 30 Jan is dropped and 26 Jan (22) enters:
    high 4 of 5 of 22 23 24 25 29 keeps 23+24+25+29 = 101, /4 = 25.25."""
    data = readings(lambda day, start: 1.0 if day == dt.date(2026, 1, 30)
                    else float(day_number(day)))
    out = compute(data, event(), XofY(x=4, y=5, select="high", low_usage_fraction=0.25))
    assert out["baseline_kwh"].to_list() == pytest.approx([25.25, 25.25])


def test_ranking_uses_the_event_window_and_values_follow_the_clock() -> None:
    """Load is day number + 100 between 17:00 and 18:00 and the day number otherwise,
    except on Thu 29 Jan (25) when the evening peak is missing. high 2 of 3 over
    29, 30 Jan and 2 Feb ranks by the 17:00–18:00 mean: 126, 129 beat 25 → (126+129)/2."""
    def load(day: dt.date, start: dt.datetime) -> float:
        peak = 17 <= start.hour < 18 and day != dt.date(2026, 1, 29)
        return day_number(day) + (100.0 if peak else 0.0)
    out = compute(readings(load), event(), XofY(x=2, y=3, select="high"))
    assert out["baseline_kwh"].to_list() == pytest.approx([127.5, 127.5])


def test_clocks_back_event_day_has_its_repeated_hour_twice() -> None:
    """Event Sun 25 Oct 2026 00:00–02:00 UTC = 01:00 BST to 01:00 GMT +1h: four periods,
    labels 3, 4, 5, 6; the first and third are both 01:00 local, so with flat weekend load
    equal to the slot number they get the same baseline. Candidates (3 of 3 all) are Sat
    24, Sun 18 and Sat 17 Oct with load = clock slot + 1 → 3, 4, 3, 4."""
    data = readings(lambda day, start: float(clock_slot(start) + 1),
                    first=dt.date(2026, 10, 1), days=26)
    start = dt.datetime(2026, 10, 25, 0, tzinfo=dt.UTC)
    out = compute(data, event(start, 120), XofY(x=3, y=3, select="all"))
    assert out["period"].to_list() == [3, 4, 5, 6]
    assert out["baseline_kwh"].to_list() == [3.0, 4.0, 3.0, 4.0]
    assert "clock_change_day:50_periods" in str(one(out, "flags"))


def test_metered_readings_come_with_each_event_half_hour() -> None:
    """Across the clocks-back repeated hour each period carries its own reading (the two
    01:00s apart), with a half hour missing left null; the event day's estimated reads are
    flagged."""
    def value(day: dt.date, start: dt.datetime) -> float | None:
        if day == dt.date(2026, 10, 25):
            minute = int(start.timestamp() // 60) % 10_000
            return None if start == dt.datetime(2026, 10, 25, 1, 30, tzinfo=dt.UTC) \
                else float(minute)
        return 1.0

    data = readings(value, first=dt.date(2026, 10, 1), days=26,
                    estimated=lambda d: d == dt.date(2026, 10, 25))
    start = dt.datetime(2026, 10, 25, 0, tzinfo=dt.UTC)
    out = compute(data, event(start, 120), XofY(x=3, y=3, select="all"))
    expected = [float(int((start + i * dt.timedelta(minutes=30)).timestamp() // 60) % 10_000)
                for i in range(4)]
    expected[3] = None  # 01:30 UTC (the second 01:30 local) was not read
    assert out["metered_kwh"].to_list() == expected
    assert "estimated_reads_on_event_day" in str(one(out, "flags"))


def test_clocks_forward_event_day_has_46_periods() -> None:
    """Event Sun 29 Mar 2026 00:00–02:00 UTC = 00:00 GMT to 03:00 BST: four periods,
    labels 1–4, local clock slots 0, 1, 4, 5 (01:00–02:00 does not exist)."""
    data = readings(lambda day, start: float(clock_slot(start) + 1),
                    first=dt.date(2026, 3, 1), days=29)
    out = compute(data, event(dt.datetime(2026, 3, 29, 0, tzinfo=dt.UTC), 120),
                  XofY(x=3, y=3, select="all"))
    assert out["period"].to_list() == [1, 2, 3, 4]
    assert out["baseline_kwh"].to_list() == [1.0, 2.0, 5.0, 6.0]
    assert "clock_change_day:46_periods" in str(one(out, "flags"))


def test_a_clocks_back_candidate_day_is_complete_with_50_readings() -> None:
    """Sun 25 Oct is a candidate for Sat 31 Oct (1 of 1): it has 50 readings, is complete,
    and its repeated 01:00 averages its two readings (7 and 9 → 8)."""
    def load(day: dt.date, start: dt.datetime) -> float:
        if day == dt.date(2026, 10, 25) and clock_slot(start) == 2:
            return 7.0 if start.hour == 0 else 9.0
        return 1.0
    data = readings(load, first=dt.date(2026, 10, 20), days=11)
    out = compute(data, event(dt.datetime(2026, 10, 31, 1, tzinfo=dt.UTC), 30),
                  XofY(x=1, y=1, select="all"))
    assert one(out, "selected_days") == "2026-10-25"
    assert out["baseline_kwh"].to_list() == [8.0]


# ---------------------------------------------------------------------------- adjustment


def test_additive_adjustment_with_its_cap_binding() -> None:
    """mid 8 of 10 = 21.75; the window 13:00–16:00 on 3 Feb reads 30: +8.25, capped at
    20% × 21.75 = 4.35 → 26.1."""
    out = compute(readings(), event(), PRESETS["mid_8_of_10"], adjustment=SameDayAdjustment())
    assert out["baseline_kwh"].to_list() == pytest.approx([26.1, 26.1])
    assert one(out, "adjustment") == pytest.approx(4.35)
    assert "adjustment_capped" in str(one(out, "flags"))
    assert out["unadjusted_kwh"].to_list() == pytest.approx([21.75, 21.75])


def test_additive_adjustment_within_its_cap() -> None:
    """With a 50% cap: 21.75 + 8.25 = 30."""
    out = compute(readings(), event(), PRESETS["mid_8_of_10"],
                  adjustment=SameDayAdjustment(cap=0.5))
    assert out["baseline_kwh"].to_list() == pytest.approx([30.0, 30.0])


def test_multiplicative_adjustment() -> None:
    """30 / 21.75 = 1.3793…, capped at 1.2 → 21.75 × 1.2 = 26.1; uncapped → 30."""
    capped = compute(readings(), event(), PRESETS["mid_8_of_10"],
                     adjustment=SameDayAdjustment(kind="multiplicative"))
    free = compute(readings(), event(), PRESETS["mid_8_of_10"],
                   adjustment=SameDayAdjustment(kind="multiplicative", cap=None))
    assert capped["baseline_kwh"].to_list() == pytest.approx([26.1, 26.1])
    assert free["baseline_kwh"].to_list() == pytest.approx([30.0, 30.0])


def test_upward_only_adjustment_never_lowers() -> None:
    """On 3 Feb the load drops to 10 before the event: 10 − 21.75 < 0, so upward-only
    keeps 21.75; a two-way adjustment capped at 20% gives 21.75 − 4.35 = 17.4."""
    data = readings(lambda day, start: 10.0 if day == dt.date(2026, 2, 3)
                    else float(day_number(day)))
    up = compute(data, event(), PRESETS["mid_8_of_10"],
                 adjustment=SameDayAdjustment(upward_only=True))
    both = compute(data, event(), PRESETS["mid_8_of_10"], adjustment=SameDayAdjustment())
    assert up["baseline_kwh"].to_list() == pytest.approx([21.75, 21.75])
    assert "adjustment_floored:upward_only" in str(one(up, "flags"))
    assert both["baseline_kwh"].to_list() == pytest.approx([17.4, 17.4])


def test_adjustment_switched_off_for_batteries() -> None:
    assets = pl.DataFrame({"asset_id": ["A1"], "technology": ["battery"], "units": [1]})
    out = compute(readings(), event(), PRESETS["mid_8_of_10"],
                  adjustment=SameDayAdjustment(), assets=assets)
    assert out["baseline_kwh"].to_list() == pytest.approx([21.75, 21.75])
    assert "adjustment_off:battery" in str(one(out, "flags"))


# ---------------------------------------------------------------------------- other methods


def test_pre_event_level() -> None:
    """Mean of 15:00–17:00 on 3 Feb (all 30) → 30; with a 1-hour gap, 14:00–16:00 → 30."""
    out = compute(readings(), event(), PreEvent())
    assert out["baseline_kwh"].to_list() == [30.0, 30.0]
    ramp = readings(lambda day, start: float(start.hour))
    assert compute(ramp, event(), PreEvent(window_minutes=60))["baseline_kwh"].to_list() \
        == [16.0, 16.0]  # 16:00 and 16:30 read 16


def test_nominated_profile_and_a_missing_nomination() -> None:
    nominations = pl.DataFrame({
        "asset_id": ["A1"], "event_id": ["E1"], "start": [EVENT_START], "kwh": [42.0]})
    out = compute(readings(), event(), Nominated(), nominations=nominations)
    assert out["baseline_kwh"].to_list() == [42.0, None]
    assert "no_baseline:1_periods_not_nominated" in str(one(out, "flags"))


def test_fixed_and_zero() -> None:
    assert compute(readings(), event(), Fixed(3.5))["baseline_kwh"].to_list() == [3.5, 3.5]
    zero = compute(readings(), event(), Fixed(0.0))
    assert zero["baseline_kwh"].to_list() == [0.0, 0.0]
    assert one(zero, "method") == "zero"


def test_reference_profile_scaled_by_units() -> None:
    """Profile value for 17:00 (slot 34) is 34 × 0.1 = 3.4 kWh per charger; 12 units → 40.8."""
    profile = ReferenceProfile({"ev_charger": tuple(i * 0.1 for i in range(48))})
    assets = pl.DataFrame({"asset_id": ["A1"], "technology": ["ev_charger"], "units": [12]})
    out = compute(readings(), event(), profile, assets=assets)
    assert out["baseline_kwh"].to_list() == pytest.approx([40.8, 42.0])


def test_bad_events_are_all_reported() -> None:
    bad = pl.DataFrame({
        "asset_id": ["A1", "A1"], "event_id": ["E1", "E2"],
        "start": [EVENT_START, EVENT_START + dt.timedelta(minutes=10)],
        "end": [EVENT_START, EVENT_START + dt.timedelta(minutes=70)]})
    with pytest.raises(BaselineInputError) as caught:
        compute(readings(), bad, PRESETS["mid_8_of_10"])
    text = str(caught.value)
    assert "event E1, asset A1): end is not after start" in text
    assert "event E2, asset A1): start 17:10:00 is not on a half hour" in text


def test_every_row_explains_itself() -> None:
    """Method, parameters, days used and eligible count are on every row."""
    out = compute(readings(), event(), PRESETS["mid_8_of_10"])
    assert one(out, "method") == "x_of_y"
    assert '"select":"mid"' in str(one(out, "params"))
    assert len(str(one(out, "selected_days")).split(",")) == 8
    assert one(out, "eligible_days") == 10


def test_categorical_asset_ids_give_the_same_baselines() -> None:
    """Parquet dictionary columns arrive as Categorical and take the code-lookup path; it
    must agree with the string path, and other assets' rows must be ignored."""
    data = pl.concat([readings(), readings(lambda d, s: 99.0, asset="OTHER")])
    as_strings = compute(data, event(), PRESETS["mid_8_of_10"])
    as_categories = compute(data.with_columns(pl.col("asset_id").cast(pl.Categorical)),
                            event(), PRESETS["mid_8_of_10"])
    assert as_categories.equals(as_strings)
    assert as_strings["baseline_kwh"].to_list() == pytest.approx([21.75, 21.75])
