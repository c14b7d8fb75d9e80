"""Meter-data intake: FSP files (CSV or Parquet) checked row by row into a monthly dataset.

Input columns (``docs/settlement.md``):

- ``meter_id``: the meter (an asset's ``meter_id`` in the contracts file);
- the half hour, either ``period_start`` (ISO 8601; with a UTC offset, or local time of
  ``tz`` without one) or ``settlement_date`` (YYYY-MM-DD, local) and ``settlement_period``
  (1 = the half hour from local midnight; 46, 48 or 50 in a day);
- ``kwh``: energy in the half hour, ≥ 0;
- ``flow`` (optional, default ``import``): ``import`` or ``export``;
- ``quality`` (optional, default ``actual``): ``actual`` or ``estimated``.

Every row is accounted for: stored (new), merged (the same value is already stored or
appears earlier in the file) or quarantined with its reason. ``rows in = stored + merged +
quarantined``, always. Stored rows go to ``DATASET/month=YYYY-MM/part-<hash>.parquet``, one
new part per ingest and month holding only new rows, so ingesting a file again writes
nothing. :func:`readings` reads the dataset back as the baselines' input frame.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from baselines.periods import period_starts, zone
from contracts.io import ContractBook
from dispatchd.export import month_bounds, next_month

UTC_TS = pl.Datetime("us", "UTC")
STORED_SCHEMA: dict[str, pl.DataType] = {
    "asset_id": pl.String(), "meter_id": pl.String(), "start": UTC_TS, "flow": pl.String(),
    "kwh": pl.Float64(), "estimated": pl.Boolean(),
}
RANGE_TOLERANCE = 1.01
"""A half hour may hold up to 1% more than the asset's rated kW × 0.5 h (meter rounding)."""


class MeterFileError(ValueError):
    """A file that cannot be read at all (not CSV or Parquet, or no meter_id/kwh/time)."""


@dataclass
class Intake:
    """What one ingest of one file did. ``rows_in == stored + merged + quarantined``."""

    file: str
    rows_in: int = 0
    stored: int = 0
    merged: int = 0
    quarantined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    parts: list[Path] = field(default_factory=list)
    quarantine_file: Path | None = None

    def summary(self) -> str:
        text = (f"{self.file}: {self.rows_in} rows in = {self.stored} stored + {self.merged} "
                f"merged + {self.quarantined} quarantined")
        if self.reasons:
            text += "\n" + "\n".join(f"    {n:>8}  {reason}"
                                     for reason, n in self.reasons.most_common())
        if self.quarantine_file is not None:
            text += f"\n    quarantined rows with their reasons: {self.quarantine_file}"
        return text


# ---------------------------------------------------------------------------- reading


def _read(path: Path) -> pl.DataFrame:
    """Every column as text (so a bad value is a row's problem, not the file's)."""
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
            return frame.with_columns(
                pl.col(c).dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S%:z")
                if isinstance(t, pl.Datetime) and t.time_zone else
                pl.col(c).dt.strftime("%Y-%m-%dT%H:%M:%S") if isinstance(t, pl.Datetime) else
                pl.col(c).cast(pl.String)
                for c, t in frame.schema.items())
        return pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise MeterFileError(f"{path}: cannot read as {path.suffix or 'CSV'}: {exc}") from exc


def _columns(frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    have = set(frame.columns)
    missing = [c for c in ("meter_id", "kwh") if c not in have]
    if "period_start" not in have and not {"settlement_date", "settlement_period"} <= have:
        missing.append("period_start (or settlement_date and settlement_period)")
    if missing:
        raise MeterFileError(f"{path}: missing column(s): {', '.join(missing)}")
    defaults = {"flow": "import", "quality": "actual", "period_start": None,
                "settlement_date": None, "settlement_period": None}
    return frame.with_columns(
        pl.lit(value, pl.String).alias(name) for name, value in defaults.items()
        if name not in have
    ).with_row_index("row", offset=1)


# ---------------------------------------------------------------------------- times


def _instant(text: str | None, tz: str) -> tuple[dt.datetime | None, str | None]:
    """A ``period_start`` value as a UTC instant, or the reason it is not one."""
    if text is None or not text.strip():
        return None, "period_start missing"
    try:
        parsed = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None, f"period_start {text!r} is not a time"
    if parsed.tzinfo is None:
        local = zone(tz)
        early, late = parsed.replace(tzinfo=local, fold=0), parsed.replace(tzinfo=local, fold=1)
        if early.utcoffset() != late.utcoffset():
            if early.astimezone(dt.UTC).astimezone(local).replace(tzinfo=None) != parsed:
                return None, (f"period_start {text!r} does not exist in {tz} "
                              "(the clocks went forward)")
            return None, (f"period_start {text!r} is ambiguous in {tz} (the clocks went back): "
                          "give a UTC offset or settlement_date and settlement_period")
        parsed = early
    instant = parsed.astimezone(dt.UTC)
    if instant.minute % 30 or instant.second or instant.microsecond:
        return None, f"period_start {text!r} is not on a half hour"
    return instant, None


def _labelled(day_text: str | None, period_text: str | None, tz: str
              ) -> tuple[dt.datetime | None, str | None]:
    """A ``settlement_date`` and ``settlement_period`` as a UTC instant, or the reason."""
    try:
        day = dt.date.fromisoformat((day_text or "").strip())
    except ValueError:
        return None, f"settlement_date {day_text!r} is not a date"
    try:
        period = int((period_text or "").strip())
    except ValueError:
        return None, f"settlement_period {period_text!r} is not a whole number"
    starts = period_starts(day, tz)
    if not 1 <= period <= len(starts):
        return None, (f"settlement_period {period} on {day} does not exist: that day has "
                      f"{len(starts)} periods in {tz}")
    return starts[period - 1], None


def _times(frame: pl.DataFrame, tz: str) -> pl.DataFrame:
    """Adds ``start`` (UTC) and ``time_problem``; each distinct value is parsed once."""
    keys = frame.select("period_start", "settlement_date", "settlement_period").unique()
    parsed = []
    for start_text, day_text, period_text in keys.iter_rows():
        if start_text is not None:
            parsed.append(_instant(start_text, tz))
        else:
            parsed.append(_labelled(day_text, period_text, tz))
    lookup = keys.with_columns(
        pl.Series("start", [p[0] for p in parsed], dtype=UTC_TS),
        pl.Series("time_problem", [p[1] for p in parsed], dtype=pl.String))
    return frame.join(lookup, on=["period_start", "settlement_date", "settlement_period"],
                      how="left", nulls_equal=True)


# ---------------------------------------------------------------------------- checks


def _checked(frame: pl.DataFrame, book: ContractBook, month: str | None, tz: str
             ) -> pl.DataFrame:
    """Adds ``asset_id``, ``kwh_value``, ``estimated`` and ``reason`` (null when usable)."""
    meters = pl.DataFrame(
        {"meter_id": [a.meter_id for a in book.assets.values()],
         "asset_id": [a.id for a in book.assets.values()],
         "import_kw": [a.import_kw for a in book.assets.values()],
         "export_kw": [a.export_kw for a in book.assets.values()]},
        schema={"meter_id": pl.String, "asset_id": pl.String, "import_kw": pl.Float64,
                "export_kw": pl.Float64})
    frame = _times(frame, tz).join(meters, on="meter_id", how="left")
    kwh = pl.col("kwh").str.strip_chars().cast(pl.Float64, strict=False)
    limit = pl.when(pl.col("flow") == "export").then(pl.col("export_kw")) \
        .otherwise(pl.col("import_kw")) * 0.5
    in_month = pl.lit(True)
    if month is not None:
        lo, hi = month_bounds(month, tz)
        in_month = (pl.col("start") >= lo) & (pl.col("start") < hi)
    shown = pl.col("kwh").fill_null("")
    return frame.with_columns(kwh_value=kwh).with_columns(
        estimated=pl.col("quality").str.strip_chars() == "estimated",
        reason=pl.when(pl.col("meter_id").is_null() | (pl.col("meter_id").str.strip_chars()
                                                        == ""))
        .then(pl.lit("meter_id missing"))
        .when(pl.col("asset_id").is_null())
        .then(pl.format("unknown meter {}: no asset in the contracts file has it",
                        pl.col("meter_id")))
        .when(pl.col("time_problem").is_not_null()).then(pl.col("time_problem"))
        .when(pl.col("kwh_value").is_null() | ~pl.col("kwh_value").is_finite())
        .then(pl.format("kwh {} is not a number", shown))
        .when(pl.col("kwh_value") < 0)
        .then(pl.format("kwh {} is negative (report export as a positive value with "
                        "flow=export)", shown))
        .when(~pl.col("flow").is_in(["import", "export"]))
        .then(pl.format("flow {} is neither import nor export", pl.col("flow")))
        .when(~pl.col("quality").str.strip_chars().is_in(["actual", "estimated"]))
        .then(pl.format("quality {} is neither actual nor estimated", pl.col("quality")))
        .when(pl.col("kwh_value") > limit * RANGE_TOLERANCE)
        .then(pl.format("kwh {} is more than asset {} can {} in a half hour ({} kWh at {} kW)",
                        shown, pl.col("asset_id"),
                        pl.when(pl.col("flow") == "export").then(pl.lit("export"))
                        .otherwise(pl.lit("import")),
                        limit.round(3), limit * 2))
        .when(~in_month)
        .then(pl.format("period_start {} is outside {}",
                        pl.col("start").dt.strftime("%Y-%m-%dT%H:%MZ"), pl.lit(month)))
        .otherwise(None),
    )


def _duplicates(good: pl.DataFrame) -> pl.DataFrame:
    """Marks repeats within the file: ``merged`` (same value as an earlier row) or a
    conflict reason (different values for one meter, half hour and flow: all quarantined)."""
    key = ["asset_id", "start", "flow"]
    values = good.group_by(key).agg(
        distinct=pl.col("kwh_value").n_unique(),
        seen=pl.col("kwh_value").sort().cast(pl.String).str.join(", "))
    good = good.join(values, on=key, how="left")
    conflict = pl.col("distinct") > 1
    return good.with_columns(
        reason=pl.when(conflict).then(pl.format(
            "conflicting values for meter {} at {} ({}): {}", pl.col("meter_id"),
            pl.col("start").dt.strftime("%Y-%m-%dT%H:%MZ"), pl.col("flow"), pl.col("seen")))
        .otherwise(pl.col("reason")),
        merged=~conflict & (pl.int_range(pl.len()).over(key) > 0),
    ).drop("distinct", "seen")


def _month(start: pl.Expr, tz: str) -> pl.Expr:
    return start.dt.convert_time_zone(tz).dt.strftime("%Y-%m")


def _stored_matches(dataset: Path, new: pl.DataFrame, tz: str) -> pl.DataFrame:
    """Stored rows sharing a key with ``new``: asset_id, start, flow, stored_kwh."""
    months = new.select(_month(pl.col("start"), tz).unique()).to_series().to_list()
    files = [p for m in months for p in sorted((dataset / f"month={m}").glob("part-*.parquet"))]
    if not files:
        return pl.DataFrame(schema={"asset_id": pl.String, "start": UTC_TS, "flow": pl.String,
                                    "stored_kwh": pl.Float64})
    keys = new.select("asset_id", "start", "flow").unique()
    return (pl.scan_parquet(files).select("asset_id", "start", "flow", "kwh")
            .join(keys.lazy(), on=["asset_id", "start", "flow"], how="semi")
            .rename({"kwh": "stored_kwh"}).collect())


def _write_part(dataset: Path, month: str, rows: pl.DataFrame) -> Path:
    """Write ``rows`` as a new part of ``month``, named by a hash of their content."""
    directory = dataset / f"month={month}"
    directory.mkdir(parents=True, exist_ok=True)
    rows = rows.sort("asset_id", "start", "flow")
    digest = hashlib.sha256(rows.hash_rows(seed=0).to_numpy().tobytes())
    target = directory / f"part-{digest.hexdigest()[:16]}.parquet"
    partial = directory / f".{target.name}.partial-{os.getpid()}"
    rows.write_parquet(partial, statistics=True)
    partial.replace(target)
    return target


def ingest(path: Path, book: ContractBook, dataset: Path, *, quarantine: Path,
           month: str | None = None, tz: str = "Europe/London") -> Intake:
    """Check every row of ``path`` and store the good ones; see the module docstring.

    Raises :class:`MeterFileError` when the file cannot be read at all (nothing is stored).
    """
    raw = _columns(_read(path), path)
    intake = Intake(str(path), rows_in=raw.height)
    rows = _checked(raw, book, month, tz)
    good = _duplicates(rows.filter(pl.col("reason").is_null()))
    rows = rows.filter(pl.col("reason").is_not_null()).select([*raw.columns, "reason"]) \
        .vstack(good.filter(pl.col("reason").is_not_null()).select([*raw.columns, "reason"]))
    good = good.filter(pl.col("reason").is_null())
    intake.merged += int(good["merged"].sum())
    fresh = good.filter(~pl.col("merged"))
    stored = _stored_matches(dataset, fresh, tz)
    fresh = fresh.join(stored, on=["asset_id", "start", "flow"], how="left")
    same = fresh["stored_kwh"].is_not_null() & (fresh["stored_kwh"] == fresh["kwh_value"])
    intake.merged += int(same.sum())
    clash = fresh.filter(pl.col("stored_kwh").is_not_null()
                         & (pl.col("stored_kwh") != pl.col("kwh_value")))
    if clash.height:
        rows = rows.vstack(clash.with_columns(reason=pl.format(
            "conflicts with the stored value {} kWh for meter {} at {} ({})",
            pl.col("stored_kwh"), pl.col("meter_id"),
            pl.col("start").dt.strftime("%Y-%m-%dT%H:%MZ"), pl.col("flow"),
        )).select([*raw.columns, "reason"]))
    new = fresh.filter(pl.col("stored_kwh").is_null()).select(
        "asset_id", pl.col("meter_id").str.strip_chars(), "start",
        pl.col("flow").str.strip_chars(), pl.col("kwh_value").alias("kwh"), "estimated",
    ).cast(STORED_SCHEMA)  # type: ignore[arg-type]
    for (month_key,), part in new.with_columns(month=_month(pl.col("start"), tz)) \
            .partition_by("month", as_dict=True).items():
        intake.parts.append(_write_part(dataset, str(month_key), part.drop("month")))
    intake.stored = new.height
    intake.quarantined = rows.height
    intake.reasons = Counter(_reason_kind(r) for r in rows["reason"].to_list())
    if rows.height:
        quarantine.mkdir(parents=True, exist_ok=True)
        intake.quarantine_file = quarantine / f"{path.name}.quarantine.csv"
        rows.sort("row").write_csv(intake.quarantine_file)
    assert intake.rows_in == intake.stored + intake.merged + intake.quarantined, intake
    return intake


def _reason_kind(reason: str) -> str:
    """The reason without the row's own values, for counting."""
    for prefix in ("unknown meter", "conflicting values", "conflicts with the stored",
                   "meter_id missing"):
        if reason.startswith(prefix):
            return prefix
    for marker in (" is not a time", " does not exist in", " is ambiguous", " is not on a",
                   " is not a number", " is negative", " is neither", " is more than",
                   " is outside", " is not a date", " is not a whole number",
                   " does not exist: that day has"):
        if marker in reason:
            return reason.split(" ", 1)[0] + marker
    return reason


# ---------------------------------------------------------------------------- reading back


def dataset_files(dataset: Path, months: Iterable[str]) -> list[Path]:
    return [p for m in sorted(set(months))
            for p in sorted((dataset / f"month={m}").glob("part-*.parquet"))]


def readings(dataset: Path, months: Iterable[str], *,
             exporters: Iterable[str] | None = None) -> pl.LazyFrame:
    """The baselines' readings frame: one row per asset and half hour, ``kwh`` = import −
    export (export negative), ``estimated`` if any part of it was.

    Netting import and export takes a group-by. Given ``exporters`` (the assets that can
    export: ``export_kw > 0``), only their rows are grouped; every other asset's import
    rows stream straight through (the intake lets such an asset report export only as 0).
    """
    files = dataset_files(dataset, months)
    if not files:
        return pl.LazyFrame(schema={"asset_id": pl.String, "start": UTC_TS, "kwh": pl.Float64,
                                    "estimated": pl.Boolean})
    scan = pl.scan_parquet(files)
    signed = pl.when(pl.col("flow") == "export").then(-pl.col("kwh")).otherwise(pl.col("kwh"))

    def netted(rows: pl.LazyFrame) -> pl.LazyFrame:
        return rows.group_by("asset_id", "start").agg(
            kwh=signed.sum(), estimated=pl.col("estimated").any())

    if exporters is None:
        return netted(scan)
    exporting = sorted(set(exporters))
    if not exporting:
        return scan.filter(pl.col("flow") == "import").select("asset_id", "start", "kwh",
                                                               "estimated")
    plain = scan.filter(~pl.col("asset_id").is_in(exporting) & (pl.col("flow") == "import")) \
        .select("asset_id", "start", "kwh", "estimated")
    return pl.concat([plain, netted(scan.filter(pl.col("asset_id").is_in(exporting)))])


def months_between(first: dt.date, last: dt.date) -> list[str]:
    """Every ``YYYY-MM`` from the month of ``first`` to that of ``last``."""
    out, day = [], first.replace(day=1)
    while day <= last:
        out.append(f"{day:%Y-%m}")
        day = next_month(day)
    return out

