"""Instruction values: what an SO asks for, and what is journaled and sent to an FSP.

Field names follow DESIGN §3. They map without loss to Piclo's dispatch (id, capacity,
start, end, flex_provider_id → ``fsp``, obligation_id → ``contract_id``, need_direction →
``direction``), to an OpenADR 3 event (programID → ``contract_id``, intervals with payloads
→ ``profile_mw``, targets → ``assets``) and to a UFTP FlexOrder (ISPs → ``profile_mw``,
ContractID → ``contract_id``, ConversationID → ``external_ref``).

All datetimes are timezone-aware and kept in UTC.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal

from pydantic import AwareDatetime, Field, field_validator, model_validator

from contracts.model import Direction, Frozen, Id

PERIOD = dt.timedelta(minutes=30)
"""Length of one entry of a capacity profile."""


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.astimezone(dt.UTC)


class ExternalRef(Frozen):
    """Where a relayed instruction came from: the platform and its own id."""

    platform: str = Field(min_length=1, max_length=64)
    id: str = Field(min_length=1, max_length=256)
    conversation: str | None = Field(default=None, max_length=256)
    """The platform's thread for replies (UFTP's ConversationID), where it has one."""


class InstructionRequest(Frozen):
    """The body of ``POST /v1/instructions``: what an SO control room submits.

    ``id`` is the idempotency key: submitting the same id and content again returns the
    stored instruction; the same id with other content is a conflict. Omitted, one is made.
    Either ``capacity_mw`` (flat) or ``profile_mw`` (one MW value per half hour from
    ``start``) is needed.
    """

    id: Id | None = None
    contract_id: Id
    fsp: Id | None = None
    """Optional check: must be the contract's FSP."""
    assets: tuple[Id, ...] = ()
    """Subset of the contract's obligated assets; empty means all of them."""
    direction: Direction | None = None
    """Optional check: must be the contract's direction."""
    capacity_mw: float | None = Field(default=None, gt=0, le=100_000)
    profile_mw: tuple[float, ...] | None = Field(default=None, min_length=1, max_length=2000)
    start: AwareDatetime
    end: AwareDatetime
    issued_at: AwareDatetime | None = None
    respond_by: AwareDatetime | None = None
    """Defaults to issued_at + the contract's response time."""
    test: bool = False
    external_ref: ExternalRef | None = None
    note: str = Field(default="", max_length=2000)
    override: str | None = Field(default=None, min_length=3, max_length=500)
    """Reason for forcing an out-of-contract instruction; contract-term problems then pass."""

    _to_utc = field_validator("start", "end", "issued_at", "respond_by")(_utc)

    @field_validator("profile_mw")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and any(v < 0 for v in value):
            raise ValueError("profile values must be ≥ 0 MW")
        return value

    @model_validator(mode="after")
    def _has_quantity(self) -> InstructionRequest:
        if self.capacity_mw is None and self.profile_mw is None:
            raise ValueError("either capacity_mw or profile_mw is needed")
        return self

    def content(self) -> dict[str, Any]:
        """Everything the client said except the id: compared for idempotency."""
        return self.model_dump(mode="json", exclude={"id"})


class RelayedRequest(Frozen):
    """An instruction relayed from another platform, already mapped to this market's ids as
    far as the mapping table allows (``dispatchd/relay``). The FSP is always known; the
    contract and assets may not be yet: ``unreconciled`` then says what is missing, and
    the instruction is delivered all the same (relay first, reconcile later)."""

    id: Id
    fsp: Id
    contract_id: Id | None = None
    assets: tuple[Id, ...] = ()
    direction: Direction
    capacity_mw: float | None = Field(default=None, gt=0, le=100_000)
    profile_mw: tuple[float, ...] | None = Field(default=None, min_length=1, max_length=2000)
    start: AwareDatetime
    end: AwareDatetime
    issued_at: AwareDatetime | None = None
    respond_by: AwareDatetime
    external_ref: ExternalRef
    note: str = Field(default="", max_length=2000)
    unreconciled: tuple[str, ...] = ()
    said: dict[str, Any] = Field(default_factory=dict)
    """The dispatch as the platform said it, in its own ids (compared for idempotency)."""

    _to_utc = field_validator("start", "end", "issued_at", "respond_by")(_utc)

    def content(self) -> dict[str, Any]:
        """What the platform said: the same dispatch again is a repeat, a different one
        under the same id a conflict (mappings added in between change neither)."""
        return self.said


class AmendRequest(Frozen):
    """The body of ``POST /v1/instructions/{id}/amend``: fields to change, all optional.

    ``revision`` is the revision this amendment creates; given, it makes the call idempotent
    (the same amendment again returns the stored revision) and refuses a stale amendment.
    """

    revision: int | None = Field(default=None, ge=1)
    assets: tuple[Id, ...] | None = None
    capacity_mw: float | None = Field(default=None, gt=0, le=100_000)
    profile_mw: tuple[float, ...] | None = Field(default=None, min_length=1, max_length=2000)
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    respond_by: AwareDatetime | None = None
    note: str | None = Field(default=None, max_length=2000)
    override: str | None = Field(default=None, min_length=3, max_length=500)

    _to_utc = field_validator("start", "end", "respond_by")(_utc)

    def content(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"revision"})


class CancelRequest(Frozen):
    """The body of ``POST /v1/instructions/{id}/cancel``."""

    revision: int | None = Field(default=None, ge=1)
    reason: str = Field(min_length=1, max_length=500)

    def content(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"revision"})


class Kind(StrEnum):
    INSTRUCT = "instruct"
    AMEND = "amend"
    CANCEL = "cancel"


class Instruction(Frozen):
    """One journaled revision of an instruction, as delivered to the FSP."""

    id: Id
    revision: int = Field(ge=0)
    kind: Kind
    so: Id
    fsp: Id
    contract_id: Id | None
    """None only for a relayed instruction whose contract is not mapped yet."""
    assets: tuple[Id, ...]
    direction: Direction
    capacity_mw: float
    profile_mw: tuple[float, ...] | None = None
    start: AwareDatetime
    end: AwareDatetime
    issued_at: AwareDatetime
    respond_by: AwareDatetime
    test: bool = False
    external_ref: ExternalRef | None = None
    note: str = ""
    override: str | None = None
    cancel_reason: str | None = None
    unreconciled: tuple[str, ...] = ()
    """What a relayed instruction still lacks (its contract, some assets); empty once
    reconciled. Settlement does not invoice an instruction while this is not empty."""

    @cached_property
    def as_json(self) -> dict[str, Any]:
        """The JSON form, computed once (the value is frozen); do not mutate the result.

        Build a changed instruction with ``model_validate``, never ``model_copy(update=…)``:
        a copy would carry this cache over (see :meth:`model_copy`)."""
        return self.model_dump(mode="json")

    def model_copy(self, *, update: Any = None, deep: bool = False) -> Instruction:
        """A copy; with ``update`` the cached JSON is dropped so it is computed afresh."""
        copied = super().model_copy(update=update, deep=deep)
        if update:
            copied.__dict__.pop("as_json", None)
        return copied


class Response(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class Ack(Frozen):
    """An FSP's answer to one revision, on the HTTP API or the MQTT ``acks`` topic."""

    id: Id | None = None
    """Required on MQTT; on HTTP it comes from the URL (and must match if given)."""
    revision: int = Field(ge=0)
    response: Response
    reason: str | None = Field(default=None, max_length=1000)

    @model_validator(mode="after")
    def _reason_for_rejection(self) -> Ack:
        if self.response is Response.REJECTED and not (self.reason or "").strip():
            raise ValueError("a rejection needs a reason")
        return self


def message_type(kind: Kind) -> Literal["instruction", "amendment", "cancellation"]:
    return {Kind.INSTRUCT: "instruction", Kind.AMEND: "amendment", Kind.CANCEL: "cancellation"}[
        kind
    ]
