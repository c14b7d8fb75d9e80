"""Dispatch benchmarks: flexops beside the same broker and client library moving bare messages.

Run: ``./dev bench bench_dispatch`` (or ``python bench/bench_dispatch.py [--quick]``).

Each figure is printed next to a reference measured in the same run on the same private
Mosquitto, because absolute times move from machine to machine:

1. *paced*: N messages per second for a few seconds, latency from send to receipt.
   Bare: an aiomqtt publisher stamps each message. flexops: SO clients POST instructions
   over HTTP; latency runs from ``accepted_at`` (the journal commit) to receipt by an MQTT
   subscriber, which acknowledges each one as an FSP would. DESIGN §7 target: p99 ≤ 25 ms
   at 1,000/s.
2. *burst*: 10,000 messages to 1,000 FSP topics as fast as possible, time until the last
   one is received. flexops: 10,000 instructions POSTed with 128 in flight. Target: ≤ 2×.
3. *accept throughput*: instructions accepted per second with group commit, beside the
   same service committing one record per transaction (``journal.max_batch = 1``).

The HTTP load comes from this process (aiohttp), which shares the machine's cores with
dispatchd and the broker; on a 2-core machine the client is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.io import ContractBook, dump_contracts
from contracts.sample import build_sample
from dispatchd.channels.mqtt import NODELAY
from dispatchd.config import write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto
from dispatchd.simulate import paced, percentile


@dataclass
class Sizes:
    rate: int = 1000
    seconds: float = 5.0
    burst: int = 10_000
    fsps: int = 1000
    accept: int = 4000
    in_flight: int = 128


QUICK = Sizes(rate=100, seconds=1.0, burst=500, fsps=50, accept=300, in_flight=32)


def quiet(client: aiomqtt.Client) -> aiomqtt.Client:
    """Configure a bench client as dispatchd configures its own: many publishes in flight
    are expected, so no warning per publish."""
    client.pending_calls_threshold = 1_000_000
    return client


class Collector:
    """One wildcard subscriber standing in for every FSP's control centre; for flexops it
    acknowledges each instruction, as FSPs do."""

    def __init__(self, port: int, topic: str, stamp: Callable[[dict[str, Any]], float],
                 *, ack: bool = False) -> None:
        self.port, self.topic, self.stamp, self.ack = port, topic, stamp, ack
        self.latencies: list[float] = []
        self.last_at = 0.0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-collector",
                                  max_queued_incoming_messages=0,
                                  socket_options=NODELAY) as client:
            quiet(client)
            await client.subscribe(self.topic, qos=1)
            self.ready.set()
            pending: set[asyncio.Task[None]] = set()
            async for message in client.messages:
                now = time.time()
                body = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                self.latencies.append(now - self.stamp(body))
                self.last_at = time.perf_counter()
                if self.ack:  # as a control centre would, so nothing is re-sent
                    ack = json.dumps({"id": body["id"], "revision": body["revision"],
                                      "response": "accepted"})
                    task = asyncio.create_task(client.publish(
                        f"flexops/v1/fsp/{body['fsp']}/acks", ack, qos=1, timeout=math.inf))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

    async def until(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.latencies) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        return len(self.latencies) >= count


async def _with_collector(port: int, topic: str, stamp: Callable[[dict[str, Any]], float],
                          body: Callable[[Collector], Any], *, ack: bool = False) -> Any:
    collector = Collector(port, topic, stamp, ack=ack)
    task = asyncio.create_task(collector.run())
    await asyncio.wait_for(collector.ready.wait(), 10)
    try:
        return await body(collector)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------------ bare reference


async def bare_paced(port: int, rate: int, seconds: float) -> list[float]:
    count = int(rate * seconds)

    async def body(collector: Collector) -> list[float]:
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-bare-pub",
                                  max_inflight_messages=1000, socket_options=NODELAY) as pub:
            quiet(pub)
            tasks = []
            async for i in paced(count, rate):
                payload = json.dumps({"i": i, "t": time.time(), "pad": "x" * 400})
                tasks.append(asyncio.create_task(pub.publish(
                    f"bench/fsp/F{i % 100}/instructions", payload, qos=1, timeout=math.inf)))
            await asyncio.gather(*tasks)
            await collector.until(count, 30)
        return collector.latencies

    return await _with_collector(port, "bench/fsp/+/instructions", lambda b: b["t"], body)


async def bare_burst(port: int, count: int, fsps: int) -> float:
    async def body(collector: Collector) -> float:
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-bare-burst",
                                  max_inflight_messages=1000, socket_options=NODELAY) as pub:
            quiet(pub)
            # At most 1,000 in flight, as dispatchd does (paho scans its queue per PUBACK).
            slots = asyncio.Semaphore(1000)

            async def one(i: int) -> None:
                async with slots:
                    await pub.publish(f"bench/fsp/F{i % fsps}/instructions",
                                      json.dumps({"i": i, "t": time.time(), "pad": "x" * 400}),
                                      qos=1, timeout=math.inf)

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(count)))
            assert await collector.until(count, 120), "bare burst incomplete"
            return collector.last_at - started

    return await _with_collector(port, "bench/fsp/+/instructions", lambda b: b["t"], body)


# ------------------------------------------------------------------------ flexops


def _market(directory: Path, fsps: int) -> tuple[ContractBook, dict[str, str]]:
    book = build_sample(n_sos=3, n_fsps=fsps, n_assets=max(2000, fsps * 2),
                        n_contracts=fsps * 4)
    dump_contracts(book, directory / "contracts.json")
    tokens = write_sample_config(book, directory)["so"]
    return book, tokens


def _bodies(book: ContractBook, count: int, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    usable = [c for c in book.contracts.values() if c.service in ("dynamic", "restore")]
    by_fsp: dict[str, list[Any]] = {}
    for contract in usable:
        by_fsp.setdefault(contract.fsp, []).append(contract)
    spread = [cs[0] for cs in by_fsp.values()]  # one per FSP, so the burst reaches them all
    now = dt.datetime.now(dt.UTC)
    out = []
    for i in range(count):
        contract = spread[i % len(spread)]
        out.append((contract.so, {
            "id": f"{prefix}-{i}", "contract_id": contract.id,
            "capacity_mw": contract.contracted_mw,
            "start": (now + dt.timedelta(minutes=10)).isoformat(),
            "end": (now + dt.timedelta(minutes=70)).isoformat(),
            "note": "benchmark",
        }))
    return out


async def _post_all(url: str, tokens: dict[str, str], bodies: list[tuple[str, dict[str, Any]]],
                    in_flight: int, rate: float | None = None) -> list[float]:
    """POST every body (paced at ``rate`` if given); returns each request's seconds."""
    slots = asyncio.Semaphore(in_flight)
    timings: list[float] = []
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(url, connector=connector) as client:

        async def post(so: str, body: dict[str, Any]) -> None:
            async with slots:
                started = time.perf_counter()
                async with client.post("/v1/instructions", json=body,
                                       headers={"Authorization": f"Bearer {tokens[so]}"}
                                       ) as response:
                    text = await response.text()
                timings.append(time.perf_counter() - started)
                if response.status != 202:
                    raise RuntimeError(f"{response.status}: {text[:300]}")

        tasks = [asyncio.create_task(post(*bodies[i])) async for i in paced(len(bodies), rate)]
        await asyncio.gather(*tasks)
    return timings


def _accepted_at(body: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(body["accepted_at"]).timestamp()


async def flexops_paced(port: int, url: str, tokens: dict[str, str], book: ContractBook,
                        rate: int, seconds: float) -> tuple[list[float], list[float]]:
    bodies = _bodies(book, int(rate * seconds), "paced")

    async def body(collector: Collector) -> tuple[list[float], list[float]]:
        accept = await _post_all(url, tokens, bodies, 256, rate=rate)
        assert await collector.until(len(bodies), 60), "paced delivery incomplete"
        return collector.latencies, accept

    return await _with_collector(port, "flexops/v1/fsp/+/instructions", _accepted_at, body,
                                 ack=True)


async def flexops_burst(port: int, url: str, tokens: dict[str, str], book: ContractBook,
                        count: int, in_flight: int) -> tuple[float, float]:
    bodies = _bodies(book, count, "burst")

    async def body(collector: Collector) -> tuple[float, float]:
        started = time.perf_counter()
        await _post_all(url, tokens, bodies, in_flight)
        accepted = time.perf_counter() - started
        assert await collector.until(count, 120), "burst delivery incomplete"
        return collector.last_at - started, accepted

    return await _with_collector(port, "flexops/v1/fsp/+/instructions", _accepted_at, body,
                                 ack=True)


def _set_max_batch(config: Path, value: int) -> None:
    text = config.read_text().replace('synchronous = "FULL"',
                                      f'synchronous = "FULL"\nmax_batch = {value}')
    config.write_text(text)


async def accept_rate(url: str, tokens: dict[str, str], book: ContractBook, count: int,
                      in_flight: int, prefix: str) -> float:
    bodies = _bodies(book, count, prefix)
    started = time.perf_counter()
    await _post_all(url, tokens, bodies, in_flight)
    return count / (time.perf_counter() - started)


# ------------------------------------------------------------------------ report


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flexops-bench-") as tmp:
        root = Path(tmp)
        with LocalMosquitto(directory=root / "mqtt") as broker:
            lat = asyncio.run(bare_paced(broker.port, sizes.rate, sizes.seconds))
            figures["bare_paced_p50_ms"], figures["bare_paced_p99_ms"] = _ms(lat, .5), _ms(lat, .99)
            figures["bare_burst_s"] = asyncio.run(bare_burst(broker.port, sizes.burst, sizes.fsps))

            def fresh(name: str, max_batch: int | None = None
                      ) -> tuple[ContractBook, dict[str, str], DispatchdProcess]:
                """Each phase gets its own dispatchd and journal, so none inherits the
                previous phase's backlog."""
                directory = root / name
                directory.mkdir()
                book, tokens = _market(directory, sizes.fsps)
                if max_batch is not None:
                    _set_max_batch(directory / "config.toml", max_batch)
                return book, tokens, DispatchdProcess(directory / "config.toml",
                                                      mqtt_url=broker.url).start()

            for label, rate in (("", sizes.rate), ("light_", sizes.rate // 5)):
                book, tokens, service = fresh(f"paced{rate}")
                try:
                    lat, accept = asyncio.run(flexops_paced(
                        broker.port, service.url, tokens, book, rate, sizes.seconds))
                    figures[f"{label}paced_p50_ms"] = _ms(lat, .5)
                    figures[f"{label}paced_p99_ms"] = _ms(lat, .99)
                    figures[f"{label}accept_p50_ms"] = _ms(accept, .5)
                    figures[f"{label}accept_p99_ms"] = _ms(accept, .99)
                finally:
                    service.stop()
            book, tokens, service = fresh("burst")
            try:
                figures["burst_s"], figures["burst_accept_s"] = asyncio.run(flexops_burst(
                    broker.port, service.url, tokens, book, sizes.burst, sizes.in_flight))
            finally:
                service.stop()
            for name, batch in (("group", None), ("serial", 1)):
                book, tokens, service = fresh(name, batch)
                try:
                    figures[f"{name}_rate"] = asyncio.run(accept_rate(
                        service.url, tokens, book, sizes.accept, sizes.in_flight, name))
                finally:
                    service.stop()

    f = figures
    print(f"dispatch benchmark ({'quick' if args.quick else 'full'} sizes: {sizes})")
    print(f"paced {sizes.rate}/s for {sizes.seconds:g}s, accepted → received by an MQTT "
          "subscriber:")
    print(f"  bare aiomqtt publish → receive   p50 {f['bare_paced_p50_ms']:6.2f} ms   "
          f"p99 {f['bare_paced_p99_ms']:6.2f} ms")
    print(f"  flexops commit → receive         p50 {f['paced_p50_ms']:6.2f} ms   "
          f"p99 {f['paced_p99_ms']:6.2f} ms   "
          f"(p99 ratio {f['paced_p99_ms'] / f['bare_paced_p99_ms']:.2f}×; target p99 ≤ 25 ms)")
    print(f"  HTTP accept round trip           p50 {f['accept_p50_ms']:6.2f} ms   "
          f"p99 {f['accept_p99_ms']:6.2f} ms   (target p99 ≤ 30 ms)")
    print(f"the same at {sizes.rate // 5}/s:")
    print(f"  flexops commit → receive         p50 {f['light_paced_p50_ms']:6.2f} ms   "
          f"p99 {f['light_paced_p99_ms']:6.2f} ms")
    print(f"  HTTP accept round trip           p50 {f['light_accept_p50_ms']:6.2f} ms   "
          f"p99 {f['light_accept_p99_ms']:6.2f} ms")
    print(f"burst of {sizes.burst} to {sizes.fsps} FSPs, first send → last received:")
    print(f"  bare                             {f['bare_burst_s']:6.2f} s")
    print(f"  flexops (HTTP in, MQTT out)      {f['burst_s']:6.2f} s   "
          f"(ratio {f['burst_s'] / f['bare_burst_s']:.2f}×; target ≤ 2×; of which "
          f"{f['burst_accept_s']:.2f} s to get every 202)")
    print(f"accept throughput, {sizes.accept} instructions, {sizes.in_flight} in flight:")
    print(f"  one record per transaction       {f['serial_rate']:7.0f} /s")
    print(f"  group commit                     {f['group_rate']:7.0f} /s   "
          f"(ratio {f['group_rate'] / f['serial_rate']:.2f}×; target ≥ 2,000/s)")
    return figures


if __name__ == "__main__":
    main()
