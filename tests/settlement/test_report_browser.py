"""The HTML report opened in a real headless browser (Debian's Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest

from settlement.rules import pounds
from settlement.run import RunResult
from tests.settlement.test_end_to_end import settle_fixture

pytestmark = pytest.mark.browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed; ./dev setup installs the Debian package")
    return found


def browse(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={page.parent / '.chromium'}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svgs = 0
        self.polylines: list[str] = []
        self.ids: dict[str, str] = {}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        if tag == "polyline":
            self.polylines.append(named.get("class") or "")
        self._open = named.get("id")

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.ids[self._open] = self.ids.get(self._open, "") + data


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return settle_fixture(tmp_path_factory.mktemp("report"))


def test_the_report_renders_with_a_plot_per_dispatch_and_the_parquet_totals(
        settled: RunResult) -> None:
    page = settled.directory / "report.html"
    dumped = browse(page, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout)
    settled_ids = settled.settlement.instructions.filter(
        pl.col("status").is_in(["settle", "failed"]))["id"].to_list()
    assert dom.svgs == len(settled_ids) == 5
    assert dom.polylines.count("series-baseline") == 5
    assert dom.polylines.count("series-metered") == 5
    lines = pl.read_parquet(settled.directory / "invoice_lines.parquet")
    payable = int(lines.filter(pl.col("status") == "payable")["amount_pence"].sum())
    assert dom.ids["total-payable"] == f"£{pounds(payable)}" == "£840.10"
    for instruction in settled_ids:
        assert re.search(rf"id=\"event-{instruction}\"", dumped.stdout)


def test_the_report_paints_a_page(settled: RunResult, tmp_path: Path) -> None:
    """A screenshot of the page is a real picture, not a blank one."""
    shot = tmp_path / "report.png"
    result = browse(settled.directory / "report.html", f"--screenshot={shot}",
                    "--window-size=1200,1600")
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_each_fsp_page_holds_only_its_own_lines(settled: RunResult) -> None:
    page = settled.directory / "fsp" / "FSPB.html"
    dumped = browse(page, "--dump-dom")
    dom = _Dom()
    dom.feed(dumped.stdout)
    assert dom.ids["total-payable"] == "£155.00"
    assert dom.svgs == 2 and "C1" not in dumped.stdout.split("<h2>Dispatches</h2>")[1]
