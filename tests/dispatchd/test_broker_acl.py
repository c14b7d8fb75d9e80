"""The generated broker accounts and ACL on a real Mosquitto: each FSP hears and answers
only for itself; anonymous and wrong passwords are refused."""

from __future__ import annotations

import asyncio
import getpass
import json
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import aiomqtt
import pytest

from contracts.io import ContractBook, dump_contracts
from dispatchd.brokerconfig import write_broker_config
from dispatchd.localstack import LocalMosquitto, free_port
from tests.conftest import pick
from tests.dispatchd.conftest import auth, instruction, make_config

pytestmark = pytest.mark.broker


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_each_fsp_reads_and_answers_only_its_own_topics(tmp_path: Path,
                                                        live_book: ContractBook) -> None:
    mine = pick(live_book, so="SO1")
    other = next(f for f in live_book.fsps if f != mine.fsp)
    port = free_port()
    address = SimpleNamespace(url=f"mqtt://127.0.0.1:{port}")  # the broker starts below
    config = make_config(tmp_path, address, live_book)  # type: ignore[arg-type]
    files = write_broker_config(live_book, config, tmp_path / "broker",
                                listen=f"127.0.0.1:{port}", broker_user=getpass.getuser())
    creds = json.loads(files.credentials.read_text())
    assert stat.S_IMODE(files.credentials.stat().st_mode) == 0o600
    assert "topic write flexops/v1/fsp/" + mine.fsp + "/acks" in files.acl.read_text()
    assert creds["dispatchd"]["password"] not in files.passwords.read_text()  # hashed
    config = config.model_copy(update={
        "mqtt": config.mqtt.model_copy(update={"username": creds["dispatchd"]["username"],
                                               "password_env": "BROKER_PASSWORD"})})
    prefix = "flexops/v1/fsp"

    async def client(who: str, password: str | None = None) -> aiomqtt.Client:
        entry = creds[who]
        return aiomqtt.Client("127.0.0.1", port, identifier=f"test-{who}",
                              username=entry["username"],
                              password=password if password is not None else entry["password"])

    async def scenario(broker: LocalMosquitto) -> None:
        from dispatchd.service import Service

        service = Service(config, live_book, environ={
            "BROKER_PASSWORD": creds["dispatchd"]["password"]})
        task = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.ready.wait(), 10)
            await asyncio.wait_for(service.mqtt.connected.wait(), 10)
            import httpx

            async with httpx.AsyncClient(base_url=service.base_url) as http, \
                    await client(mine.fsp) as owner, await client(other) as intruder:
                await owner.subscribe(f"{prefix}/{mine.fsp}/instructions", qos=1)
                await intruder.subscribe(f"{prefix}/{mine.fsp}/instructions", qos=1)
                await intruder.subscribe(f"{prefix}/#", qos=1)
                stolen: list[bytes] = []

                async def listen_intruder() -> None:
                    async for message in intruder.messages:
                        stolen.append(bytes(message.payload))  # type: ignore[arg-type]

                snooping = asyncio.create_task(listen_intruder())
                r = await http.post("/v1/instructions", headers=auth("so", mine.so),
                                    json=instruction(mine, id="acl-1"))
                assert r.status_code == 202
                got = await asyncio.wait_for(anext(owner.messages), 5)
                assert json.loads(bytes(got.payload))["id"] == "acl-1"  # type: ignore[arg-type]
                # The intruder answers for the owner on the owner's topic: the broker drops it.
                forged = json.dumps({"id": "acl-1", "revision": 0, "response": "rejected",
                                     "reason": "forged"})
                await intruder.publish(f"{prefix}/{mine.fsp}/acks", forged, qos=1)
                await asyncio.sleep(1.0)
                state = (await http.get("/v1/instructions/acl-1",
                                        headers=auth("so", mine.so))).json()
                assert state["revisions"][0]["ack"] is None
                # The owner's answer goes through.
                await owner.publish(f"{prefix}/{mine.fsp}/acks", json.dumps(
                    {"id": "acl-1", "revision": 0, "response": "accepted"}), qos=1)

                async def acknowledged() -> bool:
                    body = (await http.get("/v1/instructions/acl-1",
                                           headers=auth("so", mine.so))).json()
                    return body["state"] == "acknowledged_accepted"

                for _ in range(50):
                    if await acknowledged():
                        break
                    await asyncio.sleep(0.1)
                assert await acknowledged()
                snooping.cancel()
                assert stolen == []
        finally:
            service.stop()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 15)

    async def refused(username: str | None, password: str | None) -> None:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="nobody",
                                      username=username, password=password):
                pass

    with LocalMosquitto(port=port, config=files.conf, directory=tmp_path / "broker") as broker:
        run(scenario(broker))
        run(refused(None, None))
        run(refused(creds[mine.fsp]["username"], "wrong"))


def test_running_again_keeps_passwords_and_the_command_reports(tmp_path: Path,
                                                              live_book: ContractBook) -> None:
    dump_contracts(live_book, tmp_path / "contracts.json")
    (tmp_path / "config.toml").write_text('[service]\ncontracts = "contracts.json"\n')
    command = [sys.executable, "-m", "dispatchd.cli", "broker-config", "--config",
               str(tmp_path / "config.toml"), "--out", str(tmp_path / "broker")]
    first = subprocess.run(command, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert f"{len(live_book.fsps)} FSP accounts" in first.stdout
    before = json.loads((tmp_path / "broker" / "credentials.json").read_text())
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 0
    assert json.loads((tmp_path / "broker" / "credentials.json").read_text()) == before
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "set_tcp_nodelay true" in conf
    half = subprocess.run([*command, "--tls-cert", "x.pem"], capture_output=True, text=True,
                          check=False)
    assert half.returncode == 2 and "go together" in half.stderr
