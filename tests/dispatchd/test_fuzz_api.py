"""Fuzzing the HTTP API with schemathesis against the OpenAPI document it serves: no 5xx,
every answer documented and matching its schema, for an SO's and an FSP's token."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.io import dump_contracts
from dispatchd.config import write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto
from tests.conftest import small_book

pytestmark = [pytest.mark.broker, pytest.mark.service, pytest.mark.fuzz]

# Every check but one: a request valid by the schema may still break a contract rule
# (unknown contract, outside a service window), which the API answers 422 on purpose.
EXCLUDED_CHECKS = "positive_data_acceptance"


def schemathesis() -> str:
    found = shutil.which("st") or str(Path(sys.executable).parent / "st")
    assert Path(found).exists(), "schemathesis is a dev dependency: ./dev setup installs it"
    return found


@pytest.mark.parametrize("role", ["so", "fsp"])
def test_fuzzed_requests_get_documented_answers_and_never_a_5xx(tmp_path: Path,
                                                                role: str) -> None:
    book = small_book(today=None)
    dump_contracts(book, tmp_path / "contracts.json")
    tokens = write_sample_config(book, tmp_path)
    token = next(iter(tokens[role].values()))
    with LocalMosquitto() as broker:
        service = DispatchdProcess(tmp_path / "config.toml", mqtt_url=broker.url).start()
        try:
            result = subprocess.run(
                [schemathesis(), "run", f"{service.url}/openapi.json",
                 "-H", f"Authorization: Bearer {token}", "--checks", "all",
                 "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", "40", "--no-color",
                 "--seed", "1", f"--report-junit-path={tmp_path / 'junit.xml'}"],
                capture_output=True, text=True, check=False, timeout=600)
        finally:
            service.stop()
        log = service.log_path.read_text()
    assert result.returncode == 0, result.stdout[-6000:]
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated is not None and int(generated[1]) > 100
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    print(f"\nschemathesis ({role} token): {generated[1]} cases, 0 failures, no 5xx")


def test_framework_refusals_speak_the_api_error_shape(tmp_path: Path) -> None:
    """Found by the fuzzer: a body that is not JSON was a 400 in another shape, and a wrong
    method named only one allowed method."""
    import asyncio

    from tests.dispatchd.channels_peers import channel_book, channel_config, serving
    from tests.dispatchd.conftest import auth

    book = channel_book(small_book(today=None), {})

    async def scenario() -> None:
        async with serving(channel_config(tmp_path, book), book) as (_, client):
            garbled = await client.post("/v1/instructions", content=b"\xff{not json",
                                        headers={**auth("so", "SO1"),
                                                 "content-type": "application/json"})
            assert garbled.status_code == 422
            assert garbled.json()["problems"][0]["field"] == "body"
            wrong = await client.request("OPTIONS", "/v1/instructions", headers=auth("so", "SO1"))
            assert wrong.status_code == 405
            assert wrong.headers["allow"] == "GET, POST"
            assert wrong.json()["error"] == "method not allowed"

    asyncio.run(scenario())
