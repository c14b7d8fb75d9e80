"""Runs are reproducible, versioned, compared with the previous one, and all or nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.io import load_contracts
from settlement import run as run_module
from settlement.meterdata import ingest
from settlement.run import run
from tests.settlement.fixture import MONTH, meter_rows, write_inputs
from tests.settlement.test_end_to_end import settle_fixture


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_same_inputs_give_byte_identical_runs(tmp_path: Path) -> None:
    """Two runs into two places: every file, manifest and report included, is the same."""
    first = settle_fixture(tmp_path / "a")
    second = settle_fixture(tmp_path / "b")
    assert _files(first.directory) == _files(second.directory)
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"contracts", "dispatch_log", "meter_data"}
    assert manifest["inputs"]["meter_data"]["files"]
    assert len(manifest["code"]["source_sha256"]) == 64
    assert manifest["outputs"]["invoice_lines.parquet"]


def test_late_data_makes_a_new_version_with_the_differences(tmp_path: Path) -> None:
    """Run without B1's readings of 10 Oct, ingest them late, run again: v002 says which
    lines moved, by how much and why; v001 is left as it was."""
    missing = {("B1", dt.date(2026, 10, 10))}
    first = settle_fixture(tmp_path, meters=meter_rows(skip=missing))
    before = _files(first.directory)
    late = meter_rows().join(meter_rows(skip=missing), on=["meter_id", "period_start"],
                             how="anti")
    late.write_csv(tmp_path / "late.csv")
    book = load_contracts(tmp_path / "inputs" / "contracts.json")
    intake = ingest(tmp_path / "late.csv", book, tmp_path / "dataset",
                    quarantine=tmp_path / "quarantine")
    assert intake.stored == 48 and intake.merged == 0
    second = run(book=book, contracts_path=tmp_path / "inputs" / "contracts.json",
                 log_path=tmp_path / "inputs" / "dispatch-log.parquet",
                 dataset=tmp_path / "dataset", month=MONTH, out=tmp_path / "runs")
    assert (first.version, second.version) == ("v001", "v002")
    assert _files(first.directory) == before
    assert second.diff is not None
    diff = {r["line_id"]: r for r in second.diff.iter_rows(named=True)}
    assert set(diff) == {f"{MONTH}:C2:availability", f"{MONTH}:C2:utilisation:I4"}
    i4 = diff[f"{MONTH}:C2:utilisation:I4"]
    assert (i4["before"], i4["after"], i4["change"]) == ("0.00", "45.00", "45.00")
    assert "held → payable" in i4["why"] and "meter_data" in i4["why"]
    assert (second.directory / "diff.csv").exists()
    manifest = json.loads((second.directory / "manifest.json").read_text())
    assert manifest["previous"] == "v001"


def test_a_failing_run_leaves_no_version_behind(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    settle_fixture(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "_write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        settle_fixture(tmp_path)
    month_dir = tmp_path / "runs" / MONTH
    assert sorted(p.name for p in month_dir.iterdir()) == ["v001"]


def test_a_killed_run_leaves_no_version_and_the_next_run_clears_its_remains(
        tmp_path: Path) -> None:
    """kill -9 mid-run: no vNNN appears; the next run removes the dead run's hidden
    partial directory and writes v001."""
    paths = write_inputs(tmp_path / "inputs")
    book = load_contracts(paths["contracts"])
    ingest(paths["meters"], book, tmp_path / "dataset", quarantine=tmp_path / "q")
    month_dir = tmp_path / "runs" / MONTH
    month_dir.mkdir(parents=True)
    # A run killed while writing: stop it right after it has made its partial directory.
    script = (
        "import os, signal, sys\n"
        "from settlement import run as r\n"
        "real = r._write\n"
        "def stop(directory, *a, **k):\n"
        "    (directory / 'invoice_lines.parquet').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "r._write = stop\n"
        "from settlement.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    killed = subprocess.run(
        [sys.executable, "-c", script, "run", "--month", MONTH, "--contracts",
         str(paths["contracts"]), "--dispatch-log", str(paths["log"]), "--dataset",
         str(tmp_path / "dataset"), "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == -9, killed.stderr
    leftovers = list(month_dir.iterdir())
    assert [p.name.startswith(".v001.partial-") for p in leftovers] == [True]
    result = run(book=book, contracts_path=paths["contracts"], log_path=paths["log"],
                 dataset=tmp_path / "dataset", month=MONTH, out=tmp_path / "runs")
    assert result.version == "v001"
    assert sorted(p.name for p in month_dir.iterdir()) == ["v001"]
    assert os.path.getsize(result.directory / "invoice_lines.parquet") > 100


def test_cli_run_prints_totals_and_the_report(tmp_path: Path) -> None:
    paths = write_inputs(tmp_path / "inputs")
    root = Path(__file__).resolve().parents[2]
    ingest_result = subprocess.run(
        [sys.executable, "-m", "settlement.cli", "ingest", "--contracts",
         str(paths["contracts"]), "--dataset", str(tmp_path / "dataset"), str(paths["meters"])],
        capture_output=True, text=True, check=False, cwd=root)
    assert ingest_result.returncode == 0, ingest_result.stderr
    assert "13254 rows in = 13254 stored + 0 merged + 0 quarantined" in ingest_result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "settlement.cli", "run", "--month", MONTH, "--contracts",
         str(paths["contracts"]), "--dispatch-log", str(paths["log"]), "--dataset",
         str(tmp_path / "dataset"), "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, check=False, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "payable £840.10, held £0.00" in result.stdout
    assert "report.html" in result.stdout and "settling 2026-10" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "settlement.cli", "run", "--month", MONTH, "--contracts",
         str(paths["contracts"]), "--dispatch-log", str(tmp_path / "nope.parquet"),
         "--dataset", str(tmp_path / "dataset")],
        capture_output=True, text=True, check=False, cwd=root)
    assert missing.returncode == 2 and "no dispatch log there" in missing.stderr
    assert "Traceback" not in missing.stderr
