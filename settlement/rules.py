"""Contract rules as values settlement applies, and the money arithmetic.

Money is exact: energy and capacity-hours are rounded to six decimal places (1 Wh, 1 W·h)
and turned into :class:`~decimal.Decimal`; prices are decimals from the contracts file;
each invoice line's amount is rounded once, to the penny, half away from zero, and kept as
integer pence. Totals are sums of lines, so they add up exactly.
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from baselines.methods import PRESETS, Fixed, Method, PreEvent, SameDayAdjustment, XofY
from contracts.model import BaselineRule

PENNY = Decimal("0.01")
QUANTITY = Decimal("0.000001")


class RuleError(ValueError):
    """A contract's rule that settlement cannot apply; names the contract and the field."""


def quantity(value: float) -> Decimal:
    """An energy (MWh) or capacity-time (MW·h) as an exact decimal, to 1 Wh."""
    return Decimal(repr(float(value))).quantize(QUANTITY, rounding=ROUND_HALF_UP)


def pence(amount: Decimal) -> int:
    """An amount in £ rounded once to the penny (half away from zero), in integer pence."""
    return int((amount.quantize(PENNY, rounding=ROUND_HALF_UP) * 100).to_integral_value())


def exact(value: Decimal) -> str:
    """A decimal as plain text without trailing zeros and without losing a digit."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def pounds(value_pence: int) -> str:
    """Integer pence as a £ amount with two decimals (``-1234`` → ``-12.34``)."""
    sign = "-" if value_pence < 0 else ""
    whole, part = divmod(abs(value_pence), 100)
    return f"{sign}{whole}.{part:02d}"


def baseline_method(contract_id: str, rule: BaselineRule
                    ) -> tuple[Method, SameDayAdjustment | None]:
    """The baselines method a contract's rule names.

    ``method``: a preset (``10_of_10``, ``high_4_of_5``, ``mid_8_of_10``,
    ``previous_3_weeks``), ``x_of_y`` (params override ``mid_8_of_10``'s), ``pre_event``
    (params ``window_minutes``, ``gap_minutes``), ``zero`` or ``fixed`` (params ``kwh``).
    ``params.adjustment`` (a mapping of :class:`SameDayAdjustment` fields) adds a same-day
    adjustment to an X-of-Y method.
    """
    params: dict[str, Any] = dict(rule.params)
    adjustment_params = params.pop("adjustment", None)
    try:
        method: Method
        if rule.method in PRESETS:
            method = dataclasses.replace(PRESETS[rule.method], **params)
        elif rule.method == "x_of_y":
            method = dataclasses.replace(PRESETS["mid_8_of_10"], **params)
        elif rule.method == "pre_event":
            method = PreEvent(**params)
        elif rule.method == "zero":
            method = Fixed(0.0)
        elif rule.method == "fixed":
            method = Fixed(float(params["kwh"]))
        else:
            known = ", ".join([*PRESETS, "x_of_y", "pre_event", "zero", "fixed"])
            raise RuleError(f"contract {contract_id}: baseline.method {rule.method!r} is not "
                            f"one of {known}")
        adjustment = None
        if adjustment_params is not None:
            if not isinstance(method, XofY):
                raise RuleError(f"contract {contract_id}: baseline.params.adjustment applies "
                                "to X-of-Y methods only")
            fields = dict(adjustment_params)
            if "off_for" in fields:
                fields["off_for"] = frozenset(fields["off_for"])
            adjustment = SameDayAdjustment(**fields)
    except (TypeError, ValueError, KeyError) as exc:
        if isinstance(exc, RuleError):
            raise
        raise RuleError(f"contract {contract_id}: baseline rule {rule.method!r} with params "
                        f"{rule.params}: {exc}") from exc
    return method, adjustment
