"""Relay intake: instructions from another platform, in that platform's own shape.

An SO that runs its own auction and dispatch platform keeps it; dispatchd relays what it
triggers to the FSP's control centre. Each platform has a *mapper* that reads the
platform's message into :class:`ExternalDispatch` values (still in the platform's ids), and
the mapping table (``platform``, ``kind``, external id → ours; kept in the journal, edited
through the API and ``dispatchd relay map``) turns those ids into ours.

**Relay first, reconcile later.** As soon as the FSP is known (its own mapping, or the
mapping of the contract), the instruction is journaled and delivered, even when the
contract or some assets are not mapped yet: it then carries ``unreconciled`` reasons, and
settlement holds it until ``dispatchd reconcile`` attaches the contract. A message whose FSP
cannot be identified is *held*: journaled with the reason, listed in the exceptions, raised
as an alarm (metric, SO stream event, email to operations), and relayed the moment the
missing mapping is added. Nothing is dropped.

Writing a mapper: a class with a ``parse(body, content_type)`` method returning a list of
:class:`ExternalDispatch` and raising :class:`MapperError` with a reason for a message it
cannot read; name it in the config as ``mapper = "package.module:Class"`` (built in:
``json``, see :class:`JsonMapper`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import AwareDatetime, Field, ValidationError

from contracts.io import ContractBook
from contracts.model import Direction, Frozen
from dispatchd.core.instruction import ExternalRef, RelayedRequest

KINDS = ("fsp", "contract", "asset")
"""What the mapping table maps: another platform's FSP, contract and asset ids."""


class MapperError(Exception):
    """A message the mapper cannot read; the reason goes back to the platform.
    ``conflict``: the same dispatch id was used before for other content."""

    def __init__(self, reason: str, *, conflict: bool = False) -> None:
        super().__init__(reason)
        self.conflict = conflict


class ExternalDispatch(Frozen):
    """One dispatch as another platform said it, in that platform's ids."""

    kind: Literal["instruct", "cancel"] = "instruct"
    external_id: str = Field(min_length=1, max_length=256)
    """The platform's id for the dispatch; repeats of it are idempotent."""
    fsp: str | None = Field(default=None, max_length=256)
    contract: str | None = Field(default=None, max_length=256)
    assets: tuple[str, ...] = ()
    direction: Direction | None = None
    capacity_mw: float | None = Field(default=None, gt=0, le=100_000)
    profile_mw: tuple[float, ...] | None = Field(default=None, min_length=1, max_length=2000)
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    issued_at: AwareDatetime | None = None
    respond_by: AwareDatetime | None = None
    note: str = Field(default="", max_length=2000)
    reason: str | None = Field(default=None, max_length=500)
    """Why, for a cancellation."""
    conversation: str | None = Field(default=None, max_length=256)
    """The platform's thread for replies, where its protocol has one."""


class Mapper(Protocol):
    """Reads one platform's messages."""

    def parse(self, body: bytes, content_type: str) -> Sequence[ExternalDispatch]: ...


class JsonMapper:
    """The built-in mapper: a JSON object, or a list of them, with the fields of
    :class:`ExternalDispatch` (``external_id``, ``fsp``, ``contract``, ``assets``,
    ``direction``, ``capacity_mw`` or ``profile_mw``, ``start``, ``end``, ...)."""

    def parse(self, body: bytes, content_type: str) -> Sequence[ExternalDispatch]:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise MapperError(f"the body is not JSON: {exc}") from None
        items = data if isinstance(data, list) else [data]
        found = []
        for index, item in enumerate(items):
            try:
                found.append(ExternalDispatch.model_validate(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "body"
                raise MapperError(f"item {index}, {where}: {first['msg']}") from None
        return found


BUILT_IN: dict[str, Callable[[], Mapper]] = {"json": JsonMapper}


def load_mapper(name: str) -> Mapper:
    """A mapper by built-in name or ``package.module:Class``; ValueError says why not."""
    if name in BUILT_IN:
        return BUILT_IN[name]()
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"mapper {name!r}: not built in ({', '.join(BUILT_IN)}) and not "
                         "package.module:Class")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"mapper {name!r}: {exc}") from None
    mapper = factory()
    if not callable(getattr(mapper, "parse", None)):
        raise ValueError(f"mapper {name!r} has no parse(body, content_type) method")
    return mapper  # type: ignore[no-any-return]


_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def held_key(platform: str, external_id: str) -> str:
    """The key a dispatch is held under while its FSP is not mapped."""
    return f"{platform}:{external_id}"


def instruction_id(platform: str, external_id: str) -> str:
    """Our id for a relayed dispatch: ``platform:external id``, or a digest of the external
    id where it has characters our ids do not allow."""
    plain = f"{platform}:{external_id}"
    if _ID.match(plain):
        return plain
    return f"{platform}:{hashlib.sha256(external_id.encode()).hexdigest()[:32]}"


@dataclass(frozen=True)
class Unidentified:
    """The FSP of a dispatch cannot be identified: the message is held with ``reason``."""

    reason: str


Lookup = Callable[[str, str, str], str | None]


def resolve(dispatch: ExternalDispatch, *, platform: str, so: str, lookup: Lookup,
            book: ContractBook, now: dt.datetime, response_minutes: int
            ) -> RelayedRequest | Unidentified:
    """Map ``dispatch`` to an instruction of ours as far as the table allows.

    The FSP comes from its own mapping or from the mapped contract's FSP; without either,
    the dispatch is :class:`Unidentified`. Everything else that is missing or inconsistent
    goes into ``unreconciled``.
    """
    contract = None
    missing: list[str] = []
    if dispatch.contract is None:
        missing.append("contract: the message names none")
    else:
        ours = lookup(platform, "contract", dispatch.contract)
        contract = book.contracts.get(ours) if ours else None
        if ours is None:
            missing.append(f"contract: {platform} contract {dispatch.contract!r} is not mapped")
        elif contract is None or contract.so != so:
            missing.append(f"contract: {platform} contract {dispatch.contract!r} maps to "
                           f"{ours!r}, which is not a contract of {so}")
            contract = None
    fsp = lookup(platform, "fsp", dispatch.fsp) if dispatch.fsp else None
    if fsp is None and contract is not None:
        fsp = contract.fsp
    if fsp is None or fsp not in book.fsps:
        named = f"FSP {dispatch.fsp!r}" if dispatch.fsp else "no FSP"
        why = (f"{platform} names {named}, which is not mapped" if fsp is None
               else f"{platform} FSP {dispatch.fsp!r} maps to {fsp!r}, not an FSP here")
        return Unidentified(why + ("" if contract is None and dispatch.contract is None
                                   else f", and contract {dispatch.contract!r} gives none"))
    if contract is not None and contract.fsp != fsp:
        missing.append(f"contract: {contract.id} is with {contract.fsp}, but {platform} "
                       f"sent the dispatch to {fsp}")
        contract = None
    assets: list[str] = []
    for external in dispatch.assets:
        ours = lookup(platform, "asset", external)
        if ours is None:
            missing.append(f"asset: {platform} asset {external!r} is not mapped")
        elif contract is not None and ours not in contract.assets:
            missing.append(f"asset: {ours} is not obligated under {contract.id}")
        else:
            assets.append(ours)
    if contract is not None and not dispatch.assets:
        assets = list(contract.assets)
    direction = dispatch.direction or (contract.direction if contract else None)
    if direction is None:
        raise MapperError(f"dispatch {dispatch.external_id}: no direction, and no mapped "
                          "contract to take it from")
    if dispatch.start is None or dispatch.end is None:
        raise MapperError(f"dispatch {dispatch.external_id}: start and end are needed")
    if dispatch.capacity_mw is None and dispatch.profile_mw is None:
        raise MapperError(f"dispatch {dispatch.external_id}: capacity_mw or profile_mw is "
                          "needed")
    issued = dispatch.issued_at or now
    minutes = contract.response_minutes if contract else response_minutes
    return RelayedRequest(
        id=instruction_id(platform, dispatch.external_id), fsp=fsp,
        contract_id=contract.id if contract else None,
        assets=tuple(assets), direction=direction, capacity_mw=dispatch.capacity_mw,
        profile_mw=dispatch.profile_mw, start=dispatch.start, end=dispatch.end,
        issued_at=issued, respond_by=dispatch.respond_by or issued + dt.timedelta(
            minutes=minutes),
        external_ref=ExternalRef(platform=platform, id=dispatch.external_id,
                                 conversation=dispatch.conversation),
        note=dispatch.note, unreconciled=tuple(missing), said=dispatch_json(dispatch),
    )


def dispatch_json(dispatch: ExternalDispatch) -> dict[str, Any]:
    return dispatch.model_dump(mode="json")
