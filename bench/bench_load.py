"""Load test: locust SO and FSP users against a running dispatchd for several minutes.

Run: ``./dev bench bench_load`` (or ``python bench/bench_load.py [--rate R] [--minutes M]``).

A private Mosquitto and ``dispatchd serve`` on a sample market (3 SOs, 50 FSPs); locust
(headless, ``bench/locustfile.py``) runs SO users issuing ``--rate`` instructions per
second in all and one FSP user per FSP following its changes and acknowledging every new
revision. Instructions end ``--lifetime-s`` after they are issued and dispatchd holds
finished ones for ``--hold-s``, so that within the run the held set reaches a steady state:
memory must then stop growing. Reported: requests, failures and p50/p99 per stage (submit,
ack, changes), the instructions acknowledged, and dispatchd's resident memory and held
instructions over time: at the start, once instructions finish and are let go of (the
steady state), and at the end. DESIGN §7 names 1,000 accepted instructions a second; on
this machine one dispatchd takes about 500 (see ``bench_dispatch.py``) and locust shares
its two cores, so the default rate is below that.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_channels import rss_kib
from contracts.io import dump_contracts
from contracts.sample import build_sample
from dispatchd.config import write_sample_config
from dispatchd.localstack import DispatchdProcess, LocalMosquitto


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=200, help="instructions per second")
    parser.add_argument("--minutes", type=float, default=6.0, help="how long")
    parser.add_argument("--lifetime-s", type=float, default=60.0,
                        help="seconds from issue to an instruction's end")
    parser.add_argument("--hold-s", type=float, default=30.0,
                        help="service.hold_finished_s: how long finished ones stay in memory")
    parser.add_argument("--gc-sweep-s", type=float, default=3600.0,
                        help="service.gc_sweep_s: how often frozen objects are collected")
    args = parser.parse_args(argv)
    steady_after = args.lifetime_s + args.hold_s + 30
    with tempfile.TemporaryDirectory(prefix="flexops-load-") as tmp:
        root = Path(tmp)
        book = build_sample()
        dump_contracts(book, root / "contracts.json")
        tokens = write_sample_config(book, root)
        config = (root / "config.toml").read_text()
        (root / "config.toml").write_text(config.replace(
            "[service]\n", f"[service]\nhold_finished_s = {args.hold_s}\n"
            f"archive_sweep_s = 5.0\ngc_sweep_s = {args.gc_sweep_s}\n", 1))
        with LocalMosquitto(directory=root / "mqtt") as broker:
            service = DispatchdProcess(root / "config.toml", mqtt_url=broker.url).start()
            try:
                time.sleep(1)
                samples: list[tuple[float, float, int]] = []
                stop = threading.Event()
                began = time.monotonic()

                def sample() -> None:
                    with httpx.Client(base_url=service.url) as client:
                        while True:
                            held = client.get("/healthz").json()["instructions"]
                            samples.append((time.monotonic() - began,
                                            rss_mib(service.process.pid), held))
                            if stop.wait(15):
                                return

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                fsps = len(tokens["fsp"])
                users = args.rate + fsps
                env = {**os.environ, "FLEXOPS_TOKENS": str(root / "tokens.json"),
                       "FLEXOPS_CONTRACTS": str(root / "contracts.json"),
                       "FLEXOPS_FSP_USERS": str(fsps),
                       "FLEXOPS_LIFETIME_S": str(args.lifetime_s)}
                run = subprocess.run(
                    [sys.executable, "-m", "locust", "-f",
                     str(Path(__file__).with_name("locustfile.py")), "--headless",
                     "--host", service.url, "-u", str(users), "-r", str(max(users // 5, 1)),
                     "--run-time", f"{int(args.minutes * 60)}s", "--csv", str(root / "load"),
                     "--only-summary", "--stop-timeout", "5"],
                    capture_output=True, text=True, env=env, check=False)
                stop.set()
                sampler.join()
                with httpx.Client(base_url=service.url) as client:
                    metrics = client.get("/metrics").text
            finally:
                service.stop()
        if not (root / "load_stats.csv").exists():
            print(run.stdout[-3000:], run.stderr[-3000:])
            raise SystemExit("locust produced no statistics")
        rows = list(csv.DictReader((root / "load_stats.csv").open()))
    acknowledged = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith('flexops_instructions{state="acknowledged_accepted"}'))
    print(f"load: {args.rate} instructions/s from SO users and {len(tokens['fsp'])} FSP users "
          f"acknowledging, {args.minutes:g} min")
    print(f"{'stage':10} {'requests':>9} {'failures':>9} {'req/s':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7}")
    figures: dict[str, float] = {}
    for row in rows:
        name = row["Name"]
        print(f"{name:10} {row['Request Count']:>9} {row['Failure Count']:>9} "
              f"{float(row['Requests/s']):7.1f} {row['50%']:>7} {row['99%']:>7}")
        figures[f"{name}_p99_ms"] = float(row["99%"] or "nan")
        figures[f"{name}_failures"] = float(row["Failure Count"])
    print(f"instructions acknowledged (held at the end): {acknowledged:.0f}")
    print(f"dispatchd over time (instructions end {args.lifetime_s:g} s after issue, "
          f"finished ones held {args.hold_s:g} s):")
    print(f"{'s':>6} {'RSS MiB':>8} {'held':>7}")
    for at, rss, held in samples:
        print(f"{at:6.0f} {rss:8.0f} {held:7d}")
    start_rss = samples[0][1]
    steady = [s for s in samples if s[0] >= steady_after]
    end_rss = samples[-1][1]
    figures |= {"start_rss_mib": start_rss, "end_rss_mib": end_rss,
                "acknowledged": acknowledged}
    if len(steady) >= 2:
        growth = (steady[-1][1] - steady[0][1]) / ((steady[-1][0] - steady[0][0]) / 60)
        print(f"memory: {start_rss:.0f} MiB at start, {steady[0][1]:.0f} MiB at the steady "
              f"state ({steady[0][0]:.0f} s), {end_rss:.0f} MiB at the end: "
              f"{growth:+.1f} MiB/min in the steady state")
        figures["steady_growth_mib_per_min"] = growth
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
