"""Versioned settlement runs: inputs in, a complete run directory out, or nothing.

``OUT/YYYY-MM/vNNN/`` holds the results (Parquet, and CSV for finance), the report pages,
``manifest.json`` (content hashes of every input, the parameters, the code version and
every output's hash) and, from the second run of a month on, ``diff.csv``: which invoice
lines moved against the previous version, by how much, and why. The directory is built
under a hidden name and renamed when complete, so a killed run leaves no partial version.
The same inputs give byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl

from baselines.calendar import Calendar
from contracts.io import ContractBook
from contracts.model import Direction
from dispatchd.export import DISPATCH_LOG_SCHEMA, month_bounds
from settlement.compute import Settlement, settle
from settlement.meterdata import dataset_files, months_between, readings
from settlement.report import event_blocks, render
from settlement.rules import pounds

ROOT = Path(__file__).resolve().parents[1]
CODE = ("settlement", "baselines", "contracts", "dispatchd/export.py")
HISTORY_DAYS = 60
"""Meter data read before the month: enough for every preset's lookback (45 days)."""

Progress = Callable[[str, int, int], None]


class RunInputError(ValueError):
    """An input the run cannot use (missing file, wrong schema); nothing is written."""


@dataclass(frozen=True)
class RunResult:
    directory: Path
    version: str
    settlement: Settlement
    diff: pl.DataFrame | None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> dict[str, str]:
    """The package version and a hash of the source that computes settlement."""
    digest = hashlib.sha256()
    for top in CODE:
        path = ROOT / top
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(ROOT)).encode())
            digest.update(source.read_bytes())
    try:
        version = metadata.version("flexops")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        version = "source"
    return {"package": version, "source_sha256": digest.hexdigest()}


def read_log(path: Path) -> pl.DataFrame:
    """The dispatch log, checked against its documented schema."""
    if not path.exists():
        raise RunInputError(f"{path}: no dispatch log there (dispatchd export writes it)")
    frame = pl.read_parquet(path)
    missing = [c for c in DISPATCH_LOG_SCHEMA if c not in frame.columns]
    if missing:
        raise RunInputError(f"{path}: not a dispatch log; missing {', '.join(missing)}")
    return frame.select(list(DISPATCH_LOG_SCHEMA)).cast(DISPATCH_LOG_SCHEMA)  # type: ignore[arg-type]


def _versions(month_dir: Path) -> list[str]:
    return sorted(p.name for p in month_dir.glob("v[0-9][0-9][0-9]") if p.is_dir())


def _diff(previous: Path, lines: pl.DataFrame, manifest: dict[str, Any]) -> pl.DataFrame:
    """Invoice lines that moved since ``previous``, with the inputs that changed."""
    before = pl.read_parquet(previous / "invoice_lines.parquet")
    old = json.loads((previous / "manifest.json").read_text())
    changed_inputs = [name for name, entry in manifest["inputs"].items()
                      if old["inputs"].get(name) != entry]
    if old["code"] != manifest["code"]:
        changed_inputs.append("code")
    if old["parameters"] != manifest["parameters"]:
        changed_inputs.append("parameters")
    inputs_note = ("changed inputs: " + ", ".join(changed_inputs)) if changed_inputs \
        else "no input changed"
    joined = before.join(lines, on="line_id", how="full", suffix="_new", coalesce=True)
    rows = []
    for r in joined.sort("line_id").iter_rows(named=True):
        was, now = r["amount_pence"], r["amount_pence_new"]
        reasons = []
        if was is None:
            reasons.append("new line")
        elif now is None:
            reasons.append("line removed")
        else:
            if r["quantity"] != r["quantity_new"]:
                reasons.append(f"quantity {r['quantity']} → {r['quantity_new']} {r['unit']}")
            if r["rate"] != r["rate_new"]:
                reasons.append(f"rate {r['rate']} → {r['rate_new']}")
            if r["status"] != r["status_new"]:
                reasons.append(f"{r['status']} → {r['status_new']}")
        if not reasons:
            continue
        rows.append({"line_id": r["line_id"],
                     "before": None if was is None else pounds(was),
                     "after": None if now is None else pounds(now),
                     "change": pounds((now or 0) - (was or 0)),
                     "why": "; ".join(reasons) + f" ({inputs_note})"})
    return pl.DataFrame(rows, schema={k: pl.String for k in (
        "line_id", "before", "after", "change", "why")}, orient="row")


def _write_csv(frame: pl.DataFrame, path: Path) -> None:
    frame.write_csv(path)


def run(*, book: ContractBook, contracts_path: Path, log_path: Path, dataset: Path,
        month: str, out: Path, tz: str = "Europe/London", calendar: Calendar | None = None,
        progress: Progress | None = None) -> RunResult:
    """Settle ``month`` and write the next version under ``out/month``."""
    calendar = calendar or Calendar()
    log = read_log(log_path)
    begin, end = month_bounds(month, tz)
    months = months_between((begin - dt.timedelta(days=HISTORY_DAYS)).date(), end.date())
    meter_files = dataset_files(dataset, months)
    manifest: dict[str, Any] = {
        "month": month,
        "parameters": {"tz": tz, "calendar": calendar.region,
                       "extra_holidays": sorted(str(d) for d in calendar.extra_holidays),
                       "history_days": HISTORY_DAYS},
        "inputs": {
            "contracts": {"file": contracts_path.name, "sha256": sha256(contracts_path)},
            "dispatch_log": {"file": log_path.name, "sha256": sha256(log_path)},
            "meter_data": {"files": [{"file": str(p.relative_to(dataset)), "sha256": sha256(p)}
                                     for p in meter_files]},
        },
        "code": code_version(),
    }
    exporters = [a.id for a in book.assets.values() if a.export_kw > 0]
    result = settle(book, log, readings(dataset, months, exporters=exporters), month, tz=tz,
                    calendar=calendar, progress=progress)
    month_dir = out / month
    month_dir.mkdir(parents=True, exist_ok=True)
    existing = _versions(month_dir)
    version = f"v{len(existing) + 1:03d}" if not existing else \
        f"v{int(existing[-1][1:]) + 1:03d}"
    manifest["version"] = version
    manifest["previous"] = existing[-1] if existing else None
    diff = _diff(month_dir / existing[-1], result.lines, manifest) if existing else None
    _remove_stale(month_dir)
    partial = month_dir / f".{version}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        _write(partial, result, manifest, diff, book)
        partial.rename(month_dir / version)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return RunResult(month_dir / version, version, result, diff)


def _remove_stale(month_dir: Path) -> None:
    """Remove what a killed run left (a hidden partial directory whose process is gone)."""
    for partial in month_dir.glob(".v*.partial-*"):
        pid = int(partial.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:  # pragma: no cover - another user's live process
            pass


def _write(directory: Path, s: Settlement, manifest: dict[str, Any],
           diff: pl.DataFrame | None, book: ContractBook) -> None:
    frames = {"instructions": s.instructions, "periods": s.periods,
              "asset_periods": s.asset_periods, "availability": s.availability,
              "invoice_lines": s.lines, "problems": s.problems}
    for name, frame in frames.items():
        frame.write_parquet(directory / f"{name}.parquet", statistics=False)
    lines = s.lines.with_columns(amount=pl.col("amount_pence").map_elements(
        pounds, return_dtype=pl.String))
    _write_csv(lines, directory / "invoice_lines.csv")
    invoices = (lines.group_by("so", "fsp", "status")
                .agg(pl.col("amount_pence").sum(), lines=pl.len())
                .sort("so", "fsp", "status")
                .with_columns(amount=pl.col("amount_pence").map_elements(
                    pounds, return_dtype=pl.String)))
    _write_csv(invoices, directory / "invoices.csv")
    _write_csv(s.instructions.drop("assets", "profile_mw"), directory / "instructions.csv")
    _write_csv(s.problems, directory / "problems.csv")
    if diff is not None:
        _write_csv(diff, directory / "diff.csv")
    turn_up = {c.id: c.direction is Direction.TURN_UP for c in book.contracts.values()}
    events = event_blocks(s, turn_up)
    (directory / "report.html").write_text(render(
        s, title=f"Settlement {manifest['month']} ({manifest['version']})", turn_up=turn_up,
        diff=diff, manifest=manifest, events=events), encoding="utf-8")
    fsp_dir = directory / "fsp"
    fsp_dir.mkdir()
    for fsp in sorted(set(s.lines["fsp"].to_list()) | set(s.instructions["fsp"].to_list())):
        (fsp_dir / f"{fsp}.html").write_text(render(
            s, title=f"Settlement {manifest['month']} ({manifest['version']}) — {fsp}",
            turn_up=turn_up, fsp=fsp, manifest=manifest, events=events), encoding="utf-8")
    manifest["outputs"] = {str(p.relative_to(directory)): sha256(p)
                           for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True)
                                             + "\n", encoding="utf-8")
