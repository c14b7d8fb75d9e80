"""dispatchd's configuration: one TOML file, every key with a documented default.

Only the entry point reads files and the environment; everything else receives a
:class:`Config` (or a part of it). ``docs/configuration.md`` lists every key.
Secrets are never written in the file itself: tokens are stored as SHA-256 digests, and
passwords are named by the environment variable that holds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator

from contracts.io import ContractBook
from contracts.model import Frozen, Id


class ConfigError(ValueError):
    """The configuration file or an override is wrong; the message names the key."""


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


class ServiceConfig(Frozen):
    listen: str = "127.0.0.1:8080"
    """Where the HTTP API listens (HOST:PORT)."""
    public_url: str | None = None
    """Base URL put in status links; defaults to http://{listen}."""
    contracts: Path = Path("contracts.json")
    """The canonical contracts file (relative paths are relative to the config file)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    gc_sweep_s: float = Field(default=3600.0, gt=0)
    """Objects surviving a full garbage collection are frozen, so collections stay short;
    this often everything is unfrozen and collected once (see dispatchd/gcpolicy.py)."""
    hold_finished_s: float = Field(default=86_400.0, gt=0)
    """How long stream events, and instructions that are finished (ended, or cancelled and
    acknowledged), stay in memory after their last change; later they are read back from
    the journal when asked for. Stream clients resuming from an older event get a gap."""
    archive_sweep_s: float = Field(default=60.0, gt=0)
    """How often what has been held long enough is let go of."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class JournalConfig(Frozen):
    path: Path = Path("journal.sqlite3")
    synchronous: Literal["FULL", "NORMAL", "OFF"] = "FULL"
    """SQLite synchronous mode; FULL makes every commit durable on power loss."""
    max_batch: int = Field(default=1024, ge=1)
    """Most records committed in one transaction (group commit)."""
    max_queue: int = Field(default=20_000, ge=1)
    """Most records waiting to be committed; beyond it requests get 503."""


class MqttConfig(Frozen):
    enabled: bool = True
    """Connect to a broker; with false, no FSP may list the mqtt channel."""
    url: str = "mqtt://127.0.0.1:1883"
    """Broker as mqtt://HOST:PORT."""
    client_id: str = "flexops-dispatchd"
    username: str | None = None
    password_env: str | None = None
    """Environment variable holding the broker password."""
    topic_prefix: str = "flexops/v1"
    keepalive_s: int = Field(default=30, ge=5)
    max_inflight: int = Field(default=1000, ge=1)
    """QoS 1 messages awaiting PUBACK at once."""
    max_queue: int = Field(default=100_000, ge=1)
    """Sends waiting for the broker; beyond it a send is left to the re-send timer."""
    reconnect_max_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"{value!r} is not mqtt://HOST[:PORT]")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 1883

    def instructions_topic(self, fsp: str) -> str:
        return f"{self.topic_prefix}/fsp/{fsp}/instructions"

    def acks_topic(self, fsp: str) -> str:
        return f"{self.topic_prefix}/fsp/{fsp}/acks"

    def errors_topic(self, fsp: str) -> str:
        return f"{self.topic_prefix}/fsp/{fsp}/errors"


class DeliveryConfig(Frozen):
    retry_initial_s: float = Field(default=2.0, gt=0)
    """First re-send of an unacknowledged revision after this long (jittered)."""
    retry_multiplier: float = Field(default=2.0, ge=1)
    retry_max_s: float = Field(default=60.0, gt=0)
    """Re-sends are never further apart than this."""


class WebsocketConfig(Frozen):
    ping_interval_s: float = Field(default=20.0, gt=0)
    """A ping goes to each stream client this often."""
    ping_timeout_s: float = Field(default=20.0, gt=0)
    """A client that has not answered a ping within this is disconnected."""
    send_timeout_s: float = Field(default=10.0, gt=0)
    """A client whose socket accepts nothing for this long is dropped (it resumes with
    ``since``); the send buffer is bounded, so a slow reader holds no more memory."""
    tcp_user_timeout_s: float = Field(default=30.0, gt=0)
    """The kernel gives up on a connection whose sent data stays unacknowledged this long."""
    send_buffer_bytes: int = Field(default=262_144, ge=4096)
    """Kernel send buffer of each connection (SO_SNDBUF, set on the listening socket, so
    HTTP connections get it too): with the 64 KiB transport buffer above it, the most a
    client that stops reading can hold up."""
    compression: bool = False
    """Offer permessage-deflate; it costs a compressor (hundreds of KiB) per connection."""


class EmailConfig(Frozen):
    enabled: bool = False
    """Send email (instructions to FSPs listing the email channel, and escalations)."""
    host: str = "127.0.0.1"
    port: int = Field(default=25, gt=0, lt=65536)
    security: Literal["none", "starttls", "tls"] = "none"
    """``starttls`` upgrades a plain connection (port 587); ``tls`` is implicit TLS (465)."""
    username: str | None = None
    password_env: str | None = None
    """Environment variable holding the SMTP password."""
    ca_file: Path | None = None
    """PEM file of the certificate authorities to trust for the SMTP server's certificate;
    default: the system's."""
    from_address: str = "flexops dispatch <dispatch@localhost>"
    timeout_s: float = Field(default=10.0, gt=0)
    workers: int = Field(default=4, ge=1, le=64)
    """SMTP connections used at once; one FSP's messages always go through the same one."""
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    """While the SMTP server is unreachable, retries back off up to this (jittered)."""
    link_secret_env: str | None = None
    """Environment variable holding the key that signs the acknowledge links in emails;
    when unset, a key is generated once and kept beside the journal."""


class WebhookConfig(Frozen):
    timeout_s: float = Field(default=10.0, gt=0)
    """A webhook POST not answered within this is retried."""
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    """Retries after a timeout, 429 or 5xx back off up to this (jittered)."""
    max_connections: int = Field(default=100, ge=1)


class Principal(Frozen):
    role: Literal["so", "fsp", "platform"]
    id: Id
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 (hex) of the bearer token; the token itself is never stored."""


class AuthConfig(Frozen):
    principals: tuple[Principal, ...] = ()


class RelayPlatform(Frozen):
    """Another platform whose dispatches dispatchd relays (``[relay.platforms.NAME]``)."""

    so: Id
    """The SO whose platform it is: its instructions are that SO's."""
    mapper: str = "json"
    """How its messages are read: ``json`` (built in) or ``package.module:Class``."""
    response_minutes: int = Field(default=15, ge=1, le=1440)
    """respond_by for a relayed instruction whose message gives none and whose contract
    is not mapped yet (a mapped contract's response time wins)."""


class RelayConfig(Frozen):
    operations_emails: tuple[str, ...] = ()
    """Who is told by email when a relayed message is held (its FSP is not mapped)."""
    platforms: dict[Id, RelayPlatform] = Field(default_factory=dict)
    """One ``[relay.platforms.NAME]`` table per platform; a platform authenticates with a
    ``role = "platform"`` principal of the same name."""


class UftpDso(Frozen):
    """A DSO platform speaking UFTP to this endpoint (``[uftp.dsos."DOMAIN"]``)."""

    verify_key: str = Field(min_length=40, max_length=64)
    """Its public signing key, base64 (the first 44 characters of its ``cs1.`` string)."""
    endpoint: str
    """Its UFTP endpoint URL, where responses are sent."""
    platform: Id
    """The relay platform (``[relay.platforms.NAME]``) its orders are relayed as: its SO,
    its mapping table (the AGR domains and ContractIDs it uses)."""


class UftpConfig(Frozen):
    domains: tuple[str, ...] = ()
    """The AGR domains this endpoint answers for (an order's RecipientDomain)."""
    signing_key_env: str | None = None
    """Environment variable holding this endpoint's private signing key (base64, 64
    bytes): responses are signed with it."""
    isp_minutes: int = Field(default=15, ge=1, le=60)
    """The market's ISP length; an order with another ISP-Duration is rejected."""
    time_zone: str = "Europe/Amsterdam"
    """The market's time zone: ISPs count from its midnight; an order whose TimeZone has
    another UTC offset is rejected."""
    timeout_s: float = Field(default=30.0, gt=0)
    """A response POST to a DSO not answered within this is retried."""
    retry_max_s: float = Field(default=600.0, gt=0)
    """Retries of a response back off (jittered, exponential) up to this."""
    dsos: dict[str, UftpDso] = Field(default_factory=dict)
    """One ``[uftp.dsos."DOMAIN"]`` table per DSO platform."""


class OpenadrClient(Frozen):
    """An OpenADR VEN client (``[openadr.clients."CLIENT_ID"]``): one FSP's credentials."""

    fsp: Id
    secret_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 (hex) of the client secret; the secret itself is never stored."""


class OpenadrConfig(Frozen):
    clients: dict[str, OpenadrClient] = Field(default_factory=dict)
    """OAuth2 client credentials of VENs, one table per client id."""
    token_ttl_s: float = Field(default=3600.0, gt=0)
    """Lifetime of an access token from ``/openadr3/auth/token``."""
    mqtt_uri: str | None = None
    """The broker URI VENs are told to connect to (``GET /openadr3/notifiers``); default
    ``mqtt.url``."""
    mqtt_topic_prefix: str = "openadr3"
    """Topics of event notifications start with this."""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    """A notification POST to a subscription's callback not answered within this is
    retried (jittered backoff, for up to ten minutes)."""


class Config(Frozen):
    service: ServiceConfig = ServiceConfig()
    journal: JournalConfig = JournalConfig()
    mqtt: MqttConfig = MqttConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    websocket: WebsocketConfig = WebsocketConfig()
    email: EmailConfig = EmailConfig()
    webhook: WebhookConfig = WebhookConfig()
    relay: RelayConfig = RelayConfig()
    uftp: UftpConfig = UftpConfig()
    openadr: OpenadrConfig = OpenadrConfig()
    auth: AuthConfig = AuthConfig()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_config(path: str | Path, *, listen: str | None = None, mqtt: str | None = None
                ) -> Config:
    """Read the TOML config at ``path``; ``listen``/``mqtt`` override the file's values."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from exc
    if listen is not None:
        raw.setdefault("service", {})["listen"] = listen
    if mqtt is not None:
        raw.setdefault("mqtt", {})["url"] = mqtt
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: {len(lines)} problem(s):\n" + "\n".join(lines)) from exc
    base = path.parent
    return config.model_copy(update={
        "service": config.service.model_copy(
            update={"contracts": base / config.service.contracts}),
        "journal": config.journal.model_copy(update={"path": base / config.journal.path}),
        "email": config.email.model_copy(update={
            "ca_file": base / config.email.ca_file if config.email.ca_file else None}),
    })


def secret_from_env(key: str, name: str | None, environ: Mapping[str, str] | None = None
                    ) -> str | None:
    """The value of environment variable ``name`` (named by config key ``key``), if named;
    ``environ`` defaults to the process environment."""
    if name is None:
        return None
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        raise ConfigError(f"{key} names {name}, which is not set")
    return value


def mqtt_password(config: MqttConfig, environ: Mapping[str, str] | None = None) -> str | None:
    return secret_from_env("mqtt.password_env", config.password_env, environ)


def write_sample_config(book: ContractBook, out: Path, *, contracts_name: str = "contracts.json"
                        ) -> dict[str, dict[str, str]]:
    """Write ``config.toml`` and ``tokens.json`` (mode 600) with one token per SO and FSP.

    Returns the tokens as ``{"so": {id: token}, "fsp": {id: token}}``.
    """
    tokens: dict[str, dict[str, str]] = {
        "so": {so: secrets.token_urlsafe(24) for so in book.system_operators},
        "fsp": {fsp: secrets.token_urlsafe(24) for fsp in book.fsps},
    }
    lines = [
        "# dispatchd configuration (see docs/configuration.md for every key and default).",
        "[service]",
        'listen = "127.0.0.1:8080"',
        f'contracts = "{contracts_name}"',
        "",
        "[journal]",
        'path = "journal.sqlite3"',
        'synchronous = "FULL"',
        "",
        "[mqtt]",
        'url = "mqtt://127.0.0.1:1883"',
        "",
        "[delivery]",
        "retry_initial_s = 2.0",
        "retry_max_s = 60.0",
        "",
        "# One principal per SO and FSP; the tokens themselves are in tokens.json.",
    ]
    for role, by_id in tokens.items():
        for pid, token in by_id.items():
            lines += ["[[auth.principals]]", f'role = "{role}"', f'id = "{pid}"',
                      f'token_sha256 = "{token_digest(token)}"', ""]
    (out / "config.toml").write_text("\n".join(lines), encoding="utf-8")
    tokens_path = out / "tokens.json"
    tokens_path.write_text(json.dumps(tokens, indent=1) + "\n", encoding="utf-8")
    tokens_path.chmod(0o600)
    return tokens
