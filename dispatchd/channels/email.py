"""Email: one message per instruction revision to the FSP's dispatch contacts, escalations.

The message functions are pure: they turn an instruction and the contract book into an
:class:`~email.message.EmailMessage` with a plain-text and an HTML part carrying everything
needed to act without logging in. :class:`EmailChannel` only hands messages to the SMTP
server: each worker keeps one connection, one FSP's messages always use the same worker (so
revisions go out in order), and while the server is unreachable a message is retried with
capped, jittered backoff for as long as its sender still wants it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import html
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from zoneinfo import ZoneInfo

import aiosmtplib
from tenacity import wait_random_exponential

from contracts.io import ContractBook
from contracts.model import Direction
from dispatchd.channels.retry import while_wanted
from dispatchd.config import EmailConfig
from dispatchd.core.engine import HeldMessage
from dispatchd.core.instruction import Instruction, Kind
from dispatchd.metrics import Metrics

log = logging.getLogger("dispatchd.email")

_ACTION = {
    Direction.TURN_DOWN: "TURN DOWN (less import or more export)",
    Direction.TURN_UP: "TURN UP (more import or less export)",
}
_HEADLINE = {Kind.INSTRUCT: "Dispatch instruction", Kind.AMEND: "AMENDED dispatch instruction",
             Kind.CANCEL: "CANCELLED dispatch instruction"}


# ---------------------------------------------------------------------------- links


class AckLinks:
    """Signed links that let a person answer a revision from an email, without a token.

    A link names the FSP, instruction and revision and carries an HMAC of them under
    ``key``; it opens a page that asks to confirm (so a mail scanner following the link
    changes nothing) and posts the answer back to the same address.
    """

    def __init__(self, key: bytes, base_url: str) -> None:
        self._key = key
        self.base_url = base_url.rstrip("/")

    def signature(self, fsp: str, instruction_id: str, revision: int) -> str:
        mac = hmac.new(self._key, f"{fsp}\n{instruction_id}\n{revision}".encode(),
                       hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode()

    def url(self, fsp: str, instruction_id: str, revision: int) -> str:
        sig = self.signature(fsp, instruction_id, revision)
        return f"{self.base_url}/v1/respond/{instruction_id}/{revision}?fsp={fsp}&sig={sig}"

    def valid(self, fsp: str, instruction_id: str, revision: int, sig: str) -> bool:
        return hmac.compare_digest(self.signature(fsp, instruction_id, revision), sig)


# ---------------------------------------------------------------------------- messages


def _when(moment: dt.datetime, zone: ZoneInfo) -> str:
    local = moment.astimezone(zone)
    return (f"{local:%a %d %b %Y %H:%M} {local.tzname()} "
            f"({moment.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC)")


def _facts(inst: Instruction, book: ContractBook) -> list[tuple[str, str]]:
    """The labelled facts of one revision, in reading order."""
    contract = book.contracts.get(inst.contract_id or "")
    zone = ZoneInfo(contract.timezone if contract else "Europe/London")
    so = book.system_operators.get(inst.so)
    fsp = book.fsps.get(inst.fsp)
    facts = [
        ("Action", f"{_ACTION[inst.direction]} {inst.capacity_mw:.3f} MW"
         if inst.kind is not Kind.CANCEL else "STOP: do not deliver this instruction"),
        ("Start", _when(inst.start, zone)),
        ("End", _when(inst.end, zone)),
        ("Respond by", _when(inst.respond_by, zone)),
        ("From", f"{so.name} ({inst.so})" if so else inst.so),
        ("To", f"{fsp.name} ({inst.fsp})" if fsp else inst.fsp),
        ("Contract", f"{inst.contract_id} ({contract.service}, zone {contract.zone})"
         if contract else inst.contract_id or "not mapped yet (relayed)"),
        ("Assets", ", ".join(inst.assets) or "not mapped yet (relayed)"),
        ("Instruction", f"{inst.id}, revision {inst.revision} ({inst.kind.value})"),
        ("Issued", _when(inst.issued_at, zone)),
    ]
    if inst.profile_mw is not None:
        facts.append(("Profile (MW per half hour)", ", ".join(f"{v:g}" for v in inst.profile_mw)))
    if inst.test:
        facts.append(("Test", "yes: a test instruction, not a real dispatch"))
    if inst.cancel_reason:
        facts.append(("Cancelled because", inst.cancel_reason))
    if inst.note:
        facts.append(("Note", inst.note))
    if inst.override:
        facts.append(("Outside contract terms", inst.override))
    if inst.external_ref is not None:
        facts.append(("External reference", f"{inst.external_ref.platform} "
                      f"{inst.external_ref.id}"))
    return facts


def _compose(*, subject: str, to: tuple[str, ...], sender: str, intro: str,
             facts: list[tuple[str, str]], actions: list[tuple[str, str]], message_id: str,
             headers: dict[str, str]) -> EmailMessage:
    width = max(len(label) for label, _ in facts) + 1
    plain = [intro, ""]
    plain += [f"  {label + ':':<{width}} {value}" for label, value in facts]
    plain += [""] + [f"{text}:\n  {target}" for text, target in actions]
    rows = "".join(f"<tr><th align='left' valign='top'>{html.escape(label)}</th>"
                   f"<td>{html.escape(value)}</td></tr>" for label, value in facts)
    links = "".join(f"<p>{html.escape(text)}: <a href='{html.escape(target)}'>"
                    f"{html.escape(target)}</a></p>" if target.startswith("http") else
                    f"<p>{html.escape(text)}: <code>{html.escape(target)}</code></p>"
                    for text, target in actions)
    page = (f"<html><body><p><strong>{html.escape(intro)}</strong></p>"
            f"<table cellpadding='4'>{rows}</table>{links}</body></html>")
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id
    for name, value in headers.items():
        msg[name] = value
    msg.set_content("\n".join(plain) + "\n")
    msg.add_alternative(page, subtype="html")
    return msg


def _subject_core(inst: Instruction, book: ContractBook) -> str:
    contract = book.contracts.get(inst.contract_id or "")
    zone = ZoneInfo(contract.timezone if contract else "Europe/London")
    start, end = inst.start.astimezone(zone), inst.end.astimezone(zone)
    verb = "TURN DOWN" if inst.direction is Direction.TURN_DOWN else "TURN UP"
    return (f"{verb} {inst.capacity_mw:g} MW {start:%a %d %b %H:%M}-{end:%H:%M} "
            f"{start.tzname()} | {inst.so} {inst.contract_id or 'relayed'} | {inst.id} "
            f"rev {inst.revision}")


def instruction_email(inst: Instruction, book: ContractBook, *, sender: str,
                      links: AckLinks) -> EmailMessage:
    """The message for one revision to the FSP's dispatch contacts."""
    fsp = book.fsps[inst.fsp]
    contract = book.contracts.get(inst.contract_id or "")
    zone = ZoneInfo(contract.timezone if contract else "Europe/London")
    prefix = {Kind.INSTRUCT: "", Kind.AMEND: "AMENDED: ", Kind.CANCEL: "CANCELLED: "}[inst.kind]
    respond = inst.respond_by.astimezone(zone)
    subject = (f"{'[TEST] ' if inst.test else ''}[flexops] {prefix}{_subject_core(inst, book)}"
               f" | respond by {respond:%H:%M} {respond.tzname()}")
    ack_body = f'{{"revision": {inst.revision}, "response": "accepted"}}'
    return _compose(
        subject=subject, to=fsp.dispatch_emails, sender=sender,
        intro=f"{_HEADLINE[inst.kind]} for {fsp.name} ({fsp.id}). Please acknowledge it "
        "by the respond-by time.",
        facts=_facts(inst, book),
        actions=[
            ("Accept or reject it here", links.url(inst.fsp, inst.id, inst.revision)),
            ("Or over the API", f"POST {links.base_url}/v1/instructions/{inst.id}/ack "
             f"{ack_body}"),
        ],
        message_id=f"<instruction.{inst.id}.{inst.revision}@flexops.dispatchd>",
        headers={"X-Flexops-Instruction": inst.id, "X-Flexops-Revision": str(inst.revision),
                 "X-Flexops-Kind": inst.kind.value},
    )


def escalation_email(inst: Instruction, book: ContractBook, *, sender: str,
                     to: tuple[str, ...], links: AckLinks) -> EmailMessage:
    """The message telling people that ``inst`` was not answered by its respond-by."""
    fsp = book.fsps.get(inst.fsp)
    contacts = ", ".join(fsp.dispatch_emails) if fsp else "(none)"
    return _compose(
        subject=f"{'[TEST] ' if inst.test else ''}[flexops] NO ANSWER: "
        f"{_subject_core(inst, book)}",
        to=to, sender=sender,
        intro=f"{inst.fsp} has not acknowledged this instruction by its respond-by time. "
        f"It is still being delivered; its dispatch contacts are {contacts}.",
        facts=_facts(inst, book),
        actions=[("The FSP can still answer here", links.url(inst.fsp, inst.id, inst.revision)),
                 ("Status", f"{links.base_url}/v1/instructions/{inst.id}")],
        message_id=f"<escalation.{inst.id}.{inst.revision}@flexops.dispatchd>",
        headers={"X-Flexops-Instruction": inst.id, "X-Flexops-Revision": str(inst.revision),
                 "X-Flexops-Kind": "escalation"},
    )


# ---------------------------------------------------------------------------- sending


def held_email(held: HeldMessage, *, sender: str, to: tuple[str, ...], base_url: str
               ) -> EmailMessage:
    """The message telling operations that a relayed dispatch is held: no FSP mapping."""
    dispatch = held.dispatch
    facts = [
        ("Platform", f"{held.platform} (of {held.so})"),
        ("Its dispatch id", held.external_id),
        ("Why held", held.reason),
        ("Received", held.at.isoformat()),
        ("Its FSP", str(dispatch.get("fsp"))),
        ("Its contract", str(dispatch.get("contract"))),
        ("Start", str(dispatch.get("start"))),
        ("End", str(dispatch.get("end"))),
    ]
    return _compose(
        subject=f"[flexops] HELD: {held.platform} dispatch {held.external_id} has no FSP "
        "mapping; not delivered",
        to=to, sender=sender,
        intro="A dispatch relayed from another platform names an FSP that is not mapped. It "
        "is held, not delivered, until the mapping is added; then it goes out at once.",
        facts=facts,
        actions=[("Map the FSP", f"dispatchd relay map {held.platform} fsp "
                  f"{dispatch.get('fsp') or 'EXTERNAL-ID'} OUR-FSP-ID"),
                 ("Exceptions list", f"{base_url}/v1/relay/exceptions")],
        message_id=f"<held.{held.key}@flexops.dispatchd>",
        headers={"X-Flexops-Kind": "relay-held"},
    )


@dataclass(frozen=True)
class OutgoingEmail:
    """A message to hand over. ``key`` picks the worker (the FSP: keeps its order);
    ``compose`` builds the message when the worker takes it (not on the caller's path);
    ``wanted`` is asked before every attempt; exactly one of ``on_sent`` or ``on_failed``
    is called unless ``wanted`` turns false first."""

    key: str
    compose: Callable[[], EmailMessage]
    wanted: Callable[[], bool]
    on_sent: Callable[[], None]
    on_failed: Callable[[str], None]


class _Transient(Exception):
    """The server could not take the message now; try again later."""


def _permanent(exc: BaseException) -> str | None:
    """The reason if ``exc`` means the server will never take this message, else None."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        if all(e.code >= 500 for e in exc.recipients):
            return "; ".join(f"{e.recipient}: {e.code} {e.message}" for e in exc.recipients)
        return None
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500 and not isinstance(
            exc, aiosmtplib.SMTPServerDisconnected):
        return f"{exc.code} {exc.message}"
    return None


class EmailChannel:
    """Run :meth:`run` as a long-lived task; :meth:`enqueue` never blocks."""

    name = "email"

    def __init__(self, config: EmailConfig, *, password: str | None, metrics: Metrics) -> None:
        self.config = config
        self._password = password
        self._metrics = metrics
        self._queues: list[asyncio.Queue[OutgoingEmail]] = [
            asyncio.Queue() for _ in range(config.workers)]
        self._in_hand = 0

    @property
    def depth(self) -> int:
        """Messages waiting or being handed over."""
        return sum(q.qsize() for q in self._queues) + self._in_hand

    def enqueue(self, out: OutgoingEmail) -> None:
        self._queues[zlib.crc32(out.key.encode()) % len(self._queues)].put_nowait(out)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for n, queue in enumerate(self._queues):
                group.create_task(self._worker(queue), name=f"dispatchd.email[{n}]")

    def _client(self) -> aiosmtplib.SMTP:
        c = self.config
        return aiosmtplib.SMTP(
            hostname=c.host, port=c.port, timeout=c.timeout_s,
            use_tls=c.security == "tls", start_tls=c.security == "starttls",
            username=c.username, password=self._password,
            cert_bundle=str(c.ca_file) if c.ca_file is not None else None,
        )

    async def _worker(self, queue: asyncio.Queue[OutgoingEmail]) -> None:
        client = self._client()
        try:
            while True:
                out = await queue.get()
                self._in_hand += 1
                try:
                    client = await self._deliver(client, out)
                finally:
                    self._in_hand -= 1
        finally:
            client.close()

    async def _deliver(self, client: aiosmtplib.SMTP, out: OutgoingEmail) -> aiosmtplib.SMTP:
        """Hand ``out`` over, retrying while it is wanted; returns the client to keep."""
        if not out.wanted():
            return client
        message = out.compose()
        retrying = while_wanted(
            out.wanted, retryable=_Transient,
            wait=wait_random_exponential(multiplier=self.config.retry_initial_s,
                                         max=self.config.retry_max_s),
            on_retry=self._metrics.send_failures.labels(self.name).inc)
        async for attempt in retrying:
            with attempt:
                if not out.wanted():
                    return client
                try:
                    if not client.is_connected:
                        await client.connect()
                    await client.send_message(message)
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    reason = _permanent(exc)
                    if reason is not None:
                        self._metrics.final_failures.labels(self.name).inc()
                        out.on_failed(reason)
                        return client
                    log.warning("SMTP %s:%d: %s; retrying %s", self.config.host,
                                self.config.port, exc or type(exc).__name__,
                                message["Message-ID"])
                    client.close()
                    client = self._client()
                    raise _Transient(str(exc)) from exc
                out.on_sent()
        return client
