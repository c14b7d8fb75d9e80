"""Settling a month: each step a function from frames to frames, money at the edge.

The steps, in order (:func:`settle` runs them):

1. :func:`classify` — which instructions of the dispatch log are settled this month, which
   count as failures, which are excluded, and why.
2. :func:`requested_periods` — per instruction, asset and half hour: the requested MWh.
3. :func:`baselines_and_meters` — the baseline (``baselines/`` with the contract's method)
   and the metered kWh of each of those asset half hours.
4. :func:`delivered_energy` — delivered = baseline − metered (turn-down) or metered −
   baseline (turn-up), per asset half hour; per instruction half hour, positive-only and
   capped at requested where the contract says so.
5. :func:`performance` — per instruction: delivered / requested, the multiplier, the
   utilisation payment and any penalty.
6. :func:`availability` — per contract: service-window hours × min(declared, contracted)
   MW × price, with the contract's reduction for failed dispatches.
7. :func:`invoice_lines` — per SO × FSP × contract: one availability line, one
   utilisation line per instruction, penalty lines; held back where something blocks them.

Energy is float64 through step 4; from step 5 on, quantities become exact decimals
(``settlement.rules``) and amounts are rounded once per invoice line.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import polars as pl

from baselines.calendar import Calendar
from baselines.compute import BaselineInputError, compute
from baselines.methods import describe
from baselines.periods import HALF_HOUR, zone
from contracts.io import ContractBook
from contracts.model import Contract, Direction, ServiceWindow
from dispatchd.export import month_bounds, month_dates
from settlement.rules import baseline_method, exact, pence, quantity

UTC_TS = pl.Datetime("us", "UTC")
SETTLED_STATES = frozenset({"acknowledged_accepted", "active", "completed"})
FAILED_STATES = {"acknowledged_rejected": "rejected by the FSP",
                 "expired": "not answered by its respond-by time",
                 "accepted": "never answered", "delivered": "never answered"}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Problem:
    """Something that holds invoice lines back, and what to do about it."""

    kind: str
    contract_id: str | None
    """None for a relayed instruction not yet mapped to a contract."""
    instruction_id: str | None
    asset_id: str | None
    detail: str
    action: str


@dataclass(frozen=True)
class Settlement:
    """Everything one month's run computes (all frames sorted, so runs compare byte for byte)."""

    month: str
    instructions: pl.DataFrame
    periods: pl.DataFrame
    asset_periods: pl.DataFrame
    availability: pl.DataFrame
    lines: pl.DataFrame
    problems: pl.DataFrame


# ---------------------------------------------------------------------------- 1. classify


def classify(log: pl.DataFrame, book: ContractBook, month: str, tz: str
             ) -> tuple[pl.DataFrame, list[Problem]]:
    """The latest revision of each instruction starting in ``month``, with ``status``:
    ``settle`` (accepted: delivery is measured), ``failed`` (rejected or unanswered),
    ``cancelled``, ``test`` (excluded) — and ``reason``."""
    begin, end = month_bounds(month, tz)
    latest = log.filter(pl.col("latest") & (pl.col("start") >= begin) & (pl.col("start") < end))
    statuses, reasons = [], []
    problems: list[Problem] = []
    for row in latest.iter_rows(named=True):
        if row["test"]:
            status, reason = "test", "a test instruction: not settled"
        elif row["reconciliation"] == "unmapped":
            status, reason = "blocked", "relayed and not yet mapped to a contract"
        elif row["contract_id"] not in book.contracts:
            status, reason = "blocked", "its contract is not in the contracts file"
            problems.append(Problem("unknown_contract", row["contract_id"], row["id"], None,
                                    reason, "load the contracts file that holds it"))
        elif row["kind"] == "cancel" or row["state"] == "cancelled":
            status, reason = "cancelled", f"cancelled: {row['cancel_reason'] or 'no reason'}"
        elif row["state"] in SETTLED_STATES:
            status, reason = "settle", "accepted by the FSP"
        elif row["state"] in FAILED_STATES:
            status, reason = "failed", FAILED_STATES[row["state"]]
        else:
            status, reason = "cancelled", f"state {row['state']}: not settled"
        statuses.append(status)
        reasons.append(reason)
    classified = latest.with_columns(
        pl.Series("status", statuses, pl.String), pl.Series("reason", reasons, pl.String))
    for row in classified.filter(pl.col("reconciliation") == "unmapped").iter_rows(named=True):
        problems.append(Problem(
            "unreconciled", row["contract_id"], row["id"], None,
            f"relayed from {row['external_platform']} as {row['external_id']}; not mapped",
            "map the external ids (dispatchd relay map) and attach the contract "
            "(dispatchd reconcile), export the dispatch log again and re-run: the "
            "contract's invoice lines wait until then"))
    return classified.sort("id"), problems


# ---------------------------------------------------------------------------- 2. requested


def _weights(book: ContractBook, assets: Iterable[str]) -> dict[str, float]:
    """Each asset's share of an instruction: its rating over the group's (equal if none)."""
    ratings = {a: max(book.assets[a].import_kw, book.assets[a].export_kw)
               if a in book.assets else 0.0 for a in assets}
    total = sum(ratings.values())
    if total <= 0:
        return {a: 1 / len(ratings) for a in ratings}
    return {a: r / total for a, r in ratings.items()}


def requested_periods(instructions: pl.DataFrame, book: ContractBook) -> pl.DataFrame:
    """Per instruction, asset and half hour: ``requested_mwh`` (the instruction's MW, or its
    profile's value, × the part of the half hour it covers × the asset's share)."""
    rows: dict[str, list[Any]] = {k: [] for k in (
        "instruction_id", "asset_id", "period_start", "requested_mwh")}
    for row in instructions.filter(pl.col("status").is_in(["settle", "failed"])) \
            .iter_rows(named=True):
        start, end = row["start"], row["end"]
        first = start - dt.timedelta(minutes=start.minute % 30, seconds=start.second,
                                     microseconds=start.microsecond)
        weights = _weights(book, row["assets"])
        period, index = first, 0
        while period < end:
            covered = (min(end, period + HALF_HOUR) - max(start, period)) / HALF_HOUR
            mw = row["capacity_mw"]
            if row["profile_mw"] is not None:
                profile = row["profile_mw"]
                mw = profile[min(index, len(profile) - 1)]
            for asset, weight in weights.items():
                rows["instruction_id"].append(row["id"])
                rows["asset_id"].append(asset)
                rows["period_start"].append(period)
                rows["requested_mwh"].append(mw * 0.5 * covered * weight)
            period += HALF_HOUR
            index += 1
    return pl.DataFrame(rows, schema={"instruction_id": pl.String, "asset_id": pl.String,
                                      "period_start": UTC_TS, "requested_mwh": pl.Float64})


# ---------------------------------------------------------------------------- 3. baselines


def baselines_and_meters(requested: pl.DataFrame, instructions: pl.DataFrame,
                         book: ContractBook, readings: pl.LazyFrame, *, calendar: Calendar,
                         tz: str, progress: Progress | None = None
                         ) -> tuple[pl.DataFrame, list[Problem]]:
    """``requested`` with ``baseline_kwh``, ``metered_kwh``, ``estimated``, ``method`` and
    ``flags`` per asset half hour. Events are grouped by the contract's baseline method."""
    problems: list[Problem] = []
    events = (requested.group_by("instruction_id", "asset_id")
              .agg(start=pl.col("period_start").min(),
                   end=pl.col("period_start").max() + pl.duration(minutes=30))
              .join(instructions.select(pl.col("id").alias("instruction_id"), "contract_id"),
                    on="instruction_id")
              .sort("instruction_id", "asset_id"))
    assets = pl.DataFrame({"asset_id": list(book.assets),
                           "technology": [a.technology for a in book.assets.values()]})
    groups: dict[str, tuple[Any, Any, list[str]]] = {}
    for contract_id in events["contract_id"].unique().sort().to_list():
        method, adjustment = baseline_method(contract_id,
                                             book.contracts[contract_id].baseline)
        key = describe(method, adjustment)
        groups.setdefault(key, (method, adjustment, []))[2].append(contract_id)
    found = []
    for _key, (method, adjustment, contract_ids) in sorted(groups.items()):
        subset = events.filter(pl.col("contract_id").is_in(contract_ids)).select(
            "asset_id", pl.col("instruction_id").alias("event_id"), "start", "end")
        try:
            rows = compute(readings, subset, method, adjustment=adjustment, assets=assets,
                           calendar=calendar, tz=tz, progress=progress)
        except BaselineInputError as exc:  # a bug of ours: events are built above
            raise RuntimeError(f"baseline events refused: {exc}") from exc
        # The baselines read every event half hour's meter reading in the same pass.
        found.append(rows.select("asset_id", pl.col("event_id").alias("instruction_id"),
                                 "period_start", "baseline_kwh", "metered_kwh", "method",
                                 "flags"))
    base = pl.concat(found) if found else pl.DataFrame(schema={
        "asset_id": pl.String, "instruction_id": pl.String, "period_start": UTC_TS,
        "baseline_kwh": pl.Float64, "metered_kwh": pl.Float64, "method": pl.String,
        "flags": pl.String})
    joined = (requested.join(base, on=["instruction_id", "asset_id", "period_start"],
                             how="left")
              .with_columns(estimated=pl.col("flags").fill_null("")
                            .str.contains("estimated_reads_on_event_day")))
    gaps = (joined.group_by("instruction_id", "asset_id")
            .agg(periods=pl.len(), no_reading=pl.col("metered_kwh").null_count(),
                 no_baseline=pl.col("baseline_kwh").null_count(),
                 flags=pl.col("flags").drop_nulls().unique().sort().str.join(";"))
            .filter((pl.col("no_reading") > 0) | (pl.col("no_baseline") > 0))
            .join(instructions.select(pl.col("id").alias("instruction_id"), "contract_id"),
                  on="instruction_id")
            .sort("instruction_id", "asset_id"))
    for g in gaps.iter_rows(named=True):
        where = (g["contract_id"], g["instruction_id"], g["asset_id"])
        if g["no_reading"] == g["periods"]:
            problems.append(Problem(
                "no_meter_data", *where,
                f"no meter data for asset {g['asset_id']} in any of the instruction's "
                f"{g['periods']} half hours",
                "ingest the FSP's meter data for those days (settlement ingest), then re-run"))
        elif g["no_reading"]:
            problems.append(Problem(
                "missing_meter_data", *where,
                f"asset {g['asset_id']} has no reading for {g['no_reading']} of the "
                f"instruction's {g['periods']} half hours",
                "ingest the missing readings, then re-run"))
        if g["no_baseline"]:
            flags = ";".join(sorted({f for f in (g["flags"] or "").split(";") if f}))
            problems.append(Problem(
                "no_baseline", *where,
                f"no baseline for asset {g['asset_id']} ({flags or 'no history'})",
                "ingest enough history before the event (the baseline method's lookback), "
                "or agree another baseline method for the contract, then re-run"))
    return joined.sort("instruction_id", "asset_id", "period_start"), problems


# ---------------------------------------------------------------------------- 4. delivered


def delivered_energy(asset_periods: pl.DataFrame, instructions: pl.DataFrame,
                     book: ContractBook) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per asset half hour ``delivered_mwh``; per instruction half hour the sums and
    ``counted_mwh`` (positive-only and capped per the contract). A half hour missing any
    asset's baseline or reading has null delivered energy."""
    rules = pl.DataFrame({
        "contract_id": list(book.contracts),
        "turn_up": [c.direction is Direction.TURN_UP for c in book.contracts.values()],
        "positive_only": [c.performance.positive_only for c in book.contracts.values()],
        "cap": [c.performance.cap_at_requested for c in book.contracts.values()],
    })
    info = instructions.select(pl.col("id").alias("instruction_id"), "contract_id") \
        .join(rules, on="contract_id", how="left")
    assets = asset_periods.join(info.select("instruction_id", "turn_up"), on="instruction_id") \
        .with_columns(delivered_mwh=(
            pl.when(pl.col("turn_up"))
            .then(pl.col("metered_kwh") - pl.col("baseline_kwh"))
            .otherwise(pl.col("baseline_kwh") - pl.col("metered_kwh")) / 1000)).drop("turn_up")
    periods = (assets.group_by("instruction_id", "period_start")
               .agg(pl.col("requested_mwh").sum(),
                    baseline_mwh=pl.col("baseline_kwh").sum() / 1000,
                    metered_mwh=pl.col("metered_kwh").sum() / 1000,
                    delivered_mwh=pl.when(pl.col("delivered_mwh").null_count() == 0)
                    .then(pl.col("delivered_mwh").sum()),
                    estimated=pl.col("estimated").any())
               .join(info, on="instruction_id")
               .with_columns(counted_mwh=pl.col("delivered_mwh"))
               .with_columns(counted_mwh=pl.when(pl.col("positive_only"))
                             .then(pl.col("counted_mwh").clip(lower_bound=0))
                             .otherwise(pl.col("counted_mwh")))
               # min_horizontal skips nulls: a half hour without a measurement must stay null
               .with_columns(counted_mwh=pl.when(pl.col("cap") & pl.col("counted_mwh")
                                                 .is_not_null())
                             .then(pl.min_horizontal("counted_mwh", "requested_mwh"))
                             .otherwise(pl.col("counted_mwh")))
               .with_columns(paid_mwh=pl.when(pl.col("counted_mwh").is_not_null())
                             .then(pl.min_horizontal("counted_mwh", "requested_mwh")))
               .drop("turn_up", "positive_only", "cap", "contract_id")
               .sort("instruction_id", "period_start"))
    return assets, periods


# ---------------------------------------------------------------------------- 5. performance


def performance(instructions: pl.DataFrame, periods: pl.DataFrame, book: ContractBook,
                held: set[str]) -> pl.DataFrame:
    """Per instruction: requested, delivered (counted) and paid MWh, performance,
    multiplier, ``failed``, and the utilisation and penalty amounts (unrounded £, as text)."""
    sums = {r["instruction_id"]: r for r in periods.group_by("instruction_id").agg(
        pl.col("requested_mwh").sum(),
        counted_mwh=pl.when(pl.col("counted_mwh").null_count() == 0)
        .then(pl.col("counted_mwh").sum()),
        paid_mwh=pl.when(pl.col("paid_mwh").null_count() == 0).then(pl.col("paid_mwh").sum()),
    ).iter_rows(named=True)}
    out: dict[str, list[Any]] = {k: [] for k in (
        "requested_mwh", "delivered_mwh", "performance", "multiplier", "failed",
        "utilisation", "penalty", "held")}
    for row in instructions.iter_rows(named=True):
        contract = book.contracts.get(row["contract_id"])
        summed = sums.get(row["id"])
        requested = quantity(summed["requested_mwh"]) if summed else Decimal(0)
        measured = summed is not None and summed["counted_mwh"] is not None
        delivered = quantity(summed["counted_mwh"]) if measured and summed else None
        paid = quantity(summed["paid_mwh"]) if measured and summed else None
        perf = mult = None
        failed = row["status"] == "failed"
        utilisation = penalty = Decimal(0)
        if contract is not None and row["status"] == "settle" and delivered is not None:
            perf = delivered / requested if requested else Decimal(0)
            perf = perf.quantize(Decimal("0.000001"))
            mult = contract.performance.multiplier(perf)
            below = contract.availability.failure_below
            failed = perf < (below if below is not None else contract.performance.floor)
            utilisation = (paid or Decimal(0)) * contract.utilisation_price * mult
        if contract is not None and failed:
            penalty = _penalty(contract, requested, delivered or Decimal(0))
        out["requested_mwh"].append(exact(requested))
        out["delivered_mwh"].append(None if delivered is None else exact(delivered))
        out["performance"].append(None if perf is None else exact(perf))
        out["multiplier"].append(None if mult is None else exact(mult.quantize(
            Decimal("0.000001"))))
        out["failed"].append(failed)
        out["utilisation"].append(exact(utilisation))
        out["penalty"].append(exact(penalty))
        out["held"].append(row["id"] in held or row["status"] == "blocked")
    return instructions.with_columns(
        pl.Series(name, values, pl.Boolean if name in ("failed", "held") else pl.String)
        for name, values in out.items())


def _penalty(contract: Contract, requested: Decimal, delivered: Decimal) -> Decimal:
    rule = contract.penalty
    if rule.kind == "shortfall":
        return max(Decimal(0), requested - delivered) * Decimal(str(
            rule.params["price_per_mwh"]))
    if rule.kind == "per_failure":
        return Decimal(str(rule.params["amount"]))
    return Decimal(0)


# ---------------------------------------------------------------------------- 6. availability


def _occurrences(contract: Contract, month: str) -> tuple[tuple[dt.datetime, dt.datetime], ...]:
    """Every service-window occurrence starting on a local day of ``month`` (UTC)."""
    return _window_occurrences(contract.windows, contract.timezone, contract.start_date,
                               contract.end_date, month)


@functools.lru_cache(maxsize=256)
def _window_occurrences(windows: tuple[ServiceWindow, ...], tz: str, start_date: dt.date,
                        end_date: dt.date, month: str
                        ) -> tuple[tuple[dt.datetime, dt.datetime], ...]:
    """Contracts sharing their windows and dates share this (markets reuse window sets)."""
    first, after = month_dates(month)
    local = zone(tz)
    found = []
    day = max(first, start_date)
    last = min(after - dt.timedelta(days=1), end_date)
    while day <= last:
        for window in windows:
            lo, hi = window.start_date or start_date, window.end_date or end_date
            if not lo <= day <= hi or ("mon", "tue", "wed", "thu", "fri", "sat",
                                       "sun")[day.weekday()] not in window.days:
                continue
            end_day = day if window.end_time > window.start_time else day + dt.timedelta(1)
            found.append((dt.datetime.combine(day, window.start_time, local).astimezone(dt.UTC),
                          dt.datetime.combine(end_day, window.end_time, local)
                          .astimezone(dt.UTC)))
        day += dt.timedelta(days=1)
    return tuple(sorted(found))


def availability(book: ContractBook, instructions: pl.DataFrame, month: str, tz: str
                 ) -> pl.DataFrame:
    """Per contract and service-window occurrence in the month: hours, the MW paid for
    (min(declared, contracted), per declaration segment), the amount, and the share
    forfeited for a failed dispatch."""
    failures: dict[str, list[dt.datetime]] = {}
    for row in instructions.filter(pl.col("failed")).iter_rows(named=True):
        failures.setdefault(row["contract_id"], []).append(row["start"])
    cols: dict[str, list[Any]] = {k: [] for k in (
        "contract_id", "window_start", "window_end", "mw_hours", "declared", "forfeited",
        "amount")}
    local = zone(tz)
    for contract in sorted(book.contracts.values(), key=lambda c: c.id):
        declarations = book.declarations.get(contract.id, ())
        failed_at = failures.get(contract.id, [])
        contracted = Decimal(repr(contract.contracted_mw))
        rule = contract.availability
        for start, end in _occurrences(contract, month):
            cuts = sorted({start, end} | {t for d in declarations for t in (d.start, d.end)
                                          if start < t < end}) if declarations else (start, end)
            mw_hours = Decimal(0)
            declared_any = False
            for a, b in itertools.pairwise(cuts):
                overlapping = [d.available_mw for d in declarations if d.start < b and a < d.end]
                if overlapping:
                    declared_any = True
                    mw = min(Decimal(repr(min(overlapping))), contracted)
                else:
                    mw = contracted if rule.undeclared == "contracted" else Decimal(0)
                mw_hours += mw * quantity((b - a) / dt.timedelta(hours=1))
            forfeited = Decimal(0)
            if rule.failed_dispatch != "none" and any(
                    rule.failed_dispatch == "month"
                    or (rule.failed_dispatch == "window" and start <= t < end)
                    or (rule.failed_dispatch == "day" and t.astimezone(local).date()
                        == start.astimezone(local).date())
                    for t in failed_at):
                forfeited = rule.reduction
            cols["contract_id"].append(contract.id)
            cols["window_start"].append(start)
            cols["window_end"].append(end)
            cols["mw_hours"].append(exact(mw_hours))
            cols["declared"].append(declared_any)
            cols["forfeited"].append(exact(forfeited))
            cols["amount"].append(exact(mw_hours * contract.availability_price
                                        * (1 - forfeited)))
    return pl.DataFrame(cols, schema={
        "contract_id": pl.String, "window_start": UTC_TS, "window_end": UTC_TS,
        "mw_hours": pl.String, "declared": pl.Boolean, "forfeited": pl.String,
        "amount": pl.String})


# ---------------------------------------------------------------------------- 7. invoice


def invoice_lines(book: ContractBook, instructions: pl.DataFrame,
                  windows: pl.DataFrame, problems: list[Problem], month: str) -> pl.DataFrame:
    """One row per invoice line; ``amount_pence`` is the line rounded once to the penny."""
    blocked_contracts = {p.contract_id: p.detail for p in problems
                         if p.kind in ("unreconciled", "unknown_contract")}
    held_instructions: dict[str, str] = {}
    waiting: dict[str, str] = {}
    for p in problems:
        if p.instruction_id:
            held_instructions.setdefault(p.instruction_id, p.detail)
            contract = book.contracts.get(p.contract_id)
            if contract is not None and contract.availability.failed_dispatch != "none":
                waiting.setdefault(p.contract_id, f"waits for instruction {p.instruction_id}, "
                                   "whose outcome may reduce availability: " + p.detail)
    lines: list[dict[str, Any]] = []

    def add(contract: Contract, kind: str, instruction_id: str | None, description: str,
            qty: Decimal, unit: str, rate: Decimal, amount: Decimal, hold: str | None) -> None:
        hold = blocked_contracts.get(contract.id, hold)
        lines.append({
            "line_id": f"{month}:{contract.id}:{kind}" + (f":{instruction_id}"
                                                        if instruction_id else ""),
            "month": month, "so": contract.so, "fsp": contract.fsp, "contract_id": contract.id,
            "kind": kind, "instruction_id": instruction_id, "description": description,
            "quantity": exact(qty), "unit": unit, "rate": exact(rate),
            "amount_pence": pence(amount), "status": "held" if hold else "payable",
            "hold_reason": hold,
        })

    by_contract = {c: part for (c,), part in windows.partition_by(
        "contract_id", as_dict=True).items()} if windows.height else {}
    for contract in sorted(book.contracts.values(), key=lambda c: c.id):
        part = by_contract.get(contract.id)
        if part is None or part.height == 0:
            continue
        mw_hours = sum((Decimal(x) for x in part["mw_hours"]), Decimal(0))
        amount = sum((Decimal(x) for x in part["amount"]), Decimal(0))
        forfeited = sum(1 for x in part["forfeited"] if Decimal(x) > 0)
        add(contract, "availability", None,
            f"availability {month}: {part.height} service windows"
            + (f", {forfeited} reduced for a failed dispatch" if forfeited else ""),
            mw_hours, "MW·h", contract.availability_price, amount, waiting.get(contract.id))
    for row in instructions.filter(pl.col("status").is_in(["settle", "failed"])) \
            .sort("contract_id", "id").iter_rows(named=True):
        contract = book.contracts[row["contract_id"]]
        hold = held_instructions.get(row["id"])
        if row["status"] == "settle":
            paid_note = f"performance {row['performance'] or 'unmeasured'}, multiplier " \
                        f"{row['multiplier'] or '-'}"
            add(contract, "utilisation", row["id"], f"utilisation {row['id']}: {paid_note}",
                Decimal(row["delivered_mwh"] or 0), "MWh",
                contract.utilisation_price * Decimal(row["multiplier"] or 0),
                Decimal(row["utilisation"]), hold)
        if Decimal(row["penalty"]) != 0:
            add(contract, "penalty", row["id"],
                f"penalty {row['id']} ({contract.penalty.kind}): {row['reason']}"
                if row["status"] == "failed" else
                f"penalty {row['id']} ({contract.penalty.kind}): performance "
                f"{row['performance']}",
                Decimal(1), "dispatch", -Decimal(row["penalty"]), -Decimal(row["penalty"]),
                hold)
    schema = {"line_id": pl.String, "month": pl.String, "so": pl.String, "fsp": pl.String,
              "contract_id": pl.String, "kind": pl.String, "instruction_id": pl.String,
              "description": pl.String, "quantity": pl.String, "unit": pl.String,
              "rate": pl.String, "amount_pence": pl.Int64, "status": pl.String,
              "hold_reason": pl.String}
    return pl.DataFrame(lines, schema=schema, orient="row").sort("line_id") if lines else \
        pl.DataFrame(schema=schema)


def payable_and_held(lines: pl.DataFrame) -> tuple[int, int]:
    """The payable and the held total of ``lines``, in integer pence."""
    return tuple(int(lines.filter(pl.col("status") == status)["amount_pence"].sum())
                 for status in ("payable", "held"))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- all


def settle(book: ContractBook, log: pl.DataFrame, readings: pl.LazyFrame, month: str, *,
           tz: str = "Europe/London", calendar: Calendar | None = None,
           progress: Progress | None = None) -> Settlement:
    """Run every step for ``month``; see the module docstring."""
    calendar = calendar or Calendar()
    instructions, problems = classify(log, book, month, tz)
    requested = requested_periods(instructions, book)
    if progress is not None:
        progress("requested energy", requested.height, requested.height)
    asset_periods, more = baselines_and_meters(requested, instructions, book, readings,
                                               calendar=calendar, tz=tz, progress=progress)
    problems += more
    asset_periods, periods = delivered_energy(asset_periods, instructions, book)
    held = {p.instruction_id for p in problems if p.instruction_id}
    instructions = performance(instructions, periods, book, held)
    windows = availability(book, instructions, month, tz)
    if progress is not None:
        progress("availability", windows.height, windows.height)
    lines = invoice_lines(book, instructions, windows, problems, month)
    problem_frame = pl.DataFrame(
        [p.__dict__ for p in problems],
        schema={"kind": pl.String, "contract_id": pl.String, "instruction_id": pl.String,
                "asset_id": pl.String, "detail": pl.String, "action": pl.String},
        orient="row").sort("contract_id", "instruction_id", "asset_id", "kind",
                           nulls_last=True)
    return Settlement(month, instructions, periods, asset_periods, windows, lines,
                      problem_frame)
