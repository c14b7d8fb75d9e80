"""UFTP (Shapeshifter 3.x): flexops as the aggregator (AGR) endpoint of DSO platforms.

A DSO platform posts signed ``FlexOrder`` messages to ``/shapeshifter/api/v3/message``.
Parsing, signatures (NaCl ``crypto_sign``, the specification's cryptographic scheme CS1)
and the message classes come from the Shapeshifter library (``shapeshifter-uftp``); this
module applies the specification's checks and turns an order into a relayed dispatch
(:mod:`dispatchd.relay`) of the DSO's relay platform:

- the order's ``RecipientDomain`` is the FSP's id on that platform (each FSP has the AGR
  domain it trades under; map it with ``dispatchd relay map PLATFORM fsp DOMAIN FSP``),
  its ``ContractID`` the contract's; its ``MessageID`` is the dispatch's external id;
- its ISPs become a profile of MW per half hour: ``Power`` is in W, negative values are
  less consumption or more production (turn down, "Power" in the message catalog),
  positive more consumption (turn up); each half hour carries the mean of its ISPs, so the
  energy ordered is kept when ISPs are 15 minutes long; ``ActivationFactor`` scales it.

What the specification says about errors, and where (section names of the Shapeshifter
specification 3.x): until the inner message is unsealed, errors are HTTP statuses
("Message transport mechanism", *Error handling*): a body that is not a schema-valid
``SignedMessage`` or whose unsealed body is not valid is 400, a wrong content type 400, an
invalid signature 401. A sender this endpoint has no key for cannot be authenticated
either: 401. Afterwards every problem is a signed response message with ``Result =
Rejected`` and the ``RejectionReason`` from "Message validation". A ``FlexOrderResponse``
for an order that passed goes out when the FSP answers: ``Accepted``, or ``Rejected`` with
the FSP's reason, or ``Rejected`` when nobody answered by the respond-by time.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from shapeshifter_uftp import transport
from shapeshifter_uftp.client import ShapeshifterAgrDsoClient
from shapeshifter_uftp.exceptions import InvalidSignatureException, SchemaException
from shapeshifter_uftp.uftp import (
    AcceptedRejected,
    FlexOrder,
    FlexOrderResponse,
    FlexRequest,
    FlexRequestResponse,
    PayloadMessage,
    PayloadMessageResponse,
    SignedMessage,
    TestMessage,
    TestMessageResponse,
    UsefRole,
)

from dispatchd.config import UftpConfig, UftpDso
from dispatchd.core.instruction import PERIOD
from dispatchd.relay import ExternalDispatch

log = logging.getLogger("dispatchd.uftp")
# The library logs every message it seals or opens, keys and all, at DEBUG and INFO.
logging.getLogger("shapeshifter-uftp").setLevel(logging.WARNING)

ENDPOINT = "/shapeshifter/api/v3/message"
"""The specification's URL path for major version 3."""

# RejectionReason texts of "Message validation".
MISMATCH_SENDER = "Mismatch SenderDomain"
UNKNOWN_RECIPIENT = "Unknown RecipientDomain"
INVALID_MESSAGE = "Invalid Message"
DUPLICATE = "Duplicate Identifier"
ALREADY_SUBMITTED = "Already Submitted"
ISP_DURATION = "ISP duration rejected"
TIMEZONE = "TimeZone rejected"
ISPS_OUT_OF_BOUNDS = "ISPs out of bounds"
ISP_CONFLICT = "ISP conflict"
PERIOD_OUT_OF_BOUNDS = "Period out of bounds"


_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


class TransportRefusal(Exception):
    """A message refused before it was unsealed: answered with an HTTP status only."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Opened:
    """A message whose signature checked out, and the DSO that sent it."""

    domain: str
    dso: UftpDso
    message: PayloadMessage
    xml: str


def open_signed(body: bytes, content_type: str, config: UftpConfig) -> Opened:
    """Unseal a ``SignedMessage`` from a configured DSO; :class:`TransportRefusal` else."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "text/xml":
        raise TransportRefusal(400, f"Content-Type must be text/xml; charset=utf-8, not "
                               f"{content_type or 'none'}")
    charset = re.search(r"charset=\"?([\w-]+)", params)
    if charset is not None and charset.group(1).lower() not in ("utf-8", "utf8"):
        raise TransportRefusal(400, f"the character set must be utf-8, not {charset.group(1)}")
    try:
        signed = transport.from_xml(body)
    except Exception as exc:  # the parser raises several kinds for broken XML
        raise TransportRefusal(400, f"not a SignedMessage: {exc}") from None
    if not isinstance(signed, SignedMessage):
        raise TransportRefusal(400, f"expected a SignedMessage, got {type(signed).__name__}")
    dso = config.dsos.get(signed.sender_domain or "")
    if dso is None or signed.sender_role != UsefRole.DSO:
        raise TransportRefusal(401, f"no key for {signed.sender_role} {signed.sender_domain}: "
                               "not a sender this endpoint knows")
    try:
        inner = transport.unseal_message(signed.body, dso.verify_key)
    except InvalidSignatureException:
        raise TransportRefusal(401, f"the signature does not verify with the key of "
                               f"{signed.sender_domain}") from None
    except SchemaException as exc:
        raise TransportRefusal(400, f"the unsealed message is not valid: {exc}") from None
    metadata = _metadata_problem(inner)
    if metadata is not None:
        raise TransportRefusal(400, f"the unsealed message is not valid: {metadata}")
    return Opened(signed.sender_domain or "", dso, inner, transport.to_xml(inner))


def _metadata_problem(message: PayloadMessage) -> str | None:
    """What the schema requires of the metadata and the library's parser does not check:
    a MessageID that is a UUID, a TimeStamp that is a time with its offset."""
    if not _UUID.fullmatch(message.message_id or ""):
        return f"MessageID {message.message_id!r} is not a UUID"
    try:
        stamped = dt.datetime.fromisoformat(message.time_stamp or "")
    except ValueError:
        stamped = None
    if stamped is None or stamped.tzinfo is None:
        return f"TimeStamp {message.time_stamp!r} is not a time with its offset"
    return None


def envelope_problems(opened: Opened, config: UftpConfig) -> list[str]:
    """"Message validation" rules every message must pass (RejectionReasons)."""
    message = opened.message
    problems = []
    if message.sender_domain != opened.domain:
        problems.append(f"{MISMATCH_SENDER}: the SignedMessage is from {opened.domain}, the "
                        f"message says {message.sender_domain}")
    if message.recipient_domain not in config.domains:
        problems.append(f"{UNKNOWN_RECIPIENT}: {message.recipient_domain} is not an AGR "
                        "domain of this endpoint")
    return problems


def _isp_minutes(order: FlexOrder) -> int | None:
    match = re.fullmatch(r"PT(\d+)M", str(order.isp_duration))
    return int(match.group(1)) if match else None


def _day_bounds(day: dt.date, zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone).astimezone(dt.UTC)
    return start, end


def order_problems(order: FlexOrder, config: UftpConfig, now: dt.datetime) -> list[str]:
    """The FlexOrder rules of "Message validation" that this endpoint applies."""
    problems = []
    minutes = _isp_minutes(order)
    if minutes != config.isp_minutes:
        problems.append(f"{ISP_DURATION}: {order.isp_duration}; this market's ISPs are "
                        f"PT{config.isp_minutes}M")
        return problems
    zone = ZoneInfo(config.time_zone)
    day = dt.date.fromisoformat(str(order.period))
    try:
        theirs = ZoneInfo(order.time_zone)
    except (KeyError, ValueError):
        theirs = None
    midday = dt.datetime.combine(day, dt.time(12))
    if theirs is None or midday.replace(tzinfo=theirs).utcoffset() != \
            midday.replace(tzinfo=zone).utcoffset():
        problems.append(f"{TIMEZONE}: {order.time_zone} has another UTC offset than "
                        f"{config.time_zone} on {day}")
        return problems
    begin, end = _day_bounds(day, zone)
    per_day = int((end - begin) / dt.timedelta(minutes=minutes))
    taken: set[int] = set()
    for isp in order.isps:
        last = isp.start + isp.duration - 1
        if isp.start < 1 or isp.duration < 1 or last > per_day:
            problems.append(f"{ISPS_OUT_OF_BOUNDS}: ISP {isp.start} for {isp.duration}; "
                            f"{day} has ISPs 1 to {per_day}")
            continue
        numbers = set(range(isp.start, last + 1))
        if numbers & taken:
            problems.append(f"{ISP_CONFLICT}: ISP {min(numbers & taken)} is given twice")
        taken |= numbers
    if not order.isps:
        problems.append(f"{ISPS_OUT_OF_BOUNDS}: the order has no ISP")
    if problems:
        return problems
    last_end = begin + dt.timedelta(minutes=minutes * max(taken))
    if last_end <= now:
        problems.append(f"{PERIOD_OUT_OF_BOUNDS}: every ordered ISP of {day} is over")
    signs = {isp.power > 0 for isp in order.isps if isp.power != 0}
    if not signs:
        problems.append(f"{INVALID_MESSAGE}: every ISP orders 0 W")
    elif len(signs) > 1:
        problems.append(f"{INVALID_MESSAGE}: the ISPs order both more and less consumption; "
                        "send one order per direction")
    return problems


def order_dispatch(order: FlexOrder, config: UftpConfig) -> ExternalDispatch:
    """The relayed dispatch an order (that passed :func:`order_problems`) asks for."""
    minutes = config.isp_minutes
    zone = ZoneInfo(config.time_zone)
    begin, _ = _day_bounds(dt.date.fromisoformat(str(order.period)), zone)
    factor = Decimal(str(order.activation_factor or "1.00"))
    watts: dict[int, int] = {}
    for isp in order.isps:
        for number in range(isp.start, isp.start + isp.duration):
            watts[number] = isp.power
    first, last = min(watts), max(watts)
    start = begin + dt.timedelta(minutes=minutes * (first - 1))
    end = begin + dt.timedelta(minutes=minutes * last)
    halves = -(-(end - start) // PERIOD)
    end = start + halves * PERIOD
    per_half = PERIOD // dt.timedelta(minutes=minutes) if minutes <= 30 else 1
    profile = []
    for half in range(halves):
        numbers = [first + half * per_half + k for k in range(per_half)]
        mean_w = sum(abs(watts.get(n, 0)) for n in numbers) / per_half
        profile.append(round(float(Decimal(str(mean_w)) * factor) / 1e6, 6))
    turn = "turn_down" if next(p for p in watts.values() if p != 0) < 0 else "turn_up"
    note = (f"UFTP FlexOrder {order.order_reference} for congestion point "
            f"{order.congestion_point}, {order.price} {order.currency}")
    return ExternalDispatch(
        external_id=order.message_id or "", fsp=order.recipient_domain,
        contract=order.contract_id, direction=turn, profile_mw=tuple(profile),
        start=start, end=end, issued_at=dt.datetime.fromisoformat(order.time_stamp or ""),
        note=note)


def response_to(message: PayloadMessage, *, accepted: bool, reason: str | None,
                our_domain: str) -> PayloadMessageResponse | None:
    """The response message the specification pairs with ``message`` (None: there is
    none, e.g. for a response)."""
    result = AcceptedRejected.ACCEPTED if accepted else AcceptedRejected.REJECTED
    common: dict[str, Any] = {
        "conversation_id": message.conversation_id, "result": result,
        "rejection_reason": None if accepted else reason, "recipient_domain":
        message.sender_domain, "sender_domain": our_domain}
    if isinstance(message, FlexOrder):
        return FlexOrderResponse(flex_order_message_id=message.message_id, **common)
    if isinstance(message, FlexRequest):
        return FlexRequestResponse(flex_request_message_id=message.message_id, **common)
    if isinstance(message, TestMessage):
        return TestMessageResponse(**common)
    return None


Sender = Callable[[PayloadMessageResponse], None]


def sender(config: UftpConfig, signing_key: str, dso_domain: str) -> Sender:
    """Sign and POST one response to a DSO's endpoint (blocking; raises on failure:
    ``ClientTransportException`` with the HTTP response, or a connection error)."""
    dso = config.dsos[dso_domain]

    def send(message: PayloadMessageResponse) -> None:
        client = ShapeshifterAgrDsoClient(
            sender_domain=message.sender_domain or config.domains[0],
            signing_key=signing_key, recipient_domain=dso_domain,
            recipient_endpoint=dso.endpoint, recipient_signing_key=dso.verify_key)
        client.request_timeout = config.timeout_s
        if isinstance(message, FlexOrderResponse):
            client.send_flex_order_response(message)
        elif isinstance(message, FlexRequestResponse):
            client.send_flex_request_response(message)
        else:
            client.send_test_message_response(message)

    return send
