"""The ``baselines`` command on real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.baselines.test_methods import event, readings


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "baselines.cli", *args],
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_cli_computes_from_files_and_writes_the_explained_rows(tmp_path: Path,
                                                               suffix: str) -> None:
    """mid 8 of 10 with the capped additive adjustment: 26.1 (see test_methods)."""
    data, events = readings(), event()
    if suffix == "csv":
        data.drop("estimated").write_csv(tmp_path / "r.csv")
        events.write_csv(tmp_path / "e.csv")
    else:
        data.write_parquet(tmp_path / "r.parquet")
        events.write_parquet(tmp_path / "e.parquet")
    out = tmp_path / "out.csv"
    result = _run("--readings", str(tmp_path / f"r.{suffix}"), "--events",
                  str(tmp_path / f"e.{suffix}"), "--method", "mid_8_of_10", "--adjust",
                  "additive", "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = pl.read_csv(out)
    assert table["baseline_kwh"].to_list() == pytest.approx([26.1, 26.1])
    assert set(table.columns) >= {"selected_days", "flags", "params", "adjustment", "period"}
    assert "wrote 2 rows for 1 events" in result.stderr
    assert not list(tmp_path.glob("*.partial"))


def test_cli_names_a_missing_column(tmp_path: Path) -> None:
    readings().drop("kwh").write_csv(tmp_path / "r.csv")
    event().write_csv(tmp_path / "e.csv")
    result = _run("--readings", str(tmp_path / "r.csv"), "--events", str(tmp_path / "e.csv"),
                  "--out", str(tmp_path / "o.csv"))
    assert result.returncode == 1
    assert "missing column(s) ['kwh']" in result.stderr
    assert not (tmp_path / "o.csv").exists()


def test_cli_help_lists_methods() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for name in ("mid_8_of_10", "high_4_of_5", "10_of_10", "previous_3_weeks", "--adjust"):
        assert name in result.stdout


def test_cli_reads_a_parquet_dataset_directory(tmp_path: Path) -> None:
    """A directory of Parquet files (partitioned by month, say, with other files beside
    them) is read as one data set."""
    data = readings()
    dataset = tmp_path / "meter-data"
    for month, part in ((1, data.filter(pl.col("start").dt.month() == 1)),
                        (2, data.filter(pl.col("start").dt.month() == 2))):
        (dataset / f"month=2026-{month:02d}").mkdir(parents=True)
        part.write_parquet(dataset / f"month=2026-{month:02d}" / "part-0.parquet")
    (dataset / "README.txt").write_text("not data")
    event().write_csv(tmp_path / "e.csv")
    result = _run("--readings", str(dataset), "--events", str(tmp_path / "e.csv"),
                  "--method", "mid_8_of_10", "--out", str(tmp_path / "o.parquet"))
    assert result.returncode == 0, result.stderr
    assert pl.read_parquet(tmp_path / "o.parquet")["baseline_kwh"].to_list() == \
        pytest.approx([21.75, 21.75])
