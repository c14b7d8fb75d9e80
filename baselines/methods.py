"""Baseline methods as frozen parameter sets.

Every method answers: what would this asset have used in each half hour of the event had
it not been dispatched? Each is a value; :func:`baselines.compute.compute` applies it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Select = Literal["high", "mid", "all"]


@dataclass(frozen=True)
class XofY:
    """The X-of-Y family.

    Candidates are the ``y`` most recent *eligible* days within ``lookback_days`` before the
    event day, of the same kind as the event day (``match="day_type"``: working day vs
    weekend-or-holiday; ``match="weekday"``: the same day of the week, holidays apart).
    Ineligible: the asset's own event days, days with missing readings (or, with
    ``exclude_estimated``, estimated ones), and, with ``low_usage_fraction``, days whose
    mean is below that fraction of the candidates' average. The candidates are ranked by
    mean load over the event window and ``select`` keeps the top ``x`` (``high``), the middle
    ``x`` (``mid``: drop (n−x)/2 from each end) or all of them (``all``). The baseline per
    half hour is the mean over the kept days at the same local clock time.

    With fewer than ``y`` eligible days, what there is is used (flagged) down to
    ``min_days``; below that there is no baseline, and a flag says why.
    """

    x: int
    y: int
    select: Select = "all"
    lookback_days: int = 45
    min_days: int = 1
    match: Literal["day_type", "weekday"] = "day_type"
    low_usage_fraction: float | None = None
    exclude_estimated: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.x <= self.y:
            raise ValueError(f"need 1 ≤ x ≤ y, got x={self.x} y={self.y}")
        if not 1 <= self.min_days <= self.y:
            raise ValueError(f"need 1 ≤ min_days ≤ y, got {self.min_days}")
        if self.lookback_days < self.y:
            raise ValueError("lookback_days must be at least y")

    name = "x_of_y"


@dataclass(frozen=True)
class SameDayAdjustment:
    """Scale the baseline to the event day's own load just before the event.

    The window is ``window_minutes`` long and ends ``gap_minutes`` before the event starts
    (default: the 3 hours ending 1 hour before). ``additive`` adds mean(metered − baseline)
    over the window, capped at ±``cap`` × the window's mean baseline; ``multiplicative``
    multiplies by Σmetered/Σbaseline, capped to [1 − cap, 1 + cap]. ``upward_only`` never
    lowers the baseline. Technologies in ``off_for`` get no adjustment (a battery's load
    before an event says nothing about its load during it).
    """

    kind: Literal["additive", "multiplicative"] = "additive"
    window_minutes: int = 180
    gap_minutes: int = 60
    cap: float | None = 0.2
    upward_only: bool = False
    off_for: frozenset[str] = field(default_factory=lambda: frozenset({"battery"}))

    def __post_init__(self) -> None:
        if self.window_minutes <= 0 or self.window_minutes % 30 or self.gap_minutes % 30:
            raise ValueError("adjustment window and gap must be whole half hours")


@dataclass(frozen=True)
class PreEvent:
    """The mean metered load over ``window_minutes`` ending ``gap_minutes`` before the start,
    flat across the event."""

    window_minutes: int = 120
    gap_minutes: int = 0
    name = "pre_event"


@dataclass(frozen=True)
class Nominated:
    """The FSP's declared profile, taken from the nominations frame as given."""

    name = "nominated"


@dataclass(frozen=True)
class Fixed:
    """The same kWh in every half hour; ``Fixed(0.0)`` is the zero baseline."""

    kwh: float

    @property
    def name(self) -> str:
        return "zero" if self.kwh == 0 else "fixed"


@dataclass(frozen=True)
class ReferenceProfile:
    """A fixed half-hourly profile per technology (48 kWh values per unit, by local clock
    half hour from midnight), multiplied by the asset's ``units``. GB DNOs publish such
    "fixed reference" profiles for domestic assets, to be multiplied by the number of DERs
    in the group (as described for ElectronConnect submissions, help.electron.net)."""

    profiles: Mapping[str, tuple[float, ...]]
    name = "reference_profile"

    def __post_init__(self) -> None:
        for technology, values in self.profiles.items():
            if len(values) != 48:
                raise ValueError(f"profile for {technology!r} has {len(values)} values, not 48")


Method = XofY | PreEvent | Nominated | Fixed | ReferenceProfile


def describe(method: Method, adjustment: SameDayAdjustment | None = None) -> str:
    """The method and its parameters as compact JSON, for the explainable output."""
    params: dict[str, Any] = {"method": method.name}
    if not isinstance(method, ReferenceProfile):
        params |= asdict(method)
    else:
        params["technologies"] = sorted(method.profiles)
    if adjustment is not None:
        adj = asdict(adjustment)
        adj["off_for"] = sorted(adjustment.off_for)
        params["adjustment"] = adj
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


PRESETS: dict[str, XofY] = {
    # CAISO's "10-in-10" customer load baseline: the mean of the 10 most recent similar
    # non-event days (CAISO Business Practice Manual for Demand Response). Used there with a
    # day-of adjustment capped at ±20%; pass a SameDayAdjustment to match.
    "10_of_10": XofY(x=10, y=10, select="all", lookback_days=45, min_days=5),
    # PJM's economic customer baseline load: the highest 4 of the 5 most recent
    # representative days within a 45-day lookback (PJM Manual 11, Customer Baseline Load).
    "high_4_of_5": XofY(x=4, y=5, select="high", lookback_days=45, min_days=3),
    # GB Balancing and Settlement Code, Baselining Methodology Document (introduced by
    # modification P376): the middle 8 of the 10 most recent like days, with an in-day
    # adjustment.
    "mid_8_of_10": XofY(x=8, y=10, select="mid", lookback_days=45, min_days=5),
    # A simple comparator, not from a particular programme: the same day of the week in
    # each of the previous three weeks.
    "previous_3_weeks": XofY(x=3, y=3, select="all", lookback_days=21, min_days=2,
                             match="weekday"),
}
