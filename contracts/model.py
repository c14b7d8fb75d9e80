"""The contract model both dispatch and settlement read (DESIGN §2).

Every value is frozen: a changed contract is a new contracts file, never an edit in place.
The canonical file format is JSON (see ``docs/contracts-format.md``); its schema is
:func:`contracts_json_schema`, generated from these models.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
"""Identifiers: letters, digits and ``_ . : -`` (they appear in MQTT topics and URLs)."""

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Frozen(BaseModel):
    """Base of every model value: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Direction(StrEnum):
    TURN_DOWN = "turn_down"
    """Less import or more export."""
    TURN_UP = "turn_up"
    """More import or less export."""


class Channel(StrEnum):
    MQTT = "mqtt"
    WEBSOCKET = "websocket"
    EMAIL = "email"
    WEBHOOK = "webhook"


class SystemOperator(Frozen):
    id: Id
    name: str = Field(min_length=1)
    escalation_emails: tuple[str, ...] = ()
    """Control-room addresses told when an FSP does not answer an instruction in time."""


class Endpoints(Frozen):
    """How an FSP's control centre is reached. Secrets are named, never stored here."""

    channels: tuple[Channel, ...] = (Channel.MQTT,)
    mqtt_username: str | None = None
    """Broker user name for this FSP; defaults to the FSP id."""
    webhook_url: str | None = None
    webhook_secret_env: str | None = None
    """Name of the environment variable holding the webhook signing secret."""

    @field_validator("channels")
    @classmethod
    def _no_repeats(cls, value: tuple[Channel, ...]) -> tuple[Channel, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value


class FSP(Frozen):
    id: Id
    name: str = Field(min_length=1)
    dispatch_emails: tuple[str, ...] = ()
    escalation_emails: tuple[str, ...] = ()
    endpoints: Endpoints = Endpoints()


class Asset(Frozen):
    id: Id
    fsp: Id
    meter_id: str = Field(min_length=1)
    """MPAN-like meter identifier."""
    zone: str = Field(min_length=1)
    """Zone or substation."""
    technology: str = Field(min_length=1)
    import_kw: float = Field(ge=0)
    export_kw: float = Field(ge=0)


class ServiceWindow(Frozen):
    """Times when the service may be called, in the contract's local time zone.

    ``end_time`` at or before ``start_time`` means the window runs past midnight into the
    next day; ``00:00``–``00:00`` is the whole day. ``start_date``/``end_date`` (inclusive)
    default to the contract's own dates.
    """

    days: tuple[str, ...] = WEEKDAYS
    start_time: dt.time
    end_time: dt.time
    start_date: dt.date | None = None
    end_date: dt.date | None = None

    @field_validator("days")
    @classmethod
    def _known_days(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        lowered = tuple(d.lower()[:3] for d in value)
        unknown = [d for d, low in zip(value, lowered, strict=True) if low not in WEEKDAYS]
        if unknown:
            raise ValueError(f"unknown day(s) {unknown}; use {', '.join(WEEKDAYS)}")
        if not lowered:
            raise ValueError("at least one day is needed")
        return lowered

    def occurrences(
        self, around: dt.datetime, zone: ZoneInfo, live: tuple[dt.date, dt.date]
    ) -> list[tuple[dt.datetime, dt.datetime]]:
        """The window's occurrences (local aware start, end) that could contain ``around``."""
        local_day = around.astimezone(zone).date()
        first = max(self.start_date or live[0], live[0])
        last = min(self.end_date or live[1], live[1])
        found = []
        for day in (local_day - dt.timedelta(days=1), local_day):
            if not first <= day <= last or WEEKDAYS[day.weekday()] not in self.days:
                continue
            start = dt.datetime.combine(day, self.start_time, zone)
            end_day = day if self.end_time > self.start_time else day + dt.timedelta(days=1)
            found.append((start, dt.datetime.combine(end_day, self.end_time, zone)))
        return found


class BaselineRule(Frozen):
    method: str = "x_of_y"
    params: dict[str, Any] = Field(default_factory=dict)


class PerformanceRule(Frozen):
    """Delivered/requested → payment multiplier.

    Below ``floor`` the multiplier is 0. From ``floor`` it is ``performance / full``
    (``shape = "proportional"``, the default) or rises from 0 at ``floor`` to 1 at ``full``
    (``shape = "ramp"``); it never exceeds 1. ``cap_at_requested`` counts at most the
    requested energy in each half hour; ``positive_only`` counts a half hour that delivered
    less than nothing as zero (otherwise deliveries are netted).
    """

    floor: Decimal = Field(default=Decimal("0.5"), ge=0, le=1)
    full: Decimal = Field(default=Decimal("1.0"), gt=0)
    shape: Literal["proportional", "ramp"] = "proportional"
    cap_at_requested: bool = True
    positive_only: bool = True

    def multiplier(self, performance: Decimal) -> Decimal:
        if performance < self.floor:
            return Decimal(0)
        if self.shape == "ramp":
            if self.full <= self.floor:
                return Decimal(1)
            return min(Decimal(1), (performance - self.floor) / (self.full - self.floor))
        return min(Decimal(1), performance / self.full)


class AvailabilityRule(Frozen):
    """How availability is paid: hours in service windows × min(declared, contracted) MW.

    ``undeclared``: what an hour without a declaration counts as (``contracted`` MW, or
    ``zero``). A dispatch the FSP failed (performance below ``failure_below``, default the
    performance floor; or rejected or unanswered) forfeits ``reduction`` of the availability
    of its ``failed_dispatch`` scope: the service-window occurrence it fell in (``window``),
    its local day (``day``), the whole month (``month``) or nothing (``none``).
    """

    undeclared: Literal["contracted", "zero"] = "contracted"
    failed_dispatch: Literal["none", "window", "day", "month"] = "window"
    failure_below: Decimal | None = Field(default=None, ge=0, le=1)
    reduction: Decimal = Field(default=Decimal(1), ge=0, le=1)


class PenaltyRule(Frozen):
    """``none``; ``shortfall`` (params ``price_per_mwh``: the undelivered MWh of a failed
    dispatch × that price); or ``per_failure`` (params ``amount``: £ per failed dispatch)."""

    kind: Literal["none", "shortfall", "per_failure"] = "none"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _params(self) -> PenaltyRule:
        needed = {"none": None, "shortfall": "price_per_mwh", "per_failure": "amount"}[self.kind]
        if needed is not None:
            try:
                Decimal(str(self.params[needed]))
            except (KeyError, ArithmeticError) as exc:
                raise ValueError(f"penalty {self.kind} needs params.{needed} (a number)") \
                    from exc
        return self


class Contract(Frozen):
    id: Id
    so: Id
    fsp: Id
    zone: str = Field(min_length=1)
    service: str = Field(min_length=1)
    """e.g. sustain, secure, dynamic, restore — or free text."""
    direction: Direction
    contracted_mw: float = Field(gt=0)
    start_date: dt.date
    end_date: dt.date
    """Inclusive."""
    timezone: str = "Europe/London"
    windows: tuple[ServiceWindow, ...] = Field(min_length=1)
    availability_price: Decimal = Field(ge=0)
    """£ per MW per hour."""
    utilisation_price: Decimal = Field(ge=0)
    """£ per MWh."""
    response_minutes: int = Field(default=15, gt=0)
    """How long the FSP has to accept or reject an instruction."""
    notice_minutes: int = Field(default=0, ge=0)
    min_run_minutes: int = Field(default=0, ge=0)
    max_run_minutes: int | None = Field(default=None, gt=0)
    baseline: BaselineRule = BaselineRule()
    performance: PerformanceRule = PerformanceRule()
    availability: AvailabilityRule = AvailabilityRule()
    penalty: PenaltyRule = PenaltyRule()
    assets: tuple[Id, ...] = Field(min_length=1)
    """Obligated assets."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Contract:
        if self.end_date < self.start_date:
            raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
        if self.max_run_minutes is not None and self.max_run_minutes < self.min_run_minutes:
            raise ValueError("max_run_minutes is below min_run_minutes")
        if len(set(self.assets)) != len(self.assets):
            raise ValueError("an obligated asset is listed twice")
        return self

    @property
    def zoneinfo(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def window_containing(
        self, start: dt.datetime, end: dt.datetime
    ) -> tuple[dt.datetime, dt.datetime] | None:
        """The service window that contains [start, end), if any.

        Occurrences that touch or overlap (a whole-day window on consecutive days, say)
        count as one, so an instruction may run across midnight through them.
        """
        live = (self.start_date, self.end_date)
        days = (end.astimezone(self.zoneinfo).date() - start.astimezone(self.zoneinfo).date()).days
        found = sorted({
            occurrence
            for n in range(days + 1)
            for window in self.windows
            for occurrence in window.occurrences(start + dt.timedelta(days=n), self.zoneinfo,
                                                 live)
        })
        for i, (w_start, w_end) in enumerate(found):
            if not w_start <= start < w_end:
                continue
            for n_start, n_end in found[i + 1:]:
                if n_start > w_end:
                    break
                w_end = max(w_end, n_end)
            if end <= w_end:
                return w_start, w_end
        return None


class AvailabilityDeclaration(Frozen):
    """An FSP's declared MW for a contract over [start, end); 0 MW means unavailable."""

    contract_id: Id
    start: dt.datetime
    end: dt.datetime
    available_mw: float = Field(ge=0)

    @model_validator(mode="after")
    def _aware_and_ordered(self) -> AvailabilityDeclaration:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end need a UTC offset")
        if self.end <= self.start:
            raise ValueError("end is not after start")
        return self


def contracts_json_schema() -> dict[str, Any]:
    """JSON Schema of the canonical contracts file, generated from the models."""
    from contracts.io import ContractsDocument

    return ContractsDocument.model_json_schema()
