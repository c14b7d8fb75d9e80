"""Reading and writing the canonical contracts file.

A file is loaded whole or not at all: :func:`load_contracts` checks every row and every
cross-reference and raises :class:`ContractsFileError` listing *all* problems (file,
position, field, reason) when any is found.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from contracts.model import (
    FSP,
    Asset,
    AvailabilityDeclaration,
    Contract,
    Frozen,
    SystemOperator,
)

FORMAT_VERSION = 1

_SECTIONS: dict[str, type[BaseModel]] = {
    "system_operators": SystemOperator,
    "fsps": FSP,
    "assets": Asset,
    "contracts": Contract,
    "declarations": AvailabilityDeclaration,
}


class ContractsDocument(Frozen):
    """The whole canonical file (``format_version`` 1)."""

    format_version: int = FORMAT_VERSION
    system_operators: tuple[SystemOperator, ...] = ()
    fsps: tuple[FSP, ...] = ()
    assets: tuple[Asset, ...] = ()
    contracts: tuple[Contract, ...] = ()
    declarations: tuple[AvailabilityDeclaration, ...] = ()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file: where, which field, and why."""

    file: str
    position: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.position}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ContractsFileError(ValueError):
    """The contracts file was refused; ``problems`` lists everything found wrong in it."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in contracts file:\n{shown}{more}")


@dataclass(frozen=True)
class ContractBook:
    """Everything in a contracts file, indexed. Build it with :func:`load_contracts`."""

    system_operators: Mapping[str, SystemOperator]
    fsps: Mapping[str, FSP]
    assets: Mapping[str, Asset]
    contracts: Mapping[str, Contract]
    declarations: Mapping[str, tuple[AvailabilityDeclaration, ...]] = field(default_factory=dict)

    def declared_mw(self, contract_id: str, start: dt.datetime, end: dt.datetime) -> float | None:
        """Lowest MW declared for ``contract_id`` over any part of [start, end), if declared."""
        overlapping = [
            d.available_mw
            for d in self.declarations.get(contract_id, ())
            if d.start < end and start < d.end
        ]
        return min(overlapping) if overlapping else None

    def to_document(self) -> ContractsDocument:
        return ContractsDocument(
            system_operators=tuple(self.system_operators.values()),
            fsps=tuple(self.fsps.values()),
            assets=tuple(self.assets.values()),
            contracts=tuple(self.contracts.values()),
            declarations=tuple(d for ds in self.declarations.values() for d in ds),
        )


def _field_path(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _check_rows(name: str, raw: Mapping[str, Any]) -> tuple[dict[str, list[Any]], list[Problem]]:
    problems: list[Problem] = []
    parsed: dict[str, list[Any]] = {}
    version = raw.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        problems.append(
            Problem(name, "$", "format_version", f"is {version!r}; this reads {FORMAT_VERSION}")
        )
    for key in raw:
        if key not in _SECTIONS and key != "format_version":
            problems.append(Problem(name, "$", key, "unknown section"))
    for section, model in _SECTIONS.items():
        rows = raw.get(section, [])
        if not isinstance(rows, list):
            problems.append(Problem(name, section, "", "must be a list"))
            continue
        adapter = TypeAdapter(model)
        parsed[section] = []
        for index, row in enumerate(rows):
            position = f"{section}[{index}]"
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                position += f" (id {row['id']})"
            try:
                parsed[section].append(adapter.validate_python(row))
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    problems.append(Problem(name, position, _field_path(err["loc"]), err["msg"]))
    return parsed, problems


def _index(
    name: str, section: str, rows: list[Any], problems: list[Problem]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for index, row in enumerate(rows):
        if row.id in out:
            problems.append(Problem(name, f"{section}[{index}]", "id", f"duplicate id {row.id!r}"))
        out[row.id] = row
    return out


def _cross_check(name: str, parsed: dict[str, list[Any]]) -> tuple[ContractBook, list[Problem]]:
    problems: list[Problem] = []
    sos = _index(name, "system_operators", parsed["system_operators"], problems)
    fsps = _index(name, "fsps", parsed["fsps"], problems)
    assets = _index(name, "assets", parsed["assets"], problems)
    contracts = _index(name, "contracts", parsed["contracts"], problems)
    for i, asset in enumerate(parsed["assets"]):
        if asset.fsp not in fsps:
            problems.append(Problem(name, f"assets[{i}]", "fsp", f"unknown FSP {asset.fsp!r}"))
    for i, contract in enumerate(parsed["contracts"]):
        where = f"contracts[{i}] (id {contract.id})"
        if contract.so not in sos:
            problems.append(Problem(name, where, "so", f"unknown system operator {contract.so!r}"))
        if contract.fsp not in fsps:
            problems.append(Problem(name, where, "fsp", f"unknown FSP {contract.fsp!r}"))
        for asset_id in contract.assets:
            asset = assets.get(asset_id)
            if asset is None:
                problems.append(Problem(name, where, "assets", f"unknown asset {asset_id!r}"))
            elif asset.fsp != contract.fsp:
                problems.append(
                    Problem(name, where, "assets",
                            f"asset {asset_id!r} belongs to {asset.fsp!r}, not {contract.fsp!r}")
                )
    declarations: dict[str, list[AvailabilityDeclaration]] = defaultdict(list)
    for i, decl in enumerate(parsed["declarations"]):
        if decl.contract_id not in contracts:
            problems.append(
                Problem(name, f"declarations[{i}]", "contract_id",
                        f"unknown contract {decl.contract_id!r}")
            )
        declarations[decl.contract_id].append(decl)
    book = ContractBook(
        system_operators=sos,
        fsps=fsps,
        assets=assets,
        contracts=contracts,
        declarations={k: tuple(v) for k, v in declarations.items()},
    )
    return book, problems


def parse_contracts(raw: Any, name: str = "<contracts>") -> ContractBook:
    """Build a :class:`ContractBook` from already-decoded JSON, or raise with every problem."""
    if not isinstance(raw, dict):
        raise ContractsFileError([Problem(name, "$", "", "the top level must be a JSON object")])
    parsed, problems = _check_rows(name, raw)
    if problems:
        raise ContractsFileError(problems)
    book, problems = _cross_check(name, parsed)
    if problems:
        raise ContractsFileError(problems)
    return book


def load_contracts(path: str | Path) -> ContractBook:
    """Load the canonical JSON contracts file at ``path``; all or nothing."""
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise ContractsFileError([Problem(str(path), "$", "", f"cannot read: {exc}")]) from exc
    except json.JSONDecodeError as exc:
        raise ContractsFileError(
            [Problem(str(path), f"line {exc.lineno} column {exc.colno}", "",
                     f"not JSON: {exc.msg}")]
        ) from exc
    return parse_contracts(raw, str(path))


def dump_contracts(book: ContractBook, path: str | Path) -> None:
    """Write ``book`` as the canonical JSON file (stable key order, human-diffable)."""
    text = book.to_document().model_dump_json(indent=1, exclude_defaults=False)
    Path(path).write_text(text + "\n", encoding="utf-8")
