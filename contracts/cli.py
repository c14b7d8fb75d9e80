"""The ``contracts`` command: make a sample market, check a contracts file, print the schema."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from contracts.io import ContractsFileError, dump_contracts, load_contracts
from contracts.model import contracts_json_schema
from contracts.sample import build_sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contracts",
        description="flexops contract data: the canonical JSON file both dispatch and "
        "settlement read (docs/contracts-format.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sample = sub.add_parser(
        "sample", help="write a sample market and a matching dispatchd config",
        description="Write contracts.json, config.toml (token digests) and tokens.json "
        "(the tokens themselves, mode 600) into --out.")
    sample.add_argument("--out", type=Path, required=True, help="directory to write into")
    sample.add_argument("--sos", type=int, default=3, help="system operators (default 3)")
    sample.add_argument("--fsps", type=int, default=50, help="FSPs (default 50)")
    sample.add_argument("--assets", type=int, default=2000, help="assets (default 2000)")
    sample.add_argument("--contracts", type=int, default=300, help="contracts (default 300)")
    sample.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    sample.add_argument("--today", type=dt.date.fromisoformat,
                        help="date the contracts are centred on (default today)")
    check = sub.add_parser("check", help="check a contracts file and list every problem")
    check.add_argument("file", type=Path)
    sub.add_parser("schema", help="print the JSON Schema of the contracts file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(contracts_json_schema(), indent=1))
        return 0
    if args.command == "check":
        try:
            book = load_contracts(args.file)
        except ContractsFileError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.file}: ok — {len(book.system_operators)} SOs, {len(book.fsps)} FSPs, "
              f"{len(book.assets)} assets, {len(book.contracts)} contracts, "
              f"{sum(map(len, book.declarations.values()))} declarations")
        return 0
    from dispatchd.config import write_sample_config

    try:
        book = build_sample(n_sos=args.sos, n_fsps=args.fsps, n_assets=args.assets,
                            n_contracts=args.contracts, seed=args.seed, today=args.today)
    except ValueError as exc:
        print(f"contracts: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    dump_contracts(book, args.out / "contracts.json")
    write_sample_config(book, args.out)
    print(f"wrote {args.out}/contracts.json ({len(book.contracts)} contracts), "
          f"{args.out}/config.toml and {args.out}/tokens.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
