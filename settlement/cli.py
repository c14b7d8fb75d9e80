"""The ``settlement`` command: ingest meter data, run a month."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

EXAMPLES = """\
examples:
  settlement ingest --contracts market/contracts.json --dataset meter-data fsp1-oct.csv
  dispatchd export --config market/config.toml --month 2026-10 --out dispatch-log-2026-10.parquet
  settlement run --month 2026-10 --contracts market/contracts.json \\
      --dispatch-log dispatch-log-2026-10.parquet --dataset meter-data --out runs

Files, columns, rules and outputs: docs/settlement.md.
"""


def _month(text: str) -> str:
    from dispatchd.export import month_dates

    try:
        month_dates(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="settlement",
        description="Monthly settlement of flexibility dispatches: meter data in, what each "
        "dispatch delivered, availability and utilisation payments, penalties and invoice "
        "lines out, with a report.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = sub.add_parser(
        "ingest", help="check FSP meter files and add their good rows to the dataset",
        description="Check every row of each CSV or Parquet file; store new rows in the "
        "monthly dataset, merge repeats, and write the rest to a quarantine CSV with the "
        "reason. Prints rows in = stored + merged + quarantined per file. Ingesting a file "
        "again changes nothing. Exit status 1 if a file cannot be read at all, else 0.")
    ingest.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="meter data, .csv or .parquet")
    ingest.add_argument("--contracts", required=True, type=Path,
                        help="the contracts file (meters and asset ratings)")
    ingest.add_argument("--dataset", required=True, type=Path,
                        help="the meter-data dataset directory (created if missing)")
    ingest.add_argument("--quarantine", type=Path,
                        help="where quarantine files go (default DATASET/quarantine)")
    ingest.add_argument("--month", type=_month,
                        help="YYYY-MM: quarantine readings outside this month")
    ingest.add_argument("--tz", default="Europe/London",
                        help="zone of local times and settlement periods")

    run = sub.add_parser(
        "run", help="settle one month into a new versioned run directory",
        description="Settle a month: baselines, delivered energy, performance, availability "
        "and utilisation payments, penalties, invoice lines. Writes OUT/YYYY-MM/vNNN/ "
        "(Parquet, CSV, manifest.json, report.html, fsp/*.html and, after the first run, "
        "diff.csv). A killed run leaves no partial version. Progress goes to stderr.")
    run.add_argument("--month", required=True, type=_month, help="YYYY-MM")
    run.add_argument("--contracts", required=True, type=Path, help="the contracts file")
    run.add_argument("--dispatch-log", required=True, type=Path,
                     help="the month's dispatch log (dispatchd export)")
    run.add_argument("--dataset", required=True, type=Path, help="the meter-data dataset")
    run.add_argument("--out", type=Path, default=Path("settlement-runs"),
                     help="where run directories go (default settlement-runs)")
    run.add_argument("--tz", default="Europe/London", help="the settlement time zone")
    run.add_argument("--region", default="england-and-wales",
                     help="bank-holiday calendar for baselines")
    run.add_argument("--holiday", action="append", default=[], metavar="YYYY-MM-DD",
                     help="an extra holiday (repeatable)")
    return parser


class _Progress:
    """Throttled progress lines on stderr."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        """``total`` 0 means unknown: the count alone is shown."""
        now = time.monotonic()
        if (total == 0 or done < total) and now - self._last < 1.0:
            return
        self._last = now
        shown = f"{done:,}" if total == 0 else f"{done:,}/{total:,}"
        print(f"  {stage}: {shown}", file=sys.stderr, flush=True)


def cmd_ingest(args: argparse.Namespace) -> int:
    from contracts.io import ContractsFileError, load_contracts
    from settlement.meterdata import MeterFileError, ingest

    try:
        book = load_contracts(args.contracts)
    except ContractsFileError as exc:
        print(f"settlement: {exc}", file=sys.stderr)
        return 2
    status = 0
    for path in args.files:
        try:
            intake = ingest(path, book, args.dataset,
                            quarantine=args.quarantine or args.dataset / "quarantine",
                            month=args.month, tz=args.tz)
        except MeterFileError as exc:
            print(f"settlement: {exc}", file=sys.stderr)
            status = 1
            continue
        print(intake.summary())
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from baselines.calendar import Calendar
    from contracts.io import ContractsFileError, load_contracts
    from settlement.compute import payable_and_held
    from settlement.rules import RuleError, pounds
    from settlement.run import RunInputError, run

    try:
        book = load_contracts(args.contracts)
        calendar = Calendar.with_extra(args.region, [dt.date.fromisoformat(d)
                                                     for d in args.holiday])
        print(f"settling {args.month} …", file=sys.stderr)
        result = run(book=book, contracts_path=args.contracts, log_path=args.dispatch_log,
                     dataset=args.dataset, month=args.month, out=args.out, tz=args.tz,
                     calendar=calendar, progress=_Progress())
    except (ContractsFileError, RunInputError, RuleError, ValueError) as exc:
        print(f"settlement: {exc}", file=sys.stderr)
        return 2
    lines = result.settlement.lines
    payable, held = payable_and_held(lines)
    print(f"{result.directory}: {lines.height} invoice lines, payable £{pounds(payable)}, "
          f"held £{pounds(held)}; {result.settlement.problems.height} blocking problem(s)")
    if result.diff is not None:
        print(f"  {result.diff.height} line(s) changed since the previous version "
              f"(diff.csv)")
    print(f"  report: {result.directory / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ingest":
        return cmd_ingest(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
