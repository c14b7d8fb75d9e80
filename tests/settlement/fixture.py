"""A small market settled by hand: two FSPs, two contracts, October 2026 (clocks go back
on Sunday 25 October). Every number the tests expect is worked out in
``tests/settlement/test_end_to_end.py``.

Loads are flat, so every X-of-Y baseline equals the flat load: A1 150 kWh, A2 50 kWh and
B1 200 kWh per half hour, from 1 August to 31 October.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl

from contracts.io import ContractBook
from contracts.model import (
    FSP,
    Asset,
    AvailabilityDeclaration,
    BaselineRule,
    Contract,
    Direction,
    PenaltyRule,
    ServiceWindow,
    SystemOperator,
)
from dispatchd.export import DISPATCH_LOG_SCHEMA

LONDON = ZoneInfo("Europe/London")
MONTH = "2026-10"
FLAT_KWH = {"A1": 150.0, "A2": 50.0, "B1": 200.0}
METERS = {"A1": "M-A1", "A2": "M-A2", "B1": "M-B1"}


def local(day: str, time: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"{day}T{time}").replace(tzinfo=LONDON).astimezone(dt.UTC)


def book() -> ContractBook:
    every_day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    c1 = Contract(
        id="C1", so="SO1", fsp="FSPA", zone="Z1", service="secure",
        direction=Direction.TURN_DOWN, contracted_mw=0.5,
        start_date=dt.date(2026, 1, 1), end_date=dt.date(2026, 12, 31),
        windows=(ServiceWindow(days=every_day, start_time=dt.time(16),
                               end_time=dt.time(20)),),
        availability_price=Decimal("10.005"), utilisation_price=Decimal("200"),
        baseline=BaselineRule(method="10_of_10"), assets=("A1", "A2"))
    c2 = Contract(
        id="C2", so="SO1", fsp="FSPB", zone="Z2", service="sustain",
        direction=Direction.TURN_UP, contracted_mw=1.0,
        start_date=dt.date(2026, 1, 1), end_date=dt.date(2026, 12, 31),
        windows=(ServiceWindow(days=("sat", "sun"), start_time=dt.time(10),
                               end_time=dt.time(14)),),
        availability_price=Decimal("5"), utilisation_price=Decimal("100"),
        baseline=BaselineRule(method="10_of_10"),
        penalty=PenaltyRule(kind="shortfall", params={"price_per_mwh": "50"}),
        assets=("B1",))
    return ContractBook(
        system_operators={"SO1": SystemOperator(id="SO1", name="Test DSO")},
        fsps={f: FSP(id=f, name=f"Flex {f}") for f in ("FSPA", "FSPB")},
        assets={
            "A1": Asset(id="A1", fsp="FSPA", meter_id="M-A1", zone="Z1",
                        technology="industrial_load", import_kw=400, export_kw=0),
            "A2": Asset(id="A2", fsp="FSPA", meter_id="M-A2", zone="Z1",
                        technology="heat_pump", import_kw=200, export_kw=0),
            "B1": Asset(id="B1", fsp="FSPB", meter_id="M-B1", zone="Z2",
                        technology="industrial_load", import_kw=1000, export_kw=0),
        },
        contracts={"C1": c1, "C2": c2},
        declarations={"C1": (AvailabilityDeclaration(
            contract_id="C1", start=local("2026-10-05", "16:00"),
            end=local("2026-10-05", "18:00"), available_mw=0.3),)},
    )


# Metered deviations from the flat load during the dispatches: {(asset, UTC start): kWh}.
RESPONSES: dict[tuple[str, dt.datetime], float] = {}


def _respond(asset: str, day: str, start: str, halves: int, kwh: float) -> None:
    first = local(day, start)
    for i in range(halves):
        RESPONSES[asset, first + dt.timedelta(minutes=30 * i)] = kwh


_respond("A1", "2026-10-06", "17:00", 2, 50.0)    # I1: A1 150 → 50
_respond("A2", "2026-10-06", "17:00", 2, 30.0)    #     A2 50 → 30
_respond("A1", "2026-10-25", "17:00", 3, 0.0)     # I2: A1 150 → 0 (clock-change day)
_respond("A1", "2026-10-13", "18:00", 2, 140.0)   # I3: A1 150 → 140, A2 unchanged
_respond("B1", "2026-10-10", "11:00", 2, 500.0)   # I4: B1 200 → 500 (turn-up)


def meter_rows(*, skip: set[tuple[str, dt.date]] = frozenset()) -> pl.DataFrame:  # type: ignore[assignment]
    """Half-hourly readings 1 Aug – 31 Oct 2026 in the intake's columns (UTC offsets),
    leaving out ``(asset, local date)`` pairs in ``skip``."""
    start = local("2026-08-01", "00:00")
    end = local("2026-11-01", "00:00")
    rows: dict[str, list[Any]] = {"meter_id": [], "period_start": [], "kwh": []}
    for asset, flat in FLAT_KWH.items():
        moment = start
        while moment < end:
            if (asset, moment.astimezone(LONDON).date()) not in skip:
                rows["meter_id"].append(METERS[asset])
                rows["period_start"].append(moment.isoformat())
                rows["kwh"].append(RESPONSES.get((asset, moment), flat))
            moment += dt.timedelta(minutes=30)
    return pl.DataFrame(rows)


def _instruction(iid: str, contract: str, fsp: str, assets: list[str], direction: str,
                 mw: float, start: dt.datetime, end: dt.datetime, state: str,
                 **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in DISPATCH_LOG_SCHEMA}
    row |= {"id": iid, "revision": 0, "kind": "instruct", "latest": True, "so": "SO1",
            "fsp": fsp, "contract_id": contract, "assets": assets, "direction": direction,
            "capacity_mw": mw, "start": start, "end": end,
            "issued_at": start - dt.timedelta(hours=1),
            "respond_by": start - dt.timedelta(minutes=30),
            "accepted_at": start - dt.timedelta(hours=1), "state": state, "test": False,
            "reconciliation": "direct"}
    return row | extra


def dispatch_log(*extra_rows: dict[str, Any]) -> pl.DataFrame:
    a, b = ["A1", "A2"], ["B1"]
    rows = [
        _instruction("I1", "C1", "FSPA", a, "turn_down", 0.4, local("2026-10-06", "17:00"),
                     local("2026-10-06", "18:00"), "completed"),
        _instruction("I2", "C1", "FSPA", a, "turn_down", 0.2, local("2026-10-25", "17:00"),
                     local("2026-10-25", "18:30"), "completed"),
        _instruction("I3", "C1", "FSPA", a, "turn_down", 0.5, local("2026-10-13", "18:00"),
                     local("2026-10-13", "19:00"), "completed"),
        _instruction("I4", "C2", "FSPB", b, "turn_up", 0.8, local("2026-10-10", "11:00"),
                     local("2026-10-10", "12:00"), "completed"),
        _instruction("I5", "C2", "FSPB", b, "turn_up", 1.0, local("2026-10-18", "12:00"),
                     local("2026-10-18", "13:00"), "acknowledged_rejected",
                     ack_response="rejected", ack_reason="site closed"),
        _instruction("I6", "C1", "FSPA", a, "turn_down", 0.5, local("2026-10-20", "17:00"),
                     local("2026-10-20", "18:00"), "cancelled", kind="cancel",
                     cancel_reason="constraint cleared"),
        _instruction("I7", "C1", "FSPA", a, "turn_down", 0.5, local("2026-10-21", "17:00"),
                     local("2026-10-21", "18:00"), "completed", test=True),
        *extra_rows,
    ]
    return pl.DataFrame(rows, schema=DISPATCH_LOG_SCHEMA, orient="row")


def write_inputs(directory: Path, *, log: pl.DataFrame | None = None,
                 meters: pl.DataFrame | None = None) -> dict[str, Path]:
    """The contracts file, dispatch log and meter CSV of the fixture under ``directory``."""
    from contracts.io import dump_contracts

    directory.mkdir(parents=True, exist_ok=True)
    paths = {"contracts": directory / "contracts.json",
             "log": directory / "dispatch-log.parquet", "meters": directory / "meters.csv"}
    dump_contracts(book(), paths["contracts"])
    (log if log is not None else dispatch_log()).write_parquet(paths["log"])
    (meters if meters is not None else meter_rows()).write_csv(paths["meters"])
    return paths
