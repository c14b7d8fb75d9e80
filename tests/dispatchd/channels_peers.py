"""Real peers for channel tests: an SMTP server (aiosmtpd), a webhook receiver (aiohttp),
websocket stream clients (websockets), and a dispatchd whose FSPs use those channels."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email
import email.policy
import json
import ssl
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from websockets.asyncio.client import ClientConnection, connect

from contracts.io import ContractBook
from contracts.model import Channel, Endpoints
from dispatchd.config import (
    AuthConfig,
    Config,
    DeliveryConfig,
    EmailConfig,
    JournalConfig,
    MqttConfig,
    ServiceConfig,
    WebhookConfig,
    WebsocketConfig,
)
from dispatchd.localstack import free_port
from dispatchd.service import Service
from dispatchd.webhooks import Replayed, VerificationError, Verifier, new_secret
from tests.dispatchd.conftest import principals, token

# ---------------------------------------------------------------------------- SMTP


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        with self.lock:
            self.messages.append(parsed)  # type: ignore[arg-type]
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


class SmtpServer:
    """aiosmtpd on a fixed free loopback port that can be stopped and started again.

    With ``tls`` (a certificate and key file) it requires STARTTLS; with ``login`` (user,
    password) it also requires authentication and records who logged in.
    """

    def __init__(self, *, tls: tuple[Path, Path] | None = None,
                 login: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.inbox = _Inbox()
        self.logins: list[str] = []
        self._tls = tls
        self._login = login
        self._controller: Controller | None = None

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        user, password = auth_data.login.decode(), auth_data.password.decode()
        if self._login is not None and (user, password) == self._login:
            self.logins.append(user)
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def start(self) -> None:
        extra: dict[str, Any] = {}
        if self._tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self._tls)
            extra |= {"tls_context": context, "require_starttls": True}
        if self._login is not None:
            extra |= {"authenticator": self._authenticate, "auth_required": True}
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port,
                                      **extra)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def messages(self) -> list[EmailMessage]:
        with self.inbox.lock:
            return list(self.inbox.messages)

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made with the openssl command."""
    cert, key = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


# ---------------------------------------------------------------------------- webhooks


@dataclass
class WebhookReceiver:
    """An HTTP server verifying Standard Webhooks signatures with the shipped Verifier.

    ``answers`` are the statuses to return in turn to verified messages (then 200); a
    verified message answered with a non-2xx status is forgotten, so its retry verifies.
    """

    secret: str = field(default_factory=new_secret)
    answers: list[int] = field(default_factory=list)
    accepted: list[tuple[bytes, dict[str, str], Any]] = field(default_factory=list)
    attempts: int = 0
    refused: list[str] = field(default_factory=list)
    replays: int = 0
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        verifier = self._verifier
        try:
            event = verifier.verify(body, dict(request.headers))
        except Replayed:
            self.replays += 1
            return web.Response(status=200)
        except VerificationError as exc:
            self.refused.append(exc.reason)
            return web.Response(status=401, text=exc.reason)
        status = self.answers.pop(0) if self.answers else 200
        if status >= 300:
            verifier.forget(request.headers["webhook-id"])
            return web.Response(status=status, text="not now")
        self.accepted.append((body, dict(request.headers), event))
        return web.Response(status=status)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[WebhookReceiver]:
        self._verifier = Verifier(self.secret)
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        try:
            yield self
        finally:
            await runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


# ---------------------------------------------------------------------------- dispatchd


class FakeClock:
    """An injected clock: starts now and moves only when told."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


def channel_book(book: ContractBook, endpoints: dict[str, Endpoints]) -> ContractBook:
    """``book`` with the given FSPs' endpoints; every other FSP uses the websocket only."""
    fsps = {
        fid: fsp.model_copy(update={"endpoints": endpoints.get(
            fid, Endpoints(channels=(Channel.WEBSOCKET,)))})
        for fid, fsp in book.fsps.items()
    }
    return dataclasses.replace(book, fsps=fsps)


def channel_config(tmp_path: Path, book: ContractBook, *, smtp_port: int | None = None,
                   **websocket: Any) -> Config:
    """A config without MQTT; email to ``smtp_port`` when given; one token per principal."""
    return Config(
        service=ServiceConfig(listen="127.0.0.1:0"),
        journal=JournalConfig(path=tmp_path / "journal.sqlite3"),
        mqtt=MqttConfig(enabled=False, client_id=f"dispatchd-{uuid.uuid4().hex[:8]}"),
        delivery=DeliveryConfig(retry_initial_s=0.3, retry_max_s=2.0),
        websocket=WebsocketConfig(**websocket),
        email=EmailConfig(enabled=smtp_port is not None, port=smtp_port or 25,
                          retry_initial_s=0.1, retry_max_s=0.5, timeout_s=2),
        webhook=WebhookConfig(retry_initial_s=0.05, retry_max_s=0.3, timeout_s=2),
        auth=AuthConfig(principals=principals(book)),
    )


@contextlib.asynccontextmanager
async def serving(config: Config, book: ContractBook, *, clock: Callable[[], dt.datetime]
                  | None = None, environ: dict[str, str] | None = None
                  ) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """An in-process dispatchd (no broker), ready; stopped on exit."""
    kwargs: dict[str, Any] = {"environ": environ or {}}
    if clock is not None:
        kwargs["clock"] = clock
    service = Service(config, book, **kwargs)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            yield service, client
    finally:
        service.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)


def ws_url(service: Service, path: str, since: int | None = None) -> str:
    base = service.base_url.replace("http://", "ws://")
    return f"{base}{path}" + (f"?since={since}" if since is not None else "")


@contextlib.asynccontextmanager
async def stream(service: Service, role: str, principal: str, since: int | None = None
                 ) -> AsyncIterator[ClientConnection]:
    """A real websocket client on the principal's stream, past its hello frame."""
    path = "/v1/stream" if role == "fsp" else "/v1/so/stream"
    async with connect(ws_url(service, path, since), compression=None,
                       additional_headers={"Authorization": f"Bearer {token(role, principal)}"}
                       ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["event"] == "hello" and hello["principal"] == principal
        yield ws


async def next_event(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


def parts(message: EmailMessage) -> tuple[str, str]:
    """The plain-text and HTML bodies of a message."""
    plain = message.get_body(("plain",))
    page = message.get_body(("html",))
    assert plain is not None and page is not None
    return plain.get_content(), page.get_content()
