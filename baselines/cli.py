"""The ``baselines`` command: baselines for a meter-data file and an events file."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import polars as pl

from baselines.calendar import REGIONS, Calendar
from baselines.compute import BaselineInputError, compute
from baselines.methods import PRESETS, Fixed, Method, PreEvent, SameDayAdjustment

UTC_TIME = pl.Datetime("us", "UTC")
METHODS = [*PRESETS, "pre_event", "zero", "fixed"]


def _read(path: Path, required: dict[str, pl.DataType], what: str) -> pl.LazyFrame:
    """Scan a Parquet or CSV file, casting the required columns; names what is missing."""
    if not path.exists():
        raise BaselineInputError([f"{what} file {path} does not exist"])
    if path.is_dir():  # a dataset: every .parquet file below it, whatever else is there
        frame = pl.scan_parquet(str(path / "**" / "*.parquet"))
    elif path.suffix.lower() == ".parquet":
        frame = pl.scan_parquet(path)
    elif path.suffix.lower() == ".csv":
        frame = pl.scan_csv(path, infer_schema=False)
    else:
        raise BaselineInputError([f"{what} file {path}: use .parquet or .csv"])
    columns = frame.collect_schema().names()
    missing = [c for c in required if c not in columns]
    if missing:
        raise BaselineInputError([f"{what} file {path}: missing column(s) {missing}; "
                                  f"has {columns}"])
    casts = []
    for name, dtype in required.items():
        col = pl.col(name)
        if dtype == UTC_TIME:
            col = col.cast(pl.String).str.to_datetime(time_zone="UTC", time_unit="us") \
                if frame.collect_schema()[name] == pl.String else col.cast(UTC_TIME)
        else:
            col = col.cast(dtype)
        casts.append(col.alias(name))
    return frame.with_columns(casts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baselines",
        description="Compute baselines (what each asset would have used had it not been "
        "dispatched) for every half hour of every event, with the method, days used, "
        "adjustment and flags on each row. See docs/baselines.md.")
    parser.add_argument("--readings", type=Path, required=True,
                        help="meter data: Parquet file or dataset directory, or CSV, with "
                        "asset_id, start (UTC), kwh[, estimated]")
    parser.add_argument("--events", type=Path, required=True,
                        help="events: Parquet or CSV with asset_id, event_id, start, end (UTC)")
    parser.add_argument("--assets", type=Path,
                        help="optional: asset_id, technology[, units] (for per-technology "
                        "adjustment and reference profiles)")
    parser.add_argument("--method", choices=METHODS, default="mid_8_of_10",
                        help="a preset or method (default mid_8_of_10)")
    parser.add_argument("--kwh", type=float, default=0.0, help="value for --method fixed")
    parser.add_argument("--adjust", choices=["none", "additive", "multiplicative"],
                        default="none", help="same-day adjustment (X-of-Y methods only)")
    parser.add_argument("--cap", type=float, default=0.2,
                        help="adjustment cap as a fraction, e.g. 0.2 = ±20%% (default); "
                        "negative for none")
    parser.add_argument("--upward-only", action="store_true")
    parser.add_argument("--window", type=int, default=180,
                        help="adjustment window in minutes (default 180)")
    parser.add_argument("--gap", type=int, default=60,
                        help="minutes between the window's end and the event (default 60)")
    parser.add_argument("--no-adjust-for", action="append", default=None, metavar="TECH",
                        help="technology with no adjustment (repeatable; default battery)")
    parser.add_argument("--region", choices=[*REGIONS, "none"], default="england-and-wales",
                        help="bank-holiday calendar (default england-and-wales)")
    parser.add_argument("--holiday", action="append", default=[], type=dt.date.fromisoformat,
                        metavar="YYYY-MM-DD", help="an extra holiday (repeatable)")
    parser.add_argument("--tz", default="Europe/London", help="local time zone of periods")
    parser.add_argument("--out", type=Path, required=True,
                        help="output file: .parquet or .csv")
    return parser


def _method(args: argparse.Namespace) -> Method:
    if args.method in PRESETS:
        return PRESETS[args.method]
    if args.method == "pre_event":
        return PreEvent()
    return Fixed(0.0 if args.method == "zero" else args.kwh)


class _Progress:
    """Progress on stderr, at most four updates a second (the last is always shown)."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.25 and not (total and done == total):
            return
        self.last = now
        shown = f"{done:,}/{total:,}" if total else f"{done:,} rows"
        print(f"\r{stage}: {shown}\033[K", end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.suffix.lower() not in (".parquet", ".csv"):
        print("baselines: --out must end in .parquet or .csv", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        readings = _read(args.readings, {"asset_id": pl.String(), "start": UTC_TIME,
                                         "kwh": pl.Float64()}, "readings")
        events = _read(args.events, {"asset_id": pl.String(), "event_id": pl.String(),
                                     "start": UTC_TIME, "end": UTC_TIME}, "events").collect()
        assets = _read(args.assets, {"asset_id": pl.String(), "technology": pl.String()},
                       "assets").collect() if args.assets else None
        adjustment = None
        if args.adjust != "none":
            adjustment = SameDayAdjustment(
                kind=args.adjust, window_minutes=args.window, gap_minutes=args.gap,
                cap=None if args.cap < 0 else args.cap, upward_only=args.upward_only,
                off_for=frozenset(args.no_adjust_for if args.no_adjust_for is not None
                                  else ["battery"]))
        calendar = Calendar.with_extra(None if args.region == "none" else args.region,
                                       args.holiday)
        result = compute(readings, events, _method(args), adjustment=adjustment, assets=assets,
                         calendar=calendar, tz=args.tz, progress=_Progress())
    except (BaselineInputError, ValueError, pl.exceptions.PolarsError) as exc:
        print(f"\nbaselines: {exc}", file=sys.stderr)
        return 1
    partial = args.out.with_name(args.out.name + ".partial")
    if args.out.suffix.lower() == ".csv":
        result.write_csv(partial)
    else:
        result.write_parquet(partial)
    partial.replace(args.out)  # a killed run leaves no half-written output
    flagged = result.filter(pl.col("flags") != "").select("asset_id", "event_id").unique()
    missing = result.filter(pl.col("baseline_kwh").is_null()).select("event_id").n_unique()
    print(f"\nwrote {len(result):,} rows for {result.select('event_id').n_unique():,} events "
          f"to {args.out} in {time.perf_counter() - started:.1f}s; {len(flagged):,} events "
          f"flagged, {missing:,} without a baseline", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
