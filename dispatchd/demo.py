"""The demo: the whole dispatch stack on a sample market, in about half a minute.

It starts a private Mosquitto on a free loopback port, ``dispatchd serve`` on a freshly
generated sample market, one simulated control centre per FSP (most acknowledge at once,
some slowly, some reject now and then, one never answers), and an SO control room that
issues a paced burst, an amendment, a cancellation, an idempotent repeat and an invalid
instruction. It then prints what happened and stops everything it started.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from contracts.io import ContractBook, dump_contracts
from contracts.sample import build_sample
from dispatchd.config import write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto
from dispatchd.simulate import FspBehaviour, FspSimulator, paced, percentile, wait_for

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


async def _summarise(url: str, tokens: dict[str, str]) -> Counter[str]:
    states: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for token in tokens.values():
            cursor = 0
            while True:
                page = (await client.get("/v1/instructions", params={"since": cursor,
                                                                     "limit": 1000},
                                         headers={"Authorization": f"Bearer {token}"})).json()
                states.update(item["state"] for item in page["instructions"])
                if not page["instructions"]:
                    break
                cursor = page["cursor"]
    return states


async def _run(out: Path, instructions: int, rate: float) -> int:
    book = build_sample()
    dump_contracts(book, out / "contracts.json")
    tokens = write_sample_config(book, out)
    _say(f"sample market: {len(book.system_operators)} SOs, {len(book.fsps)} FSPs, "
         f"{len(book.assets)} assets, {len(book.contracts)} contracts → {out}/")
    with LocalMosquitto(directory=out / "mosquitto") as broker:
        _say(f"mosquitto: {broker.url} (private, loopback only)")
        service = DispatchdProcess(out / "config.toml", mqtt_url=broker.url).start()
        _say(f"dispatchd: {service.url} (journal {out}/journal.sqlite3, log {service.log_path})")
        try:
            return await _exercise(book, tokens, broker, service, instructions, rate)
        finally:
            service.stop()


async def _exercise(book: ContractBook, tokens: dict[str, dict[str, str]],
                    broker: LocalMosquitto, service: DispatchdProcess, instructions: int,
                    rate: float) -> int:
    behaviours = _behaviours(book)
    sims = {f: FspSimulator(f, "127.0.0.1", broker.port, b) for f, b in behaviours.items()}
    readies = {f: asyncio.Event() for f in sims}
    tasks = [asyncio.create_task(sims[f].run(readies[f])) for f in sims]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies.values())), 15)
        never = [f for f, b in behaviours.items() if b.ack_delay_s is None]
        _say(f"{len(sims)} FSP control centres subscribed "
             f"({sum(1 for b in behaviours.values() if b.ack_delay_s == 2.5)} slow, "
             f"{sum(1 for b in behaviours.values() if b.reject_every)} reject some, "
             f"{', '.join(never)} never answers)")
        _say(f"control room: issuing {instructions} instructions at {rate:g}/s …")
        seen = await _control_room(service.url, tokens["so"], book, instructions, rate)
        _say(f"  {len(seen['accepted'])} accepted (202) in {seen['burst_s']:.1f}s, "
             f"{len(seen['refused'])} refused")
        _say(f"  repeat of demo-00000 with other content → {seen['repeat']} (conflict)")
        _say(f"  amend {seen['amend'][0]} → {seen['amend'][1]}, revision {seen['amend'][2]}")
        _say(f"  cancel {seen['cancel'][0]} → {seen['cancel'][1]}, revision {seen['cancel'][2]}")
        status, body = seen["invalid"]
        _say(f"  invalid instruction → {status} {body['error']}:")
        for problem in body["problems"]:
            _say(f"      {problem['field']}: {problem['reason']}")
        expected = len(seen["accepted"]) + 2  # plus the amendment and the cancellation
        _say(f"waiting for delivery and answers (respond-by is {RESPOND_WITHIN.seconds}s) …")
        await wait_for(lambda: sum(len(s.received) for s in sims.values()) >= expected, 20)
        await asyncio.sleep(RESPOND_WITHIN.seconds + 3)
        states = await _summarise(service.url, tokens["so"])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    received = [r for s in sims.values() for r in s.received]
    latencies = [r.latency_s * 1000 for r in received if r.attempt == 0]
    delivered = len({(r.id, r.revision) for r in received})
    out_of_order = sum(s.out_of_order for s in sims.values())
    _say("")
    _say("summary")
    _say(f"  revisions delivered to FSPs : {delivered} of {expected}")
    _say(f"  re-sends ignored by FSPs    : {sum(s.duplicates for s in sims.values())} "
         "(duplicates carry the same id and revision)")
    _say(f"  out-of-order revisions      : {out_of_order}")
    _say(f"  accepted → received (MQTT)  : p50 {percentile(latencies, 0.5):.1f} ms, "
         f"p99 {percentile(latencies, 0.99):.1f} ms")
    _say("  instructions by state       : " + ", ".join(
        f"{state} {n}" for state, n in sorted(states.items())))
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{service.url}/metrics")).text
    for line in metrics.splitlines():
        if line.startswith("flexops_journal_batch_records_count"):
            batches = float(line.split()[-1])
            _say(f"  journal transactions        : {batches:.0f} for "
                 f"{len(seen['accepted']) + 2} revisions and their events (group commit)")
    ok = delivered == expected and out_of_order == 0 and states.get("expired", 0) > 0
    _say("demo " + ("completed" if ok else "FAILED: see above"))
    return 0 if ok else 1


def run_demo(*, out: Path, instructions: int = 300, rate: float = 100.0) -> int:
    """Run the demo in ``out`` (emptied first); returns the process exit status."""
    if out.exists():
        for name in ("journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm",
                     "dispatchd.log"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "mosquitto", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_run(out, instructions, rate))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear last word instead of a traceback for the operator
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


