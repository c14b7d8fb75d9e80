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


def _where(section: str, index: int, row: Any) -> str:
    ident = row.get("id") if isinstance(row, dict) else getattr(row, "id", None)
    return f"{section}[{index}]" + (f" (id {ident})" if isinstance(ident, str) else "")


@dataclass
class _Parsed:
    """Rows that parsed, with their position in the file, and ids of rows that did not."""

    rows: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    refused_ids: set[str] = field(default_factory=set)


def _check_rows(name: str, raw: Mapping[str, Any]) -> tuple[_Parsed, list[Problem]]:
    problems: list[Problem] = []
    parsed = _Parsed()
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
        parsed.rows[section] = []
        if not isinstance(rows, list):
            problems.append(Problem(name, section, "", "must be a list"))
            continue
        adapter = TypeAdapter(model)
        for index, row in enumerate(rows):
            try:
                parsed.rows[section].append((index, adapter.validate_python(row)))
            except ValidationError as exc:
                if isinstance(row, dict) and isinstance(row.get("id"), str):
                    parsed.refused_ids.add(row["id"])
                for err in exc.errors(include_url=False):
                    problems.append(Problem(name, _where(section, index, row),
                                            _field_path(err["loc"]), err["msg"]))
    return parsed, problems


def _index(
    name: str, section: str, rows: list[tuple[int, Any]], problems: list[Problem]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for index, row in rows:
        if row.id in out:
            problems.append(Problem(name, _where(section, index, row), "id",
                                    f"duplicate id {row.id!r}"))
        out[row.id] = row
    return out


def _cross_check(name: str, parsed: _Parsed) -> tuple[ContractBook, list[Problem]]:
    """Check references between rows. A reference to a row refused for its own problems
    is not reported again: that row's problem is the one to fix."""
    problems: list[Problem] = []
    rows = parsed.rows
    sos = _index(name, "system_operators", rows["system_operators"], problems)
    fsps = _index(name, "fsps", rows["fsps"], problems)
    assets = _index(name, "assets", rows["assets"], problems)
    contracts = _index(name, "contracts", rows["contracts"], problems)

    def missing(ref: str, known: Mapping[str, Any]) -> bool:
        return ref not in known and ref not in parsed.refused_ids

    for i, asset in rows["assets"]:
        if missing(asset.fsp, fsps):
            problems.append(Problem(name, _where("assets", i, asset), "fsp",
                                    f"unknown FSP {asset.fsp!r}"))
    for i, contract in rows["contracts"]:
        where = _where("contracts", i, contract)
        if missing(contract.so, sos):
            problems.append(Problem(name, where, "so", f"unknown system operator {contract.so!r}"))
        if missing(contract.fsp, fsps):
            problems.append(Problem(name, where, "fsp", f"unknown FSP {contract.fsp!r}"))
        for asset_id in contract.assets:
            asset = assets.get(asset_id)
            if asset is None:
                if missing(asset_id, assets):
                    problems.append(Problem(name, where, "assets", f"unknown asset {asset_id!r}"))
            elif asset.fsp != contract.fsp:
                problems.append(
                    Problem(name, where, "assets",
                            f"asset {asset_id!r} belongs to {asset.fsp!r}, not {contract.fsp!r}")
                )
    declarations: dict[str, list[AvailabilityDeclaration]] = defaultdict(list)
    for i, decl in rows["declarations"]:
        if missing(decl.contract_id, contracts):
            problems.append(Problem(name, f"declarations[{i}]", "contract_id",
                                    f"unknown contract {decl.contract_id!r}"))
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
    # Cross-references are checked among the rows that parsed, so one run lists everything.
    book, cross = _cross_check(name, parsed)
    if problems or cross:
        raise ContractsFileError(problems + cross)
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
