"""Shared fixtures: a small sample market and a fixed clock for tests without sockets."""

from __future__ import annotations

import datetime as dt

import pytest

from contracts.io import ContractBook
from contracts.model import Contract
from contracts.sample import build_sample

TODAY = dt.date(2026, 3, 2)  # a Monday in GMT
NOW = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)


def small_book(today: dt.date | None = TODAY) -> ContractBook:
    return build_sample(n_sos=2, n_fsps=4, n_assets=24, n_contracts=24, seed=3, today=today)


@pytest.fixture
def book() -> ContractBook:
    return small_book()


def pick(book: ContractBook, *, service: str = "dynamic", so: str | None = None,
         fsp: str | None = None, exclude: tuple[str, ...] = ()) -> Contract:
    """The first contract matching; fails the test if there is none."""
    for contract in book.contracts.values():
        if (contract.service == service and (so is None or contract.so == so)
                and (fsp is None or contract.fsp == fsp) and contract.id not in exclude):
            return contract
    raise AssertionError(f"no {service} contract for so={so} fsp={fsp} in the sample")
