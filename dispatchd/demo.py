"""The demo: the whole dispatch stack on a sample market, in about half a minute.

It starts a private Mosquitto and an SMTP sink on free loopback ports, ``dispatchd serve``
on a freshly generated sample market, one simulated control centre per FSP (most on MQTT,
some on the websocket stream, some taking signed webhooks, a few also by email; most
acknowledge at once, some slowly, some reject now and then, one never answers), SO
control rooms watching their streams, and a control room that issues a paced burst, an
amendment, a cancellation, an idempotent repeat and an invalid instruction. It then prints
what happened and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email
import email.policy
import json
import random
import secrets as secrets_module
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import websockets.asyncio.client
import websockets.exceptions
from aiosmtpd.controller import Controller

from contracts.io import ContractBook, dump_contracts
from contracts.model import Channel, Endpoints
from contracts.sample import build_sample
from dispatchd.config import token_digest, write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto, free_port
from dispatchd.simulate import (
    ControlCentre,
    FspBehaviour,
    FspSimulator,
    StreamFspSimulator,
    WebhookFspSimulator,
    every_instruction,
    paced,
    percentile,
    wait_for,
)
from dispatchd.webhooks import new_secret

RESPOND_WITHIN = dt.timedelta(seconds=8)


def _say(text: str) -> None:
    print(text, flush=True)


def _behaviours(book: ContractBook) -> dict[str, FspBehaviour]:
    fsps = sorted(book.fsps)
    out = {}
    for index, fsp in enumerate(fsps):
        if fsp == fsps[-1]:
            out[fsp] = FspBehaviour(ack_delay_s=None)  # never answers: its instructions expire
        elif index % 10 == 3:
            out[fsp] = FspBehaviour(ack_delay_s=2.5)  # a slow control room
        elif index % 10 == 7:
            out[fsp] = FspBehaviour(ack_delay_s=0.2, reject_every=3)
        else:
            out[fsp] = FspBehaviour(ack_delay_s=0.05)
    return out


def _rotation(book: ContractBook) -> list[Any]:
    """Contracts valid whenever the demo runs (whole-day windows, no notice), one FSP after
    another, starting with the FSP that never answers — so even a short burst reaches
    every kind of control centre."""
    by_fsp: dict[str, list[Any]] = {}
    for contract in book.contracts.values():
        if contract.service in ("dynamic", "restore"):
            by_fsp.setdefault(contract.fsp, []).append(contract)
    fsps = sorted(by_fsp)
    fsps = fsps[-1:] + fsps[:-1]
    rounds = max(len(cs) for cs in by_fsp.values())
    return [by_fsp[f][r] for r in range(rounds) for f in fsps if r < len(by_fsp[f])]


def _request(contract_id: str, mw: float, now: dt.datetime, rng: random.Random,
             **extra: Any) -> dict[str, Any]:
    start = now + dt.timedelta(minutes=rng.choice([2, 5, 10, 30]))
    return {
        "contract_id": contract_id,
        "capacity_mw": mw,
        "start": start.isoformat(),
        "end": (start + dt.timedelta(minutes=rng.choice([30, 60, 90]))).isoformat(),
        "respond_by": (now + RESPOND_WITHIN).isoformat(),
        **extra,
    }


async def _control_room(url: str, tokens: dict[str, str], book: ContractBook, count: int,
                        rate: float) -> dict[str, Any]:
    """Issue the burst and the special cases; returns what the SO saw."""
    rng = random.Random(11)
    usable = _rotation(book)
    accepted: list[str] = []
    refused: list[tuple[int, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def post(path: str, so: str, body: dict[str, Any]) -> httpx.Response:
            return await client.post(path, json=body,
                                     headers={"Authorization": f"Bearer {tokens[so]}"})

        async def one(i: int) -> None:
            contract = usable[i % len(usable)]
            mw = round(min(contract.contracted_mw, rng.uniform(0.2, contract.contracted_mw)), 1)
            body = _request(contract.id, max(mw, 0.1), dt.datetime.now(dt.UTC), rng,
                            id=f"demo-{i:05d}", note="demo burst")
            response = await post("/v1/instructions", contract.so, body)
            if response.status_code == 202:
                accepted.append(body["id"])
            else:
                refused.append((response.status_code, response.json()))

        started = time.monotonic()
        tasks = [asyncio.create_task(one(i)) async for i in paced(count, rate)]
        await asyncio.gather(*tasks)
        burst_s = time.monotonic() - started

        special: dict[str, Any] = {}
        first = book.contracts[usable[0].id]
        repeat = await post("/v1/instructions", first.so, _request(
            first.id, 0.1, dt.datetime.now(dt.UTC), rng, id="demo-00000"))
        special["repeat"] = repeat.status_code
        # demo-00001 and demo-00002 were issued by the SOs of usable[1] and usable[2].
        amend_id, cancel_id = "demo-00001", "demo-00002"
        amend_so, cancel_so = usable[1 % len(usable)].so, usable[2 % len(usable)].so
        amended = await post(f"/v1/instructions/{amend_id}/amend", amend_so,
                             {"revision": 1, "capacity_mw": 0.1,
                              "respond_by": (dt.datetime.now(dt.UTC) + RESPOND_WITHIN).isoformat(),
                              "note": "demo: reduced after a forecast update"})
        special["amend"] = (amend_id, amended.status_code, amended.json().get("revision"))
        cancelled = await post(f"/v1/instructions/{cancel_id}/cancel", cancel_so,
                               {"revision": 1, "reason": "demo: constraint cleared"})
        special["cancel"] = (cancel_id, cancelled.status_code, cancelled.json().get("revision"))
        now = dt.datetime.now(dt.UTC)
        bad = await post("/v1/instructions", first.so, {
            "contract_id": first.id, "capacity_mw": first.contracted_mw * 10,
            "start": (now + dt.timedelta(hours=2)).isoformat(),
            "end": (now + dt.timedelta(hours=1)).isoformat(),
            "assets": ["NOT-AN-ASSET"],
        })
        special["invalid"] = (bad.status_code, bad.json())
    return {"accepted": accepted, "refused": refused, "burst_s": burst_s, **special}


PLATFORM = "dsoflex"


async def _relay_platform(url: str, platform_token: str, so_tokens: dict[str, str],
                          contract: Any) -> dict[str, Any]:
    """An SO's own dispatch platform relays three dispatches in its own ids: one fully
    mapped, one whose contract is not mapped (delivered, unreconciled), one whose FSP is
    not mapped (held). The SO then maps the FSP (the held one goes out) and reconciles
    the second; the third stays unreconciled, for settlement to list."""
    so = {"Authorization": f"Bearer {so_tokens[contract.so]}"}
    now = dt.datetime.now(dt.UTC)
    times = {"direction": contract.direction.value, "capacity_mw": 0.1,
             "start": (now + dt.timedelta(minutes=10)).isoformat(),
             "end": (now + dt.timedelta(minutes=70)).isoformat()}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for kind, external, ours in (("fsp", "AGR-NORTH", contract.fsp),
                                     ("contract", "FLEX-1", contract.id)):
            await client.put(f"/v1/relay/{PLATFORM}/mappings/{kind}/{external}", headers=so,
                             json={"ours": ours})
        posted = await client.post(
            f"/v1/relay/{PLATFORM}/dispatches",
            headers={"Authorization": f"Bearer {platform_token}"},
            json=[{"external_id": "ORD-1", "fsp": "AGR-NORTH", "contract": "FLEX-1", **times},
                  {"external_id": "ORD-2", "fsp": "AGR-NORTH", "contract": "FLEX-9", **times},
                  {"external_id": "ORD-3", "fsp": "AGR-SOUTH", "contract": "FLEX-7",
                   **times}])
        outcomes = posted.json()["dispatches"]
        mapped = await client.put(f"/v1/relay/{PLATFORM}/mappings/fsp/AGR-SOUTH",
                                  headers=so, json={"ours": contract.fsp})
        reconciled = await client.post(f"/v1/instructions/{PLATFORM}:ORD-2/reconcile",
                                       headers=so, json={"contract_id": contract.id})
        left = (await client.get("/v1/relay/exceptions", headers=so)).json()
    return {"outcomes": outcomes, "released": mapped.json()["released"],
            "reconciled": reconciled.status_code, "left": left}


def _report_relay(relay: dict[str, Any]) -> None:
    _say(f"platform {PLATFORM} relays 3 dispatches in its own ids:")
    for outcome in relay["outcomes"]:
        extra = outcome.get("reason") or "; ".join(outcome.get("unreconciled") or ()) or \
            "mapped"
        _say(f"  {outcome['external_id']} → {outcome['status']}: {extra}")
    for item in relay["released"]:
        _say(f"  FSP mapped: held {item['external_id']} relayed to {item['fsp']} at once")
    _say(f"  {PLATFORM}:ORD-2 reconciled ({relay['reconciled']}); still unreconciled: "
         + ", ".join(i["id"] for i in relay["left"]["unreconciled"])
         + " (settlement holds it back)")


async def _summarise(url: str, tokens: dict[str, str]) -> Counter[str]:
    return Counter([item["state"] async for item in every_instruction(url, tokens.values())])


class _Mailbox:
    """The demo's SMTP sink (aiosmtpd): counts what dispatchd hands over, by kind."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content,
                                           policy=email.policy.default)
        with self._lock:
            self.kinds[str(message["X-Flexops-Kind"])] += 1
        return "250 OK"


@contextlib.contextmanager
def _smtp_sink() -> Any:
    mailbox = _Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield mailbox, controller.port
    finally:
        controller.stop()


def _channels(book: ContractBook) -> dict[str, tuple[Channel, ...]]:
    """Which channels each FSP of the demo uses: most MQTT, five the websocket stream,
    three webhooks, and three (the one that never answers among them) MQTT and email."""
    fsps = sorted(book.fsps)
    out = {}
    for index, fsp in enumerate(fsps):
        if index < 5:
            out[fsp] = (Channel.WEBSOCKET,)
        elif index < 8:
            out[fsp] = (Channel.WEBHOOK,)
        elif index < 10 or fsp == fsps[-1]:
            out[fsp] = (Channel.MQTT, Channel.EMAIL)
        else:
            out[fsp] = (Channel.MQTT,)
    return out


@contextlib.asynccontextmanager
async def _so_watchers(url: str, tokens: dict[str, str]) -> AsyncIterator[Counter[str]]:
    """Each SO's control room on its stream; yields the count of events seen, by kind."""
    seen: Counter[str] = Counter()
    stream = url.replace("http://", "ws://")

    async def watch(token: str) -> None:
        with contextlib.suppress(websockets.exceptions.WebSocketException):
            async with websockets.asyncio.client.connect(
                    f"{stream}/v1/so/stream", compression=None,
                    additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                async for frame in ws:
                    event = json.loads(frame)["event"]
                    if event != "hello":
                        seen[event] += 1

    tasks = [asyncio.create_task(watch(token)) for token in tokens.values()]
    try:
        yield seen
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run(out: Path, instructions: int, rate: float) -> int:
    sample = build_sample()
    channels = _channels(sample)
    secrets = {f: new_secret() for f, cs in channels.items() if Channel.WEBHOOK in cs}
    hooks = {f: free_port() for f in secrets}
    book = dataclasses.replace(sample, fsps={
        fid: fsp.model_copy(update={"endpoints": Endpoints(
            channels=channels[fid],
            webhook_url=f"http://127.0.0.1:{hooks[fid]}/flexops" if fid in hooks else None,
            webhook_secret_env=f"DEMO_WEBHOOK_SECRET_{fid}" if fid in hooks else None)})
        for fid, fsp in sample.fsps.items()})
    dump_contracts(book, out / "contracts.json")
    tokens = write_sample_config(book, out)
    _say(f"sample market: {len(book.system_operators)} SOs, {len(book.fsps)} FSPs, "
         f"{len(book.assets)} assets, {len(book.contracts)} contracts → {out}/")
    with LocalMosquitto(directory=out / "mosquitto") as broker, _smtp_sink() as (mailbox, port):
        _say(f"mosquitto: {broker.url}; SMTP sink: 127.0.0.1:{port} (private, loopback only)")
        config = out / "config.toml"
        platform_token = secrets_module.token_urlsafe(24)
        tokens["platform"] = {PLATFORM: platform_token}
        config.write_text(
            config.read_text() + f"\n[email]\nenabled = true\nport = {port}\n"
            f'\n[relay.platforms.{PLATFORM}]\nso = "SO1"\n'
            f'\n[[auth.principals]]\nrole = "platform"\nid = "{PLATFORM}"\n'
            f'token_sha256 = "{token_digest(platform_token)}"\n')
        env = {f"DEMO_WEBHOOK_SECRET_{f}": secret for f, secret in secrets.items()}
        service = DispatchdProcess(config, mqtt_url=broker.url, env=env).start()
        _say(f"dispatchd: {service.url} (journal {out}/journal.sqlite3, log {service.log_path})")
        try:
            sims = _simulators(book, channels, tokens["fsp"], broker, service.url, secrets,
                               hooks)
            status = await _exercise(book, tokens, sims, mailbox, service, instructions, rate)
        finally:
            service.stop()
    return max(status, _settle(book, out))


def _settle(book: ContractBook, out: Path) -> int:
    """Export the month's dispatch log, generate the fleet's meter data, ingest, settle."""
    from dispatchd.export import dispatch_log, write_dispatch_log
    from settlement.compute import payable_and_held
    from settlement.demo import generate
    from settlement.meterdata import ingest
    from settlement.rules import pounds
    from settlement.run import run

    month = f"{dt.datetime.now(dt.UTC).astimezone(ZoneInfo('Europe/London')):%Y-%m}"
    _say("")
    _say(f"settlement of {month}")
    log = dispatch_log(out / "journal.sqlite3", book, month)
    log_path = out / f"dispatch-log-{month}.parquet"
    write_dispatch_log(log, log_path)
    _say(f"  dispatch log: {log.height} revisions of {int(log['latest'].sum())} instructions "
         f"→ {log_path}")
    started = time.monotonic()
    files = generate(book, log, month, out / "meter-files")
    dataset = out / "meter-data"
    shutil.rmtree(dataset, ignore_errors=True)
    quarantined = 0
    for path in files:
        intake = ingest(path, book, dataset, quarantine=out / "quarantine")
        quarantined += intake.quarantined
        for line in intake.summary().splitlines():
            _say(f"  {line}")
    result = run(book=book, contracts_path=out / "contracts.json", log_path=log_path,
                 dataset=dataset, month=month, out=out / "settlement-runs")
    lines = result.settlement.lines
    payable, held = payable_and_held(lines)
    _say(f"  {lines.height} invoice lines: payable £{pounds(payable)}, held £{pounds(held)}; "
         f"{result.settlement.problems.height} blocking problem(s) listed with what to do "
         f"({time.monotonic() - started:.1f}s)")
    _say(f"  report: {result.directory / 'report.html'}")
    ok = lines.height > 0 and quarantined > 0 and (result.directory / "report.html").exists()
    _say("settlement " + ("completed" if ok else "FAILED: see above"))
    return 0 if ok else 1


def _simulators(book: ContractBook, channels: dict[str, tuple[Channel, ...]],
                tokens: dict[str, str], broker: LocalMosquitto, url: str,
                secrets: dict[str, str], hooks: dict[str, int]) -> dict[str, ControlCentre]:
    sims: dict[str, ControlCentre] = {}
    for fsp, behaviour in _behaviours(book).items():
        if Channel.WEBSOCKET in channels[fsp]:
            sims[fsp] = StreamFspSimulator(fsp=fsp, behaviour=behaviour, url=url,
                                           token=tokens[fsp])
        elif Channel.WEBHOOK in channels[fsp]:
            sims[fsp] = WebhookFspSimulator(fsp=fsp, behaviour=behaviour, secret=secrets[fsp],
                                            api_url=url, token=tokens[fsp], port=hooks[fsp])
        else:
            sims[fsp] = FspSimulator(fsp=fsp, behaviour=behaviour, host="127.0.0.1",
                                     port=broker.port)
    return sims


async def _exercise(book: ContractBook, tokens: dict[str, dict[str, str]],
                    sims: dict[str, ControlCentre], mailbox: _Mailbox,
                    service: DispatchdProcess, instructions: int, rate: float) -> int:
    behaviours = {f: s.behaviour for f, s in sims.items()}
    readies = {f: asyncio.Event() for f in sims}
    tasks = [asyncio.create_task(sims[f].run(readies[f])) for f in sims]  # type: ignore[attr-defined]
    kinds = Counter(type(s).__name__ for s in sims.values())
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies.values())), 15)
        never = [f for f, b in behaviours.items() if b.ack_delay_s is None]
        _say(f"{len(sims)} FSP control centres listening: {kinds['FspSimulator']} on MQTT, "
             f"{kinds['StreamFspSimulator']} on the websocket stream, "
             f"{kinds['WebhookFspSimulator']} taking signed webhooks, "
             f"{sum(1 for f in book.fsps if Channel.EMAIL in book.fsps[f].endpoints.channels)}"
             " also by email")
        _say(f"  {sum(1 for b in behaviours.values() if b.ack_delay_s == 2.5)} slow, "
             f"{sum(1 for b in behaviours.values() if b.reject_every)} reject some, "
             f"{', '.join(never)} never answers")
        async with _so_watchers(service.url, tokens["so"]) as so_events:
            _say(f"control room: issuing {instructions} instructions at {rate:g}/s …")
            seen = await _control_room(service.url, tokens["so"], book, instructions, rate)
            _report_control_room(seen)
            relay = await _relay_platform(service.url, tokens["platform"][PLATFORM],
                                          tokens["so"], _relay_contract(book, behaviours))
            _report_relay(relay)
            # plus the amendment, the cancellation and the three relayed dispatches
            expected = len(seen["accepted"]) + 2 + 3
            _say(f"waiting for delivery and answers (respond-by is "
                 f"{RESPOND_WITHIN.seconds}s) …")
            await wait_for(lambda: sum(len(s.received) for s in sims.values()) >= expected, 20)
            await asyncio.sleep(RESPOND_WITHIN.seconds + 3)
            await wait_for(lambda: so_events["escalated"] >= so_events["expired"], 5)
            states = await _summarise(service.url, tokens["so"])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return await _report(sims, mailbox, so_events, states, seen, expected, service)


def _relay_contract(book: ContractBook, behaviours: dict[str, FspBehaviour]) -> Any:
    """A contract of SO1 whose FSP listens on MQTT and answers at once."""
    return next(c for c in _rotation(book) if c.so == "SO1"
                and book.fsps[c.fsp].endpoints.channels == (Channel.MQTT,)
                and behaviours[c.fsp].ack_delay_s == 0.05)


def _report_control_room(seen: dict[str, Any]) -> None:
    _say(f"  {len(seen['accepted'])} accepted (202) in {seen['burst_s']:.1f}s, "
         f"{len(seen['refused'])} refused")
    _say(f"  repeat of demo-00000 with other content → {seen['repeat']} (conflict)")
    _say(f"  amend {seen['amend'][0]} → {seen['amend'][1]}, revision {seen['amend'][2]}")
    _say(f"  cancel {seen['cancel'][0]} → {seen['cancel'][1]}, revision {seen['cancel'][2]}")
    status, body = seen["invalid"]
    _say(f"  invalid instruction → {status} {body['error']}:")
    for problem in body["problems"]:
        _say(f"      {problem['field']}: {problem['reason']}")


async def _report(sims: dict[str, ControlCentre], mailbox: _Mailbox,
                  so_events: Counter[str], states: Counter[str], seen: dict[str, Any],
                  expected: int, service: DispatchdProcess) -> int:
    received = [r for s in sims.values() for r in s.received]
    by_kind: dict[str, list[float]] = {}
    for sim in sims.values():
        by_kind.setdefault(type(sim).__name__, []).extend(
            r.latency_s * 1000 for r in sim.received if r.attempt == 0)
    delivered = len({(r.id, r.revision) for r in received})
    out_of_order = sum(s.out_of_order for s in sims.values())
    _say("")
    _say("summary")
    _say(f"  revisions delivered to FSPs     : {delivered} of {expected}")
    _say(f"  re-sends ignored by FSPs        : {sum(s.duplicates for s in sims.values())} "
         "(duplicates carry the same id and revision)")
    _say(f"  out-of-order revisions          : {out_of_order}")
    for label, kind in (("MQTT", "FspSimulator"), ("websocket", "StreamFspSimulator"),
                        ("webhook", "WebhookFspSimulator")):
        values = by_kind.get(kind, [])
        _say(f"  {'accepted → received (' + label + ')':<32}: "
             f"p50 {percentile(values, 0.5):.1f} ms, p99 {percentile(values, 0.99):.1f} ms "
             f"({len(values)} revisions)")
    emailed = sum(mailbox.kinds[k] for k in ("instruct", "amend", "cancel"))
    _say(f"  emails handed to SMTP           : {emailed} instructions, "
         f"{mailbox.kinds['escalation']} escalations")
    _say("  SO streams saw                  : " + ", ".join(
        f"{kind} {n}" for kind, n in sorted(so_events.items())))
    _say("  instructions by state           : " + ", ".join(
        f"{state} {n}" for state, n in sorted(states.items())))
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{service.url}/metrics")).text
    for line in metrics.splitlines():
        if line.startswith("flexops_journal_batch_records_count"):
            batches = float(line.split()[-1])
            _say(f"  journal transactions            : {batches:.0f} for "
                 f"{len(seen['accepted']) + 2} revisions and their events (group commit)")
    ok = (delivered == expected and out_of_order == 0 and states.get("expired", 0) > 0
          and so_events["escalated"] > 0 and mailbox.kinds["escalation"] > 0)
    _say("demo " + ("completed" if ok else "FAILED: see above"))
    return 0 if ok else 1


def run_demo(*, out: Path, instructions: int = 300, rate: float = 100.0) -> int:
    """Run the demo in ``out`` (emptied first); returns the process exit status."""
    if out.exists():
        for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm",
                     "dispatchd.log"):
            (out / name).unlink(missing_ok=True)
        for directory in ("mosquitto", "meter-files", "meter-data", "quarantine",
                          "settlement-runs"):
            shutil.rmtree(out / directory, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_run(out, instructions, rate))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear last word instead of a traceback for the operator
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


