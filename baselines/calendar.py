"""Day types for baselines: weekday, weekend or holiday.

GB bank holidays come from python-holidays, which computes them from the statutory rules
(Banking and Financial Dealings Act 1971 and royal proclamations: Easter, substitute days
when a holiday falls at a weekend, and the one-off days such as 8 May 2020, 2–3 June and
19 September 2022, 8 May 2023), for England & Wales, Scotland and Northern Ireland. Users
can add days of their own (a local holiday, a site shutdown).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import holidays

REGIONS = {"england-and-wales": "ENG", "scotland": "SCT", "northern-ireland": "NIR"}
FIRST_YEAR, LAST_YEAR = 2015, 2035


class DayType(StrEnum):
    WEEKDAY = "weekday"
    WEEKEND = "weekend"
    HOLIDAY = "holiday"


@dataclass(frozen=True)
class Calendar:
    """Which days are holidays. ``region`` is one of :data:`REGIONS`, or None for none."""

    region: str | None = "england-and-wales"
    extra_holidays: frozenset[dt.date] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.region is not None and self.region not in REGIONS:
            raise ValueError(f"unknown region {self.region!r}; use one of {sorted(REGIONS)}")

    @classmethod
    def with_extra(cls, region: str | None, extra: Iterable[dt.date]) -> Calendar:
        return cls(region, frozenset(extra))

    @cached_property
    def _holidays(self) -> frozenset[dt.date]:
        found: set[dt.date] = set(self.extra_holidays)
        if self.region is not None:
            years = range(FIRST_YEAR, LAST_YEAR + 1)
            found |= set(holidays.country_holidays("GB", subdiv=REGIONS[self.region],
                                                   years=years))
        return frozenset(found)

    def is_holiday(self, day: dt.date) -> bool:
        return day in self._holidays

    def day_type(self, day: dt.date) -> DayType:
        if day in self._holidays:
            return DayType.HOLIDAY
        return DayType.WEEKEND if day.weekday() >= 5 else DayType.WEEKDAY

    def is_working_day(self, day: dt.date) -> bool:
        """Weekday baselines draw on working days; weekend and holiday ones on the rest."""
        return self.day_type(day) is DayType.WEEKDAY
