"""Each FSP's channel settings, checked once at start-up.

An FSP whose listed channels cannot work would silently miss instructions, so dispatchd
refuses to start and names every such setting instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from contracts.io import ContractBook
from contracts.model import Channel
from dispatchd.config import Config, ConfigError
from dispatchd.webhooks import secret_key


def check_channels(book: ContractBook, config: Config, environ: Mapping[str, str]
                   ) -> dict[str, bytes]:
    """Check every FSP's channels; returns the webhook signing keys by FSP.

    Raises :class:`ConfigError` listing every problem (FSP, channel, what to fix).
    """
    fsp_tokens = {p.id for p in config.auth.principals if p.role == "fsp"}
    problems: list[str] = []
    keys: dict[str, bytes] = {}
    for fsp in book.fsps.values():
        def problem(channel: str, reason: str, fsp_id: str = fsp.id) -> None:
            problems.append(f"FSP {fsp_id}, channel {channel}: {reason}")

        endpoints = fsp.endpoints
        if not endpoints.channels:
            problems.append(f"FSP {fsp.id}: no channel is listed, so it could receive nothing")
        for channel in endpoints.channels:
            if channel is Channel.MQTT and not config.mqtt.enabled:
                problem(channel, "mqtt.enabled is false in the configuration")
            elif channel is Channel.WEBSOCKET and fsp.id not in fsp_tokens:
                problem(channel, "no [[auth.principals]] entry with role fsp for it, so it "
                        "cannot open a stream")
            elif channel is Channel.EMAIL:
                if not config.email.enabled:
                    problem(channel, "email.enabled is false in the configuration")
                if not fsp.dispatch_emails:
                    problem(channel, "no dispatch_emails in the contracts file")
            elif channel is Channel.WEBHOOK:
                url = endpoints.webhook_url
                parts = urlsplit(url or "")
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    problem(channel, f"webhook_url {url!r} is not an http(s) URL")
                env = endpoints.webhook_secret_env
                if env is None:
                    problem(channel, "webhook_secret_env names no environment variable")
                elif env not in environ:
                    problem(channel, f"environment variable {env} (webhook_secret_env) is not "
                            "set")
                else:
                    try:
                        keys[fsp.id] = secret_key(environ[env])
                    except ValueError as exc:
                        problem(channel, f"{env}: {exc}")
    if problems:
        raise ConfigError(f"{len(problems)} channel setting problem(s):\n"
                          + "\n".join(f"  {p}" for p in problems))
    return keys
