"""Locust users for ``bench/bench_load.py``: SO control rooms issuing instructions and FSP
control centres following their instructions and acknowledging each one.

Configuration comes from the environment (the runner sets it): ``FLEXOPS_TOKENS`` (the
``tokens.json`` path), ``FLEXOPS_CONTRACTS`` (the contracts file) and
``FLEXOPS_LIFETIME_S`` (how long after issue an instruction ends; default 70 min). Each SO
user issues one instruction per second; each FSP user polls its changes twice a second and
answers every new revision.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import random
import uuid

from locust import FastHttpUser, between, constant_throughput, task

TOKENS = json.loads(open(os.environ["FLEXOPS_TOKENS"]).read())  # noqa: SIM115
_CONTRACTS = json.loads(open(os.environ["FLEXOPS_CONTRACTS"]).read())["contracts"]  # noqa: SIM115
USABLE = [c for c in _CONTRACTS if c["service"] in ("dynamic", "restore")]
_fsp_turn = itertools.cycle(sorted(TOKENS["fsp"]))
LIFETIME = dt.timedelta(seconds=float(os.environ.get("FLEXOPS_LIFETIME_S", "4200")))
"""From issue to end; shorter than the 70 min default, the request carries an override."""
LEAD = min(dt.timedelta(minutes=10), LIFETIME / 6)


class ControlRoom(FastHttpUser):
    """An SO issuing instructions on contracts valid at any hour."""

    wait_time = constant_throughput(1)

    @task
    def issue(self) -> None:
        contract = random.choice(USABLE)
        now = dt.datetime.now(dt.UTC)
        body = {"id": uuid.uuid4().hex, "contract_id": contract["id"],
                "capacity_mw": contract["contracted_mw"],
                "start": (now + LEAD).isoformat(),
                "end": (now + LIFETIME).isoformat(), "note": "load test"}
        if LIFETIME.total_seconds() < 4200:
            body["override"] = "load test: short notice and run time"
        self.client.post("/v1/instructions", json=body, name="submit",
                         headers={"Authorization": f"Bearer {TOKENS['so'][contract['so']]}"})


class ControlCentre(FastHttpUser):
    """An FSP following its changes and acknowledging each new revision."""

    wait_time = between(0.4, 0.6)
    fixed_count = int(os.environ.get("FLEXOPS_FSP_USERS", "50"))

    def on_start(self) -> None:
        self.fsp = next(_fsp_turn)
        self.cursor = 0
        self.answered: set[tuple[str, int]] = set()
        self.headers = {"Authorization": f"Bearer {TOKENS['fsp'][self.fsp]}"}

    @task
    def follow(self) -> None:
        response = self.client.get(f"/v1/instructions?since={self.cursor}&limit=200",
                                   name="changes", headers=self.headers)
        if response.status_code != 200:
            return
        page = response.json()
        self.cursor = page["cursor"]
        for item in page["instructions"]:
            key = (item["id"], item["revision"])
            if key in self.answered or item["revisions"][-1]["ack"] is not None:
                continue
            self.answered.add(key)
            self.client.post(f"/v1/instructions/{item['id']}/ack", name="ack",
                             json={"revision": item["revision"], "response": "accepted"},
                             headers=self.headers)
