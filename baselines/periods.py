"""Settlement periods: half hours labelled in local time, stored as UTC instants.

Period 1 starts at local midnight; periods count elapsed half hours from there, so a
clocks-forward day has 46 periods, a clocks-back day 50 (the repeated hour gives two
distinct periods), and every other day 48. A reading is stored with its UTC start; its
``(local date, period)`` label is derived from it and the zone, never the other way round.

Baselines match days by *local clock slot* instead (0–47: the local time of day in half
hours), so 17:00 on any day lines up with 17:00 on any other.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from zoneinfo import ZoneInfo

HALF_HOUR = dt.timedelta(minutes=30)
SLOTS = 48
DEFAULT_ZONE = "Europe/London"


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local_midnight_utc(day: dt.date, tz: str = DEFAULT_ZONE) -> dt.datetime:
    """The UTC instant at which ``day`` begins in ``tz``."""
    return dt.datetime.combine(day, dt.time(0), zone(tz)).astimezone(dt.UTC)


def periods_in_day(day: dt.date, tz: str = DEFAULT_ZONE) -> int:
    """48, or 46 on the clocks-forward day, or 50 on the clocks-back day."""
    length = local_midnight_utc(day + dt.timedelta(days=1), tz) - local_midnight_utc(day, tz)
    return int(length / HALF_HOUR)


def period_starts(day: dt.date, tz: str = DEFAULT_ZONE) -> list[dt.datetime]:
    """UTC starts of every settlement period of the local ``day``, period 1 first."""
    first = local_midnight_utc(day, tz)
    return [first + i * HALF_HOUR for i in range(periods_in_day(day, tz))]


def label(start: dt.datetime, tz: str = DEFAULT_ZONE) -> tuple[dt.date, int]:
    """``(local date, period number)`` of the period starting at UTC ``start``.

    Raises ValueError for a naive time or one not on a half-hour boundary."""
    if start.tzinfo is None:
        raise ValueError(f"{start} has no UTC offset")
    start = start.astimezone(dt.UTC)
    if start.minute % 30 or start.second or start.microsecond:
        raise ValueError(f"{start:%Y-%m-%dT%H:%M:%SZ} is not on a half-hour boundary")
    day = start.astimezone(zone(tz)).date()
    return day, int((start - local_midnight_utc(day, tz)) / HALF_HOUR) + 1


def clock_slot(start: dt.datetime, tz: str = DEFAULT_ZONE) -> int:
    """Local time of day of ``start`` in half hours, 0–47."""
    local = start.astimezone(zone(tz))
    return local.hour * 2 + local.minute // 30
