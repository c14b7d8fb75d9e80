"""Channel benchmarks: websocket fan-out and memory, and email throughput.

Run: ``./dev bench bench_channels`` (or ``python bench/bench_channels.py [--quick]``).

Every figure is printed beside a reference measured in the same run:

1. *websocket fan-out*: 1,000 FSPs hold a stream open (``websockets`` clients in this
   process); an SO POSTs one instruction to each of them. Per instruction, the latency from
   ``accepted_at`` (the journal commit) to receipt; per round, the time from the first POST
   to the last receipt. Repeated ``rounds`` times. Reference: a bare ``websockets`` server
   process broadcasting one stamped message to the same number of clients. DESIGN §7
   target: last one received ≤ 200 ms p99.
2. *memory per idle connection*: growth of the server's resident memory per connected idle
   client, dispatchd beside the bare server. Target: ≤ 64 KiB.
3. *email*: instructions to FSPs on the email channel, handed to a local SMTP server
   (aiosmtpd): messages per second and accepted → received latency, beside aiosmtplib
   sending the same number of messages over one connection. Target: p99 ≤ 1 s.

The load (HTTP clients, websocket clients, SMTP server) runs in this process and shares
the machine's cores with the server being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import email
import email.policy
import gc
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_dispatch import _bodies, _post_all
from contracts.io import ContractBook, dump_contracts
from contracts.model import Channel, Endpoints
from contracts.sample import build_sample
from dispatchd.config import write_sample_config
from dispatchd.localstack import DispatchdProcess, free_port
from dispatchd.simulate import every_instruction, percentile


@dataclass
class Sizes:
    fsps: int = 1000
    rounds: int = 5
    emails: int = 1000


QUICK = Sizes(fsps=50, rounds=2, emails=50)
PACED_EMAIL_RATE = 20.0
"""Instructions per second in the email latency phase (a busy control room's pace)."""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


# ------------------------------------------------------------------------ clients


class Fleet:
    """``n`` websocket clients; each records (receipt time, frame) of what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.connections: list[ClientConnection] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, urls_and_headers: list[tuple[str, dict[str, str]]]) -> None:
        slots = asyncio.Semaphore(50)

        async def one(url: str, headers: dict[str, str]) -> None:
            async with slots:
                ws = await connect(url, additional_headers=headers, compression=None,
                                   ping_interval=None, max_queue=None)
                self.connections.append(ws)
                self._tasks.append(asyncio.create_task(self._read(ws)))

        await asyncio.gather(*(one(u, h) for u, h in urls_and_headers))
        # This process holds every client; its own full garbage collections would pause
        # the readers and be counted against the server. Keep them out of the figures.
        gc.collect()
        gc.freeze()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                self.received.append((time.time(), json.loads(frame)))
        except Exception:
            return

    async def until(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        return bool(predicate())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.connections), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ------------------------------------------------------------------------ bare reference

_BARE_SERVER = textwrap.dedent("""
    import asyncio, json, sys, time
    from websockets.asyncio.server import serve, broadcast

    clients = set()

    async def handler(ws):
        if ws.request.path == "/go":
            async for _ in ws:
                broadcast(clients, json.dumps({"t": time.time(), "pad": "x" * 600}))
            return
        clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    async def main():
        async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None,
                         ping_interval=None):
            print("ready", flush=True)
            await asyncio.Future()

    asyncio.run(main())
""")


def bare_fanout(n: int, rounds: int) -> dict[str, float]:
    """The reference: a bare websockets server process, started and stopped here."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _BARE_SERVER, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        return asyncio.run(_bare_rounds(port, server.pid, n, rounds))
    finally:
        server.terminate()
        server.wait(10)


async def _bare_rounds(port: int, pid: int, n: int, rounds: int) -> dict[str, float]:
    await asyncio.sleep(0.3)
    before = rss_kib(pid)
    fleet = Fleet()
    await fleet.open([(f"ws://127.0.0.1:{port}/", {})] * n)
    await asyncio.sleep(1.0)
    per_conn = (rss_kib(pid) - before) / n
    latencies: list[float] = []
    lasts: list[float] = []
    async with connect(f"ws://127.0.0.1:{port}/go", compression=None) as go:
        for _ in range(rounds):
            fleet.received.clear()
            started = time.time()
            await go.send("go")
            assert await fleet.until(lambda: len(fleet.received) >= n, 30), "bare incomplete"
            latencies += [at - body["t"] for at, body in fleet.received]
            lasts.append(max(at for at, _ in fleet.received) - started)
            await asyncio.sleep(0.2)
    await fleet.close()
    return {"bare_kib_per_conn": per_conn, "bare_p50_ms": _ms(latencies, .5),
            "bare_p99_ms": _ms(latencies, .99), "bare_last_p50_ms": _ms(lasts, .5),
            "bare_last_max_ms": max(lasts) * 1000}


# ------------------------------------------------------------------------ flexops


def _market(directory: Path, fsps: int, channel: Channel, extra_config: str
            ) -> tuple[ContractBook, dict[str, dict[str, str]]]:
    book = build_sample(n_sos=3, n_fsps=fsps, n_assets=max(2000, fsps * 2),
                        n_contracts=fsps * 4)
    book = dataclasses.replace(book, fsps={
        fid: fsp.model_copy(update={"endpoints": Endpoints(channels=(channel,))})
        for fid, fsp in book.fsps.items()})
    dump_contracts(book, directory / "contracts.json")
    tokens = write_sample_config(book, directory)
    config = directory / "config.toml"
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(text + "\n" + extra_config)
    return book, tokens


async def flexops_fanout(root: Path, n: int, rounds: int) -> dict[str, float]:
    directory = root / "ws"
    directory.mkdir()
    book, tokens = _market(directory, n, Channel.WEBSOCKET, "")
    service = DispatchdProcess(directory / "config.toml").start()
    try:
        await asyncio.sleep(0.5)
        before = rss_kib(service.process.pid)
        fleet = Fleet()
        ws_base = service.url.replace("http://", "ws://")
        await fleet.open([(f"{ws_base}/v1/stream", {"Authorization": f"Bearer {token}"})
                          for token in tokens["fsp"].values()])
        assert await fleet.until(lambda: len(fleet.received) >= n, 30), "hello frames missing"
        await asyncio.sleep(1.0)
        per_conn = (rss_kib(service.process.pid) - before) / n
        latencies: list[float] = []
        lasts: list[float] = []
        for r in range(rounds):
            fleet.received.clear()
            bodies = _bodies(book, n, f"fan{r}")
            started = time.time()
            await _post_all(service.url, tokens["so"], bodies, 64)
            assert await fleet.until(lambda: len(fleet.received) >= n, 60), "fan-out incomplete"
            latencies += [at - dt.datetime.fromisoformat(body["message"]["accepted_at"]
                                                          ).timestamp()
                          for at, body in fleet.received]
            lasts.append(max(at for at, _ in fleet.received) - started)
            await asyncio.sleep(0.3)
        fsps_reached = len({body["message"]["fsp"] for _, body in fleet.received})
        await fleet.close()
        return {"kib_per_conn": per_conn, "p50_ms": _ms(latencies, .5),
                "p99_ms": _ms(latencies, .99), "last_p50_ms": _ms(lasts, .5),
                "last_max_ms": max(lasts) * 1000, "fsps_reached": fsps_reached}
    finally:
        service.stop()


# ------------------------------------------------------------------------ email


class _Inbox:
    def __init__(self) -> None:
        self.received: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content,
                                           policy=email.policy.default)
        with self.lock:
            self.received.append((time.time(), str(message["X-Flexops-Instruction"])))
        return "250 OK"


async def bare_email(port: int, inbox: _Inbox, count: int) -> float:
    message = email.message.EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@x.example", "b@x.example", "bench"
    message.set_content("x" * 1500)
    message.add_alternative("<p>" + "x" * 1500 + "</p>", subtype="html")
    started = time.perf_counter()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        for _ in range(count):
            await client.send_message(message)
    return count / (time.perf_counter() - started)


async def flexops_email(root: Path, port: int, inbox: _Inbox, fsps: int, count: int
                        ) -> dict[str, float]:
    directory = root / "email"
    directory.mkdir()
    book, tokens = _market(directory, fsps, Channel.EMAIL,
                           f"[email]\nenabled = true\nport = {port}\n")
    service = DispatchdProcess(directory / "config.toml").start()
    figures: dict[str, float] = {}
    try:
        for phase, n, rate in (("paced", count // 4, PACED_EMAIL_RATE), ("burst", count, None)):
            inbox.received.clear()
            started = time.time()
            await _post_all(service.url, tokens["so"], _bodies(book, n, f"mail-{phase}"), 64,
                            rate=rate)
            deadline = time.monotonic() + 120
            while len(inbox.received) < n and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert len(inbox.received) >= n, f"only {len(inbox.received)} of {n} emails"
            received = {iid: at for at, iid in inbox.received}
            accepted = await _accepted_times(service.url, tokens["so"])
            latencies = [received[iid] - accepted[iid] for iid in received]
            figures[f"email_{phase}_rate"] = n / (max(received.values()) - started)
            figures[f"email_{phase}_p50_ms"] = _ms(latencies, .5)
            figures[f"email_{phase}_p99_ms"] = _ms(latencies, .99)
        return figures
    finally:
        service.stop()


async def _accepted_times(url: str, so_tokens: dict[str, str]) -> dict[str, float]:
    return {view["id"]: dt.datetime.fromisoformat(view["revisions"][0]["accepted_at"])
            .timestamp() async for view in every_instruction(url, so_tokens.values())}


# ------------------------------------------------------------------------ report


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    f: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flexops-bench-") as tmp:
        root = Path(tmp)
        f |= bare_fanout(sizes.fsps, sizes.rounds)
        f |= asyncio.run(flexops_fanout(root, sizes.fsps, sizes.rounds))
        inbox = _Inbox()
        smtp_port = free_port()
        controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
        controller.start()
        try:
            f["bare_email_rate"] = asyncio.run(bare_email(smtp_port, inbox, sizes.emails))
            inbox.received.clear()
            f |= asyncio.run(flexops_email(root, smtp_port, inbox, sizes.fsps, sizes.emails))
        finally:
            controller.stop()

    print(f"channel benchmark ({'quick' if args.quick else 'full'} sizes: {sizes})")
    print(f"websocket fan-out: one message to each of {sizes.fsps} connected clients, "
          f"{sizes.rounds} rounds")
    print(f"  bare websockets broadcast   stamp → received  p50 {f['bare_p50_ms']:7.1f} ms  "
          f"p99 {f['bare_p99_ms']:7.1f} ms   last received {f['bare_last_p50_ms']:7.1f} ms "
          f"(max {f['bare_last_max_ms']:.1f})")
    print(f"  flexops (1 POST each)       commit → received p50 {f['p50_ms']:7.1f} ms  "
          f"p99 {f['p99_ms']:7.1f} ms   last received {f['last_p50_ms']:7.1f} ms "
          f"(max {f['last_max_ms']:.1f}) after the first POST")
    print(f"  ratio p99 flexops / bare: {f['p99_ms'] / max(f['bare_p99_ms'], 1e-3):.1f}x   "
          f"target p99 ≤ 200 ms; {int(f['fsps_reached'])} FSPs reached")
    print(f"memory per idle connection: flexops {f['kib_per_conn']:.1f} KiB, bare websockets "
          f"{f['bare_kib_per_conn']:.1f} KiB (ratio "
          f"{f['kib_per_conn'] / max(f['bare_kib_per_conn'], 0.1):.1f}x); target ≤ 64 KiB")
    print(f"email: {sizes.emails} instructions to {sizes.fsps} FSPs via a local SMTP server")
    print(f"  bare aiosmtplib, one connection  {f['bare_email_rate']:7.1f} messages/s")
    print(f"  flexops, burst of {sizes.emails:<5}         {f['email_burst_rate']:7.1f} "
          f"messages/s (ratio {f['email_burst_rate'] / f['bare_email_rate']:.2f}); accepted → "
          f"received p50 {f['email_burst_p50_ms']:.0f} ms, p99 {f['email_burst_p99_ms']:.0f} ms "
          "(queued behind the burst)")
    print(f"  flexops, paced {PACED_EMAIL_RATE:g}/s            accepted → received "
          f"p50 {f['email_paced_p50_ms']:.1f} ms, p99 {f['email_paced_p99_ms']:.1f} ms; "
          "target p99 ≤ 1 s")
    return f


if __name__ == "__main__":
    main()
