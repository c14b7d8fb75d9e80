"""Baselines at national scale, beside a bare polars scan of the same Parquet.

Run: ``./dev bench bench_baselines`` (or ``python bench/bench_baselines.py [--assets N]``).

The data set is generated reproducibly (seed 1): ``--assets`` meters × 45 days of half
hours from Mon 5 Jan 2026 (no clock change, so 2,160 readings a meter: 216 M for the
default 100,000), as Parquet files in ``--data`` (kept and reused). Every meter has one
event on the 45th day, starting between 16:00 and 19:00 for one to two hours.

Each side runs in a child process of its own, so its peak memory (max RSS) is its own:

- *reference*: ``scan_parquet → group_by(asset_id) → sum(kwh)``: reading the same columns
  and touching every row once.
- *baselines*: ``baselines.compute`` with the ``mid_8_of_10`` preset over the same files.

DESIGN §7 targets: ≤ 3× the reference time, ≤ 12 GiB peak memory, and per meter at
least 1,000× faster than fitting a per-meter regression model (timed on a sample).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
DAYS = 45
BLOCK = 5000  # meters per Parquet file


def generate(directory: Path, assets: int) -> None:
    """Write the data set (skipped when a complete one is already there)."""
    marker = directory / "COMPLETE"
    if marker.exists() and marker.read_text() == str(assets):
        return
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng(1)
    periods = DAYS * 48
    t0 = int(FIRST.timestamp() * 1_000_000)
    starts = t0 + np.arange(periods, dtype=np.int64) * 1_800_000_000
    slot = np.arange(periods) % 48
    shape = 0.6 + 0.4 * np.sin((slot - 14) / 48 * 2 * np.pi) ** 2 + 0.5 * (slot >= 34) * (slot < 40)
    ids = pa.array([f"M{i:07d}" for i in range(assets)])
    for first in range(0, assets, BLOCK):
        n = min(BLOCK, assets - first)
        scale = rng.lognormal(0, 0.5, size=(n, 1))
        daily = rng.normal(1, 0.1, size=(n, DAYS)).repeat(48, axis=1)
        kwh = (scale * shape[None, :] * daily * rng.normal(1, 0.05, size=(n, periods)))
        index = np.repeat(np.arange(first, first + n, dtype=np.int32), periods)
        table = pa.table({
            "asset_id": pa.DictionaryArray.from_arrays(pa.array(index), ids),
            "start": pa.array(np.tile(starts, n), pa.timestamp("us", "UTC")),
            "kwh": pa.array(kwh.reshape(-1).round(3)),
        })
        pq.write_table(table, directory / f"part-{first // BLOCK:04d}.parquet",
                       row_group_size=1_000_000)
    marker.write_text(str(assets))


def events(assets: int) -> pl.DataFrame:
    rng = np.random.default_rng(2)
    day = FIRST + dt.timedelta(days=DAYS - 1)
    start_slot = rng.integers(32, 38, size=assets)
    length = rng.integers(2, 5, size=assets)
    starts = [day + dt.timedelta(minutes=30 * int(s)) for s in start_slot]
    return pl.DataFrame({
        "asset_id": [f"M{i:07d}" for i in range(assets)],
        "event_id": [f"EV{i:07d}" for i in range(assets)],
        "start": starts,
        "end": [s + dt.timedelta(minutes=30 * int(n)) for s, n in zip(starts, length,
                                                                        strict=True)],
    })


def measure(kind: str, directory: Path, assets: int) -> dict[str, float]:
    """Run in the child: time one side and report it with the child's peak memory."""
    source = pl.scan_parquet(directory / "*.parquet")
    started = time.perf_counter()
    if kind == "scan":
        result = source.group_by("asset_id").agg(pl.col("kwh").sum()).collect()
        rows = len(result)
    else:
        from baselines.compute import compute
        from baselines.methods import PRESETS

        table = events(assets)
        started = time.perf_counter()
        result = compute(source, table, PRESETS["mid_8_of_10"])
        rows = len(result)
        missing = result["baseline_kwh"].null_count()
        assert missing == 0, f"{missing} periods without a baseline"
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_bytes": peak, "rows": rows}


def regression_seconds_per_meter(directory: Path, sample: int = 300) -> float:
    """Fit, per meter, an ordinary least-squares load model (48 half-hour-of-day and 7
    day-of-week indicators) on its readings — the per-meter regression baseline DESIGN §7
    compares against — and return the fitting time per meter."""
    ids = [f"M{i:07d}" for i in range(sample)]
    frame = (pl.scan_parquet(directory / "*.parquet")
             .filter(pl.col("asset_id").cast(pl.String).is_in(ids))
             .sort("asset_id", "start").collect())
    started = time.perf_counter()
    for _, part in frame.group_by("asset_id", maintain_order=True):
        starts = part["start"]
        slot = (starts.dt.hour() * 2 + starts.dt.minute() // 30).to_numpy()
        weekday = starts.dt.weekday().to_numpy() - 1
        design = np.zeros((len(part), 55))
        design[np.arange(len(part)), slot] = 1
        design[np.arange(len(part)), 48 + weekday] = 1
        np.linalg.lstsq(design, part["kwh"].to_numpy(), rcond=None)
    return (time.perf_counter() - started) / sample


def _child(kind: str, directory: Path, assets: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(directory),
                          "--assets", str(assets)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=None,
                        help="where the generated Parquet lives (default /tmp/…)")
    parser.add_argument("--child", choices=["scan", "baselines"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = args.data or Path(f"/tmp/flexops-bench-baselines-{args.assets}")
    if args.child:
        print(json.dumps(measure(args.child, directory, args.assets)))
        return {}
    started = time.perf_counter()
    generate(directory, args.assets)
    print(f"data: {args.assets:,} meters × {DAYS} days = {args.assets * DAYS * 48:,} readings "
          f"in {directory} (ready in {time.perf_counter() - started:.0f}s)", flush=True)
    scan = _child("scan", directory, args.assets)
    ours = _child("baselines", directory, args.assets)
    gib = 1024 ** 3
    ratio = ours["seconds"] / scan["seconds"]
    print(f"bare polars scan + group-by sum   {scan['seconds']:7.1f} s   "
          f"peak {scan['peak_bytes'] / gib:5.2f} GiB")
    print(f"baselines mid 8 of 10             {ours['seconds']:7.1f} s   "
          f"peak {ours['peak_bytes'] / gib:5.2f} GiB   ({ours['rows']:,} event periods)")
    print(f"ratio {ratio:.2f}× (target ≤ 3×); peak {ours['peak_bytes'] / gib:.2f} GiB "
          "(target ≤ 12 GiB)")
    fit = regression_seconds_per_meter(directory, min(300, args.assets))
    per_meter = ours["seconds"] / args.assets
    print(f"per meter: baselines {per_meter * 1e6:.0f} µs, per-meter regression fit "
          f"{fit * 1e6:.0f} µs → {fit / per_meter:.0f}× faster (target ≥ 1,000×)")
    return {"scan_s": scan["seconds"], "baselines_s": ours["seconds"], "ratio": ratio,
            "peak_gib": ours["peak_bytes"] / gib, "regression_ratio": fit / per_meter}


if __name__ == "__main__":
    main()
