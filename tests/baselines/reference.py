"""A plain, obviously-correct X-of-Y, one event at a time, for checking the vectorised one.

It follows the definition in ``baselines.methods.XofY`` literally with dictionaries and
loops; it is slow on purpose and shares no code with ``baselines.compute`` beyond the
period helpers.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from baselines.calendar import Calendar
from baselines.methods import XofY
from baselines.periods import HALF_HOUR, clock_slot, periods_in_day, zone


@dataclass
class Answer:
    baseline: list[float | None]
    days: list[dt.date]
    eligible: int


def reference(readings: list[tuple[str, dt.datetime, float, bool]],
              events: list[tuple[str, str, dt.datetime, dt.datetime]],
              method: XofY, calendar: Calendar, tz: str = "Europe/London"
              ) -> dict[tuple[str, str], Answer]:
    local = zone(tz)
    by_clock: dict[tuple[str, dt.date, int], list[float]] = defaultdict(list)
    count: dict[tuple[str, dt.date], int] = defaultdict(int)
    total: dict[tuple[str, dt.date], float] = defaultdict(float)
    estimated: dict[tuple[str, dt.date], bool] = defaultdict(bool)
    for asset, start, kwh, est in readings:
        day = start.astimezone(local).date()
        by_clock[(asset, day, clock_slot(start, tz))].append(kwh)
        count[(asset, day)] += 1
        total[(asset, day)] += kwh
        estimated[(asset, day)] |= est
    event_days: dict[str, set[dt.date]] = defaultdict(set)
    for asset, _, start, end in events:
        # Every local day holding one of the event's half hours (an event ending at
        # midnight does not touch the next day).
        day = start.astimezone(local).date()
        while day <= (end - HALF_HOUR).astimezone(local).date():
            event_days[asset].add(day)
            day += dt.timedelta(days=1)

    def value(asset: str, day: dt.date, slot: int) -> float | None:
        found = by_clock.get((asset, day, slot))
        return sum(found) / len(found) if found else None

    def at(asset: str, day: dt.date, offset_days: int, slot: int) -> float | None:
        return value(asset, day + dt.timedelta(days=offset_days), slot)

    def alike(a: dt.date, b: dt.date) -> bool:
        if method.match == "weekday":
            return a.weekday() == b.weekday() and calendar.is_holiday(a) == calendar.is_holiday(b)
        return calendar.is_working_day(a) == calendar.is_working_day(b)

    answers = {}
    for asset, event_id, start, end in events:
        event_day = start.astimezone(local).date()
        periods = []
        t = start
        while t < end:
            loc = t.astimezone(local)
            periods.append(((loc.date() - event_day).days, clock_slot(t, tz)))
            t += HALF_HOUR
        eligible = []
        for back in range(1, method.lookback_days + 1):
            day = event_day - dt.timedelta(days=back)
            if not alike(day, event_day) or day in event_days[asset]:
                continue
            if count[(asset, day)] != periods_in_day(day, tz):
                continue
            if method.exclude_estimated and estimated[(asset, day)]:
                continue
            eligible.append(day)
        if method.low_usage_fraction is not None and eligible:
            # A day's mean is the mean of its readings (all 46, 48 or 50 of them).
            means = {day: total[(asset, day)] / count[(asset, day)] for day in eligible}
            average = sum(means.values()) / len(means)
            eligible = [d for d in eligible if not means[d] < method.low_usage_fraction * average]
        candidates = eligible[:method.y]
        n = len(candidates)
        if n < method.min_days:
            answers[(asset, event_id)] = Answer([None] * len(periods), [], n)
            continue

        def window_mean(day: dt.date, asset: str = asset,
                        periods: list[tuple[int, int]] = periods) -> float:
            values = [v for off, s in periods if (v := at(asset, day, off, s)) is not None]
            return sum(values) / len(values) if values else float("-inf")

        ranked = sorted(candidates, key=lambda d: -window_mean(d))  # stable: recent first
        keep = n if method.select == "all" else min(method.x, n)
        first = (n - keep) // 2 if method.select == "mid" else 0
        chosen = ranked[first:first + keep]
        baseline: list[float | None] = []
        for off, slot in periods:
            values = [v for d in chosen if (v := at(asset, d, off, slot)) is not None]
            baseline.append(sum(values) / len(values) if values else None)
        answers[(asset, event_id)] = Answer(baseline, sorted(chosen), n)
    return answers
