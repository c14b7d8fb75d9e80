"""Checking an instruction against its contract (DESIGN §3 "Validation").

Every problem is reported, not the first one. Problems with the contract's *terms* (window,
capacity, declared availability, notice, run time, live dates) are ``overridable``: an SO
may force them with an ``override`` reason, and the instruction is then marked as forced.
Problems of identity and shape (unknown contract, wrong FSP or direction, assets not
obligated, times out of order) never are.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from contracts.io import ContractBook
from contracts.model import Contract

from .instruction import PERIOD, Instruction, InstructionRequest, Kind

_EPS = 1e-9


@dataclass(frozen=True)
class Problem:
    """One reason an instruction cannot be accepted, naming the field."""

    field: str
    reason: str
    overridable: bool = False

    def as_json(self) -> dict[str, object]:
        return {"field": self.field, "reason": self.reason, "overridable": self.overridable}


def _fmt_mw(value: float) -> str:
    return f"{value:g} MW"


def _shape_problems(inst: Instruction, contract: Contract | None, now: dt.datetime
                    ) -> list[Problem]:
    problems = []
    if inst.end <= inst.start:
        problems.append(Problem("end", f"end {inst.end:%Y-%m-%dT%H:%MZ} is not after start"))
    elif inst.end <= now:
        problems.append(Problem("end", "the instruction has already ended"))
    if inst.respond_by <= inst.issued_at:
        problems.append(Problem("respond_by", "respond_by is not after issued_at"))
    for index, asset in enumerate(inst.assets):
        if contract is not None and asset not in contract.assets:
            problems.append(
                Problem(f"assets[{index}]", f"asset {asset!r} is not obligated under {contract.id}")
            )
    if inst.profile_mw is not None and inst.end > inst.start:
        span = inst.end - inst.start
        if span % PERIOD:
            problems.append(
                Problem("profile_mw", "a profile needs whole half hours from start to end"))
        elif len(inst.profile_mw) != span // PERIOD:
            problems.append(
                Problem("profile_mw",
                        f"has {len(inst.profile_mw)} values for {span // PERIOD} half hours")
            )
    return problems


def _term_problems(
    inst: Instruction, contract: Contract, book: ContractBook
) -> list[Problem]:
    problems = []
    zone = contract.zoneinfo
    local_start = inst.start.astimezone(zone).date()
    if not contract.start_date <= local_start <= contract.end_date:
        problems.append(
            Problem("start", f"contract {contract.id} is live {contract.start_date} to "
                    f"{contract.end_date}, not on {local_start}", True)
        )
    elif inst.end > inst.start and contract.window_containing(inst.start, inst.end) is None:
        problems.append(
            Problem("start", f"{inst.start.astimezone(zone):%a %Y-%m-%d %H:%M}–"
                    f"{inst.end.astimezone(zone):%H:%M} {contract.timezone} is outside the "
                    f"service windows of {contract.id}", True)
        )
    if inst.capacity_mw > contract.contracted_mw + _EPS:
        problems.append(
            Problem("capacity_mw", f"{_fmt_mw(inst.capacity_mw)} is above the contracted "
                    f"{_fmt_mw(contract.contracted_mw)}", True)
        )
    declared = book.declared_mw(contract.id, inst.start, inst.end)
    if declared is not None and inst.capacity_mw > declared + _EPS:
        problems.append(
            Problem("capacity_mw", f"{_fmt_mw(inst.capacity_mw)} is above the "
                    f"{_fmt_mw(declared)} the FSP declared available", True)
        )
    notice = dt.timedelta(minutes=contract.notice_minutes)
    if inst.start - inst.issued_at < notice:
        problems.append(
            Problem("start", f"the contract needs {contract.notice_minutes} min notice; "
                    f"start is {(inst.start - inst.issued_at).total_seconds() / 60:.0f} min "
                    "after issued_at", True)
        )
    run = (inst.end - inst.start).total_seconds() / 60
    if run <= 0:
        return problems  # already reported as a shape problem
    if run < contract.min_run_minutes:
        problems.append(
            Problem("end", f"runs {run:.0f} min; the contract's minimum is "
                    f"{contract.min_run_minutes} min", True)
        )
    if contract.max_run_minutes is not None and run > contract.max_run_minutes:
        problems.append(
            Problem("end", f"runs {run:.0f} min; the contract's maximum is "
                    f"{contract.max_run_minutes} min", True)
        )
    return problems


def check(
    inst: Instruction, book: ContractBook, now: dt.datetime
) -> list[Problem]:
    """Every problem with ``inst`` that is not forgiven by its ``override`` reason.

    A cancellation is only checked for shape; an instruction or amendment against the
    contract's terms as well. A relayed instruction not yet mapped to a contract is checked
    for shape only: its terms are the other platform's business until it is reconciled.
    """
    if inst.contract_id is None:
        return _shape_problems(inst, None, now) if inst.kind is not Kind.CANCEL else []
    contract = book.contracts[inst.contract_id]
    problems = _shape_problems(inst, contract, now) if inst.kind is not Kind.CANCEL else []
    if inst.kind is not Kind.CANCEL:
        problems += [
            p for p in _term_problems(inst, contract, book) if not (p.overridable and inst.override)
        ]
    return problems


def build_instruction(
    req: InstructionRequest, *, so: str, book: ContractBook, now: dt.datetime, instruction_id: str
) -> tuple[Instruction | None, list[Problem]]:
    """Turn an SO's request into revision 0, or say everything that is wrong with it."""
    contract = book.contracts.get(req.contract_id)
    if contract is None or contract.so != so:
        # An SO is not told whether another SO's contract exists.
        return None, [Problem("contract_id", f"no contract {req.contract_id!r} held by {so}")]
    problems = []
    if req.fsp is not None and req.fsp != contract.fsp:
        problems.append(Problem("fsp", f"contract {contract.id} is with {contract.fsp}, "
                                f"not {req.fsp}"))
    if req.direction is not None and req.direction != contract.direction:
        problems.append(Problem("direction", f"contract {contract.id} is "
                                f"{contract.direction.value}, not {req.direction.value}"))
    capacity = req.capacity_mw
    if req.profile_mw is not None:
        peak = max(req.profile_mw)
        if capacity is not None and abs(capacity - peak) > _EPS:
            problems.append(Problem("capacity_mw", f"{_fmt_mw(capacity)} is not the profile's "
                                    f"peak {_fmt_mw(peak)}"))
        capacity = peak
    if capacity is None or capacity <= 0:
        problems.append(Problem("profile_mw", "the profile has no positive value"))
        capacity = 0.0
    issued_at = req.issued_at or now
    inst = Instruction(
        id=instruction_id,
        revision=0,
        kind=Kind.INSTRUCT,
        so=so,
        fsp=contract.fsp,
        contract_id=contract.id,
        assets=req.assets or contract.assets,
        direction=contract.direction,
        capacity_mw=capacity,
        profile_mw=req.profile_mw,
        start=req.start,
        end=req.end,
        issued_at=issued_at,
        respond_by=req.respond_by or issued_at + dt.timedelta(minutes=contract.response_minutes),
        test=req.test,
        external_ref=req.external_ref,
        note=req.note,
        override=req.override,
    )
    problems += check(inst, book, now)
    return (None if problems else inst), problems
