"""OpenADR 3.1 VTN: the part of the VTN API a VEN needs to receive dispatches.

An FSP control system that speaks OpenADR 3 is a VEN; flexops is its VTN, under
``/openadr3`` (the VEN's ``vtn_base_url``). What maps to what:

- **program**: one per contract of the FSP (``id`` and ``programName`` are the contract id);
- **event**: one per instruction, ``id`` the instruction id, ``programID`` its contract
  (relayed instructions not yet reconciled have the program ``unreconciled``);
  ``intervalPeriod`` and one interval per half hour with a ``DISPATCH_SETPOINT_RELATIVE``
  payload in kW (negative: turn down, positive: turn up); ``targets`` are the assets.
  An amendment is a modification of the event (new ``modificationDateTime``, notified as
  ``PUT``); a cancellation deletes it (notified as ``DELETE``; the event is no longer
  listed);
- **reports** back from the VEN: a report on an event whose payload is ``OPERATING_STATE``
  with the value ``ACCEPTED``, or ``REJECTED`` and a reason, is the FSP's acknowledgement of
  the event's current revision; any other report (e.g. ``DELTA_USAGE``, the delivered
  quantity) is kept and listed as the VEN's record; settlement measures delivery from
  meters, not from these;
- **notifications**: to each subscription's ``callbackUrl`` (webhook, with its
  ``bearerToken``), and on the broker, on the topics ``GET /notifiers/mqtt/topics/...``
  names, as ``{"objectType", "operation", "object"}``.

Authentication is OAuth2 client credentials (``POST /auth/token``, discovered by ``GET
/auth/server``): each client in ``[openadr.clients]`` is one FSP, and sees only that
FSP's programs, events, VENs, resources, subscriptions and reports.

VENs, resources, subscriptions and reports are kept in the journal's database (table
``openadr``); events and programs are views of the instructions and contracts. Tokens
live in memory: after a restart a VEN fetches a new one, as OAuth2 clients do on a 401.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError

from contracts.io import ContractBook
from dispatchd.config import OpenadrConfig, token_digest
from dispatchd.core.engine import InstructionView
from dispatchd.core.instruction import PERIOD, Kind

PREFIX = "/openadr3"
UNRECONCILED_PROGRAM = "unreconciled"


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"PT{seconds // 3600}H{seconds % 3600 // 60}M{seconds % 60}S"


def program(contract_id: str, book: ContractBook, created: dt.datetime) -> dict[str, Any]:
    contract = book.contracts.get(contract_id)
    return {
        "id": contract_id, "objectType": "PROGRAM", "programName": contract_id,
        "createdDateTime": _iso(created), "modificationDateTime": _iso(created),
        "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                "payloadType": "DISPATCH_SETPOINT_RELATIVE", "units": "KW"}],
        "targets": list(contract.assets) if contract else [],
    }


def event(view: InstructionView) -> dict[str, Any]:
    """The OpenADR event for an instruction's latest revision (not for a cancellation)."""
    latest = view.latest.instruction
    first = view.revisions[0]
    sign = -1 if latest.direction.value == "turn_down" else 1
    halves = max(1, int((latest.end - latest.start) / PERIOD))
    values = latest.profile_mw or (latest.capacity_mw,) * halves
    span = latest.end - latest.start
    period = PERIOD if latest.profile_mw else span
    intervals = [
        {"id": i, "intervalPeriod": {"start": _iso(latest.start + i * period),
                                     "duration": _duration(period)},
         "payloads": [{"type": "DISPATCH_SETPOINT_RELATIVE",
                       "values": [round(sign * mw * 1000, 3)]}]}
        for i, mw in enumerate(values if latest.profile_mw else values[:1])]
    return {
        "id": view.id, "objectType": "EVENT",
        "programID": latest.contract_id or UNRECONCILED_PROGRAM,
        "eventName": f"{latest.direction.value} {latest.capacity_mw:g} MW "
                     f"(revision {latest.revision})",
        "priority": 0, "targets": list(latest.assets),
        "createdDateTime": _iso(first.accepted_at),
        "modificationDateTime": _iso(view.latest.accepted_at),
        "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                "payloadType": "DISPATCH_SETPOINT_RELATIVE", "units": "KW"}],
        "intervalPeriod": {"start": _iso(latest.start), "duration": _duration(span)},
        "intervals": intervals,
    }


def is_live(view: InstructionView) -> bool:
    """Whether the instruction is an event a VEN sees (a cancelled one is deleted)."""
    return view.latest.instruction.kind is not Kind.CANCEL


@dataclass(frozen=True)
class Client:
    """An authenticated VEN client: the FSP it is."""

    client_id: str
    fsp: str


class Tokens:
    """Bearer tokens issued by ``/auth/token``, kept as digests, expiring."""

    def __init__(self, config: OpenadrConfig, clock: Callable[[], dt.datetime]) -> None:
        self._config = config
        self._clock = clock
        self._issued: dict[str, tuple[Client, dt.datetime]] = {}

    def issue(self, client_id: str, secret: str) -> tuple[str, int] | None:
        found = self._config.clients.get(client_id)
        if found is None or not secrets.compare_digest(token_digest(secret),
                                                       found.secret_sha256):
            return None
        token = secrets.token_urlsafe(32)
        ttl = int(self._config.token_ttl_s)
        self._issued[token_digest(token)] = (Client(client_id, found.fsp),
                                             self._clock() + dt.timedelta(seconds=ttl))
        now = self._clock()
        self._issued = {k: v for k, v in self._issued.items() if v[1] > now}
        return token, ttl

    def client(self, token: str | None) -> Client | None:
        if not token:
            return None
        found = self._issued.get(token_digest(token))
        if found is None or found[1] <= self._clock():
            return None
        return found[0]


def basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


class Store:
    """VENs, resources, subscriptions and reports, per FSP, in the journal's database."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS openadr (kind TEXT NOT NULL, id TEXT NOT NULL, "
            "fsp TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, id))")

    def put(self, kind: str, fsp: str, body: dict[str, Any]) -> None:
        self._conn.execute("INSERT OR REPLACE INTO openadr VALUES (?, ?, ?, ?)",
                           (kind, body["id"], fsp, json.dumps(body)))

    def get(self, kind: str, fsp: str, object_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT body FROM openadr WHERE kind=? AND id=? AND fsp=?",
                                 (kind, object_id, fsp)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def all(self, kind: str, fsp: str | None = None) -> list[dict[str, Any]]:
        if fsp is None:
            rows = self._conn.execute("SELECT body FROM openadr WHERE kind=? ORDER BY rowid",
                                      (kind,))
        else:
            rows = self._conn.execute(
                "SELECT body FROM openadr WHERE kind=? AND fsp=? ORDER BY rowid", (kind, fsp))
        return [dict(json.loads(r[0])) for r in rows]

    def delete(self, kind: str, fsp: str, object_id: str) -> None:
        self._conn.execute("DELETE FROM openadr WHERE kind=? AND id=? AND fsp=?",
                           (kind, object_id, fsp))

    def close(self) -> None:
        self._conn.close()


# ---------------------------------------------------------------------------- bodies
# What a VEN sends is checked against these before anything is stored or acted on; other
# fields of the OpenADR objects are kept as sent. Field names are OpenADR's (camelCase).


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class VenIn(_Body):
    venName: str = Field(min_length=1, max_length=128)


class ResourceIn(_Body):
    resourceName: str = Field(min_length=1, max_length=128)
    venID: str = Field(min_length=1, max_length=128)


class ObjectOperationIn(_Body):
    objects: list[Literal["PROGRAM", "EVENT", "REPORT", "SUBSCRIPTION", "VEN",
                          "RESOURCE"]] = Field(min_length=1)
    operations: list[Literal["GET", "POST", "PUT", "DELETE"]] = Field(min_length=1)
    callbackUrl: AnyHttpUrl
    bearerToken: str | None = Field(default=None, max_length=1000)


class SubscriptionIn(_Body):
    clientName: str = Field(min_length=1, max_length=128)
    programID: str | None = Field(default=None, max_length=128)
    objectOperations: list[ObjectOperationIn] = Field(min_length=1)


class PayloadIn(_Body):
    type: str = Field(min_length=1, max_length=64)
    values: list[Any]


class IntervalIn(_Body):
    id: int
    payloads: list[PayloadIn]


class ReportResourceIn(_Body):
    resourceName: str = Field(min_length=1, max_length=128)
    intervals: list[IntervalIn]


class ReportIn(_Body):
    eventID: str = Field(min_length=1, max_length=128)
    clientName: str = Field(min_length=1, max_length=128)
    resources: list[ReportResourceIn] = Field(min_length=1)


def problem_of(error: ValidationError) -> str:
    """The first thing wrong with a body, named by its place."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def new_object(kind: str, body: dict[str, Any], client: Client, now: dt.datetime,
               object_id: str | None = None) -> dict[str, Any]:
    """A stored object: the VEN's fields and ours (id, times, clientID)."""
    stamp = _iso(now)
    created = body.get("createdDateTime", stamp)
    return {**{k: v for k, v in body.items() if k not in ("id", "createdDateTime",
                                                           "modificationDateTime")},
            "id": object_id or str(uuid.uuid4()), "createdDateTime": created,
            "modificationDateTime": stamp, "clientID": client.client_id,
            "objectType": {"vens": "VEN", "resources": "RESOURCE",
                           "subscriptions": "SUBSCRIPTION", "reports": "REPORT"}[kind]}


def ack_of_report(report: dict[str, Any]) -> tuple[str, str | None] | None:
    """(``accepted`` | ``rejected``, reason) when a report is an acknowledgement."""
    for resource in report.get("resources") or []:
        for interval in resource.get("intervals") or []:
            for payload in interval.get("payloads") or []:
                if payload.get("type") != "OPERATING_STATE":
                    continue
                values = [str(v) for v in payload.get("values") or []]
                if values and values[0].upper() == "ACCEPTED":
                    return "accepted", None
                if values and values[0].upper() == "REJECTED":
                    return "rejected", " ".join(values[1:]) or "rejected by the VEN"
    return None


def mqtt_topics(prefix: str, path: str) -> dict[str, Any]:
    """Topics for one notifier path (``vens/{id}/events``, ``programs/{id}/events`` ...)."""
    base = f"{prefix}/{path}"
    return {"topics": {"CREATE": f"{base}/create", "UPDATE": f"{base}/update",
                       "DELETE": f"{base}/delete", "ALL": f"{base}/+"}}
