"""The contract model, the canonical file and its loader."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from contracts.cli import main as contracts_main
from contracts.io import ContractsFileError, dump_contracts, load_contracts
from contracts.model import ServiceWindow
from contracts.sample import build_sample
from tests.conftest import TODAY, small_book

LONDON = "Europe/London"


def test_sample_has_the_requested_size_and_round_trips(tmp_path: Path) -> None:
    """The default sample is 3 SOs, 50 FSPs, 2,000 assets, 300 contracts and reloads equal."""
    book = build_sample(today=TODAY)
    assert (len(book.system_operators), len(book.fsps), len(book.assets),
            len(book.contracts)) == (3, 50, 2000, 300)
    dump_contracts(book, tmp_path / "c.json")
    assert load_contracts(tmp_path / "c.json").to_document() == book.to_document()


def test_sample_is_reproducible() -> None:
    """The same seed and date give the same market."""
    assert small_book().to_document() == small_book().to_document()


def test_every_fsp_holds_a_whole_day_contract() -> None:
    """The demo relies on each FSP having a contract valid at any hour."""
    book = build_sample(today=TODAY)
    whole_day = {c.fsp for c in book.contracts.values() if c.service in ("dynamic", "restore")}
    assert whole_day == set(book.fsps)


def _raw(tmp_path: Path) -> dict:
    path = tmp_path / "c.json"
    dump_contracts(small_book(), path)
    return json.loads(path.read_text())


def test_loader_reports_every_bad_row_with_position_field_and_reason(tmp_path: Path) -> None:
    """Three bad rows in three sections give three problems naming file, row and field."""
    raw = _raw(tmp_path)
    raw["assets"][2]["import_kw"] = -5
    raw["contracts"][1]["direction"] = "sideways"
    raw["fsps"][0]["name"] = ""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ContractsFileError) as caught:
        load_contracts(path)
    problems = caught.value.problems
    found = {(p.position, p.field) for p in problems}
    assert found == {("assets[2] (id A000003)", "import_kw"),
                     ("contracts[1] (id C00002)", "direction"), ("fsps[0] (id FSP001)", "name")}
    assert all(p.file == str(path) for p in caught.value.problems)
    assert "sideways" in str(caught.value) or "turn_down" in str(caught.value)


def test_cross_references_are_checked(tmp_path: Path) -> None:
    """A contract naming an unknown SO and another FSP's asset is refused with both reasons."""
    raw = _raw(tmp_path)
    contract = raw["contracts"][0]
    contract["so"] = "NOPE"
    other = next(a for a in raw["assets"] if a["fsp"] != contract["fsp"])
    contract["assets"] = [*contract["assets"], other["id"]]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ContractsFileError) as caught:
        load_contracts(path)
    reasons = [p.reason for p in caught.value.problems]
    assert any("unknown system operator 'NOPE'" in r for r in reasons)
    assert any(f"asset {other['id']!r} belongs to" in r for r in reasons)


def test_duplicate_ids_and_unknown_sections_are_refused(tmp_path: Path) -> None:
    """A repeated contract id and a misspelt section are both reported."""
    raw = _raw(tmp_path)
    raw["contracts"].append(raw["contracts"][0])
    raw["contract"] = []
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ContractsFileError) as caught:
        load_contracts(path)
    reasons = {(p.field, p.reason) for p in caught.value.problems}
    assert ("contract", "unknown section") in reasons
    assert ("id", f"duplicate id {raw['contracts'][0]['id']!r}") in reasons


def test_not_json_names_the_line(tmp_path: Path) -> None:
    """A syntax error is reported with its line and column."""
    path = tmp_path / "bad.json"
    path.write_text('{\n "fsps": [,]\n}')
    with pytest.raises(ContractsFileError) as caught:
        load_contracts(path)
    assert caught.value.problems[0].position.startswith("line 2")


def _window(start: str, end: str, days: tuple[str, ...] = ("mon",)) -> ServiceWindow:
    return ServiceWindow(days=days, start_time=dt.time.fromisoformat(start),
                         end_time=dt.time.fromisoformat(end))


def test_overnight_window_runs_into_the_next_day() -> None:
    """22:00–06:00 on Monday contains Tuesday 05:00 local time."""
    book = small_book()
    contract = next(iter(book.contracts.values())).model_copy(update={
        "windows": (_window("22:00", "06:00"),)})
    monday = dt.datetime(2026, 3, 2, 23, 0, tzinfo=dt.UTC)
    assert contract.window_containing(monday, monday + dt.timedelta(hours=6)) is not None
    assert contract.window_containing(monday, monday + dt.timedelta(hours=8)) is None


def test_touching_windows_join_so_an_instruction_may_cross_midnight() -> None:
    """Whole-day windows on Monday and Tuesday contain 23:00–01:00; Monday alone does not."""
    book = small_book()
    base = next(iter(book.contracts.values()))
    both = base.model_copy(update={"windows": (_window("00:00", "00:00", ("mon", "tue")),)})
    monday_only = base.model_copy(update={"windows": (_window("00:00", "00:00"),)})
    late = dt.datetime(2026, 3, 2, 23, 0, tzinfo=dt.UTC)
    two_hours = dt.timedelta(hours=2)
    assert both.window_containing(late, late + two_hours) == (
        dt.datetime(2026, 3, 2, 0, 0, tzinfo=ZoneInfo("Europe/London")),
        dt.datetime(2026, 3, 4, 0, 0, tzinfo=ZoneInfo("Europe/London")))
    assert monday_only.window_containing(late, late + two_hours) is None
    gap = base.model_copy(update={"windows": (_window("16:00", "20:00", ("mon",)),
                                              _window("20:30", "22:00", ("mon",)))})
    evening = dt.datetime(2026, 3, 2, 19, 0, tzinfo=dt.UTC)
    assert gap.window_containing(evening, evening + two_hours) is None


def test_windows_are_local_time_across_the_clock_change() -> None:
    """A 16:00–20:00 London window is 16:00Z in winter and 15:00Z in summer."""
    book = small_book()
    contract = next(iter(book.contracts.values())).model_copy(update={
        "windows": (_window("16:00", "20:00", ("mon", "tue", "wed", "thu", "fri", "sat",
                                                "sun")),),
        "start_date": dt.date(2026, 1, 1), "end_date": dt.date(2026, 12, 31)})
    winter = dt.datetime(2026, 3, 2, 16, 0, tzinfo=dt.UTC)
    summer = dt.datetime(2026, 6, 1, 15, 0, tzinfo=dt.UTC)
    hour = dt.timedelta(hours=1)
    assert contract.window_containing(winter, winter + hour) is not None
    assert contract.window_containing(summer, summer + hour) is not None
    assert contract.window_containing(summer - hour, summer) is None


def test_cli_sample_writes_contracts_config_and_private_tokens(tmp_path: Path) -> None:
    """``contracts sample`` writes a loadable file, a config and a 600-mode token file."""
    assert contracts_main(["sample", "--out", str(tmp_path), "--fsps", "5", "--assets", "20",
                           "--contracts", "10"]) == 0
    assert len(load_contracts(tmp_path / "contracts.json").contracts) == 10
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    tokens = json.loads((tmp_path / "tokens.json").read_text())
    assert set(tokens["fsp"]) == {f"FSP{i:03d}" for i in range(1, 6)}
    assert tokens["fsp"]["FSP001"] not in (tmp_path / "config.toml").read_text()


def test_cli_check_lists_problems_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    """``contracts check`` exits 1 and prints each problem."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"fsps": [{"id": "F1"}]}))
    assert contracts_main(["check", str(path)]) == 1
    assert "fsps[0] (id F1): name: Field required" in capsys.readouterr().err
