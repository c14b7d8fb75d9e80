"""Meter data for the demo fleet: daily load shapes, responses to the dispatches, defects.

Each asset of a dispatched contract gets half-hourly readings from three weeks before the
month until the end of the last dispatch's day: a daily shape by technology (evening peak
for heat pumps and EV chargers, working hours for industrial load, a midday bulge of
export for solar), lower at weekends, with noise. During each dispatch the FSP accepted,
its assets move by their share of the requested MW times a delivery factor drawn per
dispatch (most deliver 80–110%, a few fall short). A second, small file carries defects an
FSP's file really has: an unknown meter, a reading off the half hour, a negative value, a
conflicting repeat, a value beyond the asset's rating — and one asset's readings for a
dispatch day are missing, so that dispatch's line is held.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path

import numpy as np
import polars as pl

from baselines.periods import HALF_HOUR, local_midnight_utc, zone
from contracts.io import ContractBook
from contracts.model import Direction

SETTLED = ("acknowledged_accepted", "active", "completed")


def _shape(technology: str, hours: np.ndarray, weekend: np.ndarray) -> np.ndarray:
    """Fraction of the rating used in each half hour (export negative)."""
    if technology == "solar_pv":
        return -np.clip(np.sin((hours - 6) / 12 * math.pi), 0, None) * 0.7
    if technology in ("heat_pump", "ev_charger"):
        base = 0.25 + 0.35 * np.exp(-((hours - 18.5) ** 2) / 6)
    elif technology == "industrial_load":
        base = np.where((hours >= 7) & (hours < 19), 0.7, 0.3)
    elif technology == "battery":
        base = 0.1 * np.sin(hours / 24 * 2 * math.pi)
    else:
        base = np.full_like(hours, 0.15)
    return np.where(weekend, base * 0.8, base)


def generate(book: ContractBook, log: pl.DataFrame, month: str, out: Path, *,
             seed: int = 7, tz: str = "Europe/London") -> list[Path]:
    """Write the fleet's readings (Parquet) and a file of defects (CSV); returns both."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    latest = log.filter(pl.col("latest") & ~pl.col("test"))
    dispatched = sorted({a for assets in latest["assets"].to_list() for a in assets
                         if a in book.assets})
    first = dt.date.fromisoformat(f"{month}-01") - dt.timedelta(days=21)
    last = max(latest["end"].to_list(), default=local_midnight_utc(first, tz)) \
        .astimezone(local_midnight_utc(first, tz).tzinfo).date()
    start = local_midnight_utc(first, tz)
    stop = local_midnight_utc(last + dt.timedelta(days=2), tz)
    steps = int((stop - start) / HALF_HOUR)
    instant_list = [start + i * HALF_HOUR for i in range(steps)]
    instants = pl.Series("period_start", instant_list, pl.Datetime("us", "UTC"))
    local = instants.dt.convert_time_zone(tz)
    hours = (local.dt.hour() + local.dt.minute() / 60).to_numpy().astype(float)
    weekend = (local.dt.weekday() >= 6).to_numpy()
    index = {t: i for i, t in enumerate(instant_list)}
    frames = []
    loads = {}
    for asset_id in dispatched:
        asset = book.assets[asset_id]
        rating = max(asset.import_kw, asset.export_kw) * 0.5  # kWh per half hour
        load = _shape(asset.technology, hours, weekend) * rating
        loads[asset_id] = load + noise.normal(0, 0.03 * max(rating, 1), steps)
    moved: set[tuple[str, int]] = set()
    for row in latest.filter(pl.col("state").is_in(SETTLED)).iter_rows(named=True):
        factor = rng.uniform(0.8, 1.1) if rng.random() < 0.85 else rng.uniform(0.1, 0.45)
        sign = 1 if row["direction"] == Direction.TURN_UP.value else -1
        assets = [a for a in row["assets"] if a in loads]
        ratings = [max(book.assets[a].import_kw, book.assets[a].export_kw) for a in assets]
        total = sum(ratings) or 1.0
        moment = row["start"] - dt.timedelta(minutes=row["start"].minute % 30,
                                              seconds=row["start"].second,
                                              microseconds=row["start"].microsecond)
        while moment < row["end"]:
            i = index.get(moment)
            if i is not None:
                for asset_id, rating in zip(assets, ratings, strict=True):
                    if (asset_id, i) in moved:  # one response per asset and half hour
                        continue
                    moved.add((asset_id, i))
                    loads[asset_id][i] += sign * row["capacity_mw"] * 500 * factor * rating / total
            moment += HALF_HOUR
    for asset_id in dispatched:
        asset = book.assets[asset_id]
        load = loads[asset_id]
        imports = np.clip(load, 0, asset.import_kw * 0.5)
        exports = np.clip(-load, 0, asset.export_kw * 0.5)
        for flow, values in (("import", imports), ("export", exports)):
            if flow == "export" and asset.export_kw == 0:
                continue
            frames.append(pl.DataFrame({
                "meter_id": asset.meter_id, "period_start": instants, "kwh": values.round(3),
                "flow": flow, "quality": "actual"}))
    fleet = pl.concat(frames)
    settled = latest.filter(pl.col("state").is_in(SETTLED) & (pl.col("assets").list.len() > 0))
    if settled.height and dispatched:
        victim = settled.row(0, named=True)
        meter = book.assets[victim["assets"][0]].meter_id
        day_start = local_midnight_utc(victim["start"].astimezone(zone(tz)).date(), tz)
        fleet = fleet.filter(~((pl.col("meter_id") == meter)
                               & (pl.col("period_start") >= day_start)
                               & (pl.col("period_start") < day_start + dt.timedelta(days=1))))
    out.mkdir(parents=True, exist_ok=True)
    bulk = out / f"fleet-{month}.parquet"
    fleet.write_parquet(bulk)
    defects = out / f"late-corrections-{month}.csv"
    some = book.assets[dispatched[0]] if dispatched else next(iter(book.assets.values()))
    when = start + HALF_HOUR * 10
    lines = ["meter_id,period_start,kwh,flow,quality",
             f"99999999999,{when.isoformat()},1.0,import,actual",
             f"{some.meter_id},{(when + dt.timedelta(minutes=7)).isoformat()},1.0,import,actual",
             f"{some.meter_id},{when.isoformat()},-4,import,actual",
             f"{some.meter_id},{when.isoformat()},{some.import_kw * 2:.1f},import,actual",
             f"{some.meter_id},{(when + HALF_HOUR).isoformat()},{1.234:.3f},import,estimated",
             f"{some.meter_id},{(when + HALF_HOUR).isoformat()},{2.345:.3f},import,estimated"]
    defects.write_text("\n".join(lines) + "\n")
    return [bulk, defects]
