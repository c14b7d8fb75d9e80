"""Computing baselines: readings and events in, one explained row per event half hour out.

Input frames (polars; documented in ``docs/baselines.md``):

- **readings**: ``asset_id`` (str), ``start`` (UTC datetime of the half hour), ``kwh``
  (float; zero is a reading, exports are negative), optional ``estimated`` (bool).
- **events**: ``asset_id``, ``event_id`` (str), ``start``, ``end`` (UTC, on half hours).
- **assets** (optional): ``asset_id``, ``technology`` (str), ``units`` (int, default 1).
- **nominations** (for :class:`~baselines.methods.Nominated`): ``asset_id``, ``event_id``,
  ``start``, ``kwh``.

The hot path is vectorised: readings of the assets with events are laid out once as a
dense ``asset × day × half-hour`` array (numpy), and candidate selection, ranking and
means are array operations over all events at once. No per-asset Python loop.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl

from baselines.calendar import Calendar
from baselines.methods import (
    Fixed,
    Method,
    Nominated,
    PreEvent,
    ReferenceProfile,
    SameDayAdjustment,
    XofY,
    describe,
)
from baselines.periods import DEFAULT_ZONE, HALF_HOUR, SLOTS, local_midnight_utc, zone

EXTRA = 2  # slots 48 and 49 hold the second occurrence of the repeated hour
NO_SLOT = -10**9  # padding in relative-slot arrays
_US = 1_000_000
_HALF_HOUR_US = 30 * 60 * _US

OUTPUT_SCHEMA = {
    "asset_id": pl.String,
    "event_id": pl.String,
    "period_start": pl.Datetime("us", "UTC"),
    "local_date": pl.Date,
    "period": pl.Int32,
    "baseline_kwh": pl.Float64,
    "metered_kwh": pl.Float64,
    "unadjusted_kwh": pl.Float64,
    "adjustment": pl.Float64,
    "method": pl.String,
    "params": pl.String,
    "selected_days": pl.String,
    "eligible_days": pl.Int32,
    "flags": pl.String,
}

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` during long computations."""


class BaselineInputError(ValueError):
    """An input frame cannot be used; ``problems`` names each bad row and the reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:30])
        more = f"\n  … and {len(problems) - 30} more" if len(problems) > 30 else ""
        super().__init__(f"{len(problems)} problem(s) in the input:\n{shown}{more}")


# ---------------------------------------------------------------------------- the timeline


@dataclass(frozen=True)
class Timeline:
    """Local days ``first`` … ``first + days - 1`` in ``tz`` and their half hours."""

    first: dt.date
    days: int
    tz: str

    @property
    def t0_us(self) -> int:
        return int(local_midnight_utc(self.first, self.tz).timestamp() * _US)

    def dates(self) -> list[dt.date]:
        return [self.first + dt.timedelta(days=i) for i in range(self.days)]

    @cached_property
    def clock(self) -> tuple[np.ndarray, np.ndarray]:
        """Per half hour of the timeline: day index and local clock slot (0–47; the
        repeated hour's second occurrence maps to the clock slot it repeats)."""
        day_of, slot_of, _, mirror = self.grid
        extra = np.array(mirror, np.int64)
        clock = np.where(slot_of >= SLOTS, extra[np.clip(slot_of - SLOTS, 0, 1)], slot_of)
        return day_of.astype(np.int64), clock.astype(np.int64)

    @cached_property
    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """For every half hour since the first local midnight: its day index and its
        extended clock slot; per day, its number of settlement periods; and which clock
        slots the extra slots 48 and 49 repeat (the hour a clocks-back day has twice)."""
        end = local_midnight_utc(self.first + dt.timedelta(days=self.days), self.tz)
        start = local_midnight_utc(self.first, self.tz)
        count = int((end - start) / HALF_HOUR)
        day_of = np.empty(count, np.int32)
        slot_of = np.empty(count, np.int16)
        tz = zone(self.tz)
        seen: set[tuple[int, int]] = set()
        repeats: dict[int, list[int]] = {}
        mirror = [2, 3]
        for i in range(count):
            local = (start + i * HALF_HOUR).astimezone(tz)
            d = (local.date() - self.first).days
            s = local.hour * 2 + local.minute // 30
            if (d, s) in seen:  # second occurrence of a clock time: the repeated hour
                again = repeats.setdefault(d, [])
                if len(again) < EXTRA:
                    mirror[len(again)] = s
                again.append(s)
                s = SLOTS + len(again) - 1
            seen.add((d, s))
            day_of[i], slot_of[i] = d, s
        periods = np.bincount(day_of, minlength=self.days).astype(np.int32)
        return day_of, slot_of, periods, (mirror[0], mirror[1])


@dataclass
class Dense:
    """Readings of the assets with events at the local clock slots the events need.

    ``values[asset, day, compact[slot]]`` is the reading at clock ``slot`` (0–47) of that
    local day, for the slots listed in ``needed`` (``compact`` is -1 for the others); every
    reading, needed or not, is counted in ``counts`` and summed in ``sums``. On a
    clocks-back day the repeated hour's clock slots hold the mean of its two readings; the
    readings themselves are kept in ``repeated[asset, long day, occurrence, k]``.
    """

    assets: list[str]
    timeline: Timeline
    values: np.ndarray  # float64 [A, D, W]; NaN = no reading
    compact: np.ndarray  # int [48]: position of each clock slot in ``values``, or -1
    repeated: np.ndarray  # float64 [A, L, 2, 2]: per clocks-back day, both readings of
    # each of the two repeated clock slots (``mirror``)
    long_index: np.ndarray  # int [D]: index into ``repeated`` for clocks-back days, else -1
    counts: np.ndarray  # int32 [A, D] readings per day
    sums: np.ndarray  # float64 [A, D] kWh per day (zeros unless laid out with day_sums)
    estimated: np.ndarray  # int32 [A, D] estimated readings per day
    periods: np.ndarray  # int32 [D] settlement periods per day
    mirror: tuple[int, int]  # the clock slots a clocks-back day has twice

    def lookup(self, asset: np.ndarray, days: np.ndarray, rel: np.ndarray) -> np.ndarray:
        """``[E, K, R]``: values of ``asset [E]`` on ``days [E, K]`` (-1: none) at clock
        slots ``rel [E, R]`` relative to each day (NO_SLOT: none); NaN where nothing."""
        day = days[:, :, None] + np.floor_divide(rel, SLOTS)[:, None, :]
        k = self.compact[np.mod(rel, SLOTS)][:, None, :]
        valid = ((days[:, :, None] >= 0) & (rel != NO_SLOT)[:, None, :] & (k >= 0)
                 & (day >= 0) & (day < self.values.shape[1]))
        found = self.values[asset[:, None, None], np.clip(day, 0, self.values.shape[1] - 1),
                            np.clip(k, 0, None)]
        return np.where(valid, found, np.nan)

    def complete(self) -> np.ndarray:
        """``[A, D]``: every settlement period of the day has exactly one reading."""
        return self.counts == self.periods[None, :]

    def day_means(self) -> np.ndarray:
        """``[A, D]``: mean of each day's readings (NaN for a day without any)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)

    def readings_at(self, asset: np.ndarray, p: np.ndarray) -> np.ndarray:
        """The readings of ``asset[i]`` in the half hours ``p[i]`` of the timeline (NaN
        where there is none, or where the slot was not laid out)."""
        day_of, slot_of, _, _ = self.timeline.grid
        day, slot = day_of[p], slot_of[p]
        long = self.long_index[day]
        out = np.full(len(p), np.nan)
        on_long = long >= 0
        second = on_long & (slot >= SLOTS)
        out[second] = self.repeated[asset[second], long[second], 1, slot[second] - SLOTS]
        first = on_long & np.isin(slot, self.mirror)
        which = np.where(slot == self.mirror[1], 1, 0)
        out[first] = self.repeated[asset[first], long[first], 0, which[first]]
        plain = ~second & ~first
        k = self.compact[np.minimum(slot, SLOTS - 1)]
        take = plain & (k >= 0)
        out[take] = self.values[asset[take], day[take], k[take]]
        return out

    def reading(self, asset: int, day: int, slot: int) -> float:
        """The reading at extended slot ``slot`` (48, 49: the repeated hour's second time)."""
        long = self.long_index[day]
        if long >= 0 and slot >= SLOTS:
            return float(self.repeated[asset, long, 1, slot - SLOTS])
        if long >= 0 and slot in self.mirror:
            return float(self.repeated[asset, long, 0, self.mirror.index(slot)])
        k = self.compact[slot]
        return float(self.values[asset, day, k]) if k >= 0 else float("nan")


def _asset_index(ids: list[str], dtype: pl.DataType) -> pl.Expr:
    """Position of each row's ``asset_id`` in ``ids`` (null for other assets).

    A Categorical column with polars' global categories (as Parquet dictionary columns
    read) is mapped through its codes: the codes of ``ids`` come from casting them to the
    same dtype, so no row's string is touched. Anything else goes through an Enum cast,
    about twice as fast as a replace over hundreds of millions of rows."""
    col = pl.col("asset_id")
    if dtype == pl.Categorical():
        codes = pl.Series(ids, dtype=pl.String).cast(dtype).to_physical().to_numpy()
        lookup = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, np.int64)
        lookup[codes] = np.arange(len(ids))
        code = col.to_physical().cast(pl.Int64)
        size = len(lookup)
        found = pl.lit(pl.Series(lookup)).gather(code.clip(0, size - 1))
        return pl.when((code < size) & (found >= 0)).then(found).otherwise(None)
    return col.cast(pl.String).cast(pl.Enum(ids), strict=False).to_physical().cast(pl.Int64)


def _chunks(query: pl.LazyFrame, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The query's result, chunk by chunk, as numpy arrays viewing polars' own memory.

    A streamed batch is made of many small chunks; ``Series.to_numpy`` would concatenate
    (copy) them, which costs seconds over hundreds of millions of rows."""
    for batch in query.collect_batches(chunk_size=rows):
        for chunk in batch.to_arrow().to_batches():
            yield {name: column.to_numpy(zero_copy_only=False)
                   for name, column in zip(chunk.schema.names, chunk.columns, strict=True)}


def lay_out(readings: pl.LazyFrame | pl.DataFrame, assets: list[str], timeline: Timeline,
            needed: Iterable[int] = range(SLOTS), *, day_sums: bool = True,
            progress: Progress | None = None, batch_rows: int = 8_000_000) -> Dense:
    """Lay ``readings`` of ``assets`` out at the ``needed`` clock slots; count every reading
    per day, and with ``day_sums`` sum them too. Rows of other assets or outside the
    timeline are skipped. Memory: one float64 per asset, day and needed slot."""
    day_of, slot_of, periods, mirror = timeline.grid
    n_assets, n_days = len(assets), timeline.days
    compact = np.full(SLOTS, -1, np.int64)
    wanted = sorted(set(int(x) for x in needed))
    compact[wanted] = np.arange(len(wanted))
    width = max(len(wanted), 1)
    values = np.full((n_assets, n_days, width), np.nan)
    flat_values = values.reshape(-1)
    long_days = np.flatnonzero(periods == SLOTS + EXTRA)
    long_index = np.full(n_days, -1, np.int64)
    long_index[long_days] = np.arange(len(long_days))
    repeated = np.full((n_assets, len(long_days), 2, EXTRA), np.nan)
    # Where each half hour of the timeline goes: its clock slot, and for the repeated hour
    # which occurrence it is (0 first, 1 second; -1 for every other half hour).
    day_of64, clock_of = timeline.clock
    occurrence = np.full(len(day_of), -1, np.int64)
    on_long = long_index[day_of] >= 0
    occurrence[on_long & (slot_of >= SLOTS)] = 1
    occurrence[on_long & np.isin(slot_of, mirror)] = 0
    which = np.where(slot_of >= SLOTS, slot_of - SLOTS,
                     np.where(slot_of == mirror[1], 1, 0)).astype(np.int64)
    # Position of each half hour's value in a day's row of ``values`` (-1: not needed).
    position = compact[clock_of]
    cells = n_assets * n_days
    counts = np.zeros(cells, np.int64)
    sums = np.zeros(cells)
    estimated = np.zeros(cells, np.int64)
    lazy = readings.lazy() if isinstance(readings, pl.DataFrame) else readings
    schema = lazy.collect_schema()
    has_estimated = "estimated" in schema
    t0, horizon = timeline.t0_us, len(day_of)
    # The index arithmetic runs in polars (all cores); numpy only counts and scatters.
    half_hour = (pl.col("start").dt.epoch("us") - t0) // _HALF_HOUR_US
    day = pl.lit(pl.Series(day_of64)).gather(pl.col("p"))
    at = pl.lit(pl.Series(position)).gather(pl.col("p"))
    prepared = lazy.with_columns(
        _asset_index(assets, schema["asset_id"]).alias("a"), half_hour.alias("p"),
    ).filter(pl.col("a").is_not_null() & (pl.col("p") >= 0) & (pl.col("p") < horizon)
             ).select(
        "p", "a",
        (pl.col("a") * n_days + day).alias("cell"),
        pl.col("kwh").cast(pl.Float64),
        *([pl.col("estimated").fill_null(False)] if has_estimated else []),
    ).with_columns(
        pl.when(at >= 0).then(pl.col("cell") * width + at).otherwise(-1).alias("at"))
    if values.size < 2**31:  # narrower columns: less to copy out of polars per batch
        prepared = prepared.with_columns(pl.col("cell", "at").cast(pl.Int32))
    done = 0
    for batch in _chunks(prepared, batch_rows):
        cell = batch["cell"]
        kwh = batch["kwh"]
        target = batch["at"]
        keep = target >= 0
        if len(long_days):
            p = batch["p"]
            occ = occurrence[p]
            rep = occ >= 0
            a = batch["a"]
            repeated[a[rep], long_index[day_of64[p[rep]]], occ[rep], which[p[rep]]] = kwh[rep]
            keep &= occ != 1  # second occurrences live only in ``repeated``
        flat_values[target[keep]] = kwh[keep]
        # Count over the batch's own range of cells: small when readings come grouped by
        # meter, as meter data usually does; the whole range otherwise.
        low, high = int(cell.min()), int(cell.max()) + 1
        counts[low:high] += np.bincount(cell - low, minlength=high - low)
        if day_sums:
            sums[low:high] += np.bincount(cell - low, weights=kwh, minlength=high - low)
        if has_estimated:
            est = batch["estimated"]
            if est.any():
                estimated[low:high] += np.bincount(cell[est] - low, minlength=high - low)
        done += len(cell)
        if progress is not None:
            progress("lay out readings", done, 0)
    for long, long_day in enumerate(long_days):
        for k, slot in enumerate(mirror):
            if compact[slot] < 0:
                continue
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                values[:, long_day, compact[slot]] = np.nanmean(repeated[:, long, :, k], axis=1)
    return Dense(assets, timeline, values, compact, repeated, long_index,
                 counts.reshape(n_assets, n_days).astype(np.int32),
                 sums.reshape(n_assets, n_days),
                 estimated.reshape(n_assets, n_days).astype(np.int32), periods, mirror)


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Events:
    """Validated events with their positions on the timeline."""

    asset_id: list[str]
    event_id: list[str]
    start: list[dt.datetime]
    asset: np.ndarray  # [E] index into Dense.assets
    day: np.ndarray  # [E] event day (local date of start) as a timeline index
    p0: np.ndarray  # [E] half hours from the timeline's first midnight to the start
    length: np.ndarray  # [E] number of event periods
    rel: np.ndarray  # [E, R] clock slot of each event period relative to the event day
    # (padded with NO_SLOT); consecutive except across a clock change
    end_day: np.ndarray  # [E] local date of the last period, as a timeline index

    def periods(self, e: int) -> list[dt.datetime]:
        return [self.start[e] + i * HALF_HOUR for i in range(int(self.length[e]))]


def _check_events(events: pl.DataFrame) -> list[str]:
    """Every unusable event row, described; checked with column expressions, so only the
    failing rows are visited one by one."""
    missing = [c for c in ("asset_id", "event_id", "start", "end") if c not in events.columns]
    if missing:
        return [f"events: missing column {c!r}" for c in missing]
    for column in ("start", "end"):
        dtype = events.schema[column]
        if not isinstance(dtype, pl.Datetime) or dtype.time_zone is None:
            return [f"events: {column} must be a datetime with a time zone (UTC), not {dtype}"]

    def off_half_hour(column: str) -> pl.Expr:
        value = pl.col(column)
        return (value.dt.minute() % 30 != 0) | (value.dt.second() != 0) | \
            (value.dt.microsecond() != 0)

    checked = events.with_row_index("row").with_columns(
        (pl.col("start").is_null() | pl.col("end").is_null()).alias("null_time"),
        (pl.col("end") <= pl.col("start")).alias("backwards"),
        off_half_hour("start").alias("start_off"),
        off_half_hour("end").alias("end_off"),
        pl.struct("asset_id", "event_id").is_duplicated().alias("twice"),
    )
    flags = ["null_time", "backwards", "start_off", "end_off", "twice"]
    problems = []
    for row in checked.filter(pl.any_horizontal(flags)).iter_rows(named=True):
        where = f"events row {row['row']} (event {row['event_id']}, asset {row['asset_id']})"
        if row["null_time"]:
            problems.append(f"{where}: start and end need UTC times")
            continue
        if row["backwards"]:
            problems.append(f"{where}: end is not after start")
        for name in ("start", "end"):
            if row[f"{name}_off"]:
                problems.append(f"{where}: {name} {row[name]:%H:%M:%S} is not on a half hour")
        if row["twice"]:
            problems.append(f"{where}: listed twice")
    return problems


def _timeline_for(events: pl.DataFrame, lookback: int, tz: str) -> Timeline:
    span = events.select(
        pl.col("start").dt.convert_time_zone(tz).dt.date().min().alias("first"),
        pl.col("end").dt.convert_time_zone(tz).dt.date().max().alias("last"),
    ).row(0)
    first = span[0] - dt.timedelta(days=lookback + 1)
    return Timeline(first, (span[1] - first).days + 2, tz)


def relative_slots(timeline: Timeline, p: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Clock slots of half hours ``p [E, R]`` (timeline positions; negative = padding)
    relative to each row's event day ``day [E]``: the same clock time a day later is 48
    further on."""
    day_of, clock = timeline.clock
    inside = (p >= 0) & (p < len(day_of))
    q = np.clip(p, 0, len(day_of) - 1)
    return np.where(inside, (day_of[q] - day[:, None]) * SLOTS + clock[q], NO_SLOT)


def _positions(timeline: Timeline, instants: list[dt.datetime]) -> np.ndarray:
    t0 = timeline.t0_us
    return np.array([(int(i.timestamp() * _US) - t0) // _HALF_HOUR_US for i in instants],
                    np.int64)


def _place(events: pl.DataFrame, assets: list[str], timeline: Timeline) -> Events:
    """Where each event sits on the timeline (vectorised over the events)."""
    t0 = timeline.t0_us
    at = events.select(
        ((pl.col("start").dt.epoch("us") - t0) // _HALF_HOUR_US).alias("p0"),
        ((pl.col("end").dt.epoch("us") - t0) // _HALF_HOUR_US).alias("p1"),
        pl.col("asset_id").replace_strict(assets, list(range(len(assets))),
                                          return_dtype=pl.Int64).alias("asset"),
    )
    p0 = at["p0"].to_numpy()
    length = at["p1"].to_numpy() - p0
    day_of, _ = timeline.clock
    day = day_of[p0]
    width = int(length.max())
    steps = np.arange(width)[None, :]
    p = np.where(steps < length[:, None], p0[:, None] + steps, -1)
    return Events(
        asset_id=events["asset_id"].to_list(),
        event_id=events["event_id"].to_list(),
        start=events["start"].dt.convert_time_zone("UTC").to_list(),
        asset=at["asset"].to_numpy(),
        day=day, p0=p0, length=length,
        rel=relative_slots(timeline, p, day),
        end_day=day_of[p0 + length - 1],
    )


# ---------------------------------------------------------------------------- X of Y


@dataclass
class Selection:
    """Per event: the kept candidate days (timeline indices, -1 = none) and counts."""

    days: np.ndarray  # int [E, y]
    kept: np.ndarray  # int [E]
    eligible: np.ndarray  # int [E]


def _gather_mean(dense: Dense, asset: np.ndarray, days: np.ndarray,
                 rel: np.ndarray) -> np.ndarray:
    """Mean over ``days`` (-1 ignored) at relative slots ``rel`` → ``[E, R]`` (NaN when no
    value)."""
    vals = dense.lookup(asset, days, rel)
    with np.errstate(invalid="ignore"):
        sums = np.nansum(vals, axis=1)
        n = np.sum(~np.isnan(vals), axis=1)
        return np.where(n > 0, sums / np.maximum(n, 1), np.nan)


def select_days(dense: Dense, ev: Events, method: XofY,
                calendar: Calendar, event_days: np.ndarray) -> Selection:
    """Choose each event's baseline days (vectorised over all events)."""
    dates = dense.timeline.dates()
    working = np.array([calendar.is_working_day(d) for d in dates])
    holiday = np.array([calendar.is_holiday(d) for d in dates])
    weekday = np.array([d.weekday() for d in dates])
    back = np.arange(1, method.lookback_days + 1)
    cand = ev.day[:, None] - back[None, :]  # [E, L], most recent first
    inside = cand >= 0
    cand_c = np.clip(cand, 0, None)
    if method.match == "day_type":
        alike = working[cand_c] == working[ev.day][:, None]
    else:
        alike = (weekday[cand_c] == weekday[ev.day][:, None]) & \
            (holiday[cand_c] == holiday[ev.day][:, None])
    a = ev.asset[:, None]
    ok = inside & alike & dense.complete()[a, cand_c] & ~event_days[a, cand_c]
    if method.exclude_estimated:
        ok &= dense.estimated[a, cand_c] == 0
    if method.low_usage_fraction is not None:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no candidates
            day_mean = dense.day_means()[a, cand_c]  # [E, L]
            average = np.nanmean(np.where(ok, day_mean, np.nan), axis=1)
            ok &= ~(day_mean < method.low_usage_fraction * average[:, None])
    rank = np.cumsum(ok, axis=1)
    chosen = ok & (rank <= method.y)
    eligible = np.minimum(rank[:, -1], method.y)
    # The chosen candidates, most recent first (at most y per event), ranked by mean load
    # over the event window.
    first = np.argsort(~chosen, axis=1, kind="stable")[:, :method.y]
    cand = np.where(np.take_along_axis(chosen, first, axis=1),
                    np.take_along_axis(cand, first, axis=1), -1)
    window_mean = _window_means(dense, ev.asset, cand, ev.rel)
    score = np.where(cand >= 0, window_mean, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")  # highest first; ties: most recent
    kept = np.minimum(method.x, eligible) if method.select != "all" else eligible
    offset = (eligible - kept) // 2 if method.select == "mid" else np.zeros_like(eligible)
    position = np.arange(order.shape[1])[None, :]
    take = (position >= offset[:, None]) & (position < (offset + kept)[:, None])
    picked = np.take_along_axis(cand, order, axis=1)
    days = np.where(take, picked, -1)
    days = -np.sort(-days, axis=1)[:, :method.y]  # kept days, most recent first
    if days.shape[1] < method.y:
        days = np.pad(days, ((0, 0), (0, method.y - days.shape[1])), constant_values=-1)
    ok_events = eligible >= method.min_days
    days[~ok_events] = -1
    return Selection(days, np.where(ok_events, kept, 0), eligible)


def _window_means(dense: Dense, asset: np.ndarray, cand: np.ndarray, rel: np.ndarray
                  ) -> np.ndarray:
    """``[E, K]``: mean of each candidate day over the event's relative slots."""
    vals = dense.lookup(asset, cand, rel)
    with np.errstate(invalid="ignore"):
        sums = np.nansum(vals, axis=2)
        n = np.sum(~np.isnan(vals), axis=2)
    return np.where(n > 0, sums / np.maximum(n, 1), -np.inf)


# ---------------------------------------------------------------------------- adjustment


def _metered(dense: Dense, asset: int, instant: dt.datetime) -> float:
    """The reading of ``asset`` for the half hour starting at ``instant`` (NaN if none)."""
    timeline = dense.timeline
    p = int((instant.timestamp() * _US - timeline.t0_us) // _HALF_HOUR_US)
    day_of, slot_of, _, _ = timeline.grid
    if not 0 <= p < len(day_of):
        return float("nan")
    return dense.reading(asset, int(day_of[p]), int(slot_of[p]))


def _window(start: dt.datetime, minutes: int, gap: int) -> list[dt.datetime]:
    end = start - dt.timedelta(minutes=gap)
    return [end - dt.timedelta(minutes=minutes) + i * HALF_HOUR for i in range(minutes // 30)]


def adjust(baseline_window: list[float], metered_window: list[float],
           rule: SameDayAdjustment) -> tuple[float | None, list[str]]:
    """The adjustment (kWh to add, or factor) from the window, or None; and flags."""
    pairs = [(b, m) for b, m in zip(baseline_window, metered_window, strict=True)
             if not (np.isnan(b) or np.isnan(m))]
    if len(pairs) < len(baseline_window):
        return None, ["adjustment_skipped:missing_window_data"]
    flags: list[str] = []
    mean_baseline = sum(b for b, _ in pairs) / len(pairs)
    if rule.kind == "additive":
        value = sum(m - b for b, m in pairs) / len(pairs)
        if rule.cap is not None:
            limit = rule.cap * abs(mean_baseline)
            if abs(value) > limit:
                value = max(-limit, min(limit, value))
                flags.append("adjustment_capped")
        if rule.upward_only and value < 0:
            value, flags = 0.0, [*flags, "adjustment_floored:upward_only"]
        return value, flags
    total_baseline = sum(b for b, _ in pairs)
    if total_baseline == 0:
        return None, ["adjustment_skipped:zero_baseline_in_window"]
    value = sum(m for _, m in pairs) / total_baseline
    if rule.cap is not None and not 1 - rule.cap <= value <= 1 + rule.cap:
        value = max(1 - rule.cap, min(1 + rule.cap, value))
        flags.append("adjustment_capped")
    if rule.upward_only and value < 1:
        value, flags = 1.0, [*flags, "adjustment_floored:upward_only"]
    return value, flags


# ---------------------------------------------------------------------------- compute


def _event_days(dense: Dense, all_events: Iterable[tuple[int, int, int]]) -> np.ndarray:
    """``[A, D]``: days on which the asset had any event (start to end, local dates)."""
    marks = np.zeros((len(dense.assets), dense.timeline.days), bool)
    for a, first, last in all_events:
        marks[a, max(first, 0):max(last + 1, 0)] = True
    return marks


def compute(
    readings: pl.LazyFrame | pl.DataFrame,
    events: pl.DataFrame,
    method: Method,
    *,
    adjustment: SameDayAdjustment | None = None,
    assets: pl.DataFrame | None = None,
    nominations: pl.DataFrame | None = None,
    calendar: Calendar | None = None,
    tz: str = DEFAULT_ZONE,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """Baselines for every event half hour, with the method, days used, adjustment and flags.

    Raises :class:`BaselineInputError` listing every unusable event row. An event with no
    baseline gets rows with a null ``baseline_kwh`` and a flag saying why — never a silent
    zero."""
    calendar = calendar or Calendar()
    problems = _check_events(events)
    if problems:
        raise BaselineInputError(problems)
    if events.is_empty():
        return pl.DataFrame(schema=OUTPUT_SCHEMA)
    events = events.sort("asset_id", "start", "event_id")
    asset_ids = sorted(set(events["asset_id"]))
    lookback = method.lookback_days if isinstance(method, XofY) else 2
    timeline = _timeline_for(events, lookback, tz)
    ev = _place(events, asset_ids, timeline)
    dense = lay_out(readings, asset_ids, timeline,
                    _needed_slots(ev, timeline, method, adjustment),
                    day_sums=isinstance(method, XofY) and method.low_usage_fraction is not None,
                    progress=progress)
    technology, units = _asset_attributes(assets, asset_ids)
    params = describe(method, adjustment if isinstance(method, XofY) else None)
    if progress is not None:
        progress("compute baselines", 0, len(ev.asset_id))
    base, days_used, eligible, flags = _baselines(dense, ev, method, calendar,
                                                  nominations, technology, units)
    unadjusted = base.copy()
    adjustments = np.full(len(base), np.nan)
    if isinstance(method, XofY) and adjustment is not None:
        for e in range(len(base)):
            if np.isnan(base[e, :ev.length[e]]).all():
                continue
            tech = technology[ev.asset[e]]
            if tech in adjustment.off_for:
                flags[e].append(f"adjustment_off:{tech}")
                continue
            window = _window(ev.start[e], adjustment.window_minutes, adjustment.gap_minutes)
            rel = relative_slots(timeline, _positions(timeline, window)[None, :],
                                 ev.day[e:e + 1])
            b_window = _gather_mean(dense, ev.asset[e:e + 1], days_used[e][None, :],
                                    rel)[0].tolist()
            m_window = [_metered(dense, int(ev.asset[e]), w) for w in window]
            value, more = adjust(b_window, m_window, adjustment)
            flags[e] += more
            if value is not None:
                adjustments[e] = value
                base[e] = base[e] + value if adjustment.kind == "additive" else base[e] * value
    if progress is not None:
        progress("compute baselines", len(ev.asset_id), len(ev.asset_id))
    metered = _event_readings(dense, ev, base.shape[1])
    for e in np.flatnonzero(dense.estimated[ev.asset, ev.day] > 0):
        flags[e].append("estimated_reads_on_event_day")
    return _rows(ev, timeline, method, params, base, metered, unadjusted, adjustments,
                 days_used, eligible, flags)


def _event_readings(dense: Dense, ev: Events, width: int) -> np.ndarray:
    """The metered kWh of every event half hour, ``[E, width]`` like the baselines."""
    mask = np.arange(width)[None, :] < ev.length[:, None]
    out = np.full(mask.shape, np.nan)
    e_index, k = np.nonzero(mask)
    out[mask] = dense.readings_at(ev.asset[e_index], ev.p0[e_index] + k)
    return out


def _needed_slots(ev: Events, timeline: Timeline, method: Method,
                  adjustment: SameDayAdjustment | None) -> set[int]:
    """Clock slots (0–47) whose values the method will read: the event periods and any
    window before the start (adjustment or pre-event)."""
    slots = {int(r) % SLOTS for r in np.unique(ev.rel) if r != NO_SLOT}
    window = None
    if isinstance(method, PreEvent):
        window = (method.window_minutes, method.gap_minutes)
    elif isinstance(method, XofY) and adjustment is not None:
        window = (adjustment.window_minutes, adjustment.gap_minutes)
    if window is not None:
        _, clock = timeline.clock
        back = np.arange(1, (window[0] + window[1]) // 30 + 1)
        before = ev.p0[:, None] - back[None, :]
        slots |= set(np.unique(clock[before[before >= 0]]).tolist())
    if not isinstance(method, (XofY, PreEvent)):
        return set()
    return slots


def _asset_attributes(assets: pl.DataFrame | None, ids: list[str]
                      ) -> tuple[list[str | None], list[int]]:
    if assets is None:
        return [None] * len(ids), [1] * len(ids)
    known = {row["asset_id"]: row for row in assets.iter_rows(named=True)}
    tech = [known.get(a, {}).get("technology") for a in ids]
    units = [int(known.get(a, {}).get("units") or 1) for a in ids]
    return tech, units


def _baselines(dense: Dense, ev: Events, method: Method,
               calendar: Calendar, nominations: pl.DataFrame | None,
               technology: list[str | None], units: list[int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
    """Per event: baseline values ``[E, R]`` (NaN = none), days used, eligible count, flags."""
    n = len(ev.asset_id)
    lengths = ev.length.tolist()
    width = ev.rel.shape[1]
    in_event = np.arange(width)[None, :] < ev.length[:, None]
    flags: list[list[str]] = [[] for _ in range(n)]
    day_periods = dense.periods[ev.day]
    for e in np.flatnonzero(day_periods != SLOTS):
        flags[e].append(f"clock_change_day:{day_periods[e]}_periods")
    empty_days = np.full((n, 1), -1)
    nothing = np.full((n, width), np.nan)
    if isinstance(method, XofY):
        event_days = _event_days(dense, zip(ev.asset.tolist(), ev.day.tolist(),
                                            ev.end_day.tolist(), strict=True))
        sel = select_days(dense, ev, method, calendar, event_days)
        values = _gather_mean(dense, ev.asset, sel.days, ev.rel)
        too_few = sel.eligible < method.min_days
        values[too_few] = np.nan
        for e in np.flatnonzero(too_few):
            flags[e].append(f"no_baseline:{sel.eligible[e]}_eligible_days_below_minimum_"
                            f"{method.min_days}")
        for e in np.flatnonzero(~too_few & (sel.eligible < method.y)):
            flags[e].append(f"fewer_eligible_days:{sel.eligible[e]}_of_{method.y}")
        if not method.exclude_estimated:
            used = np.where(sel.days >= 0, sel.days, 0)
            est = (dense.estimated[ev.asset[:, None], used] > 0) & (sel.days >= 0)
            for e in np.flatnonzero(est.any(axis=1)):
                flags[e].append("estimated_reads_used")
        gaps = (np.isnan(values) & in_event).any(axis=1) & ~too_few
        for e in np.flatnonzero(gaps):
            flags[e].append("missing_values_in_selected_days")
        return values, sel.days, sel.eligible, flags
    if isinstance(method, PreEvent):
        base = nothing.copy()
        for e in range(n):
            window = _window(ev.start[e], method.window_minutes, method.gap_minutes)
            metered = [_metered(dense, int(ev.asset[e]), w) for w in window]
            if any(np.isnan(m) for m in metered):
                flags[e].append("no_baseline:missing_readings_in_pre_event_window")
            else:
                base[e, :lengths[e]] = sum(metered) / len(metered)
        return base, empty_days, np.zeros(n, int), flags
    if isinstance(method, Fixed):
        return np.where(in_event, method.kwh, np.nan), empty_days, np.zeros(n, int), flags
    if isinstance(method, ReferenceProfile):
        base = nothing.copy()
        for e in range(n):
            tech = technology[ev.asset[e]]
            profile = method.profiles.get(tech or "")
            if profile is None:
                flags[e].append(f"no_baseline:no_reference_profile_for_{tech}")
                continue
            slots = ev.rel[e, :lengths[e]] % SLOTS
            base[e, :lengths[e]] = np.array(profile)[slots] * units[ev.asset[e]]
        return base, empty_days, np.zeros(n, int), flags
    assert isinstance(method, Nominated)
    given: dict[tuple[str, str, dt.datetime], float] = {}
    if nominations is not None:
        for row in nominations.iter_rows(named=True):
            given[(row["asset_id"], row["event_id"], row["start"].astimezone(dt.UTC))] = \
                float(row["kwh"])
    base = nothing.copy()
    for e in range(n):
        row = [given.get((ev.asset_id[e], ev.event_id[e], p), float("nan"))
               for p in ev.periods(e)]
        missing = sum(1 for v in row if np.isnan(v))
        if missing:
            flags[e].append(f"no_baseline:{missing}_periods_not_nominated")
        base[e, :len(row)] = row
    return base, empty_days, np.zeros(n, int), flags


def _rows(ev: Events, timeline: Timeline, method: Method, params: str,
          base: np.ndarray, metered: np.ndarray, unadjusted: np.ndarray,
          adjustments: np.ndarray,
          days_used: np.ndarray, eligible: np.ndarray, flags: list[list[str]]
          ) -> pl.DataFrame:
    """One row per event half hour, built column-wise."""
    iso = [d.isoformat() for d in timeline.dates()]
    used = [",".join(iso[d] for d in sorted(row) if d >= 0) for row in days_used.tolist()]
    per_event = pl.DataFrame({
        "asset_id": ev.asset_id,
        "event_id": ev.event_id,
        "adjustment": adjustments,
        "selected_days": used,
        "eligible_days": eligible.astype(np.int32),
        "flags": [";".join(f) for f in flags],
    }, schema_overrides={"adjustment": pl.Float64}).with_columns(
        pl.col("adjustment").fill_nan(None))
    width = base.shape[1]
    mask = np.arange(width)[None, :] < ev.length[:, None]
    event_index = np.broadcast_to(np.arange(len(ev.asset_id))[:, None], mask.shape)[mask]
    step = np.broadcast_to(np.arange(width)[None, :], mask.shape)[mask]
    start_us = np.array([int(x.timestamp() * _US) for x in ev.start], np.int64)
    starts = start_us[event_index] + step * _HALF_HOUR_US
    local_midnight = pl.col("local_date").cast(pl.Datetime("us")) \
        .dt.replace_time_zone(timeline.tz, ambiguous="earliest", non_existent="null") \
        .dt.convert_time_zone("UTC")
    periods = pl.DataFrame({
        "event": event_index,
        "period_start": pl.Series(starts).cast(pl.Datetime("us", "UTC")),
        "baseline_kwh": base[mask],
        "metered_kwh": metered[mask],
        "unadjusted_kwh": unadjusted[mask],
    }).with_columns(
        pl.col("period_start").dt.convert_time_zone(timeline.tz).dt.date().alias("local_date"),
        pl.col("baseline_kwh").fill_nan(None),
        pl.col("metered_kwh").fill_nan(None),
        pl.col("unadjusted_kwh").fill_nan(None),
    ).with_columns(
        ((pl.col("period_start") - local_midnight).dt.total_minutes() // 30 + 1)
        .cast(pl.Int32).alias("period"))
    joined = pl.concat([per_event[periods["event"]], periods.drop("event")], how="horizontal")
    return joined.with_columns(
        pl.lit(method.name).alias("method"), pl.lit(params).alias("params"),
    ).select(list(OUTPUT_SCHEMA)).cast(OUTPUT_SCHEMA)
