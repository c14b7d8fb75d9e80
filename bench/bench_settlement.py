"""A month's settlement at national scale, beside a bare polars scan of the same meter data.

Run: ``./dev bench bench_settlement`` (or ``python bench/bench_settlement.py [--assets N]``).

The market is generated reproducibly (seed 3): ``--assets`` assets (100,000 by default; 5%
batteries that also export) in contracts of 20 assets (every day 16:00–20:00, turn-down),
one instruction per contract on Thu 29 Oct 2026, 17:00–18:00 GMT, answered and completed.
Meter data covers 16 Sep – 30 Oct 2026 (45 local days, the clocks going back on 25 Oct):
216 M half-hourly readings for 100,000 assets, plus the batteries' export rows, written in
the meter-data dataset's own layout (``month=YYYY-MM/part-*.parquet``) to ``--data`` and
reused.

Each side runs in a child process of its own, so its peak memory (max RSS) is its own:

- *reference*: ``scan_parquet → group_by(asset_id) → sum(kwh)`` over the same files;
- *settlement*: ``settlement.run`` for 2026-10 — baselines (``mid_8_of_10``), delivered
  energy, performance, availability, invoice lines, and every output file including the
  report pages — from the contracts already loaded.

DESIGN §7 targets: ≤ 3× the reference time, ≤ 12 GiB peak memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.io import ContractBook, dump_contracts, load_contracts
from contracts.model import (
    FSP,
    Asset,
    BaselineRule,
    Contract,
    Direction,
    ServiceWindow,
    SystemOperator,
)
from dispatchd.export import DISPATCH_LOG_SCHEMA

LONDON = "Europe/London"
FIRST_DAY = dt.date(2026, 9, 16)
LAST_DAY = dt.date(2026, 10, 30)
MONTH = "2026-10"
PER_CONTRACT = 20
BLOCK = 5000
EXPORTING = 0.05


def _midnight(day: dt.date) -> dt.datetime:
    from baselines.periods import local_midnight_utc

    return local_midnight_utc(day, LONDON)


def market(assets: int) -> ContractBook:
    rng = np.random.default_rng(3)
    batteries = rng.random(assets) < EXPORTING
    sizes = rng.uniform(20, 400, assets).round(1)
    asset_models = {
        f"A{i:06d}": Asset(
            id=f"A{i:06d}", fsp=f"F{i // (PER_CONTRACT * 50):03d}", meter_id=f"M{i:07d}",
            zone="Z", technology="battery" if batteries[i] else "industrial_load",
            import_kw=float(sizes[i]), export_kw=float(sizes[i]) if batteries[i] else 0.0)
        for i in range(assets)}
    ids = list(asset_models)
    contracts = {}
    for c in range(0, assets, PER_CONTRACT):
        cid = f"C{c // PER_CONTRACT:05d}"
        members = tuple(ids[c:c + PER_CONTRACT])
        contracts[cid] = Contract(
            id=cid, so="SO1", fsp=asset_models[members[0]].fsp, zone="Z", service="secure",
            direction=Direction.TURN_DOWN,
            contracted_mw=round(sum(asset_models[a].import_kw for a in members) / 2000, 2),
            start_date=dt.date(2026, 1, 1), end_date=dt.date(2026, 12, 31),
            windows=(ServiceWindow(start_time=dt.time(16), end_time=dt.time(20)),),
            availability_price=Decimal("8.50"), utilisation_price=Decimal("250"),
            baseline=BaselineRule(method="mid_8_of_10"), assets=members)
    fsps = sorted({a.fsp for a in asset_models.values()})
    return ContractBook(
        system_operators={"SO1": SystemOperator(id="SO1", name="Bench DSO")},
        fsps={f: FSP(id=f, name=f"Bench {f}") for f in fsps},
        assets=asset_models, contracts=contracts)


def dispatch_log(book: ContractBook) -> pl.DataFrame:
    start = _midnight(dt.date(2026, 10, 29)) + dt.timedelta(hours=17)
    rows = []
    for contract in book.contracts.values():
        row = {k: None for k in DISPATCH_LOG_SCHEMA}
        row |= {"id": f"I{contract.id}", "revision": 0, "kind": "instruct", "latest": True,
                "so": contract.so, "fsp": contract.fsp, "contract_id": contract.id,
                "assets": list(contract.assets), "direction": "turn_down",
                "capacity_mw": contract.contracted_mw, "start": start,
                "end": start + dt.timedelta(hours=1), "issued_at": start,
                "respond_by": start, "accepted_at": start, "state": "completed",
                "test": False, "reconciliation": "direct"}
        rows.append(row)
    return pl.DataFrame(rows, schema=DISPATCH_LOG_SCHEMA, orient="row")


def generate(directory: Path, assets: int) -> None:
    """Write the market, dispatch log and meter dataset (skipped when complete)."""
    marker = directory / "COMPLETE"
    if marker.exists() and marker.read_text() == str(assets):
        return
    directory.mkdir(parents=True, exist_ok=True)
    book = market(assets)
    dump_contracts(book, directory / "contracts.json")
    dispatch_log(book).write_parquet(directory / "dispatch-log.parquet")
    rng = np.random.default_rng(1)
    t0, t1 = _midnight(FIRST_DAY), _midnight(LAST_DAY + dt.timedelta(days=1))
    periods = int((t1 - t0) / dt.timedelta(minutes=30))
    starts = int(t0.timestamp() * 1_000_000) + np.arange(periods, dtype=np.int64) * 1_800_000_000
    month_of = np.where(starts < int(_midnight(dt.date(2026, 10, 1)).timestamp() * 1_000_000),
                        0, 1)
    slot = ((starts // 1_800_000_000) % 48)
    shape = 0.5 + 0.3 * ((slot >= 14) & (slot < 38)) + 0.2 * ((slot >= 32) & (slot < 40))
    event = (starts >= int((_midnight(dt.date(2026, 10, 29)).timestamp() + 17 * 3600) * 1e6)) \
        & (starts < int((_midnight(dt.date(2026, 10, 29)).timestamp() + 18 * 3600) * 1e6))
    models = list(book.assets.values())
    flows = pa.array(["import", "export"])
    for first in range(0, assets, BLOCK):
        block = models[first:first + BLOCK]
        n = len(block)
        rating = np.array([a.import_kw for a in block])[:, None] * 0.5
        load = rating * shape[None, :] * rng.normal(1, 0.05, size=(n, periods))
        load[:, event] *= 0.55  # the dispatch: a 45% reduction for the hour
        battery = np.array([a.export_kw > 0 for a in block])
        load[battery] -= rating[battery] * 0.6  # batteries export part of the day
        for month_index, month in enumerate(("2026-09", "2026-10")):
            cols = month_of == month_index
            k = int(cols.sum())
            parts = []
            for flow, values, who in (("import", np.clip(load, 0, None), np.ones(n, bool)),
                                      ("export", np.clip(-load, 0, None), battery)):
                rows = int(who.sum())
                if rows == 0:
                    continue
                picked = np.flatnonzero(who)
                asset_index = np.repeat(picked, k).astype(np.int32)
                parts.append(pa.table({
                    "asset_id": pa.DictionaryArray.from_arrays(
                        pa.array(asset_index), pa.array([a.id for a in block])),
                    "meter_id": pa.DictionaryArray.from_arrays(
                        pa.array(asset_index), pa.array([a.meter_id for a in block])),
                    "start": pa.array(np.tile(starts[cols], rows), pa.timestamp("us", "UTC")),
                    "flow": pa.DictionaryArray.from_arrays(
                        pa.array(np.full(rows * k, 0 if flow == "import" else 1, np.int32)),
                        flows),
                    "kwh": pa.array(values[picked][:, cols].reshape(-1).round(3)),
                    "estimated": pa.array(np.zeros(rows * k, bool)),
                }))
            out = directory / "meter-data" / f"month={month}"
            out.mkdir(parents=True, exist_ok=True)
            # Without the Arrow schema the columns read back as plain strings, as the
            # intake writes them (the values are still dictionary-encoded on disk).
            pq.write_table(pa.concat_tables(parts), out / f"part-{first // BLOCK:04d}.parquet",
                           row_group_size=1_000_000, store_schema=False)
    marker.write_text(str(assets))


def measure(kind: str, directory: Path) -> dict[str, float]:
    """Run in the child: time one side and report it with the child's peak memory."""
    files = sorted((directory / "meter-data").rglob("part-*.parquet"))
    if kind == "scan":
        started = time.perf_counter()
        result = pl.scan_parquet(files).group_by("asset_id").agg(pl.col("kwh").sum()).collect()
        rows = len(result)
        extra: dict[str, float] = {"readings": float(
            pl.scan_parquet(files).select(pl.len()).collect().item())}
    else:
        from settlement.run import run

        loading = time.perf_counter()
        book = load_contracts(directory / "contracts.json")
        extra = {"load_contracts_s": time.perf_counter() - loading}
        out = directory / "runs"
        started = time.perf_counter()
        result = run(book=book, contracts_path=directory / "contracts.json",
                     log_path=directory / "dispatch-log.parquet",
                     dataset=directory / "meter-data", month=MONTH, out=out)
        rows = result.settlement.lines.height
        held = result.settlement.lines.filter(pl.col("status") == "held").height
        assert held == 0, f"{held} lines held: {result.settlement.problems.head(3)}"
        extra["asset_periods"] = float(result.settlement.asset_periods.height)
        perf = result.settlement.instructions["performance"].cast(pl.Float64)
        extra["performance_mean"] = float(perf.mean())  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_bytes": peak, "rows": rows, **extra}


def _child(kind: str, directory: Path, assets: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(directory),
                          "--assets", str(assets)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=None,
                        help="where the generated market and meter data live (default /tmp/…)")
    parser.add_argument("--child", choices=["scan", "settlement"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = args.data or Path(f"/tmp/flexops-bench-settlement-{args.assets}")
    if args.child:
        print(json.dumps(measure(args.child, directory)))
        return {}
    started = time.perf_counter()
    generate(directory, args.assets)
    print(f"data: {args.assets:,} assets in {args.assets // PER_CONTRACT:,} contracts, "
          f"{(LAST_DAY - FIRST_DAY).days + 1} days of half-hourly readings in "
          f"{directory} (ready in {time.perf_counter() - started:.0f}s)", flush=True)
    scan = _child("scan", directory, args.assets)
    ours = _child("settlement", directory, args.assets)
    gib = 1024 ** 3
    ratio = ours["seconds"] / scan["seconds"]
    print(f"readings: {int(scan['readings']):,}")
    print(f"bare polars scan + group-by sum   {scan['seconds']:7.1f} s   "
          f"peak {scan['peak_bytes'] / gib:5.2f} GiB")
    print(f"settlement run {MONTH}           {ours['seconds']:7.1f} s   "
          f"peak {ours['peak_bytes'] / gib:5.2f} GiB   ({int(ours['rows']):,} invoice lines, "
          f"{int(ours['asset_periods']):,} asset half hours, mean performance "
          f"{ours['performance_mean']:.3f}; contracts loaded in {ours['load_contracts_s']:.1f} s)")
    print(f"ratio {ratio:.2f}× (target ≤ 3×); peak {ours['peak_bytes'] / gib:.2f} GiB "
          "(target ≤ 12 GiB)")
    return {"scan_s": scan["seconds"], "settlement_s": ours["seconds"], "ratio": ratio,
            "peak_gib": ours["peak_bytes"] / gib}


if __name__ == "__main__":
    main()
