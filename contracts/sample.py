"""A realistic, reproducible sample market for the demo, the tests and the benchmarks.

The same ``seed`` and ``today`` always give the same book. Contracts run from 180 days
before ``today`` to a year after it; half of them (services ``dynamic`` and ``restore``)
have whole-day windows on every day, so an instruction for "now" always has a contract.
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

from contracts.io import ContractBook
from contracts.model import (
    FSP,
    Asset,
    AvailabilityDeclaration,
    Contract,
    Direction,
    Endpoints,
    ServiceWindow,
    SystemOperator,
)

_SO_NAMES = [
    "Northern Powerlines Distribution",
    "Southern Electric Networks",
    "Eastern Grid Operator",
    "Western Power Networks",
    "Central Transmission System Operator",
]
_FSP_WORDS = [
    "Amber", "Beacon", "Cobalt", "Delta", "Ember", "Fulcrum", "Granite", "Harbour", "Ion",
    "Juniper", "Kestrel", "Lumen", "Meridian", "Nimbus", "Orchard", "Pylon", "Quartz", "Ripple",
]
_TECHNOLOGIES = ["battery", "ev_charger", "heat_pump", "generator", "industrial_load", "solar_pv"]
_SERVICES = {
    # service: (windows, notice minutes, response minutes)
    "secure": ((ServiceWindow(days=("mon", "tue", "wed", "thu", "fri"),
                              start_time=dt.time(16), end_time=dt.time(20)),), 60, 60),
    "sustain": ((ServiceWindow(start_time=dt.time(7), end_time=dt.time(22)),), 15, 30),
    "dynamic": ((ServiceWindow(start_time=dt.time(0), end_time=dt.time(0)),), 0, 15),
    "restore": ((ServiceWindow(start_time=dt.time(0), end_time=dt.time(0)),), 0, 15),
}


def build_sample(
    *,
    n_sos: int = 3,
    n_fsps: int = 50,
    n_assets: int = 2000,
    n_contracts: int = 300,
    seed: int = 7,
    today: dt.date | None = None,
) -> ContractBook:
    """Generate a market of the given size. Every FSP gets at least one contract."""
    if n_assets < n_fsps or n_contracts < n_fsps or n_sos < 1:
        raise ValueError("need at least one SO, and one asset and one contract per FSP")
    rng = random.Random(seed)
    today = today or dt.date.today()
    sos = {
        f"SO{i + 1}": SystemOperator(id=f"SO{i + 1}", name=_SO_NAMES[i % len(_SO_NAMES)],
                                     escalation_emails=(f"control-room@so{i + 1}.example",))
        for i in range(n_sos)
    }
    fsps = {}
    for i in range(n_fsps):
        fid = f"FSP{i + 1:03d}"
        word = _FSP_WORDS[i % len(_FSP_WORDS)]
        fsps[fid] = FSP(
            id=fid,
            name=f"{word} Flex {i + 1}",
            dispatch_emails=(f"control@{fid.lower()}.example",),
            escalation_emails=(f"oncall@{fid.lower()}.example",),
            endpoints=Endpoints(),
        )
    fsp_ids = list(fsps)
    assets: dict[str, Asset] = {}
    by_fsp: dict[str, list[str]] = {f: [] for f in fsp_ids}
    for i in range(n_assets):
        fid = fsp_ids[i % n_fsps]
        so_index = i % n_sos
        aid = f"A{i + 1:06d}"
        tech = rng.choice(_TECHNOLOGIES)
        size = round(rng.uniform(5, 1500), 1)
        assets[aid] = Asset(
            id=aid,
            fsp=fid,
            meter_id=f"{10 + so_index:02d}{rng.randrange(10**11):011d}",
            zone=f"SO{so_index + 1}-GSP{rng.randrange(1, 9)}",
            technology=tech,
            import_kw=size if tech != "solar_pv" else 0.0,
            export_kw=size if tech in ("battery", "generator", "solar_pv") else 0.0,
        )
        by_fsp[fid].append(aid)
    contracts: dict[str, Contract] = {}
    service_names = list(_SERVICES)
    for i in range(n_contracts):
        fid = fsp_ids[i % n_fsps]
        so = f"SO{rng.randrange(n_sos) + 1}"
        # Rotate services so that every FSP, whatever the counts, holds several kinds.
        service = service_names[(i + i // n_fsps) % len(service_names)]
        windows, notice, response = _SERVICES[service]
        pool = by_fsp[fid]
        chosen = tuple(sorted(rng.sample(pool, k=min(len(pool), rng.randint(1, 8)))))
        cid = f"C{i + 1:05d}"
        contracts[cid] = Contract(
            id=cid,
            so=so,
            fsp=fid,
            zone=f"{so}-GSP{rng.randrange(1, 9)}",
            service=service,
            direction=Direction.TURN_UP if rng.random() < 0.15 else Direction.TURN_DOWN,
            contracted_mw=round(rng.uniform(0.5, 5.0), 1),
            start_date=today - dt.timedelta(days=180),
            end_date=today + dt.timedelta(days=365),
            windows=windows,
            availability_price=Decimal(rng.randrange(200, 2000)) / 100,
            utilisation_price=Decimal(rng.randrange(10000, 60000)) / 100,
            response_minutes=response,
            notice_minutes=notice,
            min_run_minutes=30 if service == "secure" else 0,
            max_run_minutes=240 if service == "secure" else None,
            assets=chosen,
        )
    declarations: dict[str, tuple[AvailabilityDeclaration, ...]] = {}
    secure = [c for c in contracts.values() if c.service == "secure"]
    for contract in secure[: max(1, len(secure) // 10)]:
        day = today + dt.timedelta(days=rng.randint(1, 20))
        start = dt.datetime.combine(day, dt.time(16), contract.zoneinfo)
        declarations[contract.id] = (
            AvailabilityDeclaration(
                contract_id=contract.id,
                start=start,
                end=start + dt.timedelta(hours=4),
                available_mw=round(contract.contracted_mw / 2, 1),
            ),
        )
    return ContractBook(
        system_operators=sos,
        fsps=fsps,
        assets=assets,
        contracts=contracts,
        declarations=declarations,
    )
