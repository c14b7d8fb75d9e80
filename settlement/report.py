"""The settlement report: one self-contained HTML page per run, and one per FSP.

No scripts, no external files: totals, the invoice lines, what is held back and why, and
per dispatch a plot (inline SVG) of baseline, metered and requested-target energy per half
hour, with its performance, payment and every data-quality flag. Nothing in it depends on
when it was made, so the same inputs give the same bytes.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl

from settlement.compute import Settlement, payable_and_held
from settlement.rules import pounds

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .6em;border:1px solid #ddd;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
.held{color:#a40}.event{margin:1.5em 0;padding:.5em 1em;border:1px solid #ddd}
.legend span{margin-right:1.2em}.flags{color:#a40;font-size:.9em}
"""
_COLOURS = {"baseline": "#1f77b4", "metered": "#d62728", "target": "#2ca02c"}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: Iterable[list[Any]], numeric: Iterable[int] = ()
           ) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td class='n'>{_e(v)}</td>" if i in numeric else f"<td>{_e(v)}</td>"
                         for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def plot(periods: pl.DataFrame, turn_up: bool, *, width: int = 640, height: int = 220) -> str:
    """An SVG line plot of one dispatch, in kWh per half hour: baseline, metered, and the
    target (baseline − requested for turn-down, + requested for turn-up)."""
    base = [v * 1000 if v is not None else None for v in periods["baseline_mwh"].to_list()]
    metered = [v * 1000 if v is not None else None for v in periods["metered_mwh"].to_list()]
    requested = [v * 1000 for v in periods["requested_mwh"].to_list()]
    target = [None if b is None else (b + r if turn_up else b - r)
              for b, r in zip(base, requested, strict=True)]
    series = {"baseline": base, "metered": metered, "target": target}
    values = [v for s in series.values() for v in s if v is not None] or [0.0]
    low, high = min(0.0, *values), max(values) * 1.1 or 1.0
    n = max(len(base), 1)
    left, right, top, bottom = 50, 10, 10, 30
    w, h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (w * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + h - (v - low) / (high - low) * h

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"role='img' class='dispatch-plot'>",
             f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#999'/>"]
    for tick in (low, (low + high) / 2, high):
        parts.append(f"<text x='{left - 4}' y='{y(tick) + 4:.1f}' font-size='10' "
                     f"text-anchor='end'>{tick:.0f}</text>")
    labels = periods["period_start"].dt.strftime("%H:%M").to_list()
    for i, label in enumerate(labels):
        if n <= 12 or i % max(1, n // 8) == 0:
            parts.append(f"<text x='{x(i):.1f}' y='{height - 12}' font-size='10' "
                         f"text-anchor='middle'>{label}</text>")
    for name, data in series.items():
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(data) if v is not None)
        if points:
            parts.append(f"<polyline class='series-{name}' fill='none' "
                         f"stroke='{_COLOURS[name]}' stroke-width='2' points='{points}'/>")
    parts.append(f"<text x='{left}' y='{height - 1}' font-size='10'>kWh per half hour "
                 "(UTC start)</text></svg>")
    return "".join(parts)


def _local(start: Any, end: Any) -> str:
    zone = ZoneInfo("Europe/London")
    a, b = start.astimezone(zone), end.astimezone(zone)
    return (f"{a:%a %d %b %Y %H:%M}–{b:%H:%M} {b.tzname()} "
            f"({start:%H:%M}–{end:%H:%M} UTC)")


def _totals(lines: pl.DataFrame) -> list[list[Any]]:
    rows = []
    for (so, fsp), part in sorted(lines.partition_by(["so", "fsp"], as_dict=True).items()):
        payable, held = payable_and_held(part)
        rows.append([so, fsp, pounds(payable), pounds(held), part.height])
    return rows


def event_blocks(s: Settlement, turn_up: dict[str, bool]) -> dict[str, str]:
    """The HTML block of every settled or failed dispatch, by instruction id, in the order
    of their start. Pages share them: each is built once."""
    out: dict[str, str] = {}
    instructions = s.instructions.filter(pl.col("status").is_in(["settle", "failed"]))
    by_instruction = s.periods.partition_by("instruction_id", as_dict=True) \
        if s.periods.height else {}
    empty = s.periods.clear()
    flags_by: dict[str, str] = {}
    for r in s.asset_periods.select("instruction_id", "flags").unique().iter_rows(named=True):
        found = {f for f in (r["flags"] or "").split(";") if f}
        known = set(flags_by.get(r["instruction_id"], "").split("; ")) - {""}
        flags_by[r["instruction_id"]] = "; ".join(sorted(found | known))
    problems = {r["instruction_id"]: r for r in s.problems.iter_rows(named=True)
                if r["instruction_id"]}
    amounts = {r["instruction_id"]: r for r in s.lines.filter(pl.col("kind") == "utilisation")
               .iter_rows(named=True)}
    for row in instructions.sort("start", "id").iter_rows(named=True):
        periods = by_instruction.get((row["id"],), empty)
        line = amounts.get(row["id"])
        paid = pounds(line["amount_pence"]) if line else "—"
        status = f" <span class='held'>held: {_e(line['hold_reason'])}</span>" \
            if line and line["status"] == "held" else ""
        flags = flags_by.get(row["id"]) or ""
        problem = problems.get(row["id"])
        out[row["id"]] = (
            f"<div class='event' id='event-{_e(row['id'])}'><h3>{_e(row['id'])} — "
            f"{_e(row['contract_id'])} ({_e(row['fsp'])}), {_e(row['direction'])} "
            f"{row['capacity_mw']:g} MW, {_local(row['start'], row['end'])}</h3>"
            f"<p>{_e(row['reason'])}. Requested {_e(row['requested_mwh'])} MWh, "
            f"delivered {_e(row['delivered_mwh'] or 'not measured')} MWh, performance "
            f"{_e(row['performance'] or '—')}, multiplier {_e(row['multiplier'] or '—')}, "
            f"utilisation £{paid}{status}"
            + (f", penalty £{_e(Decimal(row['penalty']).quantize(Decimal('0.01')))}"
               if Decimal(row["penalty"]) else "") + "</p>"
            + plot(periods, turn_up.get(row["contract_id"], False))
            + "<p class='legend'><span style='color:#1f77b4'>— baseline</span>"
              "<span style='color:#d62728'>— metered</span>"
              "<span style='color:#2ca02c'>— target (baseline ∓ requested)</span></p>"
            + (f"<p class='flags'>data-quality flags: {_e(flags)}</p>" if flags else "")
            + (f"<p class='flags'>{_e(problem['detail'])}: {_e(problem['action'])}</p>"
               if problem else "")
            + "</div>")
    return out


def render(s: Settlement, *, title: str, turn_up: dict[str, bool], fsp: str | None = None,
           diff: pl.DataFrame | None = None, manifest: dict[str, Any] | None = None,
           events: dict[str, str] | None = None) -> str:
    """The report page of a run (``fsp``: only that FSP's lines and events); ``events``
    are the :func:`event_blocks` when the caller renders several pages."""
    events = events if events is not None else event_blocks(s, turn_up)
    lines = s.lines if fsp is None else s.lines.filter(pl.col("fsp") == fsp)
    if fsp is None:
        problems = s.problems
    else:
        theirs = s.instructions.filter(pl.col("fsp") == fsp)
        # a relayed instruction not yet mapped has no contract: it is found by its id
        contracts = {c for c in (*lines["contract_id"].to_list(),
                                 *theirs["contract_id"].to_list()) if c is not None}
        problems = s.problems.filter(pl.col("contract_id").is_in(sorted(contracts))
                                     | pl.col("instruction_id").is_in(theirs["id"].to_list()))
    payable, held = payable_and_held(lines)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p>Payable <strong id='total-payable'>£{pounds(payable)}</strong>; held back "
             f"<strong id='total-held'>£{pounds(held)}</strong> ({lines.height} invoice "
             "lines). Amounts are rounded once per line to the penny; totals are sums of "
             "lines.</p>"]
    if manifest is not None:
        parts.append(f"<p>Run {_e(manifest['version'])} of {_e(manifest['month'])}; inputs "
                     f"and code are listed with their hashes in manifest.json.</p>")
    parts.append("<h2>Totals by SO and FSP</h2>" + _table(
        ["SO", "FSP", "payable £", "held £", "lines"], _totals(lines), numeric=(2, 3, 4)))
    parts.append("<h2>Invoice lines</h2>" + _table(
        ["line", "kind", "description", "quantity", "unit", "rate £", "amount £", "status"],
        ([r["line_id"], r["kind"], r["description"], r["quantity"], r["unit"], r["rate"],
          pounds(r["amount_pence"]), r["status"] + (f": {r['hold_reason']}" if r["hold_reason"]
                                                    else "")]
         for r in lines.iter_rows(named=True)), numeric=(3, 5, 6)))
    parts.append("<h2>Blocking problems</h2>" + (_table(
        ["kind", "contract", "instruction", "asset", "what", "what to do"],
        ([r["kind"], r["contract_id"], r["instruction_id"], r["asset_id"], r["detail"],
          r["action"]] for r in problems.iter_rows(named=True)))
        if problems.height else "<p>None: every line is payable.</p>"))
    if diff is not None:
        parts.append("<h2>Changes since the previous run</h2>" + (_table(
            ["line", "before £", "after £", "change £", "why"],
            ([r["line_id"], r["before"], r["after"], r["change"], r["why"]]
             for r in diff.iter_rows(named=True)), numeric=(1, 2, 3))
            if diff.height else "<p>No invoice line changed.</p>"))
    excluded = s.instructions.filter(~pl.col("status").is_in(["settle", "failed"]))
    if fsp is not None:
        excluded = excluded.filter(pl.col("fsp") == fsp)
    mine = set(s.instructions.filter(pl.col("fsp") == fsp)["id"].to_list()) \
        if fsp is not None else None
    shown = [block for iid, block in events.items() if mine is None or iid in mine]
    parts.append("<h2>Dispatches</h2>" + ("".join(shown) or "<p>No dispatches to settle.</p>"))
    if excluded.height:
        parts.append("<h2>Not settled</h2>" + _table(
            ["instruction", "contract", "why"],
            ([r["id"], r["contract_id"], r["reason"]] for r in excluded.iter_rows(named=True))))
    parts.append("</body></html>\n")
    return "".join(parts)
