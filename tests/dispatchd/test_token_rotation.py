"""Tokens rotate without a restart: SIGHUP makes dispatchd read [auth] again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from contracts.io import dump_contracts
from dispatchd.config import token_digest, write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto
from tests.conftest import small_book

pytestmark = [pytest.mark.broker, pytest.mark.service]


def _status(url: str, token: str) -> int:
    return httpx.get(f"{url}/v1/instructions", headers={"Authorization": f"Bearer {token}"},
                     timeout=5).status_code


def test_sighup_swaps_tokens_and_a_broken_file_keeps_the_old_ones(tmp_path: Path) -> None:
    book = small_book(today=None)
    dump_contracts(book, tmp_path / "contracts.json")
    tokens = write_sample_config(book, tmp_path)
    old = tokens["so"]["SO1"]
    new = "rotated-" + old[::-1]
    config = tmp_path / "config.toml"
    with LocalMosquitto() as broker:
        service = DispatchdProcess(config, mqtt_url=broker.url).start()
        try:
            assert _status(service.url, old) == 200
            config.write_text(config.read_text().replace(token_digest(old),
                                                         token_digest(new)))
            os.kill(service.process.pid, signal.SIGHUP)
            deadline = time.monotonic() + 5
            while _status(service.url, new) != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _status(service.url, new) == 200
            assert _status(service.url, old) == 401
            assert _status(service.url, tokens["so"]["SO2"]) == 200  # others unchanged
            config.write_text("[journal\nbroken")
            os.kill(service.process.pid, signal.SIGHUP)
            time.sleep(0.5)
            assert _status(service.url, new) == 200
            assert service.process.poll() is None
            assert "SIGHUP: tokens kept" in service.log_path.read_text()
        finally:
            service.stop()
